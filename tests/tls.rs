//! TLS and mTLS with the real binary, certificates made at test time with rcgen: a CA, the
//! engine's certificate (localhost, 127.0.0.1) and client certificates whose Common Name is a
//! configured user. docs/SECURITY.md's table cites these tests.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use lanpush::client::{ClientError, ClientOptions, Event, Publisher, Subscriber, SubscriptionSpec};
use lanpush::proto::{error_code, DeliveryMode};
use lanpush::tls::ClientTls;
use util::tls::Ca;
use util::{run, Raw, Server, TempFile, STEP};

/// An engine with a TLS listener; `extra` is more TOML (e.g. `[auth]`), `mtls` adds the
/// client CA and requires client certificates.
struct TlsEngine {
    server: Server,
    tls_addr: SocketAddr,
    ca: Ca,
    _files: Vec<TempFile>,
}

fn tls_engine(extra: &str, mtls: bool) -> TlsEngine {
    tls_engine_with(extra, mtls, "")
}

/// As [`tls_engine`], with `tls_keys` added to the `[tls]` section.
fn tls_engine_with(extra: &str, mtls: bool, tls_keys: &str) -> TlsEngine {
    let ca = Ca::new("engine");
    let (cert, key) = ca.issue("engine", &["localhost", "127.0.0.1"], None);
    let client_ca = if mtls {
        format!(
            "client_ca_path = {:?}\nrequire_client_cert = true\n",
            ca.pem.path_str()
        )
    } else {
        String::new()
    };
    let toml = format!(
        "{extra}\n[tls]\nlisten = \"127.0.0.1:0\"\ncert_path = {:?}\nkey_path = {:?}\n{client_ca}{tls_keys}\n",
        cert.path_str(),
        key.path_str()
    );
    let (server, config) = Server::start_with_config(&toml);
    let tls_addr = server.line_addr("tls");
    TlsEngine {
        server,
        tls_addr,
        ca,
        _files: vec![cert, key, config],
    }
}

fn opts(addr: SocketAddr, tls: ClientTls, id: &str) -> ClientOptions {
    ClientOptions::new(addr.to_string())
        .client_id(id)
        .connect_timeout(STEP)
        .tls(tls)
}

/// The error of a connection that must fail.
fn refused(opts: ClientOptions) -> ClientError {
    match Publisher::connect(opts) {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(e) => e,
    }
}

fn next_message(sub: &mut Subscriber) -> lanpush::client::Message {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        if let Some(Event::Message(m)) = sub.next_event(Duration::from_millis(200)).unwrap() {
            return m;
        }
    }
    panic!("no message within {STEP:?}");
}

#[test]
fn tls_publish_reaches_a_tls_subscriber_and_a_plain_one() {
    let engine = tls_engine("", false);
    let tls = engine.ca.client(None);
    let spec = || vec![SubscriptionSpec::new("plant/#", DeliveryMode::All)];
    let mut sub =
        Subscriber::connect(opts(engine.tls_addr, tls.clone(), "tls-sub"), spec()).unwrap();
    let mut plain = Subscriber::connect(
        ClientOptions::new(engine.server.addr_string()).client_id("plain-sub"),
        spec(),
    )
    .unwrap();
    let mut publisher = Publisher::connect(opts(engine.tls_addr, tls, "tls-pub")).unwrap();
    // Large enough to take several TLS records each way.
    let payload = vec![b'x'; 100_000];
    for i in 0..20u8 {
        let mut p = payload.clone();
        p[0] = i;
        publisher.publish("plant/line1/t", &p).unwrap();
    }
    publisher.confirm(STEP).unwrap();
    for s in [&mut sub, &mut plain] {
        for i in 0..20u8 {
            let m = next_message(s);
            assert_eq!(m.topic, "plant/line1/t");
            assert_eq!(m.payload.len(), payload.len());
            assert_eq!(m.payload[0], i, "in order");
        }
    }
}

