//! Client tests against a scripted fake engine on 127.0.0.1:0, one thread per test. Every
//! blocking read on either side has a timeout, so a broken client fails instead of hanging.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::proto::{
    decode_frame, encode_control, encode_data, encode_frame, error_code, DataHeader, Decoded,
    DeliveryMode, Frame, Gap, Hello, SubAck, Subscribe, TopicPosition, Welcome, WireError,
    DATA_FLAG_SNAPSHOT,
};

const STEP: Duration = Duration::from_secs(5);

/// What the fake engine received, owned.
#[derive(Debug, PartialEq)]
enum Got {
    Hello(Hello),
    Subscribe(Subscribe),
    Publish { topic: String, payload: Vec<u8> },
    Ping(u64),
    Pong(u64),
    StatsRequest,
    Eof,
}

struct FakeConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Successful reads that returned data (to observe batching).
    reads: usize,
}

impl FakeConn {
    fn accept(listener: &TcpListener) -> FakeConn {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(STEP)).unwrap();
        FakeConn {
            stream,
            buf: Vec::new(),
            reads: 0,
        }
    }

    fn read(&mut self) -> Got {
        loop {
            if let Decoded::Frame(frame, used) = decode_frame(&self.buf, 1 << 20).unwrap() {
                let got = match frame {
                    Frame::Hello(h) => Got::Hello(h),
                    Frame::Subscribe(s) => Got::Subscribe(s),
                    Frame::Publish(p) => Got::Publish {
                        topic: p.topic.to_string(),
                        payload: p.payload.to_vec(),
                    },
                    Frame::Ping { nonce } => Got::Ping(nonce),
                    Frame::Pong { nonce } => Got::Pong(nonce),
                    Frame::StatsRequest => Got::StatsRequest,
                    other => panic!("fake engine got an unexpected frame {other:?}"),
                };
                self.buf.drain(..used);
                return got;
            }
            let mut chunk = [0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).expect("fake engine read");
            if n == 0 {
                return Got::Eof;
            }
            self.reads += 1;
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn send(&mut self, frames: &[Frame<'_>]) {
        let mut out = Vec::new();
        for frame in frames {
            encode_frame(&mut out, frame);
        }
        self.stream.write_all(&out).unwrap();
    }

    /// Reads HELLO and answers WELCOME with the keep-alive asked for.
    fn handshake(&mut self) -> Hello {
        self.handshake_as(77)
    }

    /// As `handshake`, for an engine run with the given `engine_id`.
    fn handshake_as(&mut self, engine_id: u64) -> Hello {
        let Got::Hello(hello) = self.read() else {
            panic!("expected HELLO")
        };
        self.send(&[Frame::Welcome(Welcome {
            version: crate::proto::PROTOCOL_VERSION,
            keepalive_ms: hello.keepalive_ms,
            max_frame_bytes: 1 << 20,
            max_subscriptions: 100,
            reactor: 0,
            connection_id: 1,
            engine_id,
            engine_version: String::new(),
        })]);
        hello
    }

    fn expect_subscribe(&mut self) -> Subscribe {
        match self.read() {
            Got::Subscribe(s) => s,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        }
    }
}

fn data(topic: &str, seq: u64, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let header = DataHeader {
        seq,
        source_ts_ns: 1,
        ingest_ts_ns: 2,
        quality: 192,
        flags,
    };
    encode_data(&mut out, &header, topic, payload);
    out
}

fn suback(sub_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    encode_control(
        &mut out,
        &Frame::SubAck(SubAck {
            sub_id,
            mode: DeliveryMode::All,
        }),
    );
    out
}

fn fast_opts(addr: std::net::SocketAddr) -> ClientOptions {
    ClientOptions::new(addr.to_string())
        .client_id("unit")
        .connect_timeout(STEP)
        .reconnect(Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(10),
        })
}

fn listener() -> (TcpListener, std::net::SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

fn message(topic: &str, seq: u64, snapshot: bool) -> Event {
    Event::Message(Message {
        topic: topic.into(),
        seq,
        source_ts_ns: 1,
        ingest_ts_ns: 2,
        quality: 192,
        snapshot,
        restored: false,
        payload: format!("{topic}#{seq}").into_bytes(),
    })
}

fn collect(sub: &mut Subscriber, n: usize) -> Vec<Event> {
    let deadline = Instant::now() + STEP;
    let mut events = Vec::new();
    while events.len() < n && Instant::now() < deadline {
        if let Some(e) = sub.next_event(Duration::from_millis(200)).unwrap() {
            events.push(e);
        }
    }
    events
}

#[test]
fn subscriber_resumes_from_tracked_positions_and_drops_duplicates() {
    let (l, addr) = listener();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let engine = thread::spawn(move || {
        let mut c1 = FakeConn::accept(&l);
        c1.handshake();
        let s = c1.expect_subscribe();
        assert_eq!((s.sub_id, s.pattern.as_str()), (1, "a/#"));
        assert!(s.resume.is_empty());
        let mut out = suback(1);
        out.extend(data("a/x", 1, DATA_FLAG_SNAPSHOT, b"a/x#1"));
        out.extend(data("a/x", 2, 0, b"a/x#2"));
        out.extend(data("a/y", 5, 0, b"a/y#5"));
        c1.stream.write_all(&out).unwrap();
        drop(c1); // mid-stream: the client must come back with its positions

        let mut c2 = FakeConn::accept(&l);
        c2.handshake();
        let s = c2.expect_subscribe();
        let mut out = suback(s.sub_id);
        out.extend(data("a/x", 2, 0, b"a/x#2")); // overlaps what was delivered
        out.extend(data("a/x", 3, 0, b"a/x#3"));
        encode_control(
            &mut out,
            &Frame::Gap(Gap {
                topic: "a/y".into(),
                from_seq: 6,
                to_seq: 7,
            }),
        );
        out.extend(data("a/y", 8, 0, b"a/y#8"));
        c2.stream.write_all(&out).unwrap();
        done_rx.recv_timeout(STEP).unwrap();
        s.resume
    });

    let mut sub = Subscriber::connect(
        fast_opts(addr),
        vec![SubscriptionSpec::new("a/#", DeliveryMode::All)],
    )
    .unwrap();
    let events = collect(&mut sub, 7);
    done_tx.send(()).unwrap();
    let resume = engine.join().unwrap();

    assert_eq!(
        resume,
        vec![
            TopicPosition {
                topic: "a/x".into(),
                last_seq: 2
            },
            TopicPosition {
                topic: "a/y".into(),
                last_seq: 5
            },
        ]
    );
    assert_eq!(
        events,
        vec![
            message("a/x", 1, true),
            message("a/x", 2, false),
            message("a/y", 5, false),
            Event::Reconnected {
                attempt: 1,
                engine_restarted: false
            },
            message("a/x", 3, false),
            Event::Gap {
                topic: "a/y".into(),
                from_seq: 6,
                to_seq: 7
            },
            message("a/y", 8, false),
        ]
    );
    let c = sub.counters();
    assert_eq!(c.duplicates_dropped, 1);
    assert_eq!((c.messages, c.gaps, c.gap_messages), (5, 1, 2));
    assert_eq!((c.disconnects, c.reconnects), (1, 1));
    assert_eq!(sub.last_seq("a/y"), Some(8));
}

#[test]
fn resume_positions_go_only_to_matching_subscriptions() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c1 = FakeConn::accept(&l);
        c1.handshake();
        let (a, b, c) = (
            c1.expect_subscribe(),
            c1.expect_subscribe(),
            c1.expect_subscribe(),
        );
        let mut out = suback(a.sub_id);
        out.extend(suback(b.sub_id));
        out.extend(suback(c.sub_id));
        out.extend(data("p/1/v", 4, 0, b"p/1/v#4"));
        out.extend(data("q/z", 9, 0, b"q/z#9"));
        c1.stream.write_all(&out).unwrap();
        drop(c1);
        let mut c2 = FakeConn::accept(&l);
        c2.handshake();
        let (a, b, c) = (
            c2.expect_subscribe(),
            c2.expect_subscribe(),
            c2.expect_subscribe(),
        );
        let mut out = suback(a.sub_id);
        out.extend(suback(b.sub_id));
        out.extend(suback(c.sub_id));
        c2.stream.write_all(&out).unwrap();
        (a, b, c)
    });
    let mut sub = Subscriber::connect(
        fast_opts(addr),
        vec![
            SubscriptionSpec::new("p/+/v", DeliveryMode::Latest),
            SubscriptionSpec::new("q/#", DeliveryMode::All),
            SubscriptionSpec::new("r/#", DeliveryMode::All),
        ],
    )
    .unwrap();
    let events = collect(&mut sub, 3);
    assert_eq!(
        events[2],
        Event::Reconnected {
            attempt: 1,
            engine_restarted: false
        }
    );
    let (a, b, c) = engine.join().unwrap();
    // Nothing seen on r/#: the empty-topic position asks for a resume, not a snapshot.
    assert_eq!(
        c.resume,
        vec![TopicPosition {
            topic: String::new(),
            last_seq: 0
        }]
    );
    assert_eq!(
        (a.pattern.as_str(), a.mode),
        ("p/+/v", DeliveryMode::Latest)
    );
    assert_eq!(
        a.resume,
        vec![TopicPosition {
            topic: "p/1/v".into(),
            last_seq: 4
        }]
    );
    assert_eq!(
        b.resume,
        vec![TopicPosition {
            topic: "q/z".into(),
            last_seq: 9
        }]
    );
}

