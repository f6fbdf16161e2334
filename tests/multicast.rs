//! Multicast delivery with the real binary (issue 10), inside a private network namespace that
//! each test makes for itself: the test re-runs itself under `unshare --net` and, inside, turns
//! on multicast on loopback (`ip link set lo up`, `multicast on`, a route for 224.0.0.0/4).
//! Multicast never leaves that namespace. Loss is injected by the engine's seeded generator on
//! its send path (`multicast.test_loss`), so every receiver loses the same datagrams.
//!
//! Where namespaces cannot be made (not root, no `unshare`), each test says so on stderr and
//! passes without running; CI runs as root and runs them.

mod util;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use lanpush::client::{ClientOptions, Publisher};
use util::{run, Cli, Server, STEP};

const INSIDE: &str = "LANPUSH_TEST_IN_NETNS";

/// True inside the namespace (go on with the test); false after the outer run re-ran `test`
/// inside one (and checked that it passed), or when no namespace can be made (skipped).
fn in_private_netns(test: &str) -> bool {
    if std::env::var_os(INSIDE).is_some() {
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "set", "lo", "multicast", "on"],
            &["route", "add", "224.0.0.0/4", "dev", "lo"],
        ] {
            util::netns::ip(args).unwrap();
        }
        return true;
    }
    let probe = Command::new("unshare")
        .args(["--net", "--", "true"])
        .output();
    match &probe {
        Ok(out) if out.status.success() => {}
        _ => {
            eprintln!(
                "SKIPPED {test}: cannot make a private network namespace (`unshare --net` failed: {probe:?}); \
                 multicast tests need root (CI runs them)"
            );
            return false;
        }
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .args(["--net", "--"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .expect("run the test inside unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("--- {test} inside its network namespace ---\n{stdout}\n{stderr}");
    assert!(out.status.success(), "{test} failed inside its namespace");
    assert!(
        stdout.contains("1 passed"),
        "{test} did not run inside its namespace"
    );
    false
}

/// configs/multicast.toml, plus `extra` TOML, in a temp file.
fn config(name: &str, extra: &str) -> std::path::PathBuf {
    let base = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/configs/multicast.toml"
    ))
    .expect("configs/multicast.toml");
    let path =
        std::env::temp_dir().join(format!("lanpush-mcast-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, format!("{base}\n{extra}")).unwrap();
    path
}

fn loss(percent: f64, burst: u32) -> String {
    loss_seeded(percent, burst, 11)
}

fn loss_seeded(percent: f64, burst: u32, seed: u64) -> String {
    format!("[multicast.test_loss]\npercent = {percent}\nburst = {burst}\nseed = {seed}\n")
}

fn serve(config: &std::path::Path) -> Server {
    Server::start_with(&["--config", config.to_str().unwrap(), "--threads", "2"])
}

fn mcast_sub(server: &Server, count: u64, pattern: &str) -> Cli {
    mcast_sub_with(&server.addr_string(), &[], count, pattern, 1)
}

/// `lanpush sub --multicast --json` at `addr` with `extra` flags, once it has subscribed and
/// joined `channels` channels.
fn mcast_sub_with(addr: &str, extra: &[&str], count: u64, pattern: &str, channels: usize) -> Cli {
    let count = count.to_string();
    let mut args = vec!["sub", "--server", addr, "--multicast", "--json"];
    args.extend_from_slice(extra);
    args.extend(["--count", &count, "--timeout", "30", pattern]);
    let cli = Cli::spawn(&args);
    let line = cli.wait_stderr_line("subscribed:", STEP);
    assert!(
        line.contains(&format!("{channels} channel(s) joined")),
        "{line}"
    );
    cli
}

/// `lanpush sub --multicast`'s counters line (stderr, at exit), by name.
fn counters(stderr: &str) -> std::collections::HashMap<String, u64> {
    let line = stderr
        .lines()
        .find(|l| l.starts_with("multicast: "))
        .unwrap_or_else(|| panic!("no counters line in:\n{stderr}"));
    line["multicast: ".len()..]
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.parse().unwrap())
        })
        .collect()
}

