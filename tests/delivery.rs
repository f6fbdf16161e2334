//! Delivery semantics (issue 3) against the real binary on loopback:
//! - a stalled subscriber (a SIGSTOPped `lanpush sub`) costs the engine bounded memory, never
//!   blocks the publisher and keeps none of 100 other subscribers from receiving everything
//!   (its effect on their latency is a benchmark's business: `lanpush-bench --stalled`);
//! - `latest` conflation always ends on the final value of every topic, and counts what it skips;
//! - `all` resumes through a cut connection with nothing lost or repeated, and with a replay ring
//!   too small to cover the outage, names exactly what was lost in GAP reports;
//! - snapshot, then live, with no gap and no duplicate while publishers run;
//! - `disconnect` cuts a slow consumer with ERROR 10 while the others keep receiving.
//!
//! The tests take a file-wide lock and run one at a time: the stalled-subscriber test measures
//! the engine's memory and loads both cores, and the others must not disturb it (nor it them).
//! Nothing sleeps to synchronise: waits poll a condition until a deadline. The sleeps that
//! remain pace a publisher or a deliberately slow reader, which is the peer's behaviour.

mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use lanpush::client::{Backoff, ClientOptions, EventRef, Publisher, Subscriber, SubscriptionSpec};
use lanpush::proto::{error_code, DeliveryMode, Frame, Subscribe, TopicPosition};
use util::{Cli, Got, Proxy, Raw, Server, Stopped, STEP};

/// One test at a time (see the module docs).
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn opts(addr: &str, id: &str) -> ClientOptions {
    ClientOptions::new(addr).client_id(id).connect_timeout(STEP)
}

/// Options for a subscriber behind a [`Proxy`]: it reconnects quickly after a cut.
fn resuming_opts(proxy: &Proxy, id: &str) -> ClientOptions {
    opts(&proxy.addr.to_string(), id).reconnect(Backoff {
        initial: Duration::from_millis(20),
        max: Duration::from_millis(200),
    })
}

/// Two raw connections, HELLO done, on different reactors of a two-reactor engine. A topic
/// belongs to the reactor of the connection that publishes it first (src/engine/owners.rs), so
/// publishing through these places topics on chosen reactors.
fn raws_on_two_reactors(addr: std::net::SocketAddr) -> [(Raw, u16); 2] {
    let mut first = Raw::connect(addr);
    let first_reactor = first.hello(30_000).reactor;
    for _ in 0..16 {
        let mut second = Raw::connect(addr);
        let reactor = second.hello(30_000).reactor;
        if reactor != first_reactor {
            return [(first, first_reactor), (second, reactor)];
        }
    }
    panic!("16 connections in a row landed on reactor {first_reactor}");
}

fn raw_publish(raw: &mut Raw, topic: &str, payload: &[u8]) {
    raw.send(&Frame::Publish(lanpush::proto::PublishRef {
        topic,
        source_ts_ns: 0,
        quality: 192,
        payload,
    }));
}

/// Topics each reactor owns, from the engine's stats.
fn topics_per_reactor(server: &Server) -> Vec<u64> {
    server.stats()["reactors"]
        .as_array()
        .expect("reactors")
        .iter()
        .map(|r| counter(r, "topics"))
        .collect()
}

/// What one subscriber accounted for on one topic.
#[derive(Debug, Default, Clone)]
struct TopicLog {
    /// Highest seq accounted for: received, or named in a GAP.
    last: u64,
    received: u64,
    /// Seq and flag of the first message.
    first: Option<(u64, bool)>,
    gaps: Vec<(u64, u64)>,
}

/// Checks a subscriber's stream as it arrives, in mode `all`: on each topic, first a snapshot
/// (any seq) or seq 1, then every following seq exactly once and in order, each either received
/// or named in a GAP whose range starts right after what was accounted for. The first
/// violation is kept, with context.
#[derive(Debug, Default)]
struct Ledger {
    topics: BTreeMap<String, TopicLog>,
    error: Option<String>,
    reconnects: u64,
}

impl Ledger {
    fn fail(&mut self, msg: String) {
        self.error.get_or_insert(msg);
    }

    fn message(&mut self, topic: &str, seq: u64, snapshot: bool) {
        let log = self.topics.entry(topic.to_string()).or_default();
        let expected = log.last + 1;
        let ok = match log.first {
            None => snapshot || seq == 1,
            Some(_) => !snapshot && seq == expected,
        };
        if !ok {
            let msg = format!(
                "{topic}: got seq {seq}{} after {} (expected {expected}{})",
                if snapshot { " (snapshot)" } else { "" },
                log.last,
                if log.first.is_none() {
                    " or a snapshot"
                } else {
                    ""
                }
            );
            self.fail(msg);
            return;
        }
        log.first.get_or_insert((seq, snapshot));
        log.last = seq;
        log.received += 1;
    }

    fn gap(&mut self, topic: &str, from_seq: u64, to_seq: u64) {
        let log = self.topics.entry(topic.to_string()).or_default();
        if from_seq != log.last + 1 || to_seq < from_seq {
            let msg = format!(
                "{topic}: GAP {from_seq}..={to_seq} after {} (it must start at {})",
                log.last,
                log.last + 1
            );
            self.fail(msg);
            return;
        }
        log.gaps.push((from_seq, to_seq));
        log.last = to_seq;
    }

    fn event(&mut self, event: &EventRef<'_>) {
        match *event {
            EventRef::Message(m) => self.message(m.topic, m.seq, m.snapshot),
            EventRef::Gap {
                topic,
                from_seq,
                to_seq,
            } => self.gap(topic, from_seq, to_seq),
            EventRef::Reconnected { .. } => self.reconnects += 1,
        }
    }

    /// Every topic in `topics` is accounted for up to `last_seq`.
    fn complete(&self, topics: &[String], last_seq: u64) -> bool {
        topics
            .iter()
            .all(|t| self.topics.get(t).is_some_and(|log| log.last >= last_seq))
    }