#[test]
fn next_batch_decodes_many_frames_per_read_without_copying() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c = FakeConn::accept(&l);
        c.handshake();
        c.expect_subscribe();
        let mut out = suback(1);
        for seq in 1..=500 {
            out.extend(data("t/x", seq, 0, format!("t/x#{seq}").as_bytes()));
        }
        c.stream.write_all(&out).unwrap();
        // Keep the connection open until the client has read everything.
        assert_eq!(c.read(), Got::Eof);
    });
    let opts = fast_opts(addr).read_buffer_bytes(64 * 1024);
    let mut sub =
        Subscriber::connect(opts, vec![SubscriptionSpec::new("t/#", DeliveryMode::All)]).unwrap();
    let mut seqs = Vec::new();
    let mut calls = 0;
    let deadline = Instant::now() + STEP;
    // Zero timeouts: the non-blocking path must still read and decode.
    while seqs.len() < 500 && Instant::now() < deadline {
        let n = sub
            .next_batch(Duration::ZERO, |e| match e {
                EventRef::Message(m) => {
                    assert_eq!(m.payload, format!("t/x#{}", m.seq).as_bytes());
                    seqs.push(m.seq);
                }
                other => panic!("unexpected {other:?}"),
            })
            .unwrap();
        calls += usize::from(n > 0);
    }
    assert_eq!(seqs, (1..=500).collect::<Vec<_>>());
    let started = Instant::now();
    assert_eq!(sub.next_batch(Duration::ZERO, |_| {}).unwrap(), 0);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert!(calls < 100, "{calls} calls for 500 frames: not batching");
    drop(sub);
    engine.join().unwrap();
}

