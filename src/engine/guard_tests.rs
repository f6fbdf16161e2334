//! Authentication, authorisation and the per-client limits on the virtual clock (`harness.rs`):
//! several shards wired in memory, no sockets, no sleeps.

use std::sync::OnceLock;
use std::time::Duration;

use super::harness::{Cluster, Got};
use crate::config::Config;
use crate::proto::{error_code, DeliveryMode, TopicPosition};

/// `[auth]` of a plant LAN: no anonymous access; a gateway that publishes the plant, an
/// operator panel that may set one setpoint and watch line 1, an HMI that watches the plant,
/// and an admin.
fn secure_auth() -> crate::config::AuthConfig {
    static AUTH: OnceLock<crate::config::AuthConfig> = OnceLock::new();
    AUTH.get_or_init(|| {
        let hash = |pw: &str| crate::auth::hash_password(pw.as_bytes()).unwrap();
        let text = format!(
            r##"
[auth]
anonymous = false
anonymous_roles = []
[[auth.roles]]
name = "gateway"
publish = ["plant/#", "site/#"]
[[auth.roles]]
name = "operator"
publish = ["plant/line1/setpoint"]
subscribe = ["plant/line1/#"]
[[auth.users]]
name = "gw"
secret_hash = "{}"
roles = ["gateway"]
[[auth.users]]
name = "op"
secret_hash = "{}"
roles = ["operator"]
[[auth.users]]
name = "hmi"
secret_hash = "{}"
subscribe = ["plant/#"]
[[auth.users]]
name = "admin"
secret_hash = "{}"
publish = ["#"]
subscribe = ["#"]
admin = true
"##,
            hash("gw-pw"),
            hash("op-pw"),
            hash("hmi-pw"),
            hash("admin-pw")
        );
        Config::from_toml_str(&text, "test").unwrap().auth
    })
    .clone()
}

pub(super) fn secure(n: u16, adjust: impl FnOnce(&mut Config)) -> Cluster {
    Cluster::new(n, |config| {
        config.auth = secure_auth();
        adjust(config);
    })
}