    fn last(&self, topic: &str) -> u64 {
        self.topics.get(topic).map_or(0, |log| log.last)
    }

    fn gap_count(&self) -> usize {
        self.topics.values().map(|log| log.gaps.len()).sum()
    }
}

/// Reads `sub` into a new ledger until every topic is accounted for up to `last_seq()` (a value
/// the publisher may still raise; 0 means "not known yet") or `deadline`; stops early on the
/// first violation. `on_event` sees the ledger after each batch.
fn follow(
    sub: &mut Subscriber,
    topics: &[String],
    last_seq: impl Fn() -> u64,
    deadline: Instant,
    on_event: impl FnMut(&Ledger),
) -> Ledger {
    follow_on(sub, Ledger::default(), topics, last_seq, deadline, on_event)
}

/// As [`follow`], continuing `ledger`.
fn follow_on(
    sub: &mut Subscriber,
    mut ledger: Ledger,
    topics: &[String],
    last_seq: impl Fn() -> u64,
    deadline: Instant,
    mut on_event: impl FnMut(&Ledger),
) -> Ledger {
    loop {
        let target = last_seq();
        if ledger.error.is_some()
            || (target > 0 && ledger.complete(topics, target))
            || Instant::now() >= deadline
        {
            return ledger;
        }
        if let Err(e) = sub.next_batch(Duration::from_millis(50), |e| ledger.event(&e)) {
            ledger.fail(format!("next_batch: {e}"));
        }
        on_event(&ledger);
    }
}

/// Finds the connection whose `client_id` is `id` in a stats document.
fn connection<'a>(stats: &'a serde_json::Value, id: &str) -> Option<&'a serde_json::Value> {
    stats["connections"]
        .as_array()?
        .iter()
        .find(|c| c["client_id"] == id)
}

/// Between two polls of the engine's stats, which refresh the per-connection figures every
/// 250 ms.
const STATS_POLL: Duration = Duration::from_millis(25);

fn counter(value: &serde_json::Value, key: &str) -> u64 {
    value[key].as_u64().unwrap_or(0)
}

// ----- 1. A stalled subscriber -----------------------------------------------------------------

/// Subscribers that read as fast as they can.
const FAST_SUBSCRIBERS: usize = 100;
/// Small topics, read by every subscriber.
const SMALL_TOPICS: usize = 4;
/// Messages per second over all small topics, and their payload.
const SMALL_RATE: f64 = 8_000.0;
const SMALL_PAYLOAD_BYTES: usize = 64;
/// One bulk topic that only the stalled subscriber takes: it is what would pile up in the
/// engine if the stalled connection's queue were not bounded, at little fan-out cost.
const BULK_RATE: f64 = 1_500.0;
const BULK_PAYLOAD_BYTES: usize = 16 * 1024;
/// How long the publisher runs at those rates.
const LOAD: Duration = Duration::from_secs(6);
/// The engine's limits for this test: small enough that the memory bound below means something
/// next to the ~150 MB the bulk topic pushes at the stalled subscriber.
const RING_BYTES: u64 = 8 << 20;
const QUEUE_MAX_BYTES: u64 = 64 << 10;
const QUEUE_MAX_MESSAGES: u64 = 1024;
/// Batches a shard inbox holds (`INBOX_CAPACITY`), each at most one turn's read of a connection
/// (`READ_BUDGET_BYTES`, 64 KiB) of forwarded PUBLISH frames.
const INBOX_BOUND_BYTES: u64 = 256 * (64 << 10);
/// Allocator fragmentation and caches, stats documents, buffers grown on demand.
const SLACK_BYTES: u64 = 16 << 20;
/// No single publish or flush may take longer: a blocked publisher would take as long as the
/// stall (seconds).
const MAX_PUBLISH_CALL: Duration = Duration::from_secs(2);

/// What the engine may hold beyond its state once every connection is up and has had traffic:
/// - the replay ring: `RING_BYTES` of frames. A small frame (~110 B) also costs its `Arc`
///   header, malloc rounding and ring slots (~50 B more), so the ring counts twice;
/// - one outbox per subscriber connection: `QUEUE_MAX_BYTES` of frames, twice for the same
///   overheads, plus up to `QUEUE_MAX_MESSAGES` 16-byte slots in a `VecDeque` that may be
///   twice as large as its contents;
/// - publish batches in flight between the shards, bounded by the inbox capacity;
/// - `SLACK_BYTES`.
fn memory_growth_bound(connections: u64) -> u64 {
    2 * RING_BYTES
        + connections * (2 * QUEUE_MAX_BYTES + 2 * 16 * QUEUE_MAX_MESSAGES)
        + INBOX_BOUND_BYTES
        + SLACK_BYTES
}

/// What the paced publisher of the stalled-subscriber test did.
struct PublishReport {
    small_per_topic: u64,
    bulk: u64,
    bulk_bytes: u64,
    published: u64,
    slowest_call: Duration,
    elapsed: Duration,
}