#[test]
fn subscriber_answers_pings_keeps_alive_and_replaces_a_silent_engine() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c1 = FakeConn::accept(&l);
        let hello = c1.handshake();
        assert_eq!(hello.keepalive_ms, 100);
        c1.expect_subscribe();
        let mut out = suback(1);
        encode_frame(&mut out, &Frame::Ping { nonce: 42 });
        c1.stream.write_all(&out).unwrap();
        assert_eq!(c1.read(), Got::Pong(42));
        // Idle: the client must PING on its own within its keep-alive.
        assert!(matches!(c1.read(), Got::Ping(_)));
        // Now say nothing: after one keep-alive of silence the client must give up on c1.
        let mut c2 = FakeConn::accept(&l);
        c2.handshake();
        c2.expect_subscribe();
        let mut out = suback(1);
        out.extend(data("k/a", 1, 0, b"k/a#1"));
        c2.stream.write_all(&out).unwrap();
        assert_eq!(c2.read(), Got::Eof);
        drop(c1);
    });
    let opts = fast_opts(addr).keepalive_ms(100);
    let mut sub =
        Subscriber::connect(opts, vec![SubscriptionSpec::new("k/#", DeliveryMode::All)]).unwrap();
    let events = collect(&mut sub, 2);
    assert_eq!(
        events,
        vec![
            Event::Reconnected {
                attempt: 1,
                engine_restarted: false
            },
            message("k/a", 1, false)
        ]
    );
    assert!(
        sub.last_disconnect_reason()
            .is_some_and(|r| r.contains("nothing heard")),
        "{:?}",
        sub.last_disconnect_reason()
    );
    assert!(sub.counters().pings_sent >= 1);
    drop(sub);
    engine.join().unwrap();
}