/// The engine's per-channel multicast figures (channel 0).
fn engine_channel(server: &Server) -> serde_json::Value {
    let out = run(
        &["stats", "--json", "--server", &server.addr_string()],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let doc: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    doc["multicast"][0].clone()
}

/// (topic, seq) of each JSON line.
fn seqs(stdout: &str) -> Vec<(String, u64, bool)> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["topic"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
                v["snapshot"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn publish(server: &Server, n: u64, topic: &str) {
    let out = run(
        &[
            "pub",
            "--server",
            &server.addr_string(),
            "--count",
            &n.to_string(),
            "--rate",
            "5000",
            topic,
        ],
        None,
        STEP * 3,
    );
    assert!(out.status.success(), "{}", out.stderr);
}

/// Publishes 1,000 messages to a carried topic; each multicast receiver must print exactly
/// 1..=1000 in order, all from the group (or its repairs); returns their counters.
fn thousand_in_order(
    name: &str,
    extra: &str,
    receivers: usize,
) -> (
    Vec<std::collections::HashMap<String, u64>>,
    serde_json::Value,
) {
    let cfg = config(name, extra);
    let server = serve(&cfg);
    let subs: Vec<Cli> = (0..receivers)
        .map(|_| mcast_sub(&server, 1000, "plant/line1/#"))
        .collect();
    publish(&server, 1000, "plant/line1/t1");
    let mut all = Vec::new();
    for sub in subs {
        let out = sub.finish(STEP * 3);
        assert!(out.status.success(), "sub failed: {}", out.stderr);
        let got = seqs(&out.stdout);
        let want: Vec<(String, u64, bool)> = (1..=1000)
            .map(|s| ("plant/line1/t1".to_string(), s, false))
            .collect();
        assert_eq!(got.len(), 1000, "{}", out.stderr);
        assert!(got == want, "not 1..=1000 in order: {:?}", &got[..20]);
        let c = counters(&out.stderr);
        assert_eq!(c["tcp_messages"], 0, "every message came by the group");
        assert_eq!(c["messages"], 1000);
        assert_eq!(c["gaps"], 0);
        all.push(c);
    }
    let engine = engine_channel(&server);
    let _ = std::fs::remove_file(cfg);
    (all, engine)
}

#[test]
fn bar_sub_multicast_receives_1000_of_1000() {
    if !in_private_netns("bar_sub_multicast_receives_1000_of_1000") {
        return;
    }
    let (c, engine) = thousand_in_order("bar", "", 1);
    assert_eq!(c[0]["naks_sent"], 0);
    assert!(engine["datagrams_sent"].as_u64().unwrap() > 0);
    assert_eq!(engine["injected_drops"], 0);
}

#[test]
fn bar_twenty_percent_loss_ends_in_the_same_1000_in_order() {
    if !in_private_netns("bar_twenty_percent_loss_ends_in_the_same_1000_in_order") {
        return;
    }
    let (c, engine) = thousand_in_order("loss20", &loss(20.0, 1), 1);
    let injected = engine["injected_drops"].as_u64().unwrap();
    assert!(injected > 0, "{engine}");
    // One receiver: every dropped datagram repaired once, over TCP.
    assert_eq!(
        c[0]["repairs_received"] + c[0]["retransmits_received"],
        injected,
        "{c:?}"
    );
    assert_eq!(engine["unicast_repairs"], injected, "{engine}");
    assert_eq!(engine["unrecoverable"], 0);
}

#[test]
fn five_percent_loss_three_receivers_lose_the_same_datagrams() {
    if !in_private_netns("five_percent_loss_three_receivers_lose_the_same_datagrams") {
        return;
    }
    let (c, engine) = thousand_in_order("loss5", &loss(5.0, 1), 3);
    let injected = engine["injected_drops"].as_u64().unwrap();
    assert!(injected > 0, "{engine}");
    for r in &c {
        assert_eq!(
            r["repairs_received"] + r["retransmits_received"],
            injected,
            "{r:?}"
        );
    }
    assert_eq!(engine["unrecoverable"], 0);
}

#[test]
fn bursts_of_fifty_lost_are_repaired() {
    if !in_private_netns("bursts_of_fifty_lost_are_repaired") {
        return;
    }
    // Seed 4102 starts its first burst at the second datagram (`LossGen`'s unit test pins
    // that), so the whole burst of 50 falls inside the run however many messages the engine
    // packs into a datagram; with seed 11 the first burst came at the 143rd datagram, which a
    // loaded machine, batching more per turn, sometimes never sent.
    let (c, engine) = thousand_in_order("burst50", &loss_seeded(20.0, 50, 4102), 1);
    let injected = engine["injected_drops"].as_u64().unwrap();
    assert!(injected >= 50, "{engine}");
    assert_eq!(
        c[0]["repairs_received"] + c[0]["retransmits_received"],
        injected
    );
}

#[test]
fn many_naks_for_the_same_datagram_make_one_multicast_retransmission() {
    if !in_private_netns("many_naks_for_the_same_datagram_make_one_multicast_retransmission") {
        return;
    }
    // Four receivers, unicast for at most one NAK per datagram: the rest is multicast.
    let extra = format!(
        "[multicast]\nunicast_repair_max = 1\nrepair_window_ms = 200\n{}",
        loss(10.0, 1)
    );
    let (c, engine) = thousand_in_order("implosion", &extra, 4);
    let injected = engine["injected_drops"].as_u64().unwrap();
    assert!(injected > 0, "{engine}");
    for r in &c {
        assert_eq!(
            r["repairs_received"] + r["retransmits_received"],
            injected,
            "{r:?}"
        );
    }
    let mcast = engine["multicast_repairs"].as_u64().unwrap();
    assert!(mcast > 0, "{engine}");
    assert!(
        mcast <= injected,
        "at most one retransmission per lost datagram: {engine}"
    );
}

#[test]
fn late_joiner_gets_the_snapshot_then_the_stream_without_gap_or_duplicate() {
    if !in_private_netns("late_joiner_gets_the_snapshot_then_the_stream_without_gap_or_duplicate") {
        return;
    }
    let cfg = config("late", &loss(20.0, 1));
    let server = serve(&cfg);
    let topics = ["plant/line1/a", "plant/line2/b"];
    let published = Arc::new(AtomicU64::new(0));
    let total_per_topic = 600u64;
    let publisher = {
        let (addr, published) = (server.addr_string(), published.clone());
        thread::spawn(move || {
            let mut p = Publisher::connect(ClientOptions::new(addr)).unwrap();
            for i in 1..=total_per_topic {
                for t in topics {
                    p.publish(t, format!("{i}").as_bytes()).unwrap();
                }
                p.flush().unwrap();
                published.store(i, Ordering::Relaxed);
                thread::sleep(Duration::from_micros(500));
            }
            p.confirm(STEP).unwrap();
        })
    };
    // Join mid-stream.
    let deadline = Instant::now() + STEP;
    while published.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline);
        thread::sleep(Duration::from_millis(1));
    }
    let addr = server.addr_string();
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "--multicast",
        "--json",
        "--timeout",
        "30",
        "plant/#",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    publisher.join().unwrap();
    // Wait for both topics' last message.
    let deadline = Instant::now() + STEP * 2;
    loop {
        let got = seqs(&sub.stdout_so_far());
        let done = topics
            .iter()
            .all(|t| got.iter().any(|(x, s, _)| x == t && *s == total_per_topic));
        if done {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last messages missing; got {}",
            got.len()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let got = seqs(&sub.stdout_so_far());
    for t in topics {
        let mine: Vec<&(String, u64, bool)> = got.iter().filter(|(x, _, _)| x == t).collect();
        assert!(
            mine[0].2,
            "{t}: the first message is the snapshot value: {:?}",
            mine[0]
        );
        let first = mine[0].1;
        assert!(
            first > 1 && first < total_per_topic,
            "{t}: joined mid-stream at {first}"
        );
        let want: Vec<u64> = (first..=total_per_topic).collect();
        let have: Vec<u64> = mine.iter().map(|m| m.1).collect();
        assert!(
            have == want,
            "{t}: not {first}..={total_per_topic} once each, in order"
        );
        assert!(mine[1..].iter().all(|m| !m.2));
    }
    let engine = engine_channel(&server);
    assert!(engine["injected_drops"].as_u64().unwrap() > 0, "{engine}");
    let _ = std::fs::remove_file(cfg);
}

#[test]
fn uncarried_topics_come_by_tcp_and_tcp_subscribers_are_unchanged() {
    if !in_private_netns("uncarried_topics_come_by_tcp_and_tcp_subscribers_are_unchanged") {
        return;
    }
    let cfg = config("mixed", "");
    let server = serve(&cfg);
    let addr = server.addr_string();
    let m = mcast_sub(&server, 110, "plant/#");
    let tcp = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "--json",
        "--count",
        "110",
        "--timeout",
        "30",
        "plant/#",
    ]);
    tcp.wait_stderr_line("subscribed:", STEP);
    publish(&server, 100, "plant/line2/x");
    publish(&server, 10, "plant/line9/y");
    let out = m.finish(STEP * 3);
    assert!(out.status.success(), "{}", out.stderr);
    let c = counters(&out.stderr);
    assert_eq!(
        c["tcp_messages"], 10,
        "the uncarried topic by TCP only: {c:?}"
    );
    assert_eq!(c["messages"], 100);
    let out = tcp.finish(STEP * 3);
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(seqs(&out.stdout).len(), 110);
    let _ = std::fs::remove_file(cfg);
}

/// A library `McastSubscriber` on `plant/#` with a quick back-off.
fn mcast_lib_sub(addr: &str) -> lanpush::client::McastSubscriber {
    lanpush::client::McastSubscriber::connect(
        ClientOptions::new(addr.to_string()).reconnect(lanpush::client::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        }),
        lanpush::client::McastOptions::default(),
        vec!["plant/#".to_string()],
        lanpush::proto::DeliveryMode::All,
    )
    .expect("connect the multicast subscriber")
}

