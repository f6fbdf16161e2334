//! Issue 11 against the real binary: authentication, topic ACLs and per-client limits, with the
//! engine on `configs/secure.toml` (or a variant) in a temp file. Each test's figure is in
//! docs/SECURITY.md.

mod util;

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lanpush::proto::{
    decode_frame, encode_frame, error_code, Decoded, DeliveryMode, Frame, PublishRef, Subscribe,
};
use util::{run, Cli, Got, Raw, Server, STEP};

const SECURE: &str = include_str!("../configs/secure.toml");

fn secure() -> (Server, util::TempFile) {
    Server::start_with_config(SECURE)
}

fn publish(raw: &mut Raw, topic: &str, payload: &[u8]) {
    raw.send(&Frame::Publish(PublishRef {
        topic,
        source_ts_ns: 0,
        quality: 192,
        payload,
    }));
}

fn subscribe(raw: &mut Raw, sub_id: u32, pattern: &str) {
    raw.send(&Frame::Subscribe(Subscribe {
        sub_id,
        pattern: pattern.into(),
        mode: DeliveryMode::All,
        resume: vec![],
    }));
}

/// Reads until the SUBACK of `sub_id`; returns the DATA topics before it (the snapshot).
fn snapshot_until_suback(raw: &mut Raw, sub_id: u32) -> Vec<String> {
    let mut topics = Vec::new();
    loop {
        match raw.read(STEP) {
            Some(Got::Data { topic, .. }) => topics.push(topic),
            Some(Got::SubAck(a)) if a.sub_id == sub_id => return topics,
            Some(Got::Ping(n)) => raw.send(&Frame::Pong { nonce: n }),
            other => panic!("waiting for SUBACK {sub_id}, got {other:?}"),
        }
    }
}

/// The next DATA topic, answering PINGs.
fn next_data(raw: &mut Raw) -> String {
    loop {
        match raw.read(STEP) {
            Some(Got::Data { topic, .. }) => return topic,
            Some(Got::Ping(n)) => raw.send(&Frame::Pong { nonce: n }),
            other => panic!("waiting for DATA, got {other:?}"),
        }
    }
}

fn next_error(raw: &mut Raw) -> lanpush::proto::WireError {
    loop {
        match raw.read(STEP) {
            Some(Got::Error(e)) => return e,
            Some(Got::Ping(n)) => raw.send(&Frame::Pong { nonce: n }),
            other => panic!("waiting for ERROR, got {other:?}"),
        }
    }
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
fn an_anonymous_publisher_is_refused_with_a_clear_reason() {
    let (server, _config) = secure();
    let addr = server.addr_string();
    let out = run(
        &["pub", "--server", &addr, "plant/line1/valve_cmd", "OPEN"],
        None,
        STEP,
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("credentials required"),
        "stderr: {}",
        out.stderr
    );
    // On the wire: ERROR 16, then the close.
    let mut raw = Raw::connect(server.addr);
    raw.send_hello("anon", 0);
    let (error, _) = raw.expect_error_then_close(STEP);
    assert_eq!(error.code, error_code::UNAUTHENTICATED);
    let stats = server.stats_as("admin:admin-pw");
    assert_eq!(stats["totals"]["auth_failures"], 2);
}

#[test]
fn a_user_without_publish_rights_is_refused_and_the_hmi_gets_nothing() {
    let (server, _config) = secure();
    let mut hmi = Raw::connect(server.addr);
    hmi.hello_as("hmi-1", "hmi:hmi-pw");
    subscribe(&mut hmi, 1, "plant/#");
    assert!(snapshot_until_suback(&mut hmi, 1).is_empty());
    // The CLI, with the token from the environment.
    let addr = server.addr_string();
    let out = Cli::spawn_env(
        &["pub", "--server", &addr, "plant/line1/valve_cmd", "OPEN"],
        &[("LANPUSH_TOKEN", "op:op-pw")],
    )
    .finish(STEP);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("plant/line1/valve_cmd") && out.stderr.contains("not allowed"),
        "stderr: {}",
        out.stderr
    );
    // And on the wire: the denial is not fatal, the allowed setpoint is the HMI's first frame.
    let mut op = Raw::connect(server.addr);
    op.hello_as("panel-1", "op:op-pw");
    publish(&mut op, "plant/line1/valve_cmd", b"OPEN");
    let e = next_error(&mut op);
    assert_eq!(e.code, error_code::FORBIDDEN);
    assert!(
        e.reason.contains("\"plant/line1/valve_cmd\""),
        "{}",
        e.reason
    );
    publish(&mut op, "plant/line1/setpoint", b"42");
    assert_eq!(next_data(&mut hmi), "plant/line1/setpoint");
    let stats = server.stats_as("admin:admin-pw");
    assert_eq!(stats["totals"]["acl_denied"], 2);
}