#[test]
fn publisher_batches_frames_and_confirm_surfaces_engine_errors() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c = FakeConn::accept(&l);
        c.handshake();
        let mut payloads = Vec::new();
        loop {
            match c.read() {
                Got::Publish { topic, payload } => {
                    assert_eq!(topic, "t/x");
                    payloads.push(payload);
                }
                Got::Ping(nonce) => {
                    c.send(&[Frame::Pong { nonce }]);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let reads = c.reads;
        // The next publish is "refused".
        assert!(matches!(c.read(), Got::Publish { .. }));
        c.send(&[Frame::Error(WireError {
            code: error_code::BAD_TOPIC,
            reason: "not allowed".into(),
        })]);
        let Got::Ping(nonce) = c.read() else {
            panic!("expected PING")
        };
        c.send(&[Frame::Pong { nonce }]);
        assert_eq!(c.read(), Got::Eof);
        (payloads, reads)
    });
    let mut p = Publisher::connect(fast_opts(addr)).unwrap();
    for i in 0..1000u32 {
        p.publish("t/x", format!("{i:08}").as_bytes()).unwrap();
    }
    p.confirm(STEP).unwrap();
    let c = p.counters();
    assert_eq!(c.published, 1000);
    assert!(c.writes <= 3, "{} writes for 1000 frames", c.writes);

    p.publish("t/x", b"refused").unwrap();
    match p.confirm(STEP) {
        Err(ClientError::Engine { code, reason }) => {
            assert_eq!(code, error_code::BAD_TOPIC);
            assert_eq!(reason, "not allowed");
        }
        other => panic!("expected the engine's ERROR, got {other:?}"),
    }
    drop(p);
    let (payloads, reads) = engine.join().unwrap();
    let expected: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| format!("{i:08}").into_bytes())
        .collect();
    assert_eq!(payloads, expected);
    assert!(reads < 100, "engine needed {reads} reads");
}

