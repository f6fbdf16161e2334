//! Publisher acknowledgements on the virtual clock (`acks.rs`, `acks_core.rs`): cumulative,
//! one ACK per turn, across shards, duplicates of an earlier connection dropped.

use super::harness::{Client, Cluster, Got};
use crate::proto::{encode_frame, error_code, DeliveryMode, Frame, PublishRef};

fn acks(got: &[Got]) -> Vec<u64> {
    got.iter()
        .filter_map(|g| match g {
            Got::Ack { seq } => Some(*seq),
            _ => None,
        })
        .collect()
}

fn payloads(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| match g {
            Got::Data {
                payload,
                snapshot: false,
                ..
            } => Some(String::from_utf8(payload.clone()).unwrap()),
            _ => None,
        })
        .collect()
}

fn request(c: &mut Cluster, client: Client, publisher_id: u64, next_seq: u64) {
    c.send(
        client,
        &Frame::AckRequest {
            publisher_id,
            next_seq,
        },
    );
}

/// PUBLISH frames with payloads `first..=last`, in one buffer (one read).
fn publishes(topic: &str, first: u64, last: u64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in first..=last {
        let payload = i.to_string();
        encode_frame(
            &mut out,
            &Frame::Publish(PublishRef {
                topic,
                source_ts_ns: 0,
                quality: 192,
                payload: payload.as_bytes(),
            }),
        );
    }
    out
}

#[test]
fn acks_are_cumulative_and_one_per_turn_not_per_message() {
    let mut c = Cluster::new(1, |_| {});
    let publisher = c.connect(0, "gw");
    request(&mut c, publisher, 9, 1);
    c.run();
    assert_eq!(
        c.recv(publisher),
        [Got::Ack { seq: 0 }],
        "the request is answered"
    );
    // 100 PUBLISHes in one read: one ACK.
    c.send_bytes(publisher, &publishes("plant/t", 1, 100));
    c.run();
    assert_eq!(c.recv(publisher), [Got::Ack { seq: 100 }]);
    // Three reads in one turn: still one ACK, for all of them.
    for i in 101..=103 {
        c.send_bytes(publisher, &publishes("plant/t", i, i));
    }
    c.run();
    assert_eq!(c.recv(publisher), [Got::Ack { seq: 103 }]);
    // Nothing new: nothing sent.
    c.run();
    assert_eq!(c.recv(publisher), []);
    assert_eq!(c.cores[0].counters.acks_sent, 3);
}

#[test]
fn an_ack_covers_a_publish_taken_for_an_owner_on_another_shard() {
    let mut c = Cluster::new(2, |_| {});
    // The topic belongs to shard 0: its first publisher is there.
    let first = c.connect(0, "gw0");
    c.publish(first, "plant/t", b"0");
    c.run();
    let sub = c.connect(0, "hmi");
    c.subscribe(sub, 1, "plant/#", DeliveryMode::All);
    c.run();
    c.recv(sub);
    let publisher = c.connect(1, "gw1");
    request(&mut c, publisher, 1, 1);
    c.send_bytes(publisher, &publishes("plant/t", 1, 50));
    c.run();
    assert_eq!(
        acks(&c.recv(publisher)),
        [50],
        "one ACK for the request and the turn"
    );
    let expected: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    assert_eq!(
        payloads(&c.recv(sub)),
        expected,
        "what was acknowledged arrived"
    );
    assert_eq!(c.cores[1].counters.acks_sent, 1);
    assert_eq!(c.cores[0].counters.acks_sent, 0, "the owner sends no ACK");
}