#[test]
fn the_cli_publishes_and_subscribes_over_tls() {
    let engine = tls_engine("", false);
    let addr = engine.tls_addr.to_string();
    let ca = engine.ca.pem.path_str();
    let tls_args = ["--tls", "--ca", ca, "--server-name", "localhost"];
    let mut sub_args = vec!["sub", "--server", &addr, "--count", "1", "--timeout", "10"];
    sub_args.extend(tls_args);
    sub_args.push("cli/#");
    let sub = util::Cli::spawn(&sub_args);
    // The subscriber is in once the engine counts two connections... simpler: publish until
    // the subscriber has its message (retained values reach a late subscriber anyway).
    let mut pub_args = vec!["pub", "--server", &addr];
    pub_args.extend(tls_args);
    pub_args.extend(["cli/x", "over-tls"]);
    let out = run(&pub_args, None, STEP);
    assert!(out.status.success(), "pub failed: {}", out.stderr);
    let out = sub.finish(STEP);
    assert!(out.status.success(), "sub failed: {}", out.stderr);
    assert!(out.stdout.contains("over-tls"), "{}", out.stdout);
}

#[test]
fn a_client_that_trusts_another_ca_is_refused_with_a_clear_error() {
    let engine = tls_engine("", false);
    let stranger = Ca::new("stranger");
    let err = refused(opts(engine.tls_addr, stranger.client(None), "p"));
    match &err {
        ClientError::Tls { reason, .. } => {
            assert!(reason.contains("certificate"), "{err}")
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
    assert!(!err.is_retryable());
    // The CLI says so and exits non-zero.
    let addr = engine.tls_addr.to_string();
    let out = run(
        &[
            "pub",
            "--server",
            &addr,
            "--tls",
            "--ca",
            stranger.pem.path_str(),
            "a/b",
            "v",
        ],
        None,
        STEP,
    );
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("TLS") && out.stderr.contains("UnknownIssuer"),
        "{}",
        out.stderr
    );
    // A name the certificate does not carry is refused too.
    let wrong_name =
        ClientTls::from_files(&engine.ca.pem.path, None, Some("elsewhere".into())).unwrap();
    let err = refused(opts(engine.tls_addr, wrong_name, "p"));
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
}

#[test]
fn plain_tcp_or_junk_on_the_tls_port_is_closed_and_disturbs_no_one() {
    let engine = tls_engine("", false);
    let tls = engine.ca.client(None);
    let mut sub = Subscriber::connect(
        opts(engine.tls_addr, tls.clone(), "steady-sub"),
        vec![SubscriptionSpec::new("steady/#", DeliveryMode::All)],
    )
    .unwrap();
    let mut publisher = Publisher::connect(opts(engine.tls_addr, tls, "steady-pub")).unwrap();
    // A native HELLO in the clear: answered by a TLS alert, then the close.
    let mut raw = Raw::connect(engine.tls_addr);
    raw.send_hello("cleartext", 0);
    raw.stream.set_read_timeout(Some(STEP)).unwrap();
    let mut answer = Vec::new();
    let closed_at = Instant::now();
    raw.stream.read_to_end(&mut answer).unwrap();
    assert!(
        closed_at.elapsed() < Duration::from_secs(2),
        "closed at once"
    );
    assert_eq!(
        answer.first(),
        Some(&0x15),
        "a TLS alert record: {answer:?}"
    );
    // Junk and a truncated handshake from other connections meanwhile.
    let mut junk = TcpStream::connect(engine.tls_addr).unwrap();
    junk.write_all(&util::noise(7, 64 * 1024)).ok();
    let mut half = TcpStream::connect(engine.tls_addr).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    for i in 0..50u32 {
        publisher.publish("steady/t", &i.to_be_bytes()).unwrap();
        publisher.flush().unwrap();
        let m = next_message(&mut sub);
        assert_eq!(m.payload, i.to_be_bytes());
    }
    drop(half);
    let stats = engine.server.stats();
    let failures = stats["totals"]["tls_failures"].as_u64();
    assert!(failures.is_some_and(|n| n >= 2), "tls_failures: {stats}");
}

const SECURE: &str = r#"
[auth]
anonymous = false
anonymous_roles = []
[[auth.roles]]
name = "hmi"
subscribe = ["plant/#"]
[[auth.users]]
name = "gateway1"
secret_hash = "HASH"
publish = ["plant/line1/#"]
[[auth.users]]
name = "hmi1"
secret_hash = "HASH"
roles = ["hmi"]
"#;

fn secure_engine() -> TlsEngine {
    let hash = lanpush::auth::hash_password(b"pw").unwrap();
    tls_engine(&SECURE.replace("HASH", &hash), true)
}

#[test]
fn mtls_refuses_a_client_without_a_certificate() {
    let engine = secure_engine();
    let err = refused(opts(engine.tls_addr, engine.ca.client(None), "p"));
    match &err {
        ClientError::Tls { reason, .. } => {
            assert!(reason.contains("refused"), "{err}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[test]
fn a_client_certificate_is_the_users_identity_and_brings_its_acl() {
    let engine = secure_engine();
    let gw = engine.ca.issue("gateway1", &[], Some("gateway1"));
    let hmi = engine.ca.issue("hmi1", &["hmi1.plant"], Some("hmi1"));
    // No token: the certificate authenticates.
    let mut sub = Subscriber::connect(
        opts(engine.tls_addr, engine.ca.client(Some(&hmi)), "hmi"),
        vec![SubscriptionSpec::new("plant/#", DeliveryMode::All)],
    )
    .unwrap();
    let mut gateway =
        Publisher::connect(opts(engine.tls_addr, engine.ca.client(Some(&gw)), "gw")).unwrap();
    gateway.publish("plant/line1/temp", b"21.5").unwrap();
    gateway.confirm(STEP).unwrap();
    assert_eq!(next_message(&mut sub).payload, b"21.5");
    // gateway1 may not publish outside plant/line1: ERROR 17, the connection stays.
    gateway.publish("plant/line2/temp", b"1").unwrap();
    match gateway.confirm(STEP) {
        Err(ClientError::Engine { code, reason }) => {
            assert_eq!(code, error_code::FORBIDDEN);
            assert!(reason.contains("gateway1"), "{reason}");
        }
        other => panic!("expected ERROR 17, got {other:?}"),
    }
    // The hmi user's certificate cannot publish at all.
    let mut hmi_pub =
        Publisher::connect(opts(engine.tls_addr, engine.ca.client(Some(&hmi)), "hmi-p")).unwrap();
    hmi_pub.publish("plant/line1/temp", b"x").unwrap();
    assert!(matches!(
        hmi_pub.confirm(STEP),
        Err(ClientError::Engine {
            code: error_code::FORBIDDEN,
            ..
        })
    ));
    // A token naming another user than the certificate is refused (ERROR 16).
    let err =
        refused(opts(engine.tls_addr, engine.ca.client(Some(&hmi)), "mixed").token("gateway1:pw"));
    assert!(
        matches!(&err, ClientError::Engine { code: error_code::UNAUTHENTICATED, reason } if reason.contains("certificate")),
        "{err:?}"
    );
    // A certificate that names no user gives no identity: without a token, refused as anonymous.
    let nobody = engine.ca.issue("nobody", &[], Some("nobody"));
    let err = refused(opts(engine.tls_addr, engine.ca.client(Some(&nobody)), "n"));
    assert!(
        matches!(
            &err,
            ClientError::Engine {
                code: error_code::UNAUTHENTICATED,
                ..
            }
        ),
        "{err:?}"
    );
    // ... and with a valid token, that token's user.
    Publisher::connect(
        opts(engine.tls_addr, engine.ca.client(Some(&nobody)), "n2").token("gateway1:pw"),
    )
    .unwrap();
    // The CLI with --cert/--key.
    let addr = engine.tls_addr.to_string();
    let out = run(
        &[
            "pub",
            "--server",
            &addr,
            "--tls",
            "--ca",
            engine.ca.pem.path_str(),
            "--server-name",
            "localhost",
            "--cert",
            gw.0.path_str(),
            "--key",
            gw.1.path_str(),
            "plant/line1/cli",
            "ok",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(next_message(&mut sub).payload, b"ok");
}

#[test]
fn mqtt_over_tls_connects_and_receives_a_native_publish() {
    let engine = tls_engine_with("", false, "mqtt_listen = \"127.0.0.1:0\"");
    let mqtt_addr = engine.server.line_addr("mqtt tls");
    let tls = engine.ca.client(None);
    let socket = TcpStream::connect(mqtt_addr).unwrap();
    socket.set_read_timeout(Some(STEP)).unwrap();
    let conn =
        rustls::ClientConnection::new(tls.config.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut mqtt = rustls::StreamOwned::new(conn, socket);
    // CONNECT: MQTT 3.1.1, clean session, keep-alive 60 s, client id "mq".
    mqtt.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'm', b'q',
    ])
    .unwrap();
    let mut connack = [0u8; 4];
    mqtt.read_exact(&mut connack).unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK accepted");
    // SUBSCRIBE packet id 1 to "m/#" at QoS 0.
    mqtt.write_all(&[0x82, 8, 0, 1, 0, 3, b'm', b'/', b'#', 0])
        .unwrap();
    let mut suback = [0u8; 5];
    mqtt.read_exact(&mut suback).unwrap();
    assert_eq!(suback, [0x90, 3, 0, 1, 0]);
    let mut publisher =
        Publisher::connect(ClientOptions::new(engine.server.addr_string()).client_id("p")).unwrap();
    publisher.publish("m/x", b"hi").unwrap();
    publisher.confirm(STEP).unwrap();
    // PUBLISH QoS 0: 0x30, remaining 7, topic "m/x", payload "hi".
    let mut publish = [0u8; 9];
    mqtt.read_exact(&mut publish).unwrap();
    assert_eq!(publish, [0x30, 7, 0, 3, b'm', b'/', b'x', b'h', b'i']);
}

/// The latency cost of TLS (bench/RESULTS.md): one publisher at 1,000 msg/s for 5 s to one
/// subscriber, publish → receive, plain TCP then TLS on the same engine, alternating twice.
/// `cargo test --release --test tls -- --ignored --nocapture tls_latency_cost`.
#[test]
#[ignore]
fn tls_latency_cost() {
    let engine = tls_engine("", false);
    let tls = engine.ca.client(None);
    let run = |use_tls: bool, round: u32| {
        let addr = if use_tls {
            engine.tls_addr.to_string()
        } else {
            engine.server.addr_string()
        };
        let mut o = ClientOptions::new(addr).connect_timeout(STEP);
        if use_tls {
            o = o.tls(tls.clone());
        }
        let topic = format!("lat/{use_tls}/{round}");
        let mut sub = Subscriber::connect(
            o.clone().client_id(format!("s{use_tls}{round}")),
            vec![SubscriptionSpec::new(topic.clone(), DeliveryMode::All)],
        )
        .unwrap();
        let mut publisher = Publisher::connect(o.client_id(format!("p{use_tls}{round}"))).unwrap();
        let payload = [0u8; 64];
        let n = 5_000u64;
        let start = Instant::now();
        let mut lat_us = Vec::with_capacity(n as usize);
        for i in 0..n {
            let due = start + Duration::from_micros(i * 1_000);
            while Instant::now() < due {
                std::thread::sleep(due - Instant::now());
            }
            publisher.publish(&topic, &payload).unwrap();
            publisher.flush().unwrap();
            if let Some(Event::Message(m)) = sub.next_event(Duration::from_secs(2)).unwrap() {
                lat_us.push((lanpush::client::now_ns() - m.source_ts_ns) / 1_000);
            }
        }
        lat_us.sort_unstable();
        let q = |p: f64| lat_us[((lat_us.len() as f64 * p) as usize).min(lat_us.len() - 1)];
        println!(
            "{:5} round {round}: n={} p50={} p90={} p99={} p99.9={} max={} us",
            if use_tls { "tls" } else { "plain" },
            lat_us.len(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            lat_us[lat_us.len() - 1]
        );
    };
    for round in 0..2 {
        run(false, round);
        run(true, round);
    }
}

/// configs/secure.toml's `[tls]` example, with generated files at its placeholder paths and
/// its listener uncommented: a certificate with CN "gw" publishes as the user gw, without a
/// token, and one with no certificate is refused.
#[test]
fn the_secure_example_serves_mtls_once_its_files_exist() {
    let ca = Ca::new("plant");
    let (cert, key) = ca.issue("engine", &["localhost"], None);
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/secure.toml"))
        .unwrap()
        .replace("/etc/lanpush/tls/engine.pem", cert.path_str())
        .replace("/etc/lanpush/tls/engine-key.pem", key.path_str())
        .replace("/etc/lanpush/tls/plant-ca.pem", ca.pem.path_str())
        .replace("# listen = \"0.0.0.0:7412\"", "listen = \"127.0.0.1:0\"")
        .replace(
            "prometheus_listen = \"127.0.0.1:9464\"",
            "prometheus_listen = \"\"",
        );
    let (server, _config) = Server::start_with_config(&text);
    let tls_addr = server.line_addr("tls");
    let gw = ca.issue("gw", &[], Some("gw"));
    let mut publisher = Publisher::connect(opts(tls_addr, ca.client(Some(&gw)), "gw1")).unwrap();
    publisher.publish("plant/line1/temp", b"21.5").unwrap();
    publisher.confirm(STEP).unwrap();
    let err = refused(opts(tls_addr, ca.client(None), "anon"));
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
}