#[test]
fn ten_thousand_denied_publishes_deliver_nothing_and_are_all_counted() {
    const N: u64 = 10_000;
    let (server, _config) = secure();
    let mut watcher = Raw::connect(server.addr);
    watcher.hello_as("watcher", "admin:admin-pw");
    subscribe(&mut watcher, 1, "#");
    snapshot_until_suback(&mut watcher, 1);
    let mut op = Raw::connect(server.addr);
    op.hello_as("panel", "op:op-pw");
    // Read the answers on another thread while the PUBLISHes go out, as a client should,
    // until the PONG that follows them: every refusal is counted in the notices before it.
    let told = Arc::new(AtomicU64::new(0));
    let notices = Arc::new(AtomicU64::new(0));
    let mut reader = op.stream.try_clone().unwrap();
    let (told_r, notices_r) = (told.clone(), notices.clone());
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        reader.set_read_timeout(Some(STEP)).unwrap();
        loop {
            let n = reader
                .read(&mut chunk)
                .expect("the engine keeps the connection");
            assert!(n > 0, "the engine closed the connection");
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            while let Ok(Decoded::Frame(frame, used)) = decode_frame(&buf[at..], 1 << 20) {
                at += used;
                match frame {
                    Frame::Error(e) => {
                        assert_eq!(e.code, error_code::FORBIDDEN, "{}", e.reason);
                        notices_r.fetch_add(1, Ordering::Relaxed);
                        told_r.fetch_add(1 + untold(&e.reason), Ordering::Relaxed);
                    }
                    Frame::Pong { nonce: 77 } => return,
                    _ => {}
                }
            }
            buf.drain(..at);
        }
    });
    let started = Instant::now();
    let mut batch = Vec::new();
    for i in 0..N {
        let topic = format!("plant/line{}/valve_cmd", i % 4);
        encode_frame(
            &mut batch,
            &Frame::Publish(PublishRef {
                topic: &topic,
                source_ts_ns: 0,
                quality: 192,
                payload: b"OPEN",
            }),
        );
    }
    encode_frame(&mut batch, &Frame::Ping { nonce: 77 });
    op.send_bytes(&batch);
    reader.join().unwrap();
    let elapsed = started.elapsed();
    let (told, notices) = (
        told.load(Ordering::Relaxed),
        notices.load(Ordering::Relaxed),
    );
    assert!(notices >= 1 && told <= N, "{notices} notices for {told}");
    // A marker the watcher may get: nothing denied came before it.
    let mut gw = Raw::connect(server.addr);
    gw.hello_as("gw", "gw:gw-pw");
    publish(&mut gw, "plant/marker", b"1");
    assert_eq!(next_data(&mut watcher), "plant/marker");
    let stats = server.stats_as("admin:admin-pw");
    let totals = &stats["totals"];
    assert_eq!(
        totals["acl_denied"].as_u64().unwrap() + totals["rate_limited"].as_u64().unwrap(),
        N
    );
    assert_eq!(totals["publishes_in"], 1, "only the marker");
    eprintln!("{N} denied PUBLISHes answered in {elapsed:?} by {notices} notices");
}

