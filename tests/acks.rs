//! Publisher acknowledgements with the real binary (docs/PROTOCOL.md §5.8): a publisher whose
//! engine dies resends exactly what the engine had not confirmed, to the restarted engine.

mod util;

use std::time::{Duration, Instant};

use lanpush::client::{Backoff, ClientError, ClientOptions, Publisher};
use util::{run, signal, Cli, Server, STEP};

/// The payloads (last field of each plain `sub` line) of topic `t`.
fn values(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("t "))
        .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
        .collect()
}

fn publish_range(p: &mut Publisher, from: u64, to: u64) {
    for i in from..=to {
        p.publish("t", i.to_string().as_bytes()).expect("publish");
    }
    p.flush().expect("flush");
}

#[test]
fn a_publisher_resends_exactly_what_a_killed_engine_had_not_confirmed() {
    let first = Server::start();
    let addr = first.addr_string();
    let opts = ClientOptions::new(addr.clone())
        .client_id("gw-acks")
        .publisher_acks(1 << 20)
        .reconnect(Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(50),
        });
    let mut publisher = Publisher::connect(opts).expect("connect");
    publish_range(&mut publisher, 1, 2000);
    publisher.confirm(STEP).expect("confirm");
    assert_eq!(publisher.counters().confirmed, 2000);
    assert_eq!(publisher.unconfirmed(), (0, 0));
    // The engine stops reading (SIGSTOP), 500 more go into the socket, then it dies: they were
    // written but never taken, and the publisher knows which.
    signal(first.pid(), libc::SIGSTOP);
    publish_range(&mut publisher, 2001, 2500);
    assert_eq!(publisher.unconfirmed().0, 500);
    signal(first.pid(), libc::SIGKILL);
    drop(first);
    // Restarted on the same port, with a subscriber waiting before the publisher is back.
    let second = Server::start_on(&addr, &["--threads", "2"]);
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "t",
        "--count",
        "510",
        "--timeout",
        "20",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    let deadline = Instant::now() + STEP;
    loop {
        match publisher.keepalive_tick() {
            Ok(()) if publisher.welcome().is_some() => break,
            Ok(()) => {}
            Err(
                e @ (ClientError::ConnectionLost { lost_frames: 0, .. }
                | ClientError::Reconnecting { .. }
                | ClientError::Connect { .. }),
            ) => {
                assert!(Instant::now() < deadline, "never reconnected: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("unexpected error while reconnecting: {e}"),
        }
    }
    publish_range(&mut publisher, 2501, 2510);
    publisher
        .confirm(STEP)
        .expect("confirm on the restarted engine");
    let c = publisher.counters();
    assert_eq!(c.resent, 500, "exactly the unconfirmed messages went again");
    assert_eq!(c.confirmed, 2510);
    assert_eq!(c.lost, 0);
    let out = sub.finish(STEP);
    assert!(out.status.success(), "sub failed: {}", out.stderr);
    let expected: Vec<u64> = (2001..=2510).collect();
    assert_eq!(
        values(&out.stdout),
        expected,
        "in order, none twice, none missing"
    );
    drop(second);
}

#[test]
fn lanpush_pub_acks_reports_what_was_confirmed() {
    let server = Server::start();
    let addr = server.addr_string();
    let out = run(
        &["pub", "--server", &addr, "--acks", "t", "--count", "300"],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stderr.contains("confirmed 300 of 300"),
        "summary: {}",
        out.stderr
    );
    let stats = server.stats();
    assert_eq!(stats["totals"]["publish_duplicates"], 0);
    assert!(stats["totals"]["acks_sent"].as_u64().unwrap() >= 1);
    // Without --acks nothing changes on the wire or in the summary.
    let out = run(&["pub", "--server", &addr, "t", "--count", "3"], None, STEP);
    assert!(out.status.success() && !out.stderr.contains("confirmed"));
}
