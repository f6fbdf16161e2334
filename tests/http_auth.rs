//! `/metrics` and `/stats` with authentication configured (`auth.anonymous = false`): HTTP
//! Basic credentials checked against the same users as HELLO; only `admin` or `metrics`
//! identities are served, a non-admin one sees what STATS shows it.

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use base64::Engine as _;
use lanpush::client::{ClientOptions, Event, Publisher, Subscriber, SubscriptionSpec};
use lanpush::proto::DeliveryMode;
use util::{Server, STEP};

const CONFIG: &str = r##"
[metrics]
prometheus_listen = "127.0.0.1:0"
[auth]
anonymous = false
anonymous_roles = []
[[auth.roles]]
name = "scrape"
metrics = true
[[auth.users]]
name = "admin"
secret_hash = "HASH"
admin = true
publish = ["#"]
subscribe = ["#"]
[[auth.users]]
name = "ops"
secret_hash = "HASH"
roles = ["scrape"]
subscribe = ["plant/line1/#"]
[[auth.users]]
name = "hmi"
secret_hash = "HASH"
subscribe = ["plant/#"]
"##;

/// (status line, headers, body) of `GET path` with `creds` (`user:secret`) if any.
fn get(addr: &str, path: &str, creds: Option<&str>) -> (String, String, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    let auth = creds.map_or(String::new(), |c| {
        format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(c)
        )
    });
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.into(), headers.into(), body.into())
}

#[test]
fn metrics_and_stats_need_credentials_with_the_right_and_show_the_viewers_share() {
    let hash = lanpush::auth::hash_password(b"pw").unwrap();
    let (server, _config) = Server::start_with_config(&CONFIG.replace("HASH", &hash));
    let opts = |id: &str| {
        ClientOptions::new(server.addr_string())
            .client_id(id)
            .token("admin:pw")
    };
    let mut sub = Subscriber::connect(
        opts("watch"),
        vec![SubscriptionSpec::new("plant/#", DeliveryMode::All)],
    )
    .unwrap();
    let mut publisher = Publisher::connect(opts("gw")).unwrap();
    publisher.publish("plant/line1/t", b"1").unwrap();
    publisher.publish("plant/line2/t", b"2").unwrap();
    publisher.confirm(STEP).unwrap();
    let mut got = 0;
    let deadline = Instant::now() + STEP;
    while got < 2 && Instant::now() < deadline {
        if let Some(Event::Message(_)) = sub.next_event(Duration::from_millis(50)).unwrap() {
            got += 1;
        }
    }
    assert_eq!(got, 2);
    let stats = server.stats_as("admin:pw");
    let url = stats["metrics_url"]
        .as_str()
        .expect("metrics_url")
        .to_string();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_string();

    for creds in [None, Some("admin:wrong"), Some("nobody:pw")] {
        for path in ["/metrics", "/stats"] {
            let (status, headers, _) = get(&addr, path, creds);
            assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{path} {creds:?}");
            assert!(
                headers.contains("WWW-Authenticate: Basic realm=\"lanpush\""),
                "{headers}"
            );
        }
    }
    let (status, _, _) = get(&addr, "/metrics", Some("hmi:pw"));
    assert_eq!(status, "HTTP/1.1 403 Forbidden", "no metrics right");

    // The histograms count a frame once its write completed: wait for both prefixes.
    let deadline = Instant::now() + STEP;
    let full = loop {
        let (status, _, body) = get(&addr, "/stats", Some("admin:pw"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        if doc["latency"]["prefixes"].get("plant/line2").is_some() || Instant::now() > deadline {
            break doc;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        full["latency"]["prefixes"].get("plant/line1").is_some(),
        "{full}"
    );
    assert!(
        full["latency"]["prefixes"].get("plant/line2").is_some(),
        "{full}"
    );
    assert!(
        !full["connections"].as_array().unwrap().is_empty(),
        "admin sees connections"
    );

    let (status, _, body) = get(&addr, "/stats", Some("ops:pw"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    let scoped: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(scoped["view"], "ops");
    assert!(
        scoped["connections"].as_array().unwrap().is_empty(),
        "{scoped}"
    );
    assert!(
        scoped["latency"]["prefixes"].get("plant/line1").is_some(),
        "{scoped}"
    );
    assert!(
        scoped["latency"]["prefixes"].get("plant/line2").is_none(),
        "{scoped}"
    );
    assert!(
        scoped["totals"]["delivered"].as_u64() >= Some(2),
        "counters are shown"
    );

    let (status, _, text) = get(&addr, "/metrics", Some("ops:pw"));
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(text.contains("plant/line1"), "{text}");
    assert!(!text.contains("plant/line2"), "{text}");
    lanpush::metrics::exposition::parse_exposition(&text).unwrap();

    // Each refusal of credentials is an audit line.
    let deadline = Instant::now() + STEP;
    while !server.stderr().contains("HTTP request refused") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        server.stderr().contains("HTTP request refused"),
        "{}",
        server.stderr()
    );
}