pub(super) fn counter(c: &Cluster, name: &str) -> u64 {
    for (i, core) in c.cores.iter().enumerate() {
        core.publish_stats(&c.shared.shards[i]);
    }
    c.shared.stats_document(Vec::new(), false)["totals"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

fn topics(got: &[Got]) -> Vec<String> {
    got.iter()
        .filter_map(|g| match g {
            Got::Data { topic, .. } | Got::Gap { topic, .. } => Some(topic.clone()),
            _ => None,
        })
        .collect()
}

/// The "(and N more PUBLISHes refused since the last notice)" of a notice, or 0.
fn untold(reason: &str) -> u64 {
    reason
        .split("(and ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn an_anonymous_client_is_refused_with_a_clear_reason_when_anonymous_is_off() {
    let mut c = secure(1, |_| {});
    let (client, got) = c.hello_as(0, "anon", "");
    assert_eq!(
        got,
        [Got::Error {
            code: error_code::UNAUTHENTICATED
        }]
    );
    assert!(
        c.reasons(client)[0].contains("credentials required"),
        "{:?}",
        c.reasons(client)
    );
    c.advance(Duration::from_secs(2));
    assert!(c.is_closed(client));
    assert_eq!(counter(&c, "auth_failures"), 1);
    assert_eq!(counter(&c, "protocol_errors"), 0, "counted as itself");
}

#[test]
fn a_wrong_secret_an_unknown_user_and_a_bad_token_are_refused_alike() {
    let mut c = secure(1, |_| {});
    for token in ["op:wrong", "nobody:op-pw", "op"] {
        let (client, got) = c.hello_as(0, "x", token);
        assert_eq!(
            got,
            [Got::Error {
                code: error_code::UNAUTHENTICATED
            }],
            "{token}"
        );
        let reason = &c.reasons(client)[0];
        assert!(
            !reason.contains("op-pw") && !reason.contains("op:"),
            "the token is not echoed: {reason}"
        );
    }
    assert_eq!(counter(&c, "auth_failures"), 3);
    // The right secret, twice: the second HELLO is answered from the verified-secret cache.
    c.connect_as(0, "op-1", "op:op-pw");
    c.connect_as(0, "op-2", "op:op-pw");
}

#[test]
fn password_guessing_is_cut_to_the_verification_budget() {
    let mut c = secure(1, |config| config.auth.max_verifications_per_s = 3);
    let refused_fast = (0..10)
        .filter(|_| {
            let (client, _) = c.hello_as(0, "guess", "op:guess");
            c.reasons(client)[0].contains("too many authentication attempts")
        })
        .count();
    assert_eq!(refused_fast, 7, "3 verified, 7 refused before hashing");
    // A second later the budget is back.
    c.advance(Duration::from_secs(1));
    c.connect_as(0, "op", "op:op-pw");
}

#[test]
fn a_user_without_publish_rights_is_refused_and_the_hmi_gets_nothing() {
    let mut c = secure(2, |_| {});
    let hmi = c.connect_as(0, "hmi", "hmi:hmi-pw");
    c.subscribe(hmi, 1, "plant/#", DeliveryMode::All);
    c.run();
    assert_eq!(c.recv(hmi).len(), 1, "SUBACK");
    let op = c.connect_as(1, "panel", "op:op-pw");
    c.publish(op, "plant/line1/valve_cmd", b"OPEN");
    c.run();
    assert_eq!(
        c.recv(op),
        [Got::Error {
            code: error_code::FORBIDDEN
        }]
    );
    let reason = &c.reasons(op)[0];
    assert!(
        reason.contains("plant/line1/valve_cmd") && reason.contains("op"),
        "{reason}"
    );
    assert!(c.recv(hmi).is_empty(), "nothing reached the HMI");
    // The connection stays open, and what the operator may do goes through.
    c.publish(op, "plant/line1/setpoint", b"42");
    c.run();
    assert_eq!(topics(&c.recv(hmi)), ["plant/line1/setpoint"]);
    assert!(!c.is_closed(op));
    assert_eq!(counter(&c, "acl_denied"), 1);
    assert_eq!(counter(&c, "requests_refused"), 1);
}

#[test]
fn ten_thousand_denied_publishes_deliver_nothing_and_are_all_counted() {
    let mut c = secure(2, |_| {});
    let admin = c.connect_as(0, "watch", "admin:admin-pw");
    c.subscribe(admin, 1, "#", DeliveryMode::All);
    c.run();
    c.recv(admin);
    let op = c.connect_as(1, "panel", "op:op-pw");
    for i in 0..10_000u32 {
        c.publish(op, &format!("plant/line{}/valve_cmd", i % 7), b"OPEN");
        if i % 500 == 0 {
            c.run();
            c.recv(op);
        }
    }
    c.run();
    c.recv(op);
    assert!(!c.is_closed(op), "denials are not fatal");
    assert!(topics(&c.recv(admin)).is_empty(), "nothing delivered");
    assert_eq!(counter(&c, "acl_denied"), 10_000);
    assert_eq!(counter(&c, "publishes_in"), 0);
    assert_eq!(counter(&c, "topics"), 0, "no topic created");
    // About one notice per write, each counting the refusals it stands for.
    let reasons = c.reasons(op);
    assert!(
        !reasons.is_empty() && reasons.len() <= 21,
        "{}",
        reasons.len()
    );
    let told: u64 = reasons.iter().map(|r| 1 + untold(r)).sum();
    assert!(told <= 10_000 && told > 9_000, "{told}");
}

#[test]
fn a_wide_subscription_gets_only_allowed_topics_in_snapshot_replay_and_live() {
    let mut c = secure(3, |_| {});
    let gw = c.connect_as(2, "gw", "gw:gw-pw");
    for topic in ["plant/line1/temp", "plant/line2/temp", "site/gate"] {
        c.publish(gw, topic, b"1");
    }
    c.run();
    // The operator may receive plant/line1/# only; it asks for everything.
    let op = c.connect_as(0, "panel", "op:op-pw");
    c.subscribe(op, 1, "#", DeliveryMode::All);
    c.run();
    let got = c.recv(op);
    assert_eq!(topics(&got), ["plant/line1/temp"], "snapshot: {got:?}");
    assert!(got.contains(&Got::SubAck {
        sub_id: 1,
        mode: DeliveryMode::All
    }));
    for topic in ["plant/line1/temp", "plant/line2/temp", "site/gate"] {
        c.publish(gw, topic, b"2");
    }
    c.run();
    assert_eq!(topics(&c.recv(op)), ["plant/line1/temp"], "live");
    // A resume asks for positions on every topic: the replay obeys the ACL too.
    let resumed = c.connect_as(1, "panel-2", "op:op-pw");
    let from = ["plant/line1/temp", "plant/line2/temp", "site/gate"]
        .map(|t| TopicPosition {
            topic: t.into(),
            last_seq: 0,
        })
        .to_vec();
    c.subscribe_from(resumed, 1, "#", DeliveryMode::All, from);
    c.run();
    let replayed = topics(&c.recv(resumed));
    assert!(!replayed.is_empty());
    assert!(
        replayed.iter().all(|t| t == "plant/line1/temp"),
        "{replayed:?}"
    );
    assert!(counter(&c, "acl_filtered") >= 4);
    // A pattern the ACL covers wholly takes no filter, one outside it is refused by name.
    c.subscribe(op, 2, "plant/line1/+", DeliveryMode::All);
    c.subscribe(op, 3, "plant/line2/#", DeliveryMode::All);
    c.run();
    let got = c.recv(op);
    assert!(got.contains(&Got::SubAck {
        sub_id: 2,
        mode: DeliveryMode::All
    }));
    assert!(got.contains(&Got::Error {
        code: error_code::FORBIDDEN
    }));
    let reason = c.reasons(op).last().unwrap();
    assert!(
        reason.starts_with("SUBSCRIBE 3:") && reason.contains("plant/line2/#"),
        "{reason}"
    );
}

#[test]
fn a_client_id_in_use_goes_to_the_same_identity_only_which_takes_it_over() {
    let mut c = secure(2, |_| {});
    let first = c.connect_as(0, "panel", "op:op-pw");
    // Another identity may not have it while it is in use.
    let (intruder, got) = c.hello_as(1, "panel", "hmi:hmi-pw");
    assert_eq!(
        got,
        [Got::Error {
            code: error_code::CLIENT_ID_IN_USE
        }]
    );
    c.advance(Duration::from_secs(2));
    assert!(c.is_closed(intruder));
    assert!(!c.is_closed(first));
    // The same identity takes it over, from another shard: the old connection is told why.
    let second = c.connect_as(1, "panel", "op:op-pw");
    c.run();
    assert_eq!(
        c.recv(first),
        [Got::Error {
            code: error_code::CLIENT_ID_IN_USE
        }]
    );
    assert!(c.reasons(first)[0].contains("taken over"));
    c.advance(Duration::from_secs(2));
    assert!(c.is_closed(first));
    assert!(!c.is_closed(second));
    assert_eq!(counter(&c, "id_conflicts"), 1);
    assert_eq!(counter(&c, "id_takeovers"), 1);
}

#[test]
fn stats_show_a_non_admin_its_own_connection_only() {
    let mut c = secure(2, |_| {});
    let admin = c.connect_as(0, "boss", "admin:admin-pw");
    let op = c.connect_as(1, "panel", "op:op-pw");
    let hmi = c.connect_as(0, "secret-hmi", "hmi:hmi-pw");
    c.subscribe(hmi, 1, "plant/#", DeliveryMode::All);
    c.run();
    for client in [admin, op] {
        c.send(client, &crate::proto::Frame::StatsRequest);
    }
    c.run();
    c.recv(admin);
    c.recv(op);
    let all = c.last_stats(admin);
    assert_eq!(all["connections"].as_array().unwrap().len(), 3);
    let mine = c.last_stats(op);
    let conns = mine["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{mine}");
    assert_eq!(conns[0]["client_id"], "panel");
    assert!(!mine.to_string().contains("secret-hmi"));
    assert_eq!(mine["view"], "op");
    assert!(mine["totals"]["acl_denied"].is_u64(), "counters stay");
}

#[test]
fn publishes_past_the_rate_are_dropped_counted_and_told_once_per_write() {
    let mut c = Cluster::new(1, |config| config.limits.max_publish_rate_per_s = 100);
    let sub = c.connect(0, "sub");
    c.subscribe(sub, 1, "t", DeliveryMode::All);
    let fast = c.connect(0, "fast");
    c.run();
    c.recv(sub);
    for _ in 0..250 {
        c.publish(fast, "t", b"x");
    }
    c.run();
    assert_eq!(topics(&c.recv(sub)).len(), 100, "one second's burst");
    assert_eq!(
        c.recv(fast),
        [Got::Error {
            code: error_code::RATE_LIMITED
        }],
        "one notice, not 150"
    );
    assert!(
        c.reasons(fast)[0].contains("max_publish_rate_per_s = 100"),
        "{}",
        c.reasons(fast)[0]
    );
    assert_eq!(counter(&c, "rate_limited"), 150);
    // Half a second later, 50 more may go.
    c.advance(Duration::from_millis(500));
    for _ in 0..60 {
        c.publish(fast, "t", b"x");
    }
    c.run();
    assert_eq!(topics(&c.recv(sub)).len(), 50);
    let notices = c.recv(fast);
    assert_eq!(notices.len(), 1);
    assert!(
        c.reasons(fast)[1].contains("(and 149 more PUBLISHes refused"),
        "the first notice's untold ones come with the next: {}",
        c.reasons(fast)[1]
    );
    assert_eq!(counter(&c, "rate_limited"), 160);
    assert!(!c.is_closed(fast));
}

#[test]
fn deep_or_long_topics_are_refused_with_a_short_quote_and_counted() {
    let mut c = Cluster::new(1, |config| config.limits.max_topic_levels = 4);
    let client = c.connect(0, "x");
    c.publish(client, "a/b/c/d/e", b"1");
    c.subscribe(client, 1, "a/b/c/d/#", DeliveryMode::All);
    let huge = "t".repeat(65_000);
    c.subscribe(client, 2, &huge, DeliveryMode::All);
    c.publish(client, &format!("{huge}/+"), b"1");
    c.run();
    assert_eq!(
        c.recv(client),
        vec![
            Got::Error {
                code: error_code::BAD_TOPIC
            };
            4
        ]
    );
    let reasons = c.reasons(client);
    assert!(reasons[0].contains("5 levels"), "{}", reasons[0]);
    assert!(reasons[1].contains("5 levels"), "{}", reasons[1]);
    for r in reasons {
        assert!(r.len() <= 200, "{} bytes: {r}", r.len());
    }
    assert!(reasons[2].contains("(65000 bytes)"), "{}", reasons[2]);
    assert!(reasons[3].contains("(65002 bytes)"), "{}", reasons[3]);
    assert_eq!(counter(&c, "topic_limit"), 4);
}

#[test]
fn subscriptions_past_the_limit_are_counted() {
    let mut c = Cluster::new(1, |config| {
        config.limits.max_subscriptions_per_connection = 2
    });
    let client = c.connect(0, "x");
    for id in 0..3 {
        c.subscribe(client, id, &format!("t/{id}"), DeliveryMode::All);
    }
    c.run();
    assert!(c.recv(client).contains(&Got::Error {
        code: error_code::TOO_MANY_SUBSCRIPTIONS
    }));
    assert_eq!(counter(&c, "subscriptions_refused"), 1);
}

/// The anonymous default keeps what existed before authentication: every right, id sharing.
#[test]
fn the_default_config_lets_anonymous_clients_do_everything_as_before() {
    let mut c = Cluster::new(2, |_| {});
    let a = c.connect(0, "same");
    let b = c.connect(1, "same");
    c.subscribe(a, 1, "#", DeliveryMode::All);
    c.run();
    c.publish(b, "any/topic", b"1");
    c.run();
    assert_eq!(topics(&c.recv(a)), ["any/topic"]);
    assert!(
        !c.is_closed(a) && !c.is_closed(b),
        "anonymous ids are shared"
    );
    c.send(b, &crate::proto::Frame::StatsRequest);
    c.run();
    c.recv(b);
    assert_eq!(
        c.last_stats(b)["connections"].as_array().unwrap().len(),
        2,
        "anonymous is admin by default"
    );
}

/// The audit lines the cores wrote, in shard order.
fn audit_lines(c: &Cluster) -> Vec<String> {
    c.cores
        .iter()
        .flat_map(|core| core.guard.audit.written.iter().cloned())
        .collect()
}

#[test]
fn the_audit_log_writes_a_line_per_event_up_to_its_rate_then_sums_up() {
    let mut c = secure(1, |config| config.auth.max_verifications_per_s = 2);
    let op = c.connect_as(0, "panel", "op:op-pw");
    c.publish(op, "plant/line1/valve_cmd", b"OPEN");
    c.run();
    let lines = audit_lines(&c);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("acl_denied op PUBLISH to \"plant/line1/valve_cmd\": not allowed"),
        "{}",
        lines[0]
    );
    // A password-guessing flood: 100 failures, 20 lines a second at most.
    for _ in 0..100 {
        c.hello_as(0, "guess", "op:guess");
    }
    assert_eq!(audit_lines(&c).len(), 20, "the window's share");
    assert_eq!(counter(&c, "auth_failures"), 100, "all counted");
    c.advance(Duration::from_secs(1));
    c.hello_as(0, "guess", "op:guess");
    let lines = audit_lines(&c);
    assert_eq!(lines.len(), 22);
    assert_eq!(lines[20], "suppressed - auth_failure=81");
    assert!(
        lines[21].starts_with("auth_failure \"op\""),
        "{}",
        lines[21]
    );
    assert!(
        !lines.iter().any(|l| l.contains("guess\"")),
        "no secret logged"
    );
}

#[test]
fn takeover_and_conflict_audit_lines_name_the_identity() {
    let mut c = secure(2, |_| {});
    c.connect_as(0, "panel", "op:op-pw");
    c.hello_as(1, "panel", "hmi:hmi-pw");
    c.connect_as(1, "panel", "op:op-pw");
    let lines = audit_lines(&c);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("id_conflict hmi "), "{}", lines[0]);
    assert!(lines[1].starts_with("id_takeover op "), "{}", lines[1]);
}

/// The audit events reach `tracing` with their fields (a subscriber on this thread).
#[test]
fn audit_events_go_to_tracing_with_their_fields() {
    #[derive(Clone, Default)]
    struct Capture(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            struct Line(String);
            impl tracing::field::Visit for Line {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    self.0.push_str(&format!("{}={:?} ", field.name(), value));
                }
            }
            if event.metadata().target() == "lanpush::audit" {
                let mut line = Line(String::new());
                event.record(&mut line);
                self.0.lock().unwrap().push(line.0);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }
    let capture = Capture::default();
    let lines = capture.0.clone();
    let mut c = secure(1, |_| {});
    let op = c.connect_as(0, "panel", "op:op-pw");
    // Another test thread may have registered the call site while no subscriber was set, and
    // tracing caches that: publish until a line arrives (each denial is an event).
    tracing::subscriber::with_default(capture, || {
        for _ in 0..100 {
            c.publish(op, "plant/line1/valve_cmd", b"OPEN");
            c.run();
            c.recv(op);
            if !lines.lock().unwrap().is_empty() {
                break;
            }
        }
    });
    let lines = lines.lock().unwrap();
    let Some(line) = lines.first() else {
        // Interest stayed cached as "never" for the whole test: nothing to check here; the
        // line's content is checked through `AuditLog::written` above.
        return;
    };
    for part in [
        "event=\"acl_denied\"",
        "who=\"op\"",
        "conn=",
        "peer=",
        "plant/line1/valve_cmd",
    ] {
        assert!(line.contains(part), "{part}: {line}");
    }
}