#[test]
fn publisher_reports_lost_frames_then_reconnects() {
    let (l, addr) = listener();
    let (closed_tx, closed_rx) = mpsc::channel::<()>();
    let engine = thread::spawn(move || {
        let mut c1 = FakeConn::accept(&l);
        c1.handshake();
        c1.stream.shutdown(std::net::Shutdown::Both).unwrap();
        drop(c1);
        closed_tx.send(()).unwrap();
        let mut c2 = FakeConn::accept(&l);
        c2.handshake();
        let mut publishes = Vec::new();
        loop {
            match c2.read() {
                Got::Publish { payload, .. } => publishes.push(payload),
                Got::Ping(nonce) => {
                    c2.send(&[Frame::Pong { nonce }]);
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        publishes
    });
    let mut p = Publisher::connect(fast_opts(addr)).unwrap();
    closed_rx.recv_timeout(STEP).unwrap();
    // The first flush after the close sees EOF; if the FIN were still in flight, the write
    // would go to the kernel and the next round would see the reset.
    let mut lost = None;
    for i in 0..100 {
        p.publish("t/a", format!("before-{i}").as_bytes()).unwrap();
        if let Err(e) = p.flush() {
            lost = Some(e);
            break;
        }
    }
    match lost {
        Some(ClientError::ConnectionLost { lost_frames, .. }) => assert_eq!(lost_frames, 1),
        other => panic!("expected ConnectionLost, got {other:?}"),
    }
    assert_eq!(p.counters().lost, 1);
    assert!(p.welcome().is_none());

    let deadline = Instant::now() + STEP;
    loop {
        match p.publish("t/a", b"after") {
            Ok(()) => break,
            Err(ClientError::Reconnecting { retry_in }) => thread::sleep(retry_in),
            Err(e) => panic!("{e}"),
        }
        assert!(Instant::now() < deadline, "never reconnected");
    }
    p.confirm(STEP).unwrap();
    assert_eq!(p.counters().reconnects, 1);
    assert_eq!(engine.join().unwrap(), vec![b"after".to_vec()]);
}

#[test]
fn invalid_topics_and_patterns_are_refused_before_sending() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c = FakeConn::accept(&l);
        c.handshake();
        c.read()
    });
    let mut p = Publisher::connect(fast_opts(addr)).unwrap();
    for bad in ["a/+/b", "a/#", "", "x\0y"] {
        match p.publish(bad, b"v") {
            Err(ClientError::Topic { topic, .. }) => assert_eq!(topic, bad),
            other => panic!("{bad:?}: {other:?}"),
        }
    }
    let long = "t".repeat(2000);
    assert!(matches!(
        p.publish(&long, b"v"),
        Err(ClientError::Topic { .. })
    ));
    let err = p.publish("a/+", b"v").unwrap_err().to_string();
    assert!(err.contains("a/+") && err.contains("wildcard"), "{err}");
    assert_eq!(p.buffered_frames(), 0);
    drop(p);
    assert_eq!(engine.join().unwrap(), Got::Eof);

    // Patterns are checked before any connection is tried (nothing listens on this port).
    match Subscriber::connect(
        ClientOptions::new("127.0.0.1:1"),
        vec![SubscriptionSpec::new("a/#/b", DeliveryMode::All)],
    ) {
        Err(ClientError::Pattern { pattern, .. }) => assert_eq!(pattern, "a/#/b"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("connected?"),
    }
}

#[test]
fn connect_and_handshake_failures_are_typed() {
    let (l, addr) = listener();
    drop(l);
    match Publisher::connect(fast_opts(addr)) {
        Err(ClientError::Connect { addr: a, .. }) => assert_eq!(a, addr.to_string()),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("connected to a closed port"),
    }
    assert!(matches!(
        Publisher::connect(ClientOptions::new("no-port-here")),
        Err(ClientError::Connect { .. })
    ));

    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c = FakeConn::accept(&l);
        assert!(matches!(c.read(), Got::Hello(_)));
        c.send(&[Frame::Error(WireError {
            code: error_code::VERSION,
            reason: "version 1 not supported".into(),
        })]);
        let mut c = FakeConn::accept(&l);
        assert!(matches!(c.read(), Got::Hello(_)));
        drop(c);
    });
    match Subscriber::connect(fast_opts(addr), vec![]) {
        Err(e @ ClientError::Engine { .. }) => {
            assert!(!e.is_retryable());
            assert!(e.to_string().contains("VERSION"), "{e}");
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("handshake succeeded"),
    }
    assert!(matches!(
        Publisher::connect(fast_opts(addr)),
        Err(ClientError::Handshake(_))
    ));
    engine.join().unwrap();
}

#[test]
fn the_client_asks_for_the_engine_version_and_falls_back_for_an_older_engine() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        // A current engine: the client asks, WELCOME tells.
        let mut c = FakeConn::accept(&l);
        let Got::Hello(hello) = c.read() else {
            panic!("expected HELLO")
        };
        assert_eq!(hello.features, crate::proto::hello_features::ENGINE_VERSION);
        c.send(&[Frame::Welcome(Welcome {
            version: crate::proto::PROTOCOL_VERSION,
            engine_id: 5,
            engine_version: "9.8.7".into(),
            ..Welcome::default()
        })]);
        // An engine older than HELLO's features refuses the trailing bytes as MALFORMED; the
        // client tries once more without them.
        let mut old = FakeConn::accept(&l);
        assert!(matches!(old.read(), Got::Hello(h) if h.features != 0));
        old.send(&[Frame::Error(WireError {
            code: error_code::MALFORMED,
            reason: "HELLO: 1 trailing bytes".into(),
        })]);
        let mut again = FakeConn::accept(&l);
        assert_eq!(again.handshake().features, 0);
        (c, again)
    });
    let current = Publisher::connect(fast_opts(addr)).unwrap();
    assert_eq!(current.welcome().unwrap().engine_version, "9.8.7");
    let older = Publisher::connect(fast_opts(addr)).unwrap();
    let welcome = older.welcome().unwrap();
    assert_eq!(
        (welcome.engine_id, welcome.engine_version.as_str()),
        (77, "")
    );
    drop(engine.join().unwrap());
}

