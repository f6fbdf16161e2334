//! The engine binary over loopback, driven by the client library and by raw sockets:
//! wildcard delivery across reactors, per-topic order, 1,000 subscribers, keep-alive,
//! malformed input, resume through a cut connection, clean shutdown.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lanpush::client::{
    Backoff, ClientOptions, Event, Message, Publisher, Subscriber, SubscriptionSpec,
};
use lanpush::proto::{error_code, DataHeader, DeliveryMode, Frame};
use util::{noise, Got, Proxy, Raw, Server, STEP};

fn opts(server: &Server, id: &str) -> ClientOptions {
    ClientOptions::new(server.addr_string())
        .client_id(id)
        .connect_timeout(STEP)
}

fn all(pattern: &str) -> SubscriptionSpec {
    SubscriptionSpec::new(pattern, DeliveryMode::All)
}

/// Reads messages until `done` says so or `timeout` passes; returns them in arrival order.
fn read_until(
    sub: &mut Subscriber,
    timeout: Duration,
    mut done: impl FnMut(&[Message]) -> bool,
) -> Vec<Message> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) && Instant::now() < deadline {
        match sub
            .next_event(Duration::from_millis(100))
            .expect("next_event")
        {
            Some(Event::Message(m)) => got.push(m),
            Some(other) => panic!("unexpected event {other:?}"),
            None => {}
        }
    }
    got
}

#[test]
fn wildcards_deliver_across_reactor_threads() {
    let server = Server::start();
    let mut publisher = Publisher::connect(opts(&server, "wild-pub")).unwrap();
    let pub_reactor = publisher.welcome().unwrap().reactor;
    let patterns = || vec![all("plant/+/temp"), all("plant/line2/#")];
    // Connections land on reactors as the kernel spreads them: open subscribers until one
    // shares the publisher's reactor and one does not.
    let (mut same, mut other) = (None, None);
    for i in 0..64 {
        let s = Subscriber::connect(opts(&server, &format!("wild-sub-{i}")), patterns()).unwrap();
        if s.welcome().unwrap().reactor == pub_reactor {
            same.get_or_insert(s);
        } else {
            other.get_or_insert(s);
        }
        if same.is_some() && other.is_some() {
            break;
        }
    }
    let (Some(mut same), Some(mut other)) = (same, other) else {
        panic!("64 connections all landed on the same side of reactor {pub_reactor}");
    };

    for (topic, value) in [
        ("plant/line1/temp", "21.5"),     // + level
        ("plant/line2/temp", "22.0"),     // both patterns (delivered once by the client)
        ("plant/line2/pressure", "1.01"), // # level
        ("plant/line2", "root"),          // # matches nothing too
        ("plant/line1/pressure", "0.99"), // neither
        ("plant/line1/temp/x", "deep"),   // + is exactly one level
    ] {
        publisher.publish(topic, value.as_bytes()).unwrap();
    }
    publisher.confirm(STEP).unwrap();

    let expected: BTreeSet<(String, String)> = [
        ("plant/line1/temp", "21.5"),
        ("plant/line2/temp", "22.0"),
        ("plant/line2/pressure", "1.01"),
        ("plant/line2", "root"),
    ]
    .iter()
    .map(|(t, v)| (t.to_string(), v.to_string()))
    .collect();
    for (name, sub) in [("same reactor", &mut same), ("other reactor", &mut other)] {
        let got = read_until(sub, STEP, |g| g.len() >= expected.len());
        let set: BTreeSet<(String, String)> = got
            .iter()
            .map(|m| {
                assert_eq!(m.seq, 1, "{name}: {m:?}");
                assert!(!m.snapshot, "{name}: {m:?}");
                (
                    m.topic.clone(),
                    String::from_utf8(m.payload.clone()).unwrap(),
                )
            })
            .collect();
        assert_eq!(set, expected, "{name}");
        assert_eq!(got.len(), expected.len(), "{name}: {got:?}");
        // Nothing that should not match turns up afterwards.
        let extra = sub.next_event(Duration::from_millis(300)).unwrap();
        assert!(extra.is_none(), "{name}: unexpected {extra:?}");
    }
}

