//! In-process engine tests over loopback: the embedding path and the cross-shard hand-off.
//! (The binary's behaviour is covered by the integration tests in `tests/`.)

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::*;
use crate::proto::{decode_frame, encode_frame, Decoded, DeliveryMode, Frame, Hello, Subscribe};

fn engine(threads: usize) -> Engine {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.threads = threads;
    config.server.pin_threads = false;
    Engine::start(config).unwrap()
}

/// A raw protocol client that owns its decoded frames as (kind-name, topic, seq, payload).
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
    reactor: u16,
}

#[derive(Debug, PartialEq)]
enum Got {
    Data {
        topic: String,
        seq: u64,
        snapshot: bool,
        payload: Vec<u8>,
    },
    Other(String),
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
            reactor: 0,
        };
        raw.send(&Frame::Hello(Hello {
            version: 1,
            client_id: "test".into(),
            keepalive_ms: 0,
            token: String::new(),
            features: 0,
        }));
        match raw.next_frame_kind() {
            Got::Other(s) if s.starts_with("Welcome") => {
                raw.reactor = s
                    .split("reactor: ")
                    .nth(1)
                    .unwrap()
                    .split(',')
                    .next()
                    .unwrap()
                    .parse()
                    .unwrap();
            }
            other => panic!("expected WELCOME, got {other:?}"),
        }
        raw
    }

    fn send(&mut self, frame: &Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(&mut out, frame);
        self.stream.write_all(&out).unwrap();
    }

    /// Subscribes and returns the snapshot: the DATA frames that precede SUBACK.
    fn subscribe(&mut self, sub_id: u32, pattern: &str) -> Vec<(String, u64, bool, Vec<u8>)> {
        self.subscribe_with(sub_id, pattern, DeliveryMode::Default)
    }

    /// [`Raw::subscribe`] in a chosen delivery mode.
    fn subscribe_with(
        &mut self,
        sub_id: u32,
        pattern: &str,
        mode: DeliveryMode,
    ) -> Vec<(String, u64, bool, Vec<u8>)> {
        self.send(&Frame::Subscribe(Subscribe {
            sub_id,
            pattern: pattern.into(),
            mode,
            resume: vec![],
        }));
        let mut snapshot = Vec::new();
        loop {
            match self.next_frame_kind() {
                Got::Other(s) if s.starts_with("SubAck") => return snapshot,
                Got::Data {
                    topic,
                    seq,
                    snapshot: flag,
                    payload,
                } => snapshot.push((topic, seq, flag, payload)),
                other => panic!("expected SUBACK, got {other:?}"),
            }
        }
    }

    fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.send(&Frame::Publish(PublishRef {
            topic,
            source_ts_ns: 1,
            quality: 192,
            payload,
        }));
    }

    fn next_frame_kind(&mut self) -> Got {
        loop {
            match decode_frame(&self.buf, 1 << 20).unwrap() {
                Decoded::Frame(frame, used) => {
                    let got = match frame {
                        Frame::Data {
                            header,
                            topic,
                            payload,
                        } => Got::Data {
                            topic: topic.into(),
                            seq: header.seq,
                            snapshot: header.flags & crate::proto::DATA_FLAG_SNAPSHOT != 0,
                            payload: payload.into(),
                        },
                        other => Got::Other(format!("{other:?}")),
                    };
                    self.buf.drain(..used);
                    return got;
                }
                Decoded::NeedMore(_) => {
                    let mut chunk = [0u8; 65536];
                    let n = self
                        .stream
                        .read(&mut chunk)
                        .expect("read (timeout means a lost message)");
                    assert!(n > 0, "engine closed the connection");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    fn next_data(&mut self) -> (String, u64, bool, Vec<u8>) {
        loop {
            if let Got::Data {
                topic,
                seq,
                snapshot,
                payload,
            } = self.next_frame_kind()
            {
                return (topic, seq, snapshot, payload);
            }
        }
    }
}

/// Connects until it has one client on each of two different reactors.
fn clients_on_two_reactors(addr: SocketAddr) -> (Raw, Raw) {
    let first = Raw::connect(addr);
    loop {
        let second = Raw::connect(addr);
        if second.reactor != first.reactor {
            return (first, second);
        }
    }
}

#[test]
fn publish_crosses_reactors_in_order_through_wildcards() {
    let engine = engine(2);
    let (mut publisher, mut subscriber) = clients_on_two_reactors(engine.local_addr());
    subscriber.subscribe(1, "plant/+/temp");
    subscriber.subscribe(2, "plant/#"); // overlaps: each message must still arrive once
    for i in 0..500u32 {
        for line in ["line1", "line2"] {
            publisher.publish(&format!("plant/{line}/temp"), &i.to_le_bytes());
        }
    }
    let mut next_seq = std::collections::HashMap::new();
    for _ in 0..1000 {
        let (topic, seq, snapshot, payload) = subscriber.next_data();
        assert!(!snapshot);
        let expected = next_seq.entry(topic.clone()).or_insert(1u64);
        assert_eq!(seq, *expected, "{topic}: out of order or duplicated");
        assert_eq!(payload, ((seq - 1) as u32).to_le_bytes());
        *expected += 1;
    }
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

#[test]
fn local_publisher_reaches_socket_subscribers_and_snapshot_follows() {
    let engine = engine(2);
    let publisher = engine.publisher();
    let mut early = Raw::connect(engine.local_addr());
    early.subscribe(1, "a/#");
    for i in 0..10u8 {
        publisher.publish("a/b", &[i], 192, 0).unwrap();
        publisher.publish("a/c", &[i], 192, 0).unwrap();
    }
    for _ in 0..20 {
        early.next_data();
    }
    // A late subscriber gets the retained value of each topic, flagged snapshot, then live.
    let mut late = Raw::connect(engine.local_addr());
    let mut snap = late.subscribe(1, "a/+");
    snap.sort();
    assert_eq!(
        snap,
        vec![
            ("a/b".into(), 10, true, vec![9]),
            ("a/c".into(), 10, true, vec![9])
        ]
    );
    publisher.publish("a/b", &[42], 192, 0).unwrap();
    assert_eq!(late.next_data(), ("a/b".into(), 11, false, vec![42]));
    assert!(matches!(
        publisher.publish("a/+", b"x", 0, 0),
        Err(PublishError::Topic { .. })
    ));
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

#[test]
fn garbage_gets_an_error_and_a_close_while_others_carry_on() {
    let engine = engine(2);
    let mut subscriber = Raw::connect(engine.local_addr());
    subscriber.subscribe(1, "x");
    let mut bad = TcpStream::connect(engine.local_addr()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    bad.write_all(&[5, 0, 0, 0, 0xee, 1, 2, 3, 4]).unwrap();
    let mut reply = Vec::new();
    let started = Instant::now();
    bad.read_to_end(&mut reply).unwrap();
    assert!(started.elapsed() < Duration::from_secs(4));
    match decode_frame(&reply, 1 << 20).unwrap() {
        Decoded::Frame(Frame::Error(e), _) => {
            assert_eq!(e.code, crate::proto::error_code::MALFORMED)
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    let mut publisher = Raw::connect(engine.local_addr());
    publisher.publish("x", b"still here");
    assert_eq!(subscriber.next_data().3, b"still here");
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

fn engine_with(adjust: impl FnOnce(&mut Config)) -> Engine {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.threads = 2;
    config.server.pin_threads = false;
    adjust(&mut config);
    Engine::start(config).unwrap()
}

/// Reads until the engine closes the connection; returns the ERROR code it sent first.
fn error_then_close(stream: &mut TcpStream) -> u16 {
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .expect("the engine must close, not time out");
    let mut at = 0;
    loop {
        match decode_frame(&reply[at..], 1 << 20).unwrap() {
            Decoded::Frame(Frame::Error(e), _) => return e.code,
            Decoded::Frame(_, used) => at += used,
            Decoded::NeedMore(_) => panic!("closed without an ERROR frame"),
        }
    }
}

#[test]
fn limits_are_enforced_with_the_right_error_codes() {
    use crate::proto::error_code;
    let engine = engine_with(|c| {
        c.limits.max_connections = 3;
        c.limits.handshake_timeout_ms = 100;
        c.limits.max_subscriptions_per_connection = 2;
    });
    let addr = engine.local_addr();
    // No HELLO within the handshake timeout.
    let mut mute = TcpStream::connect(addr).unwrap();
    mute.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(error_then_close(&mut mute), error_code::HANDSHAKE_TIMEOUT);
    drop(mute);
    let deadline = Instant::now() + Duration::from_secs(5);
    while engine
        .shared
        .open_connections
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
    {
        assert!(
            Instant::now() < deadline,
            "the refused connection was never released"
        );
        std::thread::yield_now();
    }
    // A third subscription on one connection is refused; the connection stays usable.
    let mut client = Raw::connect(addr);
    client.subscribe(1, "a");
    client.subscribe(2, "b");
    client.send(&Frame::Subscribe(Subscribe {
        sub_id: 3,
        pattern: "c".into(),
        mode: DeliveryMode::Default,
        resume: vec![],
    }));
    match client.next_frame_kind() {
        Got::Other(s) => assert!(
            s.contains(&format!("code: {}", error_code::TOO_MANY_SUBSCRIPTIONS)),
            "{s}"
        ),
        other => panic!("expected ERROR, got {other:?}"),
    }
    client.publish("a", b"still works");
    assert_eq!(client.next_data().3, b"still works");
    // A reused subscription id and a bad pattern are refused too, without closing.
    client.send(&Frame::Unsubscribe(crate::proto::Unsubscribe { sub_id: 9 }));
    match client.next_frame_kind() {
        Got::Other(s) => assert!(
            s.contains(&format!("code: {}", error_code::UNKNOWN_SUBSCRIPTION)),
            "{s}"
        ),
        other => panic!("expected ERROR, got {other:?}"),
    }
    // Connections past max_connections get ERROR 9 and a close.
    let _second = Raw::connect(addr);
    let _third = Raw::connect(addr);
    let mut fourth = TcpStream::connect(addr).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(
        error_then_close(&mut fourth),
        error_code::TOO_MANY_CONNECTIONS
    );
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

#[test]
fn an_oversized_frame_is_refused_from_its_length_prefix_alone() {
    let engine = engine_with(|c| c.limits.max_frame_bytes = 4096);
    let mut raw = Raw::connect(engine.local_addr());
    // Only the prefix: the engine must not wait for (or buffer) the 1 MiB body.
    raw.stream.write_all(&(1u32 << 20).to_le_bytes()).unwrap();
    assert_eq!(
        error_then_close(&mut raw.stream),
        crate::proto::error_code::FRAME_TOO_LARGE
    );
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

#[test]
fn a_topic_belongs_to_the_reactor_of_its_first_publisher() {
    let engine = engine(2);
    let (mut subscriber, mut publisher) = clients_on_two_reactors(engine.local_addr());
    subscriber.subscribe_with(1, "own/#", DeliveryMode::All);
    // With hashed ownership about half of these would land on each reactor.
    const TOPICS: u64 = 40;
    for t in 0..TOPICS {
        publisher.publish(&format!("own/{t}"), b"v");
    }
    for t in 0..TOPICS {
        let (topic, seq, _, _) = subscriber.next_data();
        assert_eq!((topic, seq), (format!("own/{t}"), 1));
    }
    let owned = || -> Vec<u64> {
        let stats: serde_json::Value = serde_json::from_str(&engine.stats_json()).unwrap();
        stats["reactors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["topics"].as_u64().unwrap())
            .collect()
    };
    let mut expected = vec![0, 0];
    expected[publisher.reactor as usize] = TOPICS;
    // Counters are published at the end of the owner's loop turn, just after its deliveries.
    let deadline = Instant::now() + Duration::from_secs(5);
    while owned() != expected && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(owned(), expected, "topics owned per reactor");
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}

#[test]
fn subscription_changes_reach_topics_already_delivered() {
    // One reactor: every delivery below is matched by the same subscription index, which must
    // see each change at once (a cache of matches per topic was tried; it would have to too).
    let engine = engine(1);
    let addr = engine.local_addr();
    let mut publisher = Raw::connect(addr);
    let mut a = Raw::connect(addr);
    let mut b = Raw::connect(addr);
    a.subscribe(1, "m/#");
    a.subscribe(2, "z/#");
    publisher.publish("m/x", b"1");
    assert_eq!(a.next_data().1, 1);
    // A new subscription to a topic the reactor has delivered before gets its next message.
    b.subscribe(1, "m/x"); // (its snapshot, m/x #1, is read and skipped)
    publisher.publish("m/x", b"2");
    assert_eq!(a.next_data().1, 2);
    assert_eq!(b.next_data().1, 2);
    // A removed subscription gets nothing more: A's next frame is z/end, not m/x #3.
    a.send(&Frame::Unsubscribe(crate::proto::Unsubscribe { sub_id: 1 }));
    // A's PONG follows the unsubscribe's handling (one connection is read in order).
    a.send(&Frame::Ping { nonce: 1 });
    while !matches!(a.next_frame_kind(), Got::Other(s) if s.starts_with("Pong")) {}
    publisher.publish("m/x", b"3");
    publisher.publish("z/end", b"4");
    assert_eq!(b.next_data().1, 3);
    assert_eq!(a.next_data().0, "z/end");
    engine.shutdown_handle().shutdown();
    engine.join().unwrap();
}
