//! The `lanpush` command line: output formats, exit codes, and the bar test
//! (`sub 'plant/#' --count 1000` + `pub --count 1000` while other connections send garbage).

mod util;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lanpush::client::{ClientOptions, Publisher};
use util::{noise, run, Cli, Server, STEP};

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

/// A file in the temp dir, unique to this test process and `name`.
fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("lanpush-cli-{}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

fn assert_fails_with(out: &util::Output, needle: &str) {
    assert!(!out.status.success(), "exit 0; stdout:\n{}", out.stdout);
    assert!(
        out.stderr.contains(needle),
        "stderr does not mention {needle:?}:\n{}",
        out.stderr
    );
}

#[test]
fn config_prints_the_embedded_default_and_checks_files() {
    let out = run(&["config"], None, STEP);
    assert!(out.status.success());
    assert_eq!(out.stdout, lanpush::config::DEFAULT_TOML);

    let good = temp_file("good.toml", "[server]\nthreads = 3\n");
    let out = run(&["config", "--check", good.to_str().unwrap()], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    assert!(out.stdout.ends_with(": ok\n"), "{}", out.stdout);

    let bad = temp_file("bad.toml", "[limits]\nmax_framebytes = 3\n");
    let out = run(&["config", "--check", bad.to_str().unwrap()], None, STEP);
    assert_fails_with(&out, "max_framebytes");

    let out = run(&["serve", "--config", bad.to_str().unwrap()], None, STEP);
    assert_fails_with(&out, "max_framebytes");
    let _ = std::fs::remove_file(good);
    let _ = std::fs::remove_file(bad);
}

#[test]
fn client_commands_fail_with_a_message() {
    // Nothing listens on port 1; a name that does not resolve; wildcards where they are not
    // allowed. None of these may exit 0.
    let out = run(&["pub", "--server", "127.0.0.1:1", "a/b", "v"], None, STEP);
    assert_fails_with(&out, "cannot connect to 127.0.0.1:1");
    let out = run(
        &["pub", "--server", "no-such-host:", "a/b", "v"],
        None,
        STEP,
    );
    assert_fails_with(&out, "cannot connect");
    let out = run(&["sub", "--server", "127.0.0.1:1", "a/#"], None, STEP);
    assert_fails_with(&out, "cannot connect");
    let out = run(&["stats", "--server", "127.0.0.1:1"], None, STEP);
    assert_fails_with(&out, "cannot connect");
    let out = run(
        &["pub", "--server", "127.0.0.1:1", "a/+/b", "v"],
        None,
        STEP,
    );
    assert_fails_with(&out, "wildcards");
    let out = run(&["pub", "--server", "127.0.0.1:1", "a/#", "v"], None, STEP);
    assert_fails_with(&out, "invalid topic \"a/#\"");
    let out = run(&["sub", "--server", "127.0.0.1:1", "a/#/b"], None, STEP);
    assert_fails_with(&out, "invalid pattern \"a/#/b\"");
    let out = run(&["serve", "--listen", "not-an-address"], None, STEP);
    assert_fails_with(&out, "not-an-address");
    let out = run(&["pub", "a/b", "v", "--count", "3"], None, STEP);
    assert_fails_with(&out, "cannot be used with");
    for (value, says) in [
        ("10.0.0.1=10.0.0.2", "not an IPv4 multicast group"),
        ("239.1.1.1=eth0", "not an IPv4 interface address"),
        ("eth0", "not an IPv4 interface address"),
    ] {
        let out = run(
            &["sub", "--multicast", "--multicast-interface", value, "a/#"],
            None,
            STEP,
        );
        assert_fails_with(&out, says);
    }
}

#[test]
fn the_bar_all_1000_arrive_in_order_while_others_send_garbage() {
    let server = Server::start();
    let addr = server.addr_string();
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "plant/#",
        "--count",
        "1000",
        "--json",
        "--timeout",
        "60",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);

    // Garbage on other connections for as long as the run lasts (bounded in count and time).
    let stop = Arc::new(AtomicBool::new(false));
    let noisemakers: Vec<_> = (0..4u64)
        .map(|t| {
            let (stop, target) = (stop.clone(), server.addr);
            thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut sent = 0u64;
                while !stop.load(Ordering::Relaxed) && sent < 500 && Instant::now() < deadline {
                    let Ok(mut s) = TcpStream::connect(target) else {
                        continue;
                    };
                    let bytes = noise(t * 1000 + sent + 1, 1 + (sent as usize * 37) % 4000);
                    let _ = s.write_all(&bytes);
                    // Read the engine's answer (ERROR, then close) so each one is processed.
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut sink = [0u8; 1024];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    sent += 1;
                }
                sent
            })
        })
        .collect();

    let publisher = run(
        &[
            "pub",
            "--server",
            &addr,
            "plant/line1/temp",
            "--count",
            "1000",
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(publisher.status.success(), "pub: {}", publisher.stderr);
    let out = sub.finish(Duration::from_secs(60));
    stop.store(true, Ordering::Relaxed);
    let garbage: u64 = noisemakers.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(out.status.success(), "sub: {}", out.stderr);

    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), 1000);
    for (i, line) in lines.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(line["topic"], "plant/line1/temp");
        assert_eq!(line["seq"], n, "line {i}: {line}");
        assert_eq!(line["value"], n.to_string(), "line {i}: {line}");
        assert_eq!(line["quality"], 192);
        assert_eq!(line["snapshot"], false);
    }
    assert!(garbage > 0, "no garbage connection was made");
}