/// What a receiver got: per topic the seqs in order, GAPs, and `Reconnected` events.
#[derive(Default)]
struct Ledger {
    seqs: std::collections::HashMap<String, Vec<u64>>,
    gaps: Vec<(String, u64, u64)>,
    reconnected: Vec<bool>,
}

impl Ledger {
    fn take(&mut self, e: lanpush::client::EventRef<'_>) {
        use lanpush::client::EventRef;
        match e {
            EventRef::Message(m) if !m.snapshot => self
                .seqs
                .entry(m.topic.to_string())
                .or_default()
                .push(m.seq),
            EventRef::Message(_) => {}
            EventRef::Gap {
                topic,
                from_seq,
                to_seq,
            } => self.gaps.push((topic.to_string(), from_seq, to_seq)),
            EventRef::Reconnected {
                engine_restarted, ..
            } => self.reconnected.push(engine_restarted),
        }
    }

    fn last(&self, topic: &str) -> u64 {
        self.seqs
            .get(topic)
            .and_then(|s| s.last().copied())
            .unwrap_or(0)
    }
}

/// Publishes `rounds` rounds of one message per topic, about 2,000 rounds/s.
fn publish_rounds(addr: String, topics: &'static [&'static str], rounds: u64) {
    let mut p = Publisher::connect(ClientOptions::new(addr)).unwrap();
    for i in 1..=rounds {
        for t in topics {
            p.publish(t, format!("{i}").as_bytes()).unwrap();
        }
        p.flush().unwrap();
        thread::sleep(Duration::from_micros(500));
    }
    p.confirm(STEP).unwrap();
}

