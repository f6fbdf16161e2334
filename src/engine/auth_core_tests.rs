//! HELLOs whose password check needs argon2, on the virtual clock (`harness.rs`): the core
//! parks the connection, the harness plays the verifier thread (held back here to look at the
//! connection while it waits), and the verdict completes the HELLO (`auth_core.rs`).

use std::time::Duration;

use super::core::Verdict;
use super::guard_tests::{counter, secure};
use super::harness::{Client, Cluster, Got};
use crate::proto::{self, encode_frame, error_code, DeliveryMode, Frame, Hello};

fn hello(token: &str) -> Frame<'static> {
    Frame::Hello(Hello {
        version: proto::PROTOCOL_VERSION,
        client_id: String::new(),
        keepalive_ms: 0,
        token: token.into(),
        features: 0,
    })
}

fn bytes(frames: &[Frame<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for frame in frames {
        encode_frame(&mut out, frame);
    }
    out
}

/// A new connection that sent `token`'s HELLO, its check held back by the harness.
fn parked(c: &mut Cluster, token: &str) -> Client {
    let client = c.connect_raw(0, usize::MAX / 2);
    c.send(client, &hello(token));
    c.run();
    assert!(c.cores[0].is_verifying(client.slot), "{token} waits");
    client
}

#[test]
fn frames_pipelined_behind_a_hello_wait_for_its_verdict_then_run_in_order() {
    let mut c = secure(1, |_| {});
    let hmi = c.connect_as(0, "hmi", "hmi:hmi-pw");
    c.subscribe(hmi, 1, "plant/#", DeliveryMode::All);
    c.run();
    assert!(matches!(c.recv(hmi)[..], [Got::SubAck { .. }]));
    c.hold_verifications(true);
    let admin = c.connect_raw(0, usize::MAX / 2);
    let head = bytes(&[hello("admin:admin-pw")]);
    let rest = bytes(&[
        Frame::Subscribe(proto::Subscribe {
            sub_id: 7,
            pattern: "plant/line1/#".into(),
            mode: DeliveryMode::All,
            resume: vec![],
        }),
        Frame::Publish(proto::PublishRef {
            topic: "plant/line1/temp",
            source_ts_ns: 0,
            quality: 192,
            payload: b"21.5",
        }),
        Frame::Ping { nonce: 42 },
    ]);
    let all = [head.clone(), rest.clone()].concat();
    assert_eq!(
        c.send_bytes(admin, &all),
        head.len(),
        "only the HELLO is taken"
    );
    c.run();
    assert_eq!(c.held_verifications(), 1);
    assert!(c.cores[0].is_verifying(admin.slot));
    assert!(
        c.cores[0].is_paused(admin.slot),
        "the driver leaves its socket unread"
    );
    assert_eq!(
        c.unread_by_engine(admin),
        rest.len(),
        "the rest waits in the buffer"
    );
    assert_eq!(c.recv(admin), [], "no WELCOME before the verdict");
    assert_eq!(c.recv(hmi), [], "nothing was published");
    // The reactor serves its other connections meanwhile.
    c.send(hmi, &Frame::Ping { nonce: 1 });
    c.run();
    assert_eq!(c.recv(hmi), [Got::Pong { nonce: 1 }]);

    c.release_verifications();
    let got = c.recv(admin);
    assert!(matches!(got[0], Got::Welcome { .. }), "{got:?}");
    assert_eq!(
        got[1],
        Got::SubAck {
            sub_id: 7,
            mode: DeliveryMode::All
        }
    );
    assert!(
        matches!(&got[2], Got::Data { topic, payload, .. } if topic == "plant/line1/temp" && payload == b"21.5"),
        "{got:?}"
    );
    assert_eq!(got[3..], [Got::Pong { nonce: 42 }]);
    assert_eq!(c.unread_by_engine(admin), 0);
    assert!(matches!(&c.recv(hmi)[..], [Got::Data { topic, .. }] if topic == "plant/line1/temp"));
    // Remembered now: the next HELLO with that secret is answered at once.
    c.connect_as(0, "admin-2", "admin:admin-pw");
    assert_eq!(c.held_verifications(), 0);
    assert_eq!(counter(&c, "auth_failures"), 0);
}

#[test]
fn a_wrong_secret_is_refused_with_error_16_once_the_verdict_comes() {
    let mut c = secure(1, |_| {});
    c.hold_verifications(true);
    let op = parked(&mut c, "op:wrong");
    let after = bytes(&[Frame::Ping { nonce: 3 }]);
    c.send_bytes(op, &after);
    c.run();
    assert_eq!(c.recv(op), []);
    assert_eq!(counter(&c, "auth_failures"), 0, "nothing decided yet");
    c.release_verifications();
    assert_eq!(
        c.recv(op),
        [Got::Error {
            code: error_code::UNAUTHENTICATED
        }],
        "refused, and the PING behind the HELLO is never answered"
    );
    assert!(c.reasons(op)[0].contains("unknown user or wrong secret"));
    assert_eq!(counter(&c, "auth_failures"), 1);
    c.advance(Duration::from_secs(2));
    assert!(c.is_closed(op));
}

#[test]
fn a_late_verdict_for_a_closed_connection_is_ignored_though_its_slot_is_reused() {
    let mut c = secure(1, |_| {});
    c.hold_verifications(true);
    let gone = parked(&mut c, "op:wrong");
    c.hang_up(gone);
    assert!(c.is_closed(gone));
    let next = parked(&mut c, "hmi:hmi-pw");
    assert_eq!(next.slot, gone.slot, "the slot went to the next connection");
    assert_eq!(c.held_verifications(), 2);
    c.release_verifications();
    // The first verdict (a mismatch, for a connection gone) touched neither counters nor the
    // connection that holds its slot now; the second admitted that one, once.
    let got = c.recv(next);
    assert!(matches!(got[..], [Got::Welcome { .. }]), "{got:?}");
    assert_eq!(counter(&c, "auth_failures"), 0);
    c.subscribe(next, 1, "plant/#", DeliveryMode::All);
    c.run();
    assert!(
        matches!(c.recv(next)[..], [Got::SubAck { .. }]),
        "admitted as hmi"
    );
}

#[test]
fn the_handshake_time_out_still_applies_while_a_check_is_pending() {
    let mut c = secure(1, |config| config.limits.handshake_timeout_ms = 500);
    c.hold_verifications(true);
    let op = parked(&mut c, "op:op-pw");
    c.advance(Duration::from_millis(600));
    assert_eq!(
        c.recv(op),
        [Got::Error {
            code: error_code::HANDSHAKE_TIMEOUT
        }]
    );
    // The verdict (a match) comes too late: no WELCOME after the ERROR.
    c.release_verifications();
    assert_eq!(c.recv(op), []);
    assert_eq!(counter(&c, "handshake_timeouts"), 1);
}

#[test]
fn the_budget_still_refuses_before_any_hashing_and_a_busy_verifier_refuses_as_throttled() {
    let mut c = secure(1, |config| config.auth.max_verifications_per_s = 2);
    c.hold_verifications(true);
    let first = parked(&mut c, "op:guess-1");
    let second = parked(&mut c, "op:guess-2");
    // The budget is spent when a run is asked for, not when it is made.
    let (third, got) = c.hello_as(0, "", "op:guess-3");
    assert_eq!(
        got,
        [Got::Error {
            code: error_code::UNAUTHENTICATED
        }]
    );
    assert!(c.reasons(third)[0].contains("too many authentication attempts"));
    assert_eq!(c.held_verifications(), 2, "no run for the third");
    // The driver could not queue the second's run (a full verifier queue): refused as over
    // the budget, and its run's verdict, should it come, is ignored.
    let id = c.cores[0].session(second.slot).unwrap().id;
    let now = c.now;
    c.cores[0].handle_verified(now, second.slot, id, Verdict::Busy);
    c.run();
    assert_eq!(
        c.recv(second),
        [Got::Error {
            code: error_code::UNAUTHENTICATED
        }]
    );
    assert!(c.reasons(second)[0].contains("too many authentication attempts"));
    c.release_verifications();
    assert_eq!(
        c.recv(first),
        [Got::Error {
            code: error_code::UNAUTHENTICATED
        }]
    );
    assert!(c.reasons(first)[0].contains("wrong secret"));
    assert_eq!(c.recv(second), [], "its late verdict is ignored");
    assert_eq!(c.reasons(second).len(), 1, "one refusal only");
    assert_eq!(counter(&c, "auth_failures"), 3);
}