#[test]
fn stats_is_one_round_trip() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c = FakeConn::accept(&l);
        c.handshake();
        assert_eq!(c.read(), Got::StatsRequest);
        c.send(&[Frame::Stats("{\"connections\":1}".into())]);
        assert_eq!(c.read(), Got::Eof);
    });
    assert_eq!(stats(&fast_opts(addr)).unwrap(), "{\"connections\":1}");
    engine.join().unwrap();
}

#[test]
fn patterns_match_like_mqtt() {
    let cases = [
        ("a/b", "a/b", true),
        ("a/b", "a/c", false),
        ("a/+", "a/b", true),
        ("a/+", "a/b/c", false),
        ("a/+/c", "a/b/c", true),
        ("a/#", "a", true),
        ("a/#", "a/b/c", true),
        ("#", "x/y", true),
        ("+", "x", true),
        ("+", "x/y", false),
        ("a/b/c", "a/b", false),
        ("plant/#", "plant/line1/temp", true),
    ];
    for (pattern, topic, expected) in cases {
        assert_eq!(
            pattern_matches(pattern, topic),
            expected,
            "{pattern} vs {topic}"
        );
    }
}

#[test]
fn backoff_is_exponential_capped_and_fully_jittered() {
    let b = Backoff {
        initial: Duration::from_millis(100),
        max: Duration::from_secs(2),
    };
    assert_eq!(b.ceiling(0), Duration::from_millis(100));
    assert_eq!(b.ceiling(3), Duration::from_millis(800));
    assert_eq!(b.ceiling(5), Duration::from_secs(2));
    assert_eq!(b.ceiling(200), Duration::from_secs(2));
    assert_eq!(b.delay(4, 0), Duration::ZERO);
    assert!(b.delay(4, u64::MAX) <= b.ceiling(4));
    assert_eq!(b.delay(0, u64::MAX / 2), Duration::from_nanos(49_999_999));

    // A thousand clients dropped together draw their first waits across the whole interval.
    let waits: Vec<Duration> = (0..1000)
        .map(|_| {
            let mut r = options::Reconnect::new(b);
            let now = Instant::now();
            r.on_lost(now);
            r.next_at - now
        })
        .collect();
    assert!(waits.iter().all(|w| *w <= b.ceiling(0)));
    let early = waits
        .iter()
        .filter(|w| **w < Duration::from_millis(50))
        .count();
    assert!(
        (350..=650).contains(&early),
        "{early} of 1000 in the first half"
    );
}

#[test]
fn a_restarted_engine_voids_the_positions_instead_of_dropping_its_messages_as_duplicates() {
    let (l, addr) = listener();
    let engine = thread::spawn(move || {
        let mut c1 = FakeConn::accept(&l);
        c1.handshake_as(1);
        let s = c1.expect_subscribe();
        let mut out = suback(s.sub_id);
        out.extend(data("t", 5, 0, b"t#5"));
        c1.stream.write_all(&out).unwrap();
        drop(c1);
        // The engine restarted: its sequence numbers begin at 1 again.
        let mut c2 = FakeConn::accept(&l);
        c2.handshake_as(2);
        let s2 = c2.expect_subscribe();
        let mut out = suback(s2.sub_id);
        out.extend(data("t", 1, 0, b"t#1"));
        c2.stream.write_all(&out).unwrap();
        let _ = c2.read(); // hold the connection until the client is done
        s2
    });
    let mut sub = Subscriber::connect(
        fast_opts(addr),
        vec![SubscriptionSpec::new("t", DeliveryMode::All)],
    )
    .unwrap();
    let events = collect(&mut sub, 3);
    assert_eq!(events[0], message("t", 5, false));
    assert_eq!(
        events[1],
        Event::Reconnected {
            attempt: 1,
            engine_restarted: true
        }
    );
    assert_eq!(
        events[2],
        message("t", 1, false),
        "run 2's first message was dropped"
    );
    drop(sub);
    let resubscribe = engine.join().unwrap();
    assert_eq!(
        resubscribe.resume,
        vec![TopicPosition {
            topic: String::new(),
            last_seq: 0
        }],
        "positions of run 1 were sent to run 2"
    );
}