#[test]
fn a_multicast_receiver_reconnects_and_resumes_without_loss_or_duplicate() {
    if !in_private_netns("a_multicast_receiver_reconnects_and_resumes_without_loss_or_duplicate") {
        return;
    }
    const TOPICS: &[&str] = &["plant/line1/a", "plant/line2/b"];
    const ROUNDS: u64 = 1500;
    let cfg = config("reconnect", &loss(5.0, 1));
    let server = serve(&cfg);
    let proxy = util::Proxy::start(server.addr);
    let mut sub = mcast_lib_sub(&proxy.addr.to_string());
    let addr = server.addr_string();
    let publisher = thread::spawn(move || publish_rounds(addr, TOPICS, ROUNDS));
    let mut ledger = Ledger::default();
    let mut cut = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while TOPICS.iter().any(|t| ledger.last(t) < ROUNDS) {
        assert!(
            Instant::now() < deadline,
            "stuck at {:?}",
            ledger.seqs.values().map(Vec::len).collect::<Vec<_>>()
        );
        sub.next_batch(Duration::from_millis(50), |e| ledger.take(e))
            .expect("a poll");
        // Cut the TCP session mid-stream (the group keeps flowing meanwhile).
        if !cut && ledger.last(TOPICS[0]) >= ROUNDS / 3 {
            proxy.cut();
            cut = true;
        }
    }
    publisher.join().unwrap();
    assert_eq!(
        ledger.reconnected,
        vec![false],
        "one reconnect, same engine run"
    );
    assert!(ledger.gaps.is_empty(), "gaps: {:?}", ledger.gaps);
    for t in TOPICS {
        assert_eq!(
            ledger.seqs[*t],
            (1..=ROUNDS).collect::<Vec<_>>(),
            "{t}: every seq exactly once, in order"
        );
    }
    let c = sub.counters();
    assert_eq!((c.reconnects, c.disconnects), (1, 1));
    assert!(
        c.tcp_messages > 0,
        "the resume replayed what the cut missed over TCP"
    );
    assert!(
        c.receiver.messages > ROUNDS,
        "the rest came by multicast: {c:?}"
    );
    assert_eq!(proxy.client_ports().len(), 2);
}