#[test]
fn messages_arrive_in_order_per_topic() {
    const PER_TOPIC: u64 = 2000;
    let server = Server::start();
    let mut sub = Subscriber::connect(opts(&server, "order-sub"), vec![all("order/#")]).unwrap();
    // Two publishers (most likely on different reactors), each interleaving its own topics.
    let publishers: Vec<_> = (0..2)
        .map(|p| {
            let o = opts(&server, &format!("order-pub-{p}"));
            thread::spawn(move || {
                let mut publisher = Publisher::connect(o).unwrap();
                for i in 1..=PER_TOPIC {
                    for t in 0..3 {
                        let topic = format!("order/p{p}/t{t}");
                        publisher.publish(&topic, i.to_string().as_bytes()).unwrap();
                    }
                }
                publisher.confirm(STEP).unwrap();
            })
        })
        .collect();
    let total = (2 * 3 * PER_TOPIC) as usize;
    let got = read_until(&mut sub, Duration::from_secs(60), |g| g.len() >= total);
    for p in publishers {
        p.join().unwrap();
    }
    assert_eq!(got.len(), total);
    let mut per_topic: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
    for m in &got {
        let value: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
        per_topic
            .entry(m.topic.clone())
            .or_default()
            .push((m.seq, value));
    }
    assert_eq!(per_topic.len(), 6);
    for (topic, seen) in per_topic {
        let expected: Vec<(u64, u64)> = (1..=PER_TOPIC).map(|i| (i, i)).collect();
        assert!(seen == expected, "{topic}: out of order or missing");
    }
    assert_eq!(sub.counters().duplicates_dropped, 0);
}

#[test]
fn a_thousand_concurrent_subscribers_all_receive() {
    const SUBSCRIBERS: usize = 1000;
    const MESSAGES: u64 = 10;
    // Each subscriber is a socket here and one in the engine (a child: it inherits the limit).
    let limit = util::raise_fd_limit(4 * SUBSCRIBERS as u64);
    assert!(
        limit >= 2 * SUBSCRIBERS as u64 + 64,
        "open-files limit {limit} is too low for this test"
    );
    let server = Server::start();
    let mut subs: Vec<Subscriber> = (0..SUBSCRIBERS)
        .map(|i| {
            let o = opts(&server, &format!("fan-{i}"))
                .keepalive_ms(120_000)
                .read_buffer_bytes(4096);
            Subscriber::connect(o, vec![all("fan/#")])
                .unwrap_or_else(|e| panic!("subscriber {i}: {e}"))
        })
        .collect();
    let reactors: BTreeSet<u16> = subs.iter().map(|s| s.welcome().unwrap().reactor).collect();
    assert_eq!(reactors.len(), 2, "subscribers on reactors {reactors:?}");

    let mut publisher = Publisher::connect(opts(&server, "fan-pub")).unwrap();
    for i in 1..=MESSAGES {
        publisher
            .publish("fan/t", i.to_string().as_bytes())
            .unwrap();
    }
    publisher.confirm(STEP).unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    for (i, sub) in subs.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let got = read_until(sub, left, |g| g.len() as u64 >= MESSAGES);
        let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=MESSAGES).collect::<Vec<_>>(), "subscriber {i}");
    }
}

#[test]
fn a_silent_peer_is_closed_after_its_keepalive() {
    let server = Server::start();
    let mut raw = Raw::connect(server.addr);
    let welcome = raw.hello(200);
    assert_eq!(welcome.keepalive_ms, 200);
    // Say nothing more (not even PONG to the engine's PINGs).
    let (error, after) = raw.expect_error_then_close(Duration::from_secs(5));
    assert_eq!(error.code, error_code::KEEPALIVE_TIMEOUT, "{error:?}");
    assert!(
        after >= Duration::from_millis(200),
        "closed after {after:?}, before one keep-alive"
    );

    // A peer that keeps talking at the keep-alive pace stays.
    let mut raw = Raw::connect(server.addr);
    raw.hello(200);
    let until = Instant::now() + Duration::from_millis(900);
    let mut nonce = 0;
    while Instant::now() < until {
        nonce += 1;
        raw.send(&Frame::Ping { nonce });
        loop {
            match raw.read(STEP) {
                Some(Got::Pong(n)) if n == nonce => break,
                Some(Got::Ping(n)) => raw.send(&Frame::Pong { nonce: n }),
                other => panic!("a live peer got {other:?}"),
            }
        }
        // Pace the pings well inside the window; this is the peer's behaviour, not a sync.
        thread::sleep(Duration::from_millis(80));
    }
}