/// Publishes the small topics round-robin at `SMALL_RATE` and the bulk topic at `BULK_RATE`
/// for `LOAD`, on a fixed schedule (each message is due at start + i / rate), flushing every
/// millisecond tick; times every publish and flush call.
fn publish_paced(publisher: &mut Publisher, small: &[String], bulk: &str) -> PublishReport {
    let start = Instant::now();
    let (mut small_sent, mut bulk_sent) = (0u64, 0u64);
    let small_total = (SMALL_RATE * LOAD.as_secs_f64()) as u64;
    let bulk_total = (BULK_RATE * LOAD.as_secs_f64()) as u64;
    let mut slowest = Duration::ZERO;
    let mut timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        slowest = slowest.max(t.elapsed());
    };
    let small_payload = vec![b's'; SMALL_PAYLOAD_BYTES];
    let bulk_payload = vec![b'b'; BULK_PAYLOAD_BYTES];
    while small_sent < small_total || bulk_sent < bulk_total {
        let secs = start.elapsed().as_secs_f64();
        let small_due = ((secs * SMALL_RATE) as u64).min(small_total);
        let bulk_due = ((secs * BULK_RATE) as u64).min(bulk_total);
        while small_sent < small_due {
            let topic = &small[(small_sent % small.len() as u64) as usize];
            timed(&mut || publisher.publish(topic, &small_payload).expect("publish"));
            small_sent += 1;
        }
        while bulk_sent < bulk_due {
            timed(&mut || {
                publisher
                    .publish(bulk, &bulk_payload)
                    .expect("publish bulk")
            });
            bulk_sent += 1;
        }
        timed(&mut || publisher.flush().expect("flush"));
        // Pacing the source, not synchronising: the next tick's messages are not due yet.
        thread::sleep(Duration::from_millis(1));
        assert!(
            start.elapsed() < LOAD * 3,
            "the publisher fell far behind its schedule: {small_sent} of {small_total} small, \
             {bulk_sent} of {bulk_total} bulk after {:?}",
            start.elapsed()
        );
    }
    let t = Instant::now();
    publisher.confirm(STEP).expect("confirm");
    slowest = slowest.max(t.elapsed());
    PublishReport {
        small_per_topic: small_total / small.len() as u64,
        bulk: bulk_sent,
        bulk_bytes: bulk_sent * BULK_PAYLOAD_BYTES as u64,
        published: publisher.counters().published,
        slowest_call: slowest,
        elapsed: start.elapsed(),
    }
}