#[test]
fn a_multicast_receiver_finds_a_restarted_engine_and_says_so() {
    if !in_private_netns("a_multicast_receiver_finds_a_restarted_engine_and_says_so") {
        return;
    }
    const TOPICS: &[&str] = &["plant/line1/a"];
    let cfg = config("restart", "");
    let first = serve(&cfg);
    let addr = first.addr_string();
    let mut sub = mcast_lib_sub(&addr);
    publish_rounds(addr.clone(), TOPICS, 300);
    let mut ledger = Ledger::default();
    let deadline = Instant::now() + STEP;
    while ledger.last(TOPICS[0]) < 300 {
        assert!(Instant::now() < deadline);
        sub.next_batch(Duration::from_millis(50), |e| ledger.take(e))
            .unwrap();
    }
    drop(first);
    let second = Server::start_on(
        &addr,
        &["--config", cfg.to_str().unwrap(), "--threads", "2"],
    );
    // Until the subscriber is back, then 100 on the new run: seqs start again at 1.
    let deadline = Instant::now() + STEP * 2;
    while ledger.reconnected.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{:?}",
            sub.last_disconnect_reason()
        );
        sub.next_batch(Duration::from_millis(50), |e| ledger.take(e))
            .unwrap();
    }
    assert_eq!(ledger.reconnected, vec![true], "the new run is reported");
    publish_rounds(second.addr_string(), TOPICS, 100);
    let want: Vec<u64> = (1..=300).chain(1..=100).collect();
    let deadline = Instant::now() + STEP;
    while ledger.seqs[TOPICS[0]].len() < want.len() {
        assert!(Instant::now() < deadline, "{:?}", ledger.seqs);
        sub.next_batch(Duration::from_millis(50), |e| ledger.take(e))
            .unwrap();
    }
    assert_eq!(
        ledger.seqs[TOPICS[0]], want,
        "the new run's 1..=100 are not dropped"
    );
    assert!(sub.counters().receiver.messages >= 300 + 100 - 5);
}