/// Misbehaving peers, each paired with the ERROR code the engine must answer before closing
/// (`None`: any code; random bytes can fail several ways).
fn bad_peers() -> Vec<(&'static str, bool, Vec<u8>, Option<u16>)> {
    let data_from_client = {
        let mut out = Vec::new();
        lanpush::proto::encode_data(&mut out, &DataHeader::default(), "x", b"y");
        out
    };
    vec![
        // (name, send HELLO first, bytes, expected code)
        (
            "oversized length",
            true,
            vec![0xff, 0xff, 0xff, 0x7f, 0x10],
            Some(error_code::FRAME_TOO_LARGE),
        ),
        (
            "unknown kind",
            true,
            vec![1, 0, 0, 0, 0x99],
            Some(error_code::MALFORMED),
        ),
        (
            "zero length",
            true,
            vec![0, 0, 0, 0],
            Some(error_code::MALFORMED),
        ),
        (
            "truncated PUBLISH body",
            true,
            vec![3, 0, 0, 0, 0x10, 1, 2],
            Some(error_code::MALFORMED),
        ),
        (
            "DATA from a client",
            true,
            data_from_client,
            Some(error_code::UNEXPECTED_FRAME),
        ),
        (
            "PING before HELLO",
            false,
            vec![9, 0, 0, 0, 0x20, 1, 2, 3, 4, 5, 6, 7, 8],
            Some(error_code::HANDSHAKE),
        ),
        ("random bytes", false, noise(0x5eed, 512), None),
        ("random bytes after HELLO", true, noise(0xbeef, 2048), None),
    ]
}

#[test]
fn malformed_frames_get_an_error_and_a_close_while_others_carry_on() {
    const MESSAGES: u64 = 3000;
    let server = Server::start();
    let mut sub = Subscriber::connect(opts(&server, "mal-sub"), vec![all("mal/#")]).unwrap();
    let o = opts(&server, "mal-pub");
    let publisher = thread::spawn(move || {
        let mut publisher = Publisher::connect(o).unwrap();
        for i in 1..=MESSAGES {
            publisher
                .publish("mal/t", i.to_string().as_bytes())
                .unwrap();
            if i % 100 == 0 {
                publisher.flush().unwrap();
            }
        }
        publisher.confirm(STEP).unwrap();
    });
    let addr = server.addr;
    let attackers = thread::spawn(move || {
        for round in 0..3 {
            for (name, hello, bytes, code) in bad_peers() {
                let mut raw = Raw::connect(addr);
                if hello {
                    raw.hello(10_000);
                }
                raw.send_bytes(&bytes);
                let (error, _) = raw.expect_error_then_close(STEP);
                if let Some(code) = code {
                    assert_eq!(error.code, code, "round {round}, {name}: {error:?}");
                }
            }
        }
    });
    let got = read_until(&mut sub, Duration::from_secs(60), |g| {
        g.len() as u64 >= MESSAGES
    });
    publisher.join().unwrap();
    attackers.join().unwrap();
    let values: Vec<(u64, String)> = got
        .iter()
        .map(|m| (m.seq, String::from_utf8(m.payload.clone()).unwrap()))
        .collect();
    let expected: Vec<(u64, String)> = (1..=MESSAGES).map(|i| (i, i.to_string())).collect();
    assert!(
        values == expected,
        "the subscriber missed or reordered messages"
    );
    // The engine is still serving new connections.
    lanpush::client::stats(&opts(&server, "mal-stats")).unwrap();
}