#[test]
fn a_stalled_subscriber_costs_bounded_memory_and_blocks_no_one() {
    let _serial = serial();
    util::raise_fd_limit(4096);
    let (server, _config) = Server::start_with_config(&format!(
        "[delivery]\nqueue_max_bytes = {QUEUE_MAX_BYTES}\nqueue_max_messages = {QUEUE_MAX_MESSAGES}\n\
         [retained]\nring_bytes = {RING_BYTES}\n"
    ));
    let addr = server.addr_string();

    // The bulk topic and the small ones on different owner shards: each shard has its own half
    // of the ring, so the bulk traffic cannot evict the small topics' history, which a fast
    // subscriber that fell behind catches up from. Their first messages (the warm-up, below)
    // come from connections on two different reactors, which makes them the owners.
    let bulk = "stall/bulk".to_string();
    let small: Vec<String> = (0..SMALL_TOPICS).map(|i| format!("stall/t/{i}")).collect();
    let [(mut bulk_claimer, bulk_owner), (mut small_claimer, _)] =
        raws_on_two_reactors(server.addr);

    let fast: Vec<Subscriber> = (0..FAST_SUBSCRIBERS)
        .map(|i| {
            Subscriber::connect(
                opts(&addr, &format!("fast-{i}")),
                vec![SubscriptionSpec::new("stall/t/+", DeliveryMode::All)],
            )
            .unwrap_or_else(|e| panic!("fast subscriber {i}: {e}"))
        })
        .collect();
    let stalled_cli = Cli::spawn(&[
        "sub",
        "--server",
        &addr,
        "--client-id",
        "stalled",
        "--mode",
        "all",
        "--json",
        "stall/#",
    ]);
    stalled_cli.wait_stderr_line("subscribed:", STEP);
    let stalled = Stopped::stop(stalled_cli);

    let mut publisher = Publisher::connect(opts(&addr, "stall-pub")).unwrap();
    let warmed = AtomicUsize::new(0);
    let small_last = AtomicU64::new(0);
    let deadline = Instant::now() + Duration::from_secs(40);
    let outcome = thread::scope(|scope| {
        let readers: Vec<_> = fast
            .into_iter()
            .map(|mut sub| {
                let (small, warmed, small_last) = (&small, &warmed, &small_last);
                scope.spawn(move || {
                    let mut counted = false;
                    let ledger = follow(
                        &mut sub,
                        small,
                        || small_last.load(Ordering::Relaxed),
                        deadline,
                        |ledger| {
                            if !counted && ledger.complete(small, 1) {
                                counted = true;
                                warmed.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                    );
                    (ledger, sub.counters())
                })
            })
            .collect();

        // Warm-up: one message per topic, so that every connection has had traffic before the
        // baseline is taken; it also gives each topic its owner.
        raw_publish(&mut bulk_claimer, &bulk, b"warm-up");
        for topic in &small {
            raw_publish(&mut small_claimer, topic, b"warm-up");
        }
        let mut expected_owned = vec![0u64; 2];
        expected_owned[bulk_owner as usize] = 1;
        expected_owned[1 - bulk_owner as usize] = SMALL_TOPICS as u64;
        let owned_deadline = Instant::now() + STEP;
        while topics_per_reactor(&server) != expected_owned {
            assert!(
                Instant::now() < owned_deadline,
                "warm-up topics not owned as planned"
            );
            thread::sleep(Duration::from_millis(5));
        }
        let warm_deadline = Instant::now() + STEP;
        while warmed.load(Ordering::Relaxed) < FAST_SUBSCRIBERS {
            assert!(
                Instant::now() < warm_deadline,
                "only {} fast subscribers got the warm-up messages",
                warmed.load(Ordering::Relaxed)
            );
            thread::sleep(Duration::from_millis(5));
        }
        let baseline_kib = util::vm_rss_kib(server.pid()).expect("engine VmRSS");
        let sampler = util::RssSampler::start(server.pid());

        let report = publish_paced(&mut publisher, &small, &bulk);
        // Everything is published: the fast subscribers know where to stop (+1: the warm-up).
        small_last.store(report.small_per_topic + 1, Ordering::Relaxed);

        // (d) The stalled connection shows its backlog in `lanpush stats --json` (refreshed
        // every 250 ms).
        let stats_deadline = Instant::now() + STEP;
        let stalled_stats = loop {
            let stats = server.stats();
            if let Some(c) = connection(&stats, "stalled") {
                if counter(c, "queue_bytes") > 0 && counter(c, "lagged") > 0 {
                    break c.clone();
                }
            }
            assert!(
                Instant::now() < stats_deadline,
                "no backlog shown for the stalled connection: {:?}",
                connection(&stats, "stalled")
            );
            thread::sleep(STATS_POLL);
        };
        assert_eq!(
            util::process_state(stalled.pid()),
            Some('T'),
            "the stalled subscriber must still be stopped"
        );

        let results: Vec<_> = readers.into_iter().map(|h| h.join().unwrap()).collect();
        let (peak_kib, samples) = sampler.finish();
        (
            report,
            results,
            baseline_kib,
            peak_kib,
            samples,
            stalled_stats,
        )
    });
    let (report, results, baseline_kib, peak_kib, samples, stalled_stats) = outcome;

    // Ownership stayed where the warm-up put it: the publisher, on either reactor, made no
    // topic of its own.
    let mut expected_owned = vec![0u64; 2];
    expected_owned[bulk_owner as usize] = 1;
    expected_owned[1 - bulk_owner as usize] = SMALL_TOPICS as u64;
    assert_eq!(
        topics_per_reactor(&server),
        expected_owned,
        "topics per reactor"
    );

    // (b) The publisher published everything on schedule and was never held up.
    // (The warm-up came from the two claiming connections.)
    let expected_published = report.small_per_topic * SMALL_TOPICS as u64 + report.bulk;
    assert_eq!(report.published, expected_published);
    assert!(
        report.slowest_call < MAX_PUBLISH_CALL,
        "a publish/flush call took {:?}",
        report.slowest_call
    );
    assert!(
        report.elapsed < LOAD + MAX_PUBLISH_CALL,
        "publishing {LOAD:?} worth took {:?}",
        report.elapsed
    );

    // (c) Every fast subscriber received every message of every small topic, in order, once.
    let last = report.small_per_topic + 1;
    for (i, (ledger, counters)) in results.iter().enumerate() {
        assert!(ledger.error.is_none(), "fast-{i}: {:?}", ledger.error);
        assert_eq!(ledger.gap_count(), 0, "fast-{i}: {:?}", ledger.topics);
        for topic in &small {
            let log = &ledger.topics[topic];
            assert_eq!(
                (log.received, log.last),
                (last, last),
                "fast-{i} on {topic}"
            );
        }
        assert_eq!(counters.duplicates_dropped, 0, "fast-{i}: duplicates");
        assert_eq!(counters.reconnects, 0, "fast-{i}: reconnected");
    }

    // (a) Memory stayed bounded while ~150 MB went the stalled subscriber's way.
    let bound = memory_growth_bound(FAST_SUBSCRIBERS as u64 + 1);
    assert!(
        report.bulk_bytes >= 2 * bound,
        "the run pushed too little at the stalled subscriber ({} bytes) for the bound \
         ({bound} bytes) to show anything",
        report.bulk_bytes
    );
    let growth = peak_kib.saturating_sub(baseline_kib) * 1024;
    eprintln!(
        "engine VmRSS: baseline {baseline_kib} KiB, peak {peak_kib} KiB over {samples} samples \
         (growth {} KiB, bound {} KiB); published {} msgs ({} bulk bytes) in {:?}, slowest \
         call {:?}; stalled connection: {stalled_stats}",
        growth / 1024,
        bound / 1024,
        report.published,
        report.bulk_bytes,
        report.elapsed,
        report.slowest_call
    );
    assert!(samples >= 100, "only {samples} RSS samples");
    assert!(
        growth <= bound,
        "engine VmRSS grew by {} KiB (baseline {baseline_kib} KiB, peak {peak_kib} KiB), more \
         than the {} KiB the ring and the queues allow",
        growth / 1024,
        bound / 1024
    );
    drop(stalled); // SIGCONT, then kill
}

// ----- 2. latest ---------------------------------------------------------------------------------

#[test]
fn latest_mode_slow_reader_ends_with_the_final_value_of_every_topic() {
    const TOPICS: usize = 8;
    const ROUNDS: u64 = 4000;
    let _serial = serial();
    // A queue of 64 messages (its byte bound cannot go under 64 KiB), so that the slow reader's
    // queue overflows after little data.
    let (server, _config) =
        Server::start_with_config("[delivery]\nqueue_max_bytes = 65536\nqueue_max_messages = 64\n");
    let topics: Vec<String> = (0..TOPICS).map(|t| format!("latest/t{t}")).collect();

    let mut raw = Raw::connect_with_recv_buffer(server.addr, 4096);
    let welcome = raw.hello(30_000);
    raw.send(&Frame::Subscribe(Subscribe {
        sub_id: 1,
        pattern: "latest/#".into(),
        mode: DeliveryMode::Latest,
        resume: vec![],
    }));
    match raw.read(STEP) {
        Some(Got::SubAck(ack)) => assert_eq!(ack.mode, DeliveryMode::Latest),
        other => panic!("expected SUBACK, got {other:?}"),
    }

    let published = AtomicBool::new(false);
    let (received, last_seen) = thread::scope(|scope| {
        let publisher = scope.spawn(|| {
            let mut p = Publisher::connect(opts(&server.addr_string(), "latest-pub")).unwrap();
            for round in 1..=ROUNDS {
                for topic in &topics {
                    p.publish(topic, round.to_string().as_bytes()).unwrap();
                }
            }
            p.confirm(STEP).unwrap();
            published.store(true, Ordering::Relaxed);
        });
        // A slow reader while the publisher runs (small reads, a pause every few frames), then
        // as fast as it can until every topic's final value is in.
        let mut last_seen: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
        let mut received = 0u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = |last_seen: &BTreeMap<String, (u64, Vec<u8>)>| {
            last_seen.len() == TOPICS && last_seen.values().all(|(seq, _)| *seq == ROUNDS)
        };
        while !done(&last_seen) {
            assert!(
                Instant::now() < deadline,
                "final values missing: {last_seen:?}"
            );
            let slow = !published.load(Ordering::Relaxed);
            let got = if slow {
                raw.read_limited(512, Duration::from_millis(100))
            } else {
                raw.read(Duration::from_millis(100))
            };
            match got {
                Some(Got::Data {
                    topic,
                    seq,
                    flags,
                    payload,
                }) => {
                    assert_eq!(flags, 0, "{topic} #{seq}: no snapshot expected");
                    assert_eq!(payload, seq.to_string().into_bytes(), "{topic} #{seq}");
                    let entry = last_seen.entry(topic.clone()).or_default();
                    assert!(seq > entry.0, "{topic}: seq {seq} after {}", entry.0);
                    *entry = (seq, payload);
                    received += 1;
                    if slow && received.is_multiple_of(16) {
                        // The slow reader's pace, not a synchronisation.
                        thread::sleep(Duration::from_millis(1));
                    }
                }
                Some(Got::Ping(nonce)) => raw.send(&Frame::Pong { nonce }),
                None => {}
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
        publisher.join().unwrap();
        (received, last_seen)
    });
    for topic in &topics {
        assert_eq!(
            last_seen[topic],
            (ROUNDS, ROUNDS.to_string().into_bytes()),
            "{topic}: final value"
        );
    }

    // Stats: values were conflated, and every publish is accounted for as either delivered to
    // this subscriber or superseded (the figures refresh every 250 ms).
    let total = ROUNDS * TOPICS as u64;
    let deadline = Instant::now() + STEP;
    loop {
        let stats = server.stats();
        // The list is refreshed every 250 ms: a young connection may not be in it yet.
        let conn = stats["connections"]
            .as_array()
            .and_then(|list| {
                list.iter()
                    .find(|c| counter(c, "id") == welcome.connection_id)
            })
            .cloned()
            .unwrap_or_default();
        let (delivered, conflated) = (counter(&conn, "delivered"), counter(&conn, "conflated"));
        if delivered == received && delivered + conflated == total {
            assert!(conflated > 0, "nothing was conflated: {conn}");
            assert!(counter(&stats["totals"], "conflated") >= conflated);
            eprintln!("latest: received {received} of {total}, conflated {conflated}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "received {received} of {total}; stats say delivered {delivered} + conflated \
             {conflated}: {conn}"
        );
        thread::sleep(STATS_POLL);
    }
}

// ----- 3. all + reconnect ------------------------------------------------------------------------

/// A publisher of numbered rounds (one message per topic per round, the round as payload) that
/// the test can hold back and watch.
#[derive(Default)]
struct Rounds {
    /// Rounds the publisher may publish so far.
    allowed: AtomicU64,
    /// Rounds confirmed: taken in by the engine.
    confirmed: AtomicU64,
}

impl Rounds {
    fn allowing(rounds: u64) -> Rounds {
        let r = Rounds::default();
        r.allowed.store(rounds, Ordering::Relaxed);
        r
    }

    /// Publishes rounds 1..=`rounds`, each once `allowed` reaches it, confirming every 50.
    fn publish(&self, addr: &str, id: &str, topics: &[String], rounds: u64) {
        let mut p = Publisher::connect(opts(addr, id)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 1..=rounds {
            while self.allowed.load(Ordering::Relaxed) < round {
                assert!(Instant::now() < deadline, "round {round} never allowed");
                p.keepalive_tick().unwrap();
                thread::sleep(Duration::from_millis(1));
            }
            for topic in topics {
                p.publish(topic, round.to_string().as_bytes()).unwrap();
            }
            if round % 50 == 0 || round == rounds {
                p.confirm(STEP).unwrap();
                self.confirmed.store(round, Ordering::Relaxed);
            }
        }
    }

    /// Polls until `round` is confirmed.
    fn wait_confirmed(&self, round: u64, deadline: Instant) {
        while self.confirmed.load(Ordering::Relaxed) < round {
            assert!(
                Instant::now() < deadline,
                "the publisher stalled before round {round}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }
}

#[test]
fn all_mode_resumes_through_cut_connections_without_loss_or_duplicates() {
    const ROUNDS: u64 = 4000;
    let _serial = serial();
    let server = Server::start();
    let proxy = Proxy::start(server.addr);
    let topics: Vec<String> = ["cut/a", "cut/b", "cut/c"].map(String::from).to_vec();
    let mut sub = Subscriber::connect(
        resuming_opts(&proxy, "cut-sub"),
        vec![SubscriptionSpec::new("cut/#", DeliveryMode::All)],
    )
    .unwrap();
    // The publisher stays at most 200 rounds ahead of the subscriber, so that the stream is
    // live when it is cut.
    let rounds = Rounds::allowing(200);
    let ledger = thread::scope(|scope| {
        scope.spawn(|| rounds.publish(&server.addr_string(), "cut-pub", &topics, ROUNDS));
        // Cut twice mid-stream: at a third and at two thirds of what the subscriber received,
        // each time once it is back from the previous cut.
        let mut cuts = 0;
        follow(
            &mut sub,
            &topics,
            || ROUNDS,
            Instant::now() + Duration::from_secs(60),
            |ledger| {
                let behind = topics.iter().map(|t| ledger.last(t)).min().unwrap_or(0);
                rounds.allowed.store(behind + 200, Ordering::Relaxed);
                let received: u64 = ledger.topics.values().map(|l| l.received).sum();
                let due = (cuts + 1) * ROUNDS * topics.len() as u64 / 3;
                if cuts < 2 && ledger.reconnects == cuts && received >= due {
                    proxy.cut();
                    cuts += 1;
                }
            },
        )
    });
    assert!(ledger.error.is_none(), "{:?}", ledger.error);
    assert_eq!(ledger.reconnects, 2, "{:?}", sub.last_disconnect_reason());
    for topic in &topics {
        let log = &ledger.topics[topic];
        assert_eq!(
            (log.received, log.last, log.gaps.len()),
            (ROUNDS, ROUNDS, 0),
            "{topic}: every seq 1..={ROUNDS} exactly once"
        );
    }
    // The engine sent nothing the client had already seen (the client would drop and count it).
    let c = sub.counters();
    assert_eq!((c.duplicates_dropped, c.reconnects), (0, 2));
    let ports: BTreeSet<u16> = proxy.client_ports().into_iter().collect();
    assert_eq!(ports.len(), 3, "each connection from its own local port");
}

#[test]
fn all_mode_resume_past_a_small_ring_names_exactly_what_was_lost() {
    const ROUNDS: u64 = 3000;
    // 8 KiB per reactor: about 190 DATA frames of these topics (~43 bytes each).
    const RING_BYTES: u64 = 16 << 10;
    let _serial = serial();
    let (server, _config) =
        Server::start_with_config(&format!("[retained]\nring_bytes = {RING_BYTES}\n"));
    let proxy = Proxy::start(server.addr);
    let topics: Vec<String> = ["tiny/a", "tiny/b"].map(String::from).to_vec();
    let mut sub = Subscriber::connect(
        resuming_opts(&proxy, "tiny-sub"),
        vec![SubscriptionSpec::new("tiny/#", DeliveryMode::All)],
    )
    .unwrap();
    // The publisher runs ahead of the subscriber up to the middle, the subscriber is cut while
    // it reads, and the second half is published while it is away.
    let rounds = Rounds::allowing(ROUNDS / 2);
    let (ledger, cut_at) = thread::scope(|scope| {
        scope.spawn(|| rounds.publish(&server.addr_string(), "tiny-pub", &topics, ROUNDS));
        let deadline = Instant::now() + Duration::from_secs(60);
        let ledger = follow(&mut sub, &topics, || ROUNDS / 5, deadline, |_| {});
        assert!(ledger.error.is_none(), "{:?}", ledger.error);
        proxy.cut();
        let cut_at: Vec<u64> = topics.iter().map(|t| ledger.last(t)).collect();
        // Stay away (no polls, so no reconnect) while the rest is published: 1,500 rounds, far
        // more than the ring holds.
        rounds.allowed.store(ROUNDS, Ordering::Relaxed);
        rounds.wait_confirmed(ROUNDS, deadline);
        let ledger = follow_on(&mut sub, ledger, &topics, || ROUNDS, deadline, |_| {});
        (ledger, cut_at)
    });
    assert!(ledger.error.is_none(), "{:?}", ledger.error);
    assert_eq!(ledger.reconnects, 1, "{:?}", sub.last_disconnect_reason());
    let mut gaps_after_cut = 0;
    for (topic, cut) in topics.iter().zip(&cut_at) {
        let log = &ledger.topics[topic];
        // Received and lost are disjoint (the ledger checked order) and cover 1..=ROUNDS.
        let lost: u64 = log.gaps.iter().map(|(f, t)| t - f + 1).sum();
        assert_eq!(log.last, ROUNDS, "{topic}");
        assert_eq!(log.received + lost, ROUNDS, "{topic}: {:?}", log.gaps);
        gaps_after_cut += log.gaps.iter().filter(|(f, _)| f > cut).count();
    }
    assert!(
        gaps_after_cut >= 1,
        "no GAP after an outage longer than the ring: {:?}",
        ledger.topics
    );
    assert_eq!(sub.counters().duplicates_dropped, 0);
    let ports: BTreeSet<u16> = proxy.client_ports().into_iter().collect();
    assert_eq!(ports.len(), 2, "the resume came from a new local port");

    // The same engine, by hand: a resume from seq 10 gets one GAP up to the oldest message the
    // ring still holds, then every message from there to the last, and nothing else.
    let mut raw = Raw::connect(server.addr);
    raw.hello(30_000);
    raw.send(&Frame::Subscribe(Subscribe {
        sub_id: 1,
        pattern: "tiny/#".into(),
        mode: DeliveryMode::All,
        resume: topics
            .iter()
            .map(|t| TopicPosition {
                topic: t.clone(),
                last_seq: 10,
            })
            .collect(),
    }));
    let mut ledger = Ledger::default();
    for topic in &topics {
        // Position 10: as if the first ten had been received.
        ledger.topics.insert(
            topic.clone(),
            TopicLog {
                last: 10,
                first: Some((1, false)),
                ..TopicLog::default()
            },
        );
    }
    loop {
        match raw.read(STEP) {
            Some(Got::Data {
                topic, seq, flags, ..
            }) => ledger.message(&topic, seq, flags & lanpush::proto::DATA_FLAG_SNAPSHOT != 0),
            Some(Got::Gap(g)) => ledger.gap(&g.topic, g.from_seq, g.to_seq),
            Some(Got::SubAck(_)) => break,
            Some(Got::Ping(nonce)) => raw.send(&Frame::Pong { nonce }),
            other => panic!("expected the resume and SUBACK, got {other:?}"),
        }
    }
    assert!(ledger.error.is_none(), "{:?}", ledger.error);
    // Both topics belong to the reactor of their one publisher, and what was replayed is exactly
    // what that reactor's ring held: it (RING_BYTES / 2) was full, so the frames come to less
    // than a frame short of it.
    let owned = topics_per_reactor(&server);
    assert_eq!(owned.iter().sum::<u64>(), 2, "{owned:?}");
    assert!(
        owned.contains(&2),
        "one reactor owns both topics: {owned:?}"
    );
    let mut replayed_bytes = 0u64;
    for topic in &topics {
        let log = &ledger.topics[topic];
        assert_eq!(log.last, ROUNDS, "{topic}: resumed to the end");
        assert_eq!(log.gaps.len(), 1, "{topic}: one GAP, first: {:?}", log.gaps);
        assert_eq!(log.gaps[0].0, 11, "{topic}");
        // DATA frame: 4-byte length, kind, 28 fixed bytes, topic, payload (the round).
        replayed_bytes += (log.gaps[0].1 + 1..=ROUNDS)
            .map(|round| 33 + topic.len() as u64 + round.to_string().len() as u64)
            .sum::<u64>();
    }
    let largest_frame = 33 + 6 + 4;
    let ring = RING_BYTES / 2;
    assert!(
        ring - largest_frame < replayed_bytes && replayed_bytes <= ring,
        "replayed {replayed_bytes} bytes of a {ring}-byte ring"
    );
}

// ----- 4. snapshot then live ---------------------------------------------------------------------

#[test]
fn snapshot_then_live_without_gap_or_duplicate_while_publishers_run() {
    const ROUNDS: u64 = 2000;
    /// Publisher 0's confirmed rounds at which subscriber k connects.
    const JOIN_AT: [u64; 6] = [0, 150, 400, 800, 1300, 1800];
    let _serial = serial();
    let server = Server::start();
    let addr = server.addr_string();
    let topics: [Vec<String>; 2] =
        [0, 1].map(|p| (0..3).map(|t| format!("snap/p{p}/t{t}")).collect());
    let all_topics: Vec<String> = topics.concat();
    let progress = [AtomicU64::new(0), AtomicU64::new(0)];
    // Publisher p starts once subscriber p has subscribed.
    let started = [AtomicBool::new(false), AtomicBool::new(false)];
    let results = thread::scope(|scope| {
        let publishers: Vec<_> = (0..2)
            .map(|p| {
                let (topics, progress, started, addr) =
                    (&topics[p], &progress[p], &started[p], &addr);
                scope.spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    while !started.load(Ordering::Relaxed) {
                        assert!(Instant::now() < deadline, "publisher {p} never started");
                        thread::sleep(Duration::from_millis(1));
                    }
                    let mut publisher =
                        Publisher::connect(opts(addr, &format!("snap-pub-{p}"))).unwrap();
                    let start = Instant::now();
                    for round in 1..=ROUNDS {
                        for topic in topics {
                            publisher
                                .publish(topic, round.to_string().as_bytes())
                                .unwrap();
                        }
                        if round % 10 == 0 {
                            publisher.confirm(STEP).unwrap();
                            progress.store(round, Ordering::Relaxed);
                            // Pace at about 1,000 rounds/s so that subscribers join throughout.
                            let due = start + Duration::from_millis(round);
                            thread::sleep(due.saturating_duration_since(Instant::now()));
                        }
                    }
                })
            })
            .collect();
        let mut readers = Vec::new();
        for (k, &join_at) in JOIN_AT.iter().enumerate() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while progress[0].load(Ordering::Relaxed) < join_at {
                assert!(Instant::now() < deadline, "publisher 0 stalled");
                thread::sleep(Duration::from_millis(1));
            }
            // Confirmed before SUBSCRIBE: the snapshot must be at least this recent.
            let confirmed = [0, 1].map(|p| progress[p].load(Ordering::Relaxed));
            let mut sub = Subscriber::connect(
                opts(&addr, &format!("snap-sub-{k}")),
                vec![SubscriptionSpec::new("snap/#", DeliveryMode::All)],
            )
            .unwrap();
            if let Some(started) = started.get(k) {
                // Publisher k's topics are new to subscribers 0..=k (seq 1 comes live) and old
                // to the later ones (a snapshot comes first).
                started.store(true, Ordering::Relaxed);
            }
            let all_topics = &all_topics;
            readers.push(scope.spawn(move || {
                let ledger = follow(
                    &mut sub,
                    all_topics,
                    || ROUNDS,
                    Instant::now() + Duration::from_secs(60),
                    |_| {},
                );
                (confirmed, ledger, sub.counters())
            }));
        }
        for p in publishers {
            p.join().unwrap();
        }
        readers
            .into_iter()
            .map(|r| r.join().unwrap())
            .collect::<Vec<_>>()
    });
    let mut snapshots_seen = 0;
    for (k, (confirmed, ledger, counters)) in results.iter().enumerate() {
        assert!(ledger.error.is_none(), "subscriber {k}: {:?}", ledger.error);
        assert_eq!(counters.duplicates_dropped, 0, "subscriber {k}");
        for (p, topics) in topics.iter().enumerate() {
            for topic in topics {
                let log = &ledger.topics[topic];
                assert_eq!(log.last, ROUNDS, "subscriber {k}, {topic}");
                assert!(
                    log.gaps.is_empty(),
                    "subscriber {k}, {topic}: {:?}",
                    log.gaps
                );
                let (first, snapshot) = log.first.unwrap();
                // Every seq from the first on arrived exactly once (the ledger checked order).
                assert_eq!(log.received, ROUNDS - first + 1, "subscriber {k}, {topic}");
                if confirmed[p] > 0 {
                    assert!(
                        snapshot && first >= confirmed[p],
                        "subscriber {k}, {topic}: first seq {first} (snapshot: {snapshot}), \
                         but {} were confirmed before it subscribed",
                        confirmed[p]
                    );
                    snapshots_seen += 1;
                }
            }
        }
    }
    assert!(snapshots_seen >= 3 * 6, "{snapshots_seen} snapshots");
    assert!(
        results[0]
            .1
            .topics
            .values()
            .all(|log| log.first == Some((1, false))),
        "the first subscriber saw every topic from seq 1, live"
    );
}

// ----- 5. disconnect -----------------------------------------------------------------------------

/// How a slow consumer's connection ended, as it read it afterwards.
struct SlowConsumerEnd {
    /// DATA frames it could still read (what the kernel held).
    data: u64,
    /// The ERROR before the close, if any.
    error: Option<lanpush::proto::WireError>,
    /// Rounds published when the engine was seen to have cut it, and in all.
    cut_round: u64,
    last_round: u64,
}

/// A `disconnect`-mode subscriber that never reads (a 4 KiB receive buffer) and three `all`
/// readers; a publisher publishes in small confirmed batches until the engine has cut the slow
/// one, then 2,000 rounds more. Asserts that the cut happened once and that the readers
/// received every message; returns what the slow consumer then reads.
fn disconnect_scenario() -> SlowConsumerEnd {
    const READERS: usize = 3;
    const AFTER_CUT_ROUNDS: u64 = 2000;
    const MAX_ROUNDS: u64 = 200_000;
    let (server, _config) = Server::start_with_config(
        "[delivery]\nqueue_max_bytes = 65536\nqueue_max_messages = 256\n",
    );
    let addr = server.addr_string();
    let topics: Vec<String> = ["disc/a", "disc/b"].map(String::from).to_vec();

    let mut slow = Raw::connect_with_recv_buffer(server.addr, 4096);
    slow.hello(30_000);
    slow.send(&Frame::Subscribe(Subscribe {
        sub_id: 1,
        pattern: "disc/#".into(),
        mode: DeliveryMode::Disconnect,
        resume: vec![],
    }));
    match slow.read(STEP) {
        Some(Got::SubAck(ack)) => assert_eq!(ack.mode, DeliveryMode::Disconnect),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    let readers: Vec<Subscriber> = (0..READERS)
        .map(|i| {
            Subscriber::connect(
                opts(&addr, &format!("disc-reader-{i}")),
                vec![SubscriptionSpec::new("disc/#", DeliveryMode::All)],
            )
            .unwrap()
        })
        .collect();

    let last_round = AtomicU64::new(0);
    let (results, cut_round) = thread::scope(|scope| {
        let handles: Vec<_> = readers
            .into_iter()
            .map(|mut sub| {
                let (topics, last_round) = (&topics, &last_round);
                scope.spawn(move || {
                    let ledger = follow(
                        &mut sub,
                        topics,
                        || last_round.load(Ordering::Relaxed),
                        Instant::now() + Duration::from_secs(60),
                        |_| {},
                    );
                    (ledger, sub.counters())
                })
            })
            .collect();
        // Publish until the engine has cut the slow consumer, then some more.
        let mut p = Publisher::connect(opts(&addr, "disc-pub")).unwrap();
        let mut round = 0;
        let mut cut_round = None;
        while cut_round.is_none_or(|cut| round < cut + AFTER_CUT_ROUNDS) {
            round += 1;
            for topic in &topics {
                p.publish(topic, round.to_string().as_bytes()).unwrap();
            }
            // Small confirmed batches: the engine takes them in over many loop turns, so the slow
            // consumer's queue fills because its socket is full, not in one burst.
            if round % 20 == 0 {
                p.confirm(STEP).unwrap();
            }
            if round % 500 == 0 && cut_round.is_none() {
                let stats = lanpush::client::stats(&opts(&addr, "disc-stats")).unwrap();
                let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
                if counter(&stats["totals"], "slow_disconnects") >= 1 {
                    cut_round = Some(round);
                }
            }
            assert!(round < MAX_ROUNDS, "the slow consumer was never cut");
        }
        p.confirm(STEP).unwrap();
        last_round.store(round, Ordering::Relaxed);
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (results, cut_round.unwrap())
    });
    let last = last_round.load(Ordering::Relaxed);
    for (i, (ledger, counters)) in results.iter().enumerate() {
        assert!(ledger.error.is_none(), "reader {i}: {:?}", ledger.error);
        assert_eq!(ledger.gap_count(), 0, "reader {i}");
        for topic in &topics {
            assert_eq!(ledger.topics[topic].received, last, "reader {i}, {topic}");
        }
        assert_eq!(counters.reconnects, 0, "reader {i}");
    }

    // The slow consumer, reading at last: what the kernel still held, then (ERROR and) EOF.
    let mut data = 0u64;
    let mut error = None;
    loop {
        match slow.read(STEP) {
            Some(Got::Data { .. }) if error.is_none() => data += 1,
            Some(Got::Ping(_)) | Some(Got::Pong(_)) => {}
            Some(Got::Error(e)) if error.is_none() => error = Some(e),
            Some(Got::Closed) => break,
            other => panic!("expected DATA, ERROR then EOF; got {other:?} after {data} DATA"),
        }
    }
    let stats = server.stats();
    assert_eq!(counter(&stats["totals"], "slow_disconnects"), 1);
    eprintln!(
        "disconnect: slow consumer cut by round {cut_round} of {last}; it read {data} DATA, \
         then {error:?} and EOF"
    );
    SlowConsumerEnd {
        data,
        error,
        cut_round,
        last_round: last,
    }
}

#[test]
fn disconnect_mode_cuts_a_stalled_consumer_while_others_keep_receiving() {
    let _serial = serial();
    let end = disconnect_scenario();
    assert!(end.cut_round < end.last_round);
    assert!(end.data > 0, "the kernel held some DATA for it");
    // Whether the ERROR arrived is the next test's subject.
    if let Some(error) = end.error {
        assert_eq!(error.code, error_code::SLOW_CONSUMER, "{error:?}");
    }
}

/// The ERROR must reach the consumer even though its socket was full when it was cut: the
/// engine drops the queued frames behind the one in progress, writes the ERROR as the socket
/// drains during the linger, and only then shuts the write side.
#[test]
fn a_stalled_disconnect_mode_consumer_is_told_why_with_error_10() {
    let _serial = serial();
    let end = disconnect_scenario();
    assert_eq!(
        end.error.map(|e| e.code),
        Some(error_code::SLOW_CONSUMER),
        "after {} DATA frames the connection closed without ERROR 10",
        end.data
    );
}