#[test]
fn lingering_datagrams_carry_several_turns_and_lose_nothing() {
    if !in_private_netns("lingering_datagrams_carry_several_turns_and_lose_nothing") {
        return;
    }
    // Appended to the example's channel table: 5 ms of linger, with 5 % loss repaired.
    let extra = format!("linger_us = 5000\n{}", loss(5.0, 1));
    let (c, engine) = thousand_in_order("linger", &extra, 2);
    let datagrams = engine["datagrams_sent"].as_u64().unwrap()
        - engine["heartbeats"].as_u64().unwrap()
        - engine["multicast_repairs"].as_u64().unwrap();
    // `pub --rate 5000` for 0.2 s: about 25 messages per 5 ms; one datagram per turn would
    // be about one per message.
    assert!(
        datagrams < 300,
        "1,000 messages in {datagrams} datagrams: {engine}"
    );
    let injected = engine["injected_drops"].as_u64().unwrap();
    for r in &c {
        assert_eq!(
            r["repairs_received"] + r["retransmits_received"],
            injected,
            "{r:?}"
        );
    }
}

#[test]
fn the_tcp_session_may_be_tls_and_the_group_still_carries_the_data() {
    if !in_private_netns("the_tcp_session_may_be_tls_and_the_group_still_carries_the_data") {
        return;
    }
    let ca = util::tls::Ca::new("mcast");
    let (cert, key) = ca.issue("mcast-engine", &["localhost", "127.0.0.1"], None);
    let tls = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncert_path = {:?}\nkey_path = {:?}\n",
        cert.path_str(),
        key.path_str()
    );
    let cfg = config("tls", &tls);
    let server = serve(&cfg);
    let tls_addr = server.line_addr("tls").to_string();
    let tls_args = [
        "--tls",
        "--ca",
        ca.pem.path_str(),
        "--server-name",
        "localhost",
    ];
    let sub = mcast_sub_with(&tls_addr, &tls_args, 100, "plant/line1/#", 1);
    publish(&server, 100, "plant/line1/t1");
    let out = sub.finish(STEP * 3);
    assert!(out.status.success(), "{}", out.stderr);
    let got: Vec<u64> = seqs(&out.stdout).into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    let c = counters(&out.stderr);
    assert_eq!(
        (c["messages"], c["tcp_messages"]),
        (100, 0),
        "the session over TLS, the data by the group: {c:?}"
    );
    let _ = std::fs::remove_file(cfg);
}

/// Waits until `fd` is readable or `timeout` passed (the caller's own poll, as lanpush-bench's
/// epoll over thousands of receivers).
fn readable(fd: std::os::fd::RawFd, timeout: Duration) {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, alive for the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
}

