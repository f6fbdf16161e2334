//! Durable sessions with the real binary: issue 13's bar. `lanpush sub --client-id hmi1
//! 'plant/line1/#'`, stopped; `a`, `b`, `c` published; the same command started again gets
//! `a`, `b`, `c` in order, and a GAP line names what the ring no longer holds.

mod util;

use std::time::{Duration, Instant};

use lanpush::client::{ClientOptions, Publisher};
use util::{run, Cli, Server, STEP};

const PATTERN: &str = "plant/line1/#";
const TOPIC: &str = "plant/line1/temp";

fn sub_hmi1(addr: &str) -> Cli {
    let cli = Cli::spawn(&["sub", "--server", addr, "--client-id", "hmi1", PATTERN]);
    cli.wait_stderr_line("subscribed:", STEP);
    cli
}

/// Polls the engine until the session of a stopped subscriber is kept and no longer live (the
/// engine has seen the close), so that what is published next is missed, not written to a
/// dying socket.
fn wait_session_closed(server: &Server, sessions: u64) {
    let deadline = Instant::now() + STEP;
    loop {
        let stats = server.stats();
        if stats["durable_sessions"] == sessions && stats["durable_sessions_live"] == 0 {
            assert!(
                stats["durable_session_bytes"].as_u64().unwrap_or(0) > 0,
                "{stats}"
            );
            return;
        }
        assert!(Instant::now() < deadline, "session not closed: {stats}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `(seq, value, snapshot)` of a plain `sub` output line of TOPIC.
fn parse(line: &str) -> (u64, String, bool) {
    let mut words = line.split(' ');
    assert_eq!(words.next(), Some(TOPIC), "{line}");
    let seq = words
        .next()
        .and_then(|w| w.strip_prefix("seq="))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no seq in {line:?}"));
    let value = line.rsplit(' ').next().unwrap_or_default().to_string();
    (seq, value, line.contains(" snapshot "))
}

#[test]
fn a_restarted_subscriber_with_the_same_client_id_gets_what_it_missed() {
    let server = Server::start();
    let addr = server.addr_string();

    let first = sub_hmi1(&addr);
    drop(first);
    wait_session_closed(&server, 1);

    for value in ["a", "b", "c"] {
        let out = run(&["pub", "--server", &addr, TOPIC, value], None, STEP);
        assert!(out.status.success(), "{}", out.stderr);
    }

    let again = sub_hmi1(&addr);
    let lines = again.wait_stdout_lines(3, STEP);
    let got: Vec<_> = lines.iter().map(|l| parse(l)).collect();
    assert_eq!(
        got,
        vec![
            (1, "a".to_string(), false),
            (2, "b".to_string(), false),
            (3, "c".to_string(), false)
        ],
        "{lines:?}"
    );

    // Stopped again after `c`: the next start gets only what came after it, no duplicate.
    drop(again);
    wait_session_closed(&server, 1);
    let out = run(&["pub", "--server", &addr, TOPIC, "d"], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let third = sub_hmi1(&addr);
    let lines = third.wait_stdout_lines(1, STEP);
    assert_eq!(parse(&lines[0]), (4, "d".to_string(), false), "{lines:?}");
    let out = run(&["pub", "--server", &addr, TOPIC, "e"], None, STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let lines = third.wait_stdout_lines(2, STEP);
    assert_eq!(parse(&lines[1]).0, 5, "{lines:?}");
}

#[test]
fn what_the_ring_no_longer_holds_arrives_as_a_gap_line() {
    // 2 reactors: 4 KiB of ring each, far less than the 200 messages published below.
    let (server, _config) = Server::start_with_config("[retained]\nring_bytes = 8192\n");
    let addr = server.addr_string();

    drop(sub_hmi1(&addr));
    wait_session_closed(&server, 1);

    const N: u64 = 200;
    let mut publisher = Publisher::connect(ClientOptions::new(addr.clone())).unwrap();
    for i in 1..=N {
        publisher
            .publish(TOPIC, format!("{i:0>100}").as_bytes())
            .unwrap();
    }
    publisher.flush().unwrap();
    drop(publisher);

    let again = sub_hmi1(&addr);
    let deadline = Instant::now() + STEP;
    let lines = loop {
        let out = again.stdout_so_far();
        if out.lines().any(|l| l.starts_with(TOPIC) && parse(l).0 == N) {
            break out.lines().map(str::to_owned).collect::<Vec<_>>();
        }
        assert!(Instant::now() < deadline, "no seq={N} yet:\n{out}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let gap = lines[0]
        .strip_prefix(&format!("GAP {TOPIC} 1..="))
        .unwrap_or_else(|| panic!("first line is not a GAP from 1: {lines:?}"));
    let lost: u64 = gap.parse().unwrap();
    assert!((1..N).contains(&lost), "{lines:?}");
    let seqs: Vec<u64> = lines[1..].iter().map(|l| parse(l).0).collect();
    assert_eq!(
        seqs,
        (lost + 1..=N).collect::<Vec<_>>(),
        "in order, nothing else"
    );
}