#[test]
fn a_subscriber_cut_off_mid_stream_resumes_without_loss_or_duplicates() {
    const PER_TOPIC: u64 = 3000;
    let server = Server::start();
    let proxy = Proxy::start(server.addr);
    let sub_opts = ClientOptions::new(proxy.addr.to_string())
        .client_id("resume-sub")
        .connect_timeout(STEP)
        .reconnect(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        });
    // The cut makes the subscriber come back on a new connection (a new local port).
    let mut sub = Subscriber::connect(sub_opts, vec![all("res/#")]).unwrap();
    let o = opts(&server, "resume-pub");
    // The cut comes when the publisher is half-way, and the publisher waits for it: the second
    // half can only reach the subscriber after it reconnects. (Cutting after the subscriber had
    // *handled* half raced the client library, which may already have read everything.)
    let half_published = Arc::new(AtomicBool::new(false));
    let cut_done = Arc::new(AtomicBool::new(false));
    let (half, done) = (half_published.clone(), cut_done.clone());
    let publisher = thread::spawn(move || {
        let mut publisher = Publisher::connect(o).unwrap();
        for i in 1..=PER_TOPIC {
            for topic in ["res/a", "res/b"] {
                publisher.publish(topic, i.to_string().as_bytes()).unwrap();
            }
            if i % 50 == 0 {
                publisher.confirm(STEP).unwrap();
            }
            if i == PER_TOPIC / 2 {
                half.store(true, Ordering::SeqCst);
                let until = Instant::now() + STEP;
                while !done.load(Ordering::SeqCst) && Instant::now() < until {
                    thread::sleep(Duration::from_millis(1));
                }
            }
        }
        publisher.confirm(STEP).unwrap();
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let mut got: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let (mut total, mut cut, mut reconnected) = (0u64, false, 0);
    while total < 2 * PER_TOPIC && Instant::now() < deadline {
        if !cut && half_published.load(Ordering::SeqCst) {
            proxy.cut();
            cut = true;
            cut_done.store(true, Ordering::SeqCst);
        }
        match sub.next_event(Duration::from_millis(100)).unwrap() {
            Some(Event::Message(m)) => {
                let v: u64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                assert_eq!(v, m.seq, "{m:?}");
                got.entry(m.topic).or_default().push(m.seq);
                total += 1;
            }
            Some(Event::Reconnected { .. }) => reconnected += 1,
            Some(Event::Gap {
                topic,
                from_seq,
                to_seq,
            }) => {
                panic!("GAP {topic} {from_seq}..={to_seq}: the default ring should hold this run")
            }
            None => {}
        }
    }
    publisher.join().unwrap();
    assert!(cut);
    assert_eq!(reconnected, 1, "{:?}", sub.last_disconnect_reason());
    for topic in ["res/a", "res/b"] {
        let seqs = got.get(topic).cloned().unwrap_or_default();
        assert!(
            seqs == (1..=PER_TOPIC).collect::<Vec<_>>(),
            "{topic}: {} messages, not exactly 1..={PER_TOPIC} in order",
            seqs.len()
        );
    }
    // Anything the engine re-sent across the cut was dropped by the client, and counted.
    let c = sub.counters();
    assert_eq!(c.messages, 2 * PER_TOPIC);
    assert_eq!(c.reconnects, 1);
}

#[test]
fn sigterm_shuts_down_cleanly() {
    let mut server = Server::start();
    let mut sub = Subscriber::connect(opts(&server, "term-sub"), vec![all("term/#")]).unwrap();
    let mut publisher = Publisher::connect(opts(&server, "term-pub")).unwrap();
    publisher.publish("term/x", b"1").unwrap();
    publisher.confirm(STEP).unwrap();
    let got = read_until(&mut sub, STEP, |g| !g.is_empty());
    assert_eq!(got.len(), 1);

    server.terminate();
    let status = server
        .wait_exit(STEP)
        .unwrap_or_else(|| panic!("still running {STEP:?} after SIGTERM"));
    assert!(
        status.success(),
        "exit status {status:?}; stderr:\n{}",
        server.stderr()
    );
}

/// Not a correctness test: how fast the client library moves 64-byte messages through the
/// engine (1 publisher → 1 subscriber). Run with
/// `cargo test --release --test engine -- --ignored --nocapture client_throughput`.
#[test]
#[ignore]
fn client_throughput() {
    const MESSAGES: u64 = 2_000_000;
    let server = Server::start();
    let mut sub = Subscriber::connect(opts(&server, "tp-sub"), vec![all("tp/#")]).unwrap();
    let o = opts(&server, "tp-pub");
    let started = Instant::now();
    let publisher = thread::spawn(move || {
        let mut publisher = Publisher::connect(o).unwrap();
        let payload = [b'x'; 64];
        for _ in 0..MESSAGES {
            publisher.publish("tp/t", &payload).unwrap();
        }
        publisher.confirm(STEP).unwrap();
        (started.elapsed(), publisher.counters())
    });
    // A subscriber slower than the publisher may be told of a GAP (the replay ring moved on):
    // every seq is accounted for either way.
    let (mut received, mut lost, mut last_seq) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while last_seq < MESSAGES && Instant::now() < deadline {
        sub.next_batch(Duration::from_millis(100), |e| match e {
            lanpush::client::EventRef::Message(m) => {
                assert_eq!(m.seq, last_seq + 1);
                last_seq = m.seq;
                received += 1;
            }
            lanpush::client::EventRef::Gap {
                from_seq, to_seq, ..
            } => {
                assert_eq!(from_seq, last_seq + 1);
                last_seq = to_seq;
                lost += to_seq - from_seq + 1;
            }
            other => panic!("{other:?}"),
        })
        .unwrap();
    }
    let elapsed = started.elapsed();
    let (pub_elapsed, counters) = publisher.join().unwrap();
    assert_eq!(received + lost, MESSAGES);
    println!(
        "published {MESSAGES} in {pub_elapsed:?} ({:.0}/s, {:.0} frames/write); \
         received {received} (+{lost} reported in GAPs) in {elapsed:?} ({:.0}/s)",
        MESSAGES as f64 / pub_elapsed.as_secs_f64(),
        counters.published as f64 / counters.writes as f64,
        received as f64 / elapsed.as_secs_f64()
    );
}