#[test]
fn a_resend_after_a_reconnect_is_taken_once() {
    let mut c = Cluster::new(2, |_| {});
    let sub = c.connect(0, "hmi");
    c.subscribe(sub, 1, "plant/#", DeliveryMode::All);
    c.run();
    c.recv(sub);
    let old = c.connect(1, "gw");
    request(&mut c, old, 77, 1);
    c.send_bytes(old, &publishes("plant/t", 1, 5));
    // The connection dies before the publisher reads its ACK: it knows only of 0.
    c.hang_up(old);
    // It resends 1..=5 and goes on to 7, on another reactor. The answer to its request says
    // what the engine took already.
    let new = c.connect(0, "gw");
    request(&mut c, new, 77, 1);
    c.run();
    assert_eq!(acks(&c.recv(new)), [5]);
    c.send_bytes(new, &publishes("plant/t", 1, 7));
    c.run();
    assert_eq!(acks(&c.recv(new)), [7]);
    let expected: Vec<String> = (1..=7).map(|i| i.to_string()).collect();
    assert_eq!(payloads(&c.recv(sub)), expected, "no duplicate, no loss");
    let dups: u64 = c.cores.iter().map(|k| k.counters.publish_duplicates).sum();
    assert_eq!(dups, 5);
    // Another publisher (a new process) with the same client id is not taken for the first.
    let other = c.connect(1, "gw");
    request(&mut c, other, 78, 1);
    c.run();
    assert_eq!(
        acks(&c.recv(other)),
        [0],
        "nothing taken from this publisher yet"
    );
    c.send_bytes(other, &publishes("plant/t", 1, 2));
    c.run();
    assert_eq!(acks(&c.recv(other)), [2]);
    assert_eq!(payloads(&c.recv(sub)), ["1", "2"]);
}

#[test]
fn without_a_client_id_nothing_is_dropped() {
    let mut c = Cluster::new(1, |_| {});
    let sub = c.connect(0, "hmi");
    c.subscribe(sub, 1, "t", DeliveryMode::All);
    c.run();
    c.recv(sub);
    for _ in 0..2 {
        let p = c.connect(0, "");
        request(&mut c, p, 5, 1);
        c.send_bytes(p, &publishes("t", 1, 2));
        c.run();
        assert_eq!(acks(&c.recv(p)), [2]);
        c.hang_up(p);
    }
    assert_eq!(payloads(&c.recv(sub)), ["1", "2", "1", "2"]);
}

#[test]
fn the_ack_precedes_the_pong_and_follows_a_refusal() {
    let mut c = Cluster::new(1, |_| {});
    let p = c.connect(0, "gw");
    request(&mut c, p, 1, 10);
    let mut bytes = publishes("ok", 10, 10);
    bytes.extend(publishes("bad/#", 11, 11));
    encode_frame(&mut bytes, &Frame::Ping { nonce: 3 });
    c.send_bytes(p, &bytes);
    c.run();
    assert_eq!(
        c.recv(p),
        [
            Got::Error {
                code: error_code::BAD_TOPIC
            },
            Got::Ack { seq: 11 },
            Got::Pong { nonce: 3 }
        ],
        "a refused PUBLISH is handled; the PING is a barrier for the ACK"
    );
}

#[test]
fn a_publisher_that_does_not_read_holds_one_ack_and_gets_the_latest_when_it_does() {
    let mut c = Cluster::new(1, |_| {});
    let p = c.connect(0, "gw");
    request(&mut c, p, 1, 1);
    c.run();
    c.set_capacity(p, 0);
    // Far more turns than the 64 KiB reply bound would allow ACKs of 13 bytes.
    for i in 1..=10_000 {
        c.send_bytes(p, &publishes("t", i, i));
        c.run();
    }
    assert!(!c.is_closed(p), "not cut as a slow consumer");
    c.set_capacity(p, usize::MAX / 2);
    let got = acks(&c.recv(p));
    assert_eq!(got.last(), Some(&10_000), "{got:?}");
    assert!(got.len() <= 3, "one ACK waited, then the latest: {got:?}");
}

#[test]
fn ack_request_needs_a_handshake_and_a_first_number() {
    let mut c = Cluster::new(1, |_| {});
    let p = c.connect(0, "gw");
    request(&mut c, p, 1, 0);
    c.run();
    assert_eq!(
        c.recv(p),
        [Got::Error {
            code: error_code::MALFORMED
        }]
    );
    let raw = c.connect_raw(0, usize::MAX / 2);
    request(&mut c, raw, 1, 1);
    c.run();
    assert_eq!(
        c.recv(raw),
        [Got::Error {
            code: error_code::HANDSHAKE
        }]
    );
}