#[test]
fn a_receiver_polled_on_its_group_socket_gets_the_uncarried_topics_too() {
    if !in_private_netns("a_receiver_polled_on_its_group_socket_gets_the_uncarried_topics_too") {
        return;
    }
    let cfg = config("groupfd", "");
    let server = serve(&cfg);
    let addr = server.addr_string();
    let mut sub = mcast_lib_sub(&addr);
    // line1 goes by the group, line9 by the TCP session only; the caller watches the group
    // socket alone and polls with a zero timeout, at least every 5 ms.
    const TOPICS: &[&str] = &["plant/line1/t1", "plant/line9/y"];
    let publisher = thread::spawn(move || publish_rounds(addr, TOPICS, 400));
    let mut ledger = Ledger::default();
    let deadline = Instant::now() + STEP * 3;
    while TOPICS.iter().any(|t| ledger.last(t) < 400) && Instant::now() < deadline {
        if let Some(fd) = sub.group_fd() {
            readable(fd, Duration::from_millis(5));
        }
        sub.next_batch(Duration::ZERO, |e| ledger.take(e)).unwrap();
    }
    publisher.join().unwrap();
    for t in TOPICS {
        assert_eq!(
            ledger.seqs.get(*t).cloned().unwrap_or_default(),
            (1..=400).collect::<Vec<u64>>(),
            "{t}"
        );
    }
    assert!(ledger.gaps.is_empty(), "{:?}", ledger.gaps);
    let c = sub.counters();
    assert!(c.receiver.messages >= 400, "line1 by the group: {c:?}");
    let _ = std::fs::remove_file(cfg);
}

/// What one receiver got in [`a_channel_without_loopback_reaches_other_hosts_and_not_its_own`]:
/// seqs in order, and its counters.
type Heard = (Vec<u64>, lanpush::client::McastCounters);

/// A library receiver made in namespace `ns`, joined on `interface`, polled until it has
/// `want` messages or `stop` is set.
fn receiver_in(
    ns: &str,
    addr: String,
    interface: std::net::Ipv4Addr,
    want: usize,
    ready: std::sync::mpsc::Sender<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<Heard> {
    util::netns::NetnsPair::run_in(ns, move || {
        let mut sub = lanpush::client::McastSubscriber::connect(
            ClientOptions::new(addr),
            lanpush::client::McastOptions {
                interface,
                ..Default::default()
            },
            vec!["plant/#".to_string()],
            lanpush::proto::DeliveryMode::All,
        )
        .expect("connect the multicast subscriber");
        assert_eq!(sub.channels_joined(), 1);
        ready.send(()).unwrap();
        let mut ledger = Ledger::default();
        let deadline = Instant::now() + STEP * 3;
        while ledger.seqs.values().map(Vec::len).sum::<usize>() < want
            && !stop.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            sub.next_batch(Duration::from_millis(20), |e| ledger.take(e))
                .unwrap();
        }
        let seqs = ledger.seqs.remove("plant/line1/t1").unwrap_or_default();
        (seqs, sub.counters())
    })
}

/// `loopback = false`: a receiver on another host (namespace, over a veth pair) gets every
/// message from the group; one on the engine's own host hears no datagram at all, the kernel
/// having skipped its local copy.
#[test]
fn a_channel_without_loopback_reaches_other_hosts_and_not_its_own() {
    use util::netns::{NetnsPair, CLIENT_IP, ENGINE_IP};
    let pair = match NetnsPair::create("mcloop") {
        Ok(pair) => pair,
        Err(why) => {
            eprintln!(
                "SKIPPED a_channel_without_loopback_reaches_other_hosts_and_not_its_own: \
                 network namespaces cannot be made here ({why}); multicast tests need root"
            );
            return;
        }
    };
    for (ns, dev) in [
        (&pair.engine_ns, &pair.engine_if),
        (&pair.client_ns, &pair.client_if),
    ] {
        let (ns, dev) = (ns.as_str(), dev.as_str());
        for args in [
            &["-n", ns, "link", "set", dev, "multicast", "on"][..],
            &["-n", ns, "route", "add", "224.0.0.0/4", "dev", dev],
        ] {
            util::netns::ip(args).unwrap();
        }
    }
    let config = util::TempFile::new(
        "mcloop.toml",
        &format!(
            "[[multicast.channels]]\ngroup = \"239.192.0.7\"\nport = 7427\n\
             interface = \"{ENGINE_IP}\"\nloopback = false\npatterns = [\"plant/#\"]\n"
        ),
    );
    let server = Server::start_via(
        &["ip", "netns", "exec", &pair.engine_ns],
        &format!("{ENGINE_IP}:0"),
        &["--threads", "2", "--config", config.path_str()],
    );
    let addr = server.addr.to_string();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready, subscribed) = std::sync::mpsc::channel();
    let far = receiver_in(
        &pair.client_ns,
        addr.clone(),
        CLIENT_IP,
        100,
        ready.clone(),
        stop.clone(),
    );
    let near = receiver_in(
        &pair.engine_ns,
        addr.clone(),
        ENGINE_IP,
        100,
        ready,
        stop.clone(),
    );
    for _ in 0..2 {
        subscribed
            .recv_timeout(STEP)
            .expect("both receivers subscribed");
    }
    NetnsPair::run_in(&pair.engine_ns, move || {
        let mut p = Publisher::connect(ClientOptions::new(addr)).unwrap();
        for i in 1..=100u32 {
            p.publish("plant/line1/t1", &i.to_le_bytes()).unwrap();
        }
        p.confirm(STEP).unwrap();
    })
    .join()
    .unwrap();
    let (seqs, c) = far.join().unwrap();
    assert_eq!(seqs, (1..=100).collect::<Vec<u64>>(), "{c:?}");
    assert!(c.receiver.datagrams > 0 && c.tcp_messages == 0, "{c:?}");
    // A heartbeat (100 ms) would have reached the near receiver by now if anything could.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (seqs, c) = near.join().unwrap();
    assert!(seqs.is_empty(), "{seqs:?}");
    assert_eq!(c.receiver.datagrams, 0, "{c:?}");
}