#[test]
fn pub_and_sub_formats() {
    let server = Server::start();
    let addr = server.addr_string();

    // A retained value first: a new subscriber gets it flagged as snapshot.
    let out = run(
        &[
            "pub",
            "--server",
            &addr,
            "fmt/retained",
            "hello world",
            "--quality",
            "7",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let out = run(
        &[
            "sub",
            "--server",
            &addr,
            "fmt/#",
            "--count",
            "1",
            "--timeout",
            "10",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let line = out.stdout.trim_end();
    let fields: Vec<&str> = line.splitn(7, ' ').collect();
    assert_eq!(fields[0], "fmt/retained", "{line}");
    assert_eq!(fields[1], "seq=1", "{line}");
    assert!(
        fields[2].starts_with("src_ts=") && fields[2].len() > 10,
        "{line}"
    );
    assert!(fields[3].starts_with("ingest_ts="), "{line}");
    assert_eq!(fields[4], "q=7", "{line}");
    assert_eq!(fields[5], "snapshot", "{line}");
    assert_eq!(fields[6], "hello world", "{line}");

    // stdin lines, JSON output.
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "lines/+",
        "--count",
        "3",
        "--json",
        "--timeout",
        "10",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    let out = run(
        &["pub", "--server", &addr, "lines/a"],
        Some("one\ntwo\r\nthree\n"),
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let out = sub.finish(STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let values: Vec<String> = json_lines(&out.stdout)
        .iter()
        .map(|l| l["value"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(values, ["one", "two", "three"]);

    // Synthetic messages padded to --size; a non-UTF-8 payload comes out as hex.
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "syn/#",
        "--count",
        "4",
        "--json",
        "--timeout",
        "10",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    let out = run(
        &[
            "pub", "--server", &addr, "syn/x", "--count", "3", "--size", "6", "--rate", "1000",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let mut p = Publisher::connect(ClientOptions::new(&addr)).unwrap();
    p.publish("syn/bin", &[0xff, 0x00, 0x10]).unwrap();
    p.confirm(STEP).unwrap();
    let lines = json_lines(&sub.finish(STEP).stdout);
    let mut by_topic: Vec<(String, String)> = lines
        .iter()
        .map(|l| {
            let v = l
                .get("value")
                .or_else(|| l.get("value_hex"))
                .and_then(|v| v.as_str())
                .unwrap();
            (l["topic"].as_str().unwrap().to_string(), v.to_string())
        })
        .collect();
    by_topic.sort();
    assert_eq!(
        by_topic,
        [
            ("syn/bin".to_string(), "ff0010".to_string()),
            ("syn/x".to_string(), "000001".to_string()),
            ("syn/x".to_string(), "000002".to_string()),
            ("syn/x".to_string(), "000003".to_string()),
        ]
    );
    let bin = lines.iter().find(|l| l["topic"] == "syn/bin").unwrap();
    assert!(bin.get("value").is_none(), "{bin}");
}

#[test]
fn sub_times_out_with_fewer_than_count() {
    let server = Server::start();
    let started = Instant::now();
    let out = run(
        &[
            "sub",
            "--server",
            &server.addr_string(),
            "quiet/#",
            "--count",
            "1",
            "--timeout",
            "0.5",
        ],
        None,
        STEP,
    );
    assert_fails_with(&out, "received 0 of 1");
    assert!(started.elapsed() >= Duration::from_millis(500));
}

#[test]
fn pub_reports_an_error_frame_from_the_engine() {
    // The engine accepts 16-byte topics; the client's own check (1024) lets a longer one through,
    // so only the engine's ERROR can make `pub` fail.
    let config = temp_file("short-topics.toml", "[limits]\nmax_topic_bytes = 16\n");
    let server = Server::start_with(&["--threads", "2", "--config", config.to_str().unwrap()]);
    let out = run(
        &[
            "pub",
            "--server",
            &server.addr_string(),
            "a/topic/longer/than/sixteen",
            "v",
        ],
        None,
        STEP,
    );
    let _ = std::fs::remove_file(config);
    assert_fails_with(&out, "ERROR 7");
}

#[test]
fn stats_prints_the_engines_counters() {
    let server = Server::start();
    let out = run(&["stats", "--server", &server.addr_string()], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    // For people: totals, then the latency table.
    assert!(out.stdout.contains("open connections"), "{}", out.stdout);
    assert!(out.stdout.contains("publishes_in"), "{}", out.stdout);
    assert!(out.stdout.contains("latency (µs)"), "{}", out.stdout);

    let out = run(
        &["stats", "--server", &server.addr_string(), "--json"],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 1);
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap();
}

// ----- issue 13 item 7: CLI polish -----

#[test]
fn config_check_refuses_what_serve_would_refuse() {
    for (name, toml, needle) in [
        ("threads.toml", "[server]\nthreads = 100000\n", "threads"),
        (
            // TEST-NET-1 (RFC 5737): never an address of this host.
            "foreign.toml",
            "[server]\nlisten = \"192.0.2.1:7411\"\n",
            "192.0.2.1",
        ),
    ] {
        let file = temp_file(name, toml);
        let out = run(&["config", "--check", file.to_str().unwrap()], None, STEP);
        assert_fails_with(&out, needle);
        let out = run(&["serve", "--config", file.to_str().unwrap()], None, STEP);
        assert_fails_with(&out, needle);
        let _ = std::fs::remove_file(file);
    }
}

#[test]
fn listen_takes_host_names_as_server_does() {
    let server = Server::start_on("localhost:0", &["--threads", "1"]);
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    let out = run(
        &[
            "pub",
            "--server",
            &format!("localhost:{}", server.addr.port()),
            "t",
            "v",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
}

#[test]
fn sub_prints_readable_timestamps_raw_on_request_and_strings_in_json() {
    let server = Server::start();
    let addr = server.addr_string();
    let out = run(&["pub", "--server", &addr, "ts/a", "v"], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let sub = |extra: &[&str]| {
        let mut args = vec![
            "sub",
            "--server",
            &addr,
            "ts/#",
            "--count",
            "1",
            "--timeout",
            "10",
        ];
        args.extend_from_slice(extra);
        let out = run(&args, None, STEP);
        assert!(out.status.success(), "{}", out.stderr);
        assert!(
            out.stderr.contains("engine "),
            "engine id shown: {}",
            out.stderr
        );
        out.stdout
    };
    let plain = sub(&[]);
    let fields: Vec<&str> = plain.split(' ').collect();
    let src = fields[2].strip_prefix("src_ts=").unwrap();
    // 2026-12-06T22:27:13.123456789Z
    assert_eq!(src.len(), 30, "{plain}");
    assert!(src.ends_with('Z') && &src[10..11] == "T", "{plain}");
    assert!(fields[3].starts_with("ingest_ts=2"), "{plain}");
    let raw = sub(&["--raw"]);
    let ns: u64 = raw.split(' ').nth(2).unwrap()["src_ts=".len()..]
        .parse()
        .unwrap_or_else(|_| panic!("not nanoseconds: {raw}"));
    assert!(ns > 1 << 60, "{raw}");
    let json = json_lines(&sub(&["--json"]));
    let line = &json[0];
    let exact: u64 = line["ingest_ts_ns"]
        .as_str()
        .expect("a string")
        .parse()
        .unwrap();
    assert!(
        exact > 1 << 53,
        "past what a JSON number holds exactly: {line}"
    );
    assert!(line["ingest_ts"].as_str().unwrap().ends_with('Z'), "{line}");
}

#[test]
fn sub_and_pub_name_the_engine_run_and_version_they_reached() {
    let server = Server::start();
    let addr = server.addr_string();
    let version = format!("lanpush {}", env!("CARGO_PKG_VERSION"));
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "ver/t",
        "--count",
        "1",
        "--timeout",
        "10",
    ]);
    let line = sub.wait_stderr_line("subscribed:", STEP);
    assert!(line.contains(&version), "{line}");
    let out = run(
        &["pub", "--server", &addr, "ver/t", "--count", "1"],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("to engine ") && out.stderr.contains(&version),
        "{}",
        out.stderr
    );
    assert!(sub.finish(STEP).status.success());
}

#[test]
fn stats_names_its_columns_and_leaves_out_its_own_connection() {
    let server = Server::start();
    let addr = server.addr_string();
    let sub = Cli::spawn(&["sub", "--server", &addr, "--client-id", "watcher", "s/#"]);
    sub.wait_stderr_line("subscribed:", STEP);
    let out = run(&["stats", "--server", &addr], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let text = out.stdout;
    assert!(text.starts_with("engine "), "{text}");
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    let header = text
        .lines()
        .find(|l| l.trim_start().starts_with("conn_id"))
        .unwrap_or_else(|| panic!("no connection table:\n{text}"));
    assert!(
        header.contains("reactor") && !header.contains(" rx "),
        "{header}"
    );
    let rows: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.trim_start().starts_with("conn_id"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        rows.len(),
        1,
        "only the subscriber, not stats itself: {rows:?}"
    );
    assert!(rows[0].contains("watcher"), "{rows:?}");
}

#[test]
fn sub_json_reports_gaps_and_engine_restarts_as_events() {
    let (server, config) = Server::start_with_config("[retained]\nring_bytes = 8192\n");
    let addr = server.addr_string();
    let args = [
        "sub",
        "--server",
        &addr,
        "--client-id",
        "j1",
        "--json",
        "g/#",
    ];
    drop({
        let c = Cli::spawn(&args);
        c.wait_stderr_line("subscribed:", STEP);
        c
    });
    let deadline = Instant::now() + STEP;
    while server.stats()["durable_sessions_live"] != 0 {
        assert!(Instant::now() < deadline, "session never closed");
        thread::sleep(Duration::from_millis(10));
    }
    let mut publisher = Publisher::connect(ClientOptions::new(addr.clone())).unwrap();
    for i in 1..=200 {
        publisher
            .publish("g/t", format!("{i:0>100}").as_bytes())
            .unwrap();
    }
    publisher.confirm(STEP).unwrap();
    drop(publisher);
    let sub = Cli::spawn(&args);
    sub.wait_stderr_line("subscribed:", STEP);
    let lines = sub.wait_stdout_lines(1, STEP);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["event"], "gap", "{first}");
    assert_eq!(first["gap"]["from_seq"], 1, "{first}");
    // The engine restarts on the same port: the subscriber says so on stdout too.
    let port_addr = addr.clone();
    drop(server);
    let _again = Server::start_on(
        &port_addr,
        &["--threads", "2", "--config", config.path_str()],
    );
    sub.wait_stderr_line("lanpush: reconnected", STEP);
    let deadline = Instant::now() + STEP;
    loop {
        let out = sub.stdout_so_far();
        if let Some(line) = out.lines().find(|l| l.contains("\"reconnected\"")) {
            let event: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(event["engine_restarted"], true, "{event}");
            break;
        }
        assert!(Instant::now() < deadline, "no reconnected event:\n{out}");
        thread::sleep(Duration::from_millis(10));
    }
}
