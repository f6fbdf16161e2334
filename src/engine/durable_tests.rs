//! Durable sessions on the virtual clock (`durable.rs`): kept after a close, resumed by the next
//! connection of the id (any reactor), expired, bounded, and two live connections of one id.

use std::time::Duration;

use super::core_tests::data;
use super::harness::{Client, Cluster, Got};
use crate::proto::{DeliveryMode, TopicPosition, SESSION_MARKER_SEQ};

fn marker() -> Vec<TopicPosition> {
    vec![TopicPosition {
        topic: String::new(),
        last_seq: SESSION_MARKER_SEQ,
    }]
}

fn durable_sub(c: &mut Cluster, shard: u16, id: &str) -> Client {
    let sub = c.connect(shard, id);
    c.subscribe_from(sub, 1, "p/#", DeliveryMode::All, marker());
    c.run();
    sub
}

fn counts(c: &Cluster) -> (usize, usize) {
    let n = c.shared.durable.counts();
    (n.sessions, n.live)
}

#[test]
fn a_session_is_kept_after_a_close_and_resumed_on_another_reactor() {
    let mut c = Cluster::new(2, |_| {});
    let publisher = c.connect(1, "gw");
    c.publish(publisher, "p/a", b"1");
    c.run();
    let sub = durable_sub(&mut c, 0, "hmi1");
    assert_eq!(
        data(&c.recv(sub)),
        [("p/a".into(), 1, true)],
        "new: snapshot"
    );
    c.publish(publisher, "p/a", b"2");
    c.run();
    assert_eq!(data(&c.recv(sub)), [("p/a".into(), 2, false)]);
    c.hang_up(sub);
    assert_eq!(counts(&c), (1, 0));

    for v in [b"3", b"4"] {
        c.publish(publisher, "p/a", v);
    }
    c.publish(publisher, "p/b", b"new topic");
    c.run();
    let again = durable_sub(&mut c, 1, "hmi1");
    let mut got = data(&c.recv(again));
    got.sort();
    assert_eq!(
        got,
        [
            ("p/a".into(), 3, false),
            ("p/a".into(), 4, false),
            ("p/b".into(), 1, false)
        ],
        "what was missed, no duplicate, the topic that appeared meanwhile from its start"
    );
}

#[test]
fn a_subscribe_without_the_marker_or_without_a_client_id_is_not_durable() {
    let mut c = Cluster::new(1, |_| {});
    let old = c.connect(0, "old-client");
    c.subscribe(old, 1, "p/#", DeliveryMode::All);
    let anonymous = c.connect(0, "");
    c.subscribe_from(anonymous, 1, "p/#", DeliveryMode::All, marker());
    c.run();
    assert_eq!(counts(&c), (0, 0));
    c.hang_up(old);
    c.hang_up(anonymous);
    assert_eq!(counts(&c), (0, 0));
}

#[test]
fn a_session_expires_client_session_expiry_s_after_its_close() {
    let mut c = Cluster::new(1, |config| config.limits.client_session_expiry_s = 5);
    let sub = durable_sub(&mut c, 0, "hmi1");
    c.hang_up(sub);
    let publisher = c.connect(0, "gw");
    c.publish(publisher, "p/a", b"1");
    c.publish(publisher, "p/a", b"2");
    c.run();
    c.advance(Duration::from_secs(6));
    let again = durable_sub(&mut c, 0, "hmi1");
    assert_eq!(
        data(&c.recv(again)),
        [("p/a".into(), 2, true)],
        "expired: a new session, a snapshot"
    );
    assert_eq!(counts(&c), (1, 1));
}

#[test]
fn sessions_are_bounded_the_one_closed_longest_ago_goes_first() {
    let mut c = Cluster::new(1, |config| config.limits.max_durable_sessions = 2);
    for id in ["a", "b", "c"] {
        let sub = durable_sub(&mut c, 0, id);
        c.hang_up(sub);
    }
    assert_eq!(counts(&c), (2, 0));
    // Two live sessions fill the bound: a third id is served, but not durably.
    let b = durable_sub(&mut c, 0, "b");
    let cc = durable_sub(&mut c, 0, "c");
    let a = durable_sub(&mut c, 0, "a");
    assert_eq!(counts(&c), (2, 2));
    assert!(c.session_durable(a).is_none());
    assert!(c.session_durable(b).is_some() && c.session_durable(cc).is_some());
    let bytes = c.shared.durable.counts().bytes;
    assert!(bytes > 0 && bytes < 1024, "{bytes}");
}

#[test]
fn two_live_connections_of_one_id_share_the_session_and_both_merge_into_it() {
    let mut c = Cluster::new(2, |_| {});
    let publisher = c.connect(1, "gw");
    let first = durable_sub(&mut c, 0, "hmi1");
    let second = durable_sub(&mut c, 1, "hmi1");
    assert_eq!(counts(&c), (1, 1), "one session, with a live connection");
    assert!(c.session_durable(first).is_some() && c.session_durable(second).is_some());
    c.publish(publisher, "p/a", b"1");
    c.run();
    assert_eq!(data(&c.recv(first)), [("p/a".into(), 1, false)]);
    assert_eq!(data(&c.recv(second)), [("p/a".into(), 1, false)]);
    c.hang_up(first);
    assert_eq!(counts(&c), (1, 1), "kept, still live");
    c.publish(publisher, "p/a", b"2");
    c.run();
    c.recv(second);
    c.hang_up(second);
    c.publish(publisher, "p/a", b"3");
    c.run();
    let third = durable_sub(&mut c, 0, "hmi1");
    assert_eq!(
        data(&c.recv(third)),
        [("p/a".into(), 3, false)],
        "the highest position of the two"
    );
}

#[test]
fn a_gap_written_moves_the_position_so_it_is_not_reported_twice() {
    let mut c = Cluster::new(1, |config| config.retained.ring_bytes = 1024);
    let sub = durable_sub(&mut c, 0, "hmi1");
    c.hang_up(sub);
    let publisher = c.connect(0, "gw");
    for i in 0..100u32 {
        c.publish(publisher, "p/a", format!("{i:0>50}").as_bytes());
    }
    c.run();
    let again = durable_sub(&mut c, 0, "hmi1");
    let got: Vec<Got> = c
        .recv(again)
        .into_iter()
        .filter(|g| !matches!(g, Got::SubAck { .. }))
        .collect();
    let Some(Got::Gap { from: 1, to, .. }) = got.first().cloned() else {
        panic!("no GAP first: {got:?}");
    };
    assert_eq!(data(&got).last().map(|d| d.1), Some(100));
    assert!(to > 1 && to < 100, "{to}");
    c.hang_up(again);
    let third = durable_sub(&mut c, 0, "hmi1");
    assert_eq!(
        c.recv(third),
        [Got::SubAck {
            sub_id: 1,
            mode: DeliveryMode::All
        }],
        "nothing new: no GAP again, no duplicate"
    );
}