#[test]
fn a_wildcard_subscriber_with_a_limited_acl_gets_only_allowed_retained_values() {
    let (server, _config) = secure();
    let mut gw = Raw::connect(server.addr);
    gw.hello_as("gw", "gw:gw-pw");
    let mut admin = Raw::connect(server.addr);
    admin.hello_as("admin", "admin:admin-pw");
    // The admin sees everything live: once it has, everything is retained.
    subscribe(&mut admin, 1, "#");
    snapshot_until_suback(&mut admin, 1);
    for topic in [
        "plant/line1/temp",
        "plant/line2/temp",
        "plant/line1/setpoint",
    ] {
        publish(&mut gw, topic, b"1");
    }
    publish(&mut admin, "site/gate", b"1");
    for _ in 0..4 {
        next_data(&mut admin);
    }
    let mut op = Raw::connect(server.addr);
    op.hello_as("panel", "op:op-pw");
    subscribe(&mut op, 1, "#");
    let mut snapshot = snapshot_until_suback(&mut op, 1);
    snapshot.sort();
    assert_eq!(snapshot, ["plant/line1/setpoint", "plant/line1/temp"]);
    // Live too: line 2 never arrives, line 1 does.
    publish(&mut gw, "plant/line2/temp", b"2");
    publish(&mut gw, "plant/line1/temp", b"2");
    assert_eq!(next_data(&mut op), "plant/line1/temp");
}

#[test]
fn stats_show_a_non_admin_its_own_connection_only() {
    let (server, _config) = secure();
    let mut hmi = Raw::connect(server.addr);
    hmi.hello_as("secret-hmi", "hmi:hmi-pw");
    let mine = server.stats_as("op:op-pw");
    let conns = mine["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{mine}");
    assert!(!mine.to_string().contains("secret-hmi"));
    let all = server.stats_as("admin:admin-pw");
    assert!(all.to_string().contains("secret-hmi"));
}

#[test]
fn a_client_id_in_use_is_refused_to_another_identity_and_taken_over_by_the_same() {
    let (server, _config) = secure();
    let mut first = Raw::connect(server.addr);
    first.hello_as("panel", "op:op-pw");
    let mut intruder = Raw::connect(server.addr);
    intruder.send_hello_as("panel", 0, "hmi:hmi-pw");
    let (e, _) = intruder.expect_error_then_close(STEP);
    assert_eq!(e.code, error_code::CLIENT_ID_IN_USE);
    let mut second = Raw::connect(server.addr);
    second.hello_as("panel", "op:op-pw");
    let (e, _) = first.expect_error_then_close(STEP);
    assert_eq!(e.code, error_code::CLIENT_ID_IN_USE);
    assert!(e.reason.contains("taken over"), "{}", e.reason);
    second.ping(1, STEP);
    let stats = server.stats_as("admin:admin-pw");
    assert_eq!(stats["totals"]["id_conflicts"], 1);
    assert_eq!(stats["totals"]["id_takeovers"], 1);
}