/// A receiving host whose channels come on two networks: `--multicast-interface GROUP=ADDR`
/// joins the second channel's group on its own interface (a veth end in the test's namespace,
/// where the engine sends that channel); the first stays on the route's (loopback). Joined on
/// the wrong interface, the second channel's datagrams would never arrive. (The first channel
/// names 127.0.0.1: with the veth's address in the namespace, the kernel would otherwise send
/// it from 10.9.0.1 over loopback, a source the receiving side drops.)
#[test]
fn each_group_is_joined_on_the_interface_named_for_it() {
    if !in_private_netns("each_group_is_joined_on_the_interface_named_for_it") {
        return;
    }
    for args in [
        &[
            "link", "add", "lpva", "type", "veth", "peer", "name", "lpvb",
        ][..],
        &["addr", "add", "10.9.0.1/24", "dev", "lpva"],
        &["link", "set", "lpva", "multicast", "on", "up"],
        &["link", "set", "lpvb", "up"],
    ] {
        util::netns::ip(args).unwrap();
    }
    let config = util::TempFile::new(
        "two-nets.toml",
        "[[multicast.channels]]\ngroup = \"239.192.0.1\"\nport = 7420\n\
         interface = \"127.0.0.1\"\npatterns = [\"plant/line1/#\"]\n\
         [[multicast.channels]]\ngroup = \"239.192.0.2\"\nport = 7421\n\
         interface = \"10.9.0.1\"\npatterns = [\"plant/line2/#\"]\n",
    );
    let server = serve(&config.path);
    let sub = mcast_sub_with(
        &server.addr_string(),
        &["--multicast-interface", "239.192.0.2=10.9.0.1"],
        200,
        "plant/#",
        2,
    );
    publish(&server, 100, "plant/line1/a");
    publish(&server, 100, "plant/line2/b");
    let out = sub.finish(STEP * 3);
    assert!(out.status.success(), "{}", out.stderr);
    let got = seqs(&out.stdout);
    for topic in ["plant/line1/a", "plant/line2/b"] {
        let s: Vec<u64> = got
            .iter()
            .filter(|(t, _, _)| t == topic)
            .map(|(_, s, _)| *s)
            .collect();
        assert_eq!(s, (1..=100).collect::<Vec<_>>(), "{topic}");
    }
    let c = counters(&out.stderr);
    assert_eq!(
        (c["messages"], c["tcp_messages"]),
        (200, 0),
        "both channels by their groups: {c:?}"
    );
}