#[test]
fn passwd_makes_a_hash_the_engine_accepts_and_only_for_its_password() {
    let out = run(&["passwd"], Some("plant-42\n"), STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let hash = out.stdout.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    let config = format!(
        "[auth]\nanonymous = false\nanonymous_roles = []\n[[auth.users]]\nname = \"ops\"\nsecret_hash = \"{hash}\"\nadmin = true\n"
    );
    let (server, _file) = Server::start_with_config(&config);
    let doc = server.stats_as("ops:plant-42");
    assert!(doc["totals"].is_object());
    let addr = server.addr_string();
    let out = run(
        &["stats", "--server", &addr, "--token", "ops:plant-43"],
        None,
        STEP,
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("unknown user or wrong secret"),
        "{}",
        out.stderr
    );
}

#[test]
fn connections_per_source_address_are_limited_and_freed_on_close() {
    let (server, _config) =
        Server::start_with_config("[limits]\nmax_connections_per_address = 3\n");
    let mut open: Vec<Raw> = (0..3)
        .map(|i| {
            let mut r = Raw::connect(server.addr);
            r.hello_as(&format!("c{i}"), "");
            r
        })
        .collect();
    let mut fourth = Raw::from_stream(TcpStream::connect(server.addr).unwrap());
    let (e, _) = fourth.expect_error_then_close(STEP);
    assert_eq!(e.code, error_code::TOO_MANY_CONNECTIONS);
    assert!(
        e.reason.contains("from 127.0.0.1") && e.reason.contains("max_connections_per_address"),
        "{}",
        e.reason
    );
    drop(open.pop());
    // The close is seen by the engine a little later: retry until a HELLO is welcomed.
    let deadline = Instant::now() + STEP;
    loop {
        let mut r = Raw::connect(server.addr);
        r.send_hello("again", 0);
        match r.read(STEP) {
            Some(Got::Welcome(_)) => break,
            Some(Got::Error(e)) if e.code == error_code::TOO_MANY_CONNECTIONS => {}
            other => panic!("{other:?}"),
        }
        assert!(Instant::now() < deadline, "the slot never came back");
        std::thread::sleep(Duration::from_millis(10));
    }
    // `lanpush stats` needs a slot too: free the ones this test still holds.
    drop(open);
    // The welcomed connection was dropped at `break`; until the engine has seen that close,
    // `lanpush stats` is the fourth connection and refused too (a race this test lost about one
    // run in three on a loaded machine): retry it the same way.
    let stats = loop {
        let addr = server.addr_string();
        let out = util::run(&["stats", "--json", "--server", &addr], None, STEP);
        if out.status.success() {
            break serde_json::from_str::<serde_json::Value>(out.stdout.trim()).unwrap();
        }
        assert!(
            out.stderr.contains("TOO_MANY_CONNECTIONS") && Instant::now() < deadline,
            "{}",
            out.stderr
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(stats["totals"]["address_refused"].as_u64().unwrap() >= 1);
}

#[test]
fn an_error_quotes_at_most_a_short_prefix_of_a_65_kb_topic() {
    let server = Server::start();
    let mut raw = Raw::connect(server.addr);
    raw.hello(0);
    let topic = "x".repeat(65_000);
    publish(&mut raw, &topic, b"1");
    subscribe(&mut raw, 1, &topic);
    for _ in 0..2 {
        let e = next_error(&mut raw);
        assert_eq!(e.code, error_code::BAD_TOPIC);
        assert!(e.reason.len() < 200, "{} bytes", e.reason.len());
        assert!(e.reason.contains("(65000 bytes)"), "{}", e.reason);
    }
    assert_eq!(server.stats()["totals"]["topic_limit"], 2);
}

#[test]
fn the_cli_authenticates_with_the_token_from_the_environment() {
    let (server, _config) = secure();
    let addr = server.addr_string();
    let sub = Cli::spawn_env(
        &["sub", "--server", &addr, "--count", "1", "plant/#"],
        &[("LANPUSH_TOKEN", "hmi:hmi-pw")],
    );
    sub.wait_stderr_line("subscribed:", STEP);
    let out = run(
        &[
            "pub",
            "--server",
            &addr,
            "--token",
            "gw:gw-pw",
            "plant/line1/temp",
            "21.5",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let got = sub.finish(STEP);
    assert!(got.status.success(), "{}", got.stderr);
    assert!(got.stdout.contains("plant/line1/temp") && got.stdout.contains("21.5"));
    // The same subscriber without credentials is refused before it subscribes.
    let out = run(&["sub", "--server", &addr, "plant/#"], None, STEP);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("credentials required"),
        "{}",
        out.stderr
    );
}
