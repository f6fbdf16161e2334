//! One benchmark run: connect, load, drain, and assemble the [`RunResult`].
//!
//! Order of events: every subscriber connects and subscribes (so the broker confirmed every
//! subscription before the first message), then every publisher connects; the run starts
//! [`START_DELAY`] later on a shared clock, warms up, measures, and stops publishing at the end
//! of the window. Subscribers then drain until every expected message arrived, or nothing
//! arrived for [`DRAIN_IDLE`], or [`DRAIN_MAX`] passed. A progress line goes to stderr every
//! second.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::clock::{Clock, WallClock};
use crate::driver::Driver;
use crate::engine_probe::{EngineProbe, ProbeSpec};
use crate::error::BenchError;
use crate::params::{Params, ScenarioKind};
use crate::publisher::{run_publisher_thread, PubSlot};
use crate::recorder::{new_histogram, Recorder, Window};
use crate::report::{
    fmt_count, CpuStats, DeliverStats, HistogramDump, Percentiles, PublishStats, RunResult,
    TargetInfo, RESULT_FORMAT,
};
use crate::scenario::{expected_for, plan, stalled};
use crate::subscriber::{run_subscriber_thread, SubSlot};

/// Between the last connection and the first intended send: lets every thread reach its loop.
const START_DELAY: Duration = Duration::from_millis(200);
/// The drain ends when nothing arrived for this long...
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// ...or after this long in any case.
const DRAIN_MAX: Duration = Duration::from_secs(15);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// Counters the worker threads bump once per turn (not per message) for the progress line and
/// the drain.
#[derive(Debug, Default)]
pub struct Progress {
    sent: AtomicU64,
    delivered: AtomicU64,
    /// Unpaced publishers' in-flight window (0 = open loop) and the deliveries one published
    /// message makes on average (fan-out 1→S: S).
    window: u64,
    deliveries_per_message: f64,
    measured: AtomicU64,
    recent_max_ns: AtomicU64,
}

impl Progress {
    /// True while more than `window` messages are sent but not yet received (averaged over the
    /// subscribers that should receive them): an unpaced publisher then waits.
    pub fn over_window(&self) -> bool {
        if self.window == 0 || self.deliveries_per_message <= 0.0 {
            return false;
        }
        let sent = self.sent.load(Ordering::Relaxed) as f64;
        let delivered = self.delivered.load(Ordering::Relaxed) as f64;
        sent - delivered / self.deliveries_per_message > self.window as f64
    }

    pub fn add_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Adds `n` deliveries and takes over what `recorder` measured since its last report.
    pub fn add_delivered(&self, n: u64, recorder: &mut Recorder) {
        self.delivered.fetch_add(n, Ordering::Relaxed);
        let measured = recorder.histogram.len();
        self.measured
            .fetch_add(measured - recorder.measured_reported, Ordering::Relaxed);
        recorder.measured_reported = measured;
        self.recent_max_ns
            .fetch_max(recorder.recent_max_ns, Ordering::Relaxed);
        recorder.recent_max_ns = 0;
    }
}

/// Opens one subscriber connection and waits until its subscription is confirmed.
fn connect_subscriber(
    driver: &dyn Driver,
    sub: &crate::scenario::SubPlan,
    role: &str,
) -> Result<Box<dyn crate::driver::SubConn>, BenchError> {
    let mut conn = driver
        .subscriber(&sub.client_id)
        .map_err(BenchError::connect(format!(
            "connecting {role} {}",
            sub.client_id
        )))?;
    conn.subscribe(&sub.pattern)
        .map_err(BenchError::connect(format!(
            "subscribing {} to {}",
            sub.client_id, sub.pattern
        )))?;
    Ok(conn)
}

/// Deliveries one published message makes, averaged over the published topics.
fn deliveries_per_message(plan: &crate::scenario::Plan) -> f64 {
    let topics: Vec<&str> = plan
        .publishers
        .iter()
        .flat_map(|p| p.topics.iter().map(String::as_str))
        .collect();
    if topics.is_empty() {
        return 0.0;
    }
    let deliveries: u64 = topics
        .iter()
        .map(|&topic| {
            plan.subscribers
                .iter()
                .map(|s| expected_for(&s.pattern, &[(topic, 1)]))
                .sum::<u64>()
        })
        .sum();
    deliveries as f64 / topics.len() as f64
}

/// Progress line printer: rates over the last interval.
struct Ticker {
    quiet: bool,
    started: Instant,
    last: Instant,
    last_sent: u64,
    last_delivered: u64,
}

impl Ticker {
    fn line(&mut self, progress: &Progress, phase: &str, extra: &str) {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64().max(1e-3);
        let sent = progress.sent.load(Ordering::Relaxed);
        let delivered = progress.delivered.load(Ordering::Relaxed);
        let max_ns = progress.recent_max_ns.swap(0, Ordering::Relaxed);
        if !self.quiet {
            eprintln!(
                "[{:6.1}s] {phase:<9} sent {:>11} msg/s  delivered {:>12} msg/s  max latency {:>9}{extra}",
                now.duration_since(self.started).as_secs_f64(),
                fmt_count((sent - self.last_sent) as f64 / secs),
                fmt_count((delivered - self.last_delivered) as f64 / secs),
                if max_ns == 0 {
                    "-".to_string()
                } else {
                    crate::report::fmt_us(max_ns as f64 / 1_000.0) + " µs"
                },
            );
        }
        self.last = now;
        self.last_sent = sent;
        self.last_delivered = delivered;
    }
}

/// CPU used so far by the tool and by the engine it started.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    tool_ns: u64,
    engine_ns: Option<u64>,
}

impl CpuSample {
    fn take(engine_pid: Option<u32>) -> Self {
        CpuSample {
            at: Instant::now(),
            tool_ns: crate::sys::process_cpu_ns(),
            engine_ns: engine_pid.and_then(crate::sys::other_process_cpu_ns),
        }
    }

    /// Percent of one core used by each between `self` and `later`.
    fn usage_until(&self, later: &CpuSample) -> CpuStats {
        let wall_ns = later.at.duration_since(self.at).as_nanos().max(1) as f64;
        let pct = |a: u64, b: u64| b.saturating_sub(a) as f64 * 100.0 / wall_ns;
        CpuStats {
            tool_pct: pct(self.tool_ns, later.tool_ns),
            engine_pct: match (self.engine_ns, later.engine_ns) {
                (Some(a), Some(b)) => Some(pct(a, b)),
                _ => None,
            },
        }
    }
}

/// Splits `items` round-robin into `n` groups (so each group gets a mix of patterns).
fn deal<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = (0..n.max(1)).map(|_| Vec::new()).collect();
    let len = groups.len();
    for (i, item) in items.into_iter().enumerate() {
        groups[i % len].push(item);
    }
    groups
}

/// The handles that were spawned; the first spawn error goes to `error`.
fn keep_spawned<T>(handles: Vec<std::io::Result<T>>, error: &mut Option<std::io::Error>) -> Vec<T> {
    let mut kept = Vec::with_capacity(handles.len());
    for handle in handles {
        match handle {
            Ok(handle) => kept.push(handle),
            Err(e) => {
                error.get_or_insert(e);
            }
        }
    }
    kept
}

/// Runs the scenario of `params` against `driver`. `probe` (the engine's pid: the one the tool
/// started, or `--engine-pid`) is only used to report what the engine spent.
pub fn run(
    params: &Params,
    driver: &dyn Driver,
    target: TargetInfo,
    probe: &ProbeSpec,
    quiet: bool,
) -> Result<RunResult, BenchError> {
    let engine_pid = probe.pid;
    let plan = plan(params);
    let say = |msg: String| {
        if !quiet {
            eprintln!("{msg}");
        }
    };

    let stalled_plan = stalled(params);
    say(format!(
        "connecting {} subscriber(s){} and {} publisher(s) to {} {}",
        plan.subscribers.len(),
        if stalled_plan.is_empty() {
            String::new()
        } else {
            format!(" (+{} stalled)", stalled_plan.len())
        },
        plan.publishers.len(),
        target.driver,
        target.address
    ));
    let mut sub_slots = Vec::with_capacity(plan.subscribers.len());
    for sub in &plan.subscribers {
        let conn = connect_subscriber(driver, sub, "subscriber")?;
        sub_slots.push(SubSlot::new(
            sub.client_id.clone(),
            sub.pattern.clone(),
            conn,
        ));
    }
    if sub_slots.iter().any(|s| s.conn.raw_fd().is_none()) {
        say(format!(
            "note: the {} driver exposes no socket to wait on; its subscribers are polled, \
             which adds up to ~100 µs of latency",
            driver.name()
        ));
    }
    let clock = WallClock::new();
    let mut pub_conns = Vec::with_capacity(plan.publishers.len());
    for publisher in &plan.publishers {
        let conn = driver
            .publisher(&publisher.client_id)
            .map_err(BenchError::connect(format!(
                "connecting publisher {}",
                publisher.client_id
            )))?;
        pub_conns.push(conn);
    }
    // Stalled subscribers subscribe like the others, then are never polled: the broker must
    // cope with consumers that stop reading. Held until every figure is taken; counted nowhere.
    // They connect last, so that the measured connections land where they would without them
    // (a multi-reactor broker deals connections out in order: adding one earlier would move
    // the publisher to another reactor and change the run for a reason other than the stall).
    let mut stalled_conns = Vec::with_capacity(stalled_plan.len());
    for sub in &stalled_plan {
        stalled_conns.push(connect_subscriber(driver, sub, "stalled subscriber")?);
    }

    let run_start_ns = clock.now_ns() + START_DELAY.as_nanos() as u64;
    let measure_start_ns = run_start_ns + (params.warmup_s * 1e9) as u64;
    let window = Window {
        run_start_ns,
        measure_start_ns,
        end_ns: measure_start_ns + (params.duration_s * 1e9) as u64,
    };
    let started_unix_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let pub_slots: Vec<PubSlot> = plan
        .publishers
        .iter()
        .zip(pub_conns)
        .map(|(p, conn)| {
            PubSlot::new(
                p.client_id.clone(),
                conn,
                p.topics.clone(),
                p.pacing.pace(run_start_ns),
                params.size_bytes,
            )
        })
        .collect();

    let progress = Progress {
        window: params.window,
        deliveries_per_message: deliveries_per_message(&plan),
        ..Progress::default()
    };
    let stop_subscribers = AtomicBool::new(false);
    let stop_publishers = AtomicBool::new(false);
    let sub_groups = deal(sub_slots, params.sub_threads);
    let pub_groups = deal(pub_slots, params.pub_threads);
    let mut ticker = Ticker {
        quiet,
        started: Instant::now(),
        last: Instant::now(),
        last_sent: 0,
        last_delivered: 0,
    };

    let mut cpu_start = None;
    let mut cpu_end = None;
    let mut engine_probe = None;
    let mut engine = None;
    let (pub_results, sub_results) = std::thread::scope(|scope| {
        let sub_handles: Vec<_> = sub_groups
            .into_iter()
            .enumerate()
            .map(|(i, mut slots)| {
                let (clock, progress, stop) = (&clock, &progress, &stop_subscribers);
                std::thread::Builder::new()
                    .name(format!("bench-sub{i}"))
                    .spawn_scoped(scope, move || {
                        let mut recorder = Recorder::new(window);
                        let outcome =
                            run_subscriber_thread(clock, &mut slots, &mut recorder, stop, progress);
                        (slots, recorder, outcome)
                    })
            })
            .collect();
        let pub_handles: Vec<_> = pub_groups
            .into_iter()
            .enumerate()
            .map(|(i, mut slots)| {
                let (clock, progress, stop) = (&clock, &progress, &stop_publishers);
                std::thread::Builder::new()
                    .name(format!("bench-pub{i}"))
                    .spawn_scoped(scope, move || {
                        crate::sys::tighten_timer_slack();
                        let report =
                            run_publisher_thread(clock, &mut slots, &window, stop, progress);
                        (slots, report)
                    })
            })
            .collect();
        // A failed spawn (out of threads) must still stop and join the ones that started.
        let mut spawn_error = None;
        let sub_handles = keep_spawned(sub_handles, &mut spawn_error);
        let pub_handles = keep_spawned(pub_handles, &mut spawn_error);
        if let Some(source) = spawn_error {
            stop_publishers.store(true, Ordering::Relaxed);
            stop_subscribers.store(true, Ordering::Relaxed);
            return Err(BenchError::Io {
                context: "spawning benchmark threads".into(),
                source,
            });
        }

        let mut next_tick = Instant::now() + PROGRESS_INTERVAL;
        while !pub_handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(20));
            if cpu_start.is_none() && clock.now_ns() >= window.measure_start_ns {
                cpu_start = Some(CpuSample::take(engine_pid));
                engine_probe = Some(EngineProbe::start(probe));
            }
            if Instant::now() >= next_tick {
                next_tick += PROGRESS_INTERVAL;
                let now = clock.now_ns();
                let phase = if now < window.run_start_ns {
                    "starting"
                } else if now < window.measure_start_ns {
                    "warm-up"
                } else {
                    "measuring"
                };
                ticker.line(&progress, phase, "");
            }
        }
        cpu_end = Some(CpuSample::take(engine_pid));
        engine = engine_probe.take().map(EngineProbe::finish);
        let pub_results: Vec<_> = pub_handles
            .into_iter()
            .map(|h| h.join().expect("publisher thread panicked"))
            .collect();

        // What should arrive: per subscriber, the measured messages on topics it matches.
        let mut sent: Vec<(&str, u64)> = Vec::new();
        for (slots, _) in &pub_results {
            for slot in slots {
                for (topic, &n) in slot.topics.iter().zip(&slot.sent_measured) {
                    sent.push((topic.as_str(), n));
                }
            }
        }
        let expected_total: u64 = plan
            .subscribers
            .iter()
            .map(|s| expected_for(&s.pattern, &sent))
            .sum();

        let drain_started = Instant::now();
        let mut last_change = Instant::now();
        let mut last_delivered = progress.delivered.load(Ordering::Relaxed);
        loop {
            let measured = progress.measured.load(Ordering::Relaxed);
            if measured >= expected_total
                || last_change.elapsed() >= DRAIN_IDLE
                || drain_started.elapsed() >= DRAIN_MAX
                || sub_handles.iter().all(|h| h.is_finished())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
            let delivered = progress.delivered.load(Ordering::Relaxed);
            if delivered != last_delivered {
                last_delivered = delivered;
                last_change = Instant::now();
            }
            if Instant::now() >= next_tick {
                next_tick += PROGRESS_INTERVAL;
                ticker.line(
                    &progress,
                    "draining",
                    &format!(
                        "  ({} of {} expected)",
                        fmt_count(measured as f64),
                        fmt_count(expected_total as f64)
                    ),
                );
            }
        }
        stop_subscribers.store(true, Ordering::Relaxed);
        let sub_results: Vec<_> = sub_handles
            .into_iter()
            .map(|h| h.join().expect("subscriber thread panicked"))
            .collect();
        Ok((pub_results, sub_results))
    })?;

    // Assemble.
    let mut errors = Vec::new();
    let mut latency = new_histogram();
    let mut send_lag = new_histogram();
    let mut publish = PublishStats {
        connections: params.publishers,
        threads: pub_results.len(),
        messages: 0,
        warmup_messages: 0,
        msg_per_s: 0.0,
        payload_mb_per_s: 0.0,
        failed_connections: 0,
    };
    let mut sent: Vec<(String, u64)> = Vec::new();
    for (slots, report) in &pub_results {
        // Same bounds on both sides: adding cannot fail.
        send_lag
            .add(&report.send_lag)
            .expect("histograms share bounds");
        for slot in slots {
            publish.messages += slot.sent_measured_total();
            publish.warmup_messages += slot.sent_warmup;
            if let Some(e) = &slot.failed {
                publish.failed_connections += 1;
                errors.push(e.clone());
            }
            for (topic, &n) in slot.topics.iter().zip(&slot.sent_measured) {
                sent.push((topic.clone(), n));
            }
        }
    }
    let sent_refs: Vec<(&str, u64)> = sent.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let seconds = window.measured_seconds();
    publish.msg_per_s = publish.messages as f64 / seconds;
    publish.payload_mb_per_s = publish.msg_per_s * params.size_bytes as f64 / 1e6;

    let mut deliver = DeliverStats {
        connections: params.subscribers,
        threads: sub_results.len(),
        expected: 0,
        received: 0,
        lost: 0,
        extra: 0,
        warmup_messages: 0,
        stale_messages: 0,
        msg_per_s: 0.0,
        payload_mb_per_s: 0.0,
        incomplete_subscribers: 0,
        failed_connections: 0,
    };
    let mut arrived_in_window = 0;
    for (slots, recorder, outcome) in &sub_results {
        if let Err(e) = outcome {
            errors.push(format!("subscriber thread: {e}"));
        }
        latency
            .add(&recorder.histogram)
            .expect("histograms share bounds");
        arrived_in_window += recorder.arrived_in_window;
        for slot in slots {
            let expected = expected_for(&slot.pattern, &sent_refs);
            deliver.expected += expected;
            deliver.received += slot.counts.measured;
            deliver.warmup_messages += slot.counts.warmup;
            deliver.stale_messages += slot.counts.stale;
            if slot.counts.measured < expected {
                deliver.incomplete_subscribers += 1;
            }
            if let Some(e) = &slot.failed {
                deliver.failed_connections += 1;
                errors.push(e.clone());
            }
        }
    }
    deliver.lost = deliver.expected.saturating_sub(deliver.received);
    deliver.extra = deliver.received.saturating_sub(deliver.expected);
    deliver.msg_per_s = arrived_in_window as f64 / seconds;
    deliver.payload_mb_per_s = deliver.msg_per_s * params.size_bytes as f64 / 1e6;

    let label = params.label.clone().unwrap_or_else(|| {
        let rate = if params.rate == 0.0 {
            "max".to_string()
        } else {
            format!("{}/s", fmt_count(params.rate))
        };
        let shape = match params.scenario {
            ScenarioKind::Plant => format!(
                "{}gw x {} tags/{} ms -> {} hmi",
                params.publishers, params.tags, params.cycle_ms, params.subscribers
            ),
            _ => format!("{} -> {}", params.publishers, params.subscribers),
        };
        let shape = if params.stalled > 0 {
            format!("{shape} +{} stalled", params.stalled)
        } else {
            shape
        };
        format!(
            "{} {} {} {}",
            target.driver,
            params.scenario.name(),
            shape,
            rate
        )
    });
    drop(stalled_conns);
    let cpu = match (cpu_start, cpu_end) {
        (Some(start), Some(end)) => start.usage_until(&end),
        _ => CpuStats {
            tool_pct: 0.0,
            engine_pct: None,
        },
    };
    Ok(RunResult {
        tool: "lanpush-bench".into(),
        format: RESULT_FORMAT,
        label,
        target,
        params: params.clone(),
        started_unix_ms,
        window,
        publish,
        deliver,
        latency_us: Percentiles::of(&latency),
        send_lag_us: Percentiles::of(&send_lag),
        cpu,
        engine: engine.unwrap_or_default(),
        errors,
        histogram: HistogramDump::of(&latency),
        provenance: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpaced_publishers_wait_while_the_window_is_full() {
        let progress = Progress {
            window: 10,
            deliveries_per_message: 2.0,
            ..Progress::default()
        };
        progress.sent.store(20, Ordering::Relaxed);
        progress.delivered.store(10, Ordering::Relaxed); // 15 messages in flight
        assert!(progress.over_window());
        progress.delivered.store(30, Ordering::Relaxed); // 5 in flight
        assert!(!progress.over_window());
        let open_loop = Progress {
            window: 0,
            deliveries_per_message: 2.0,
            ..Progress::default()
        };
        open_loop.sent.store(1_000_000, Ordering::Relaxed);
        assert!(!open_loop.over_window());
    }
    use crate::lanpush_driver::LanpushDriver;
    use crate::params::ParamArgs;
    use crate::testutil::FakeEngine;

    fn run_against_fake(kind: ScenarioKind, args: ParamArgs) -> (RunResult, FakeEngine) {
        let engine = FakeEngine::start();
        let driver = LanpushDriver::new(&engine.addr).unwrap();
        let params = Params::resolve(kind, args).unwrap();
        let target = TargetInfo {
            driver: "lanpush".into(),
            address: engine.addr.clone(),
            engine_started: false,
        };
        let result = run(&params, &driver, target, &ProbeSpec::default(), true).unwrap();
        (result, engine)
    }

    /// The whole tool against a stand-in engine: every scheduled message arrives once at every
    /// subscriber, snapshots are ignored, engine PINGs are answered.
    #[test]
    fn fanout_run_counts_every_delivery() {
        let (result, engine) = run_against_fake(
            ScenarioKind::Fanout,
            ParamArgs {
                subscribers: Some(3),
                rate: Some(2_000.0),
                warmup: Some(0.2),
                duration: Some(0.5),
                ..Default::default()
            },
        );
        assert_eq!(result.publish.messages, 1_000);
        assert_eq!(result.publish.warmup_messages, 400);
        assert_eq!(engine.publishes(), 1_400);
        let d = &result.deliver;
        assert_eq!(
            (d.expected, d.received, d.lost, d.extra),
            (3_000, 3_000, 0, 0)
        );
        assert_eq!(d.warmup_messages, 1_200);
        assert_eq!(
            d.stale_messages, 0,
            "snapshots must not reach the measurement"
        );
        assert_eq!(result.latency_us.count, 3_000);
        assert_eq!(
            result.send_lag_us.count, 1_000,
            "the publisher's lag counts measured messages only, not the warm-up's 400"
        );
        assert!(result.errors.is_empty(), "{:?}", result.errors);
        assert_eq!(engine.pongs(), 3);
        // Round trip through JSON, as --plot --overlay reads it.
        let dir = std::env::temp_dir().join(format!("lanpush-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fanout.json");
        result.save(&path).unwrap();
        let back = RunResult::load(&path).unwrap();
        // Floats may differ in the last bit through JSON; what --plot uses must be exact.
        assert!(
            back.histogram == result.histogram,
            "histogram changed through JSON"
        );
        assert!(back.params == result.params && back.label == result.label);
        assert_eq!(back.deliver.received, result.deliver.received);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Stalled subscribers subscribe, then never read (they never answer the fake engine's
    /// PING), and appear in no figure.
    #[test]
    fn stalled_subscribers_subscribe_but_are_not_counted() {
        let (result, engine) = run_against_fake(
            ScenarioKind::Fanout,
            ParamArgs {
                subscribers: Some(2),
                stalled: Some(1),
                rate: Some(2_000.0),
                warmup: Some(0.2),
                duration: Some(0.5),
                ..Default::default()
            },
        );
        assert_eq!(engine.subscriptions(), 3);
        assert_eq!(engine.pongs(), 2, "the stalled subscriber read its PING");
        let d = &result.deliver;
        assert_eq!(d.connections, 2);
        assert_eq!(
            (d.expected, d.received, d.lost, d.extra),
            (2_000, 2_000, 0, 0)
        );
        assert_eq!(result.latency_us.count, 2_000);
        assert!(result.label.contains("+1 stalled"), "{}", result.label);
        assert!(result.table().contains("+1 stalled"));
    }

    /// Overlapping plant patterns: each HMI expects exactly the tags its pattern matches.
    #[test]
    fn plant_run_expects_per_pattern_counts() {
        let (result, _engine) = run_against_fake(
            ScenarioKind::Plant,
            ParamArgs {
                gateways: Some(2),
                tags: Some(5),
                cycle_ms: Some(50),
                hmis: Some(8),
                warmup: Some(0.1),
                duration: Some(0.5),
                ..Default::default()
            },
        );
        // 10 cycles x 2 gateways x 5 tags.
        assert_eq!(result.publish.messages, 100);
        // 2 x plant/# (100 each), gw0/# and gw1/# (50 each), +/tag0 and +/tag1 (20 each),
        // gw0/tag0 and gw1/tag1 (10 each).
        let d = &result.deliver;
        assert_eq!(d.expected, 2 * 100 + 2 * 50 + 2 * 20 + 2 * 10);
        assert_eq!((d.received, d.lost), (d.expected, 0));
    }

    #[test]
    fn unpaced_run_is_lossless_through_a_blocking_engine() {
        let (result, _engine) = run_against_fake(
            ScenarioKind::Fanin,
            ParamArgs {
                publishers: Some(2),
                rate: Some(0.0),
                warmup: Some(0.1),
                duration: Some(0.3),
                ..Default::default()
            },
        );
        assert!(result.publish.messages > 0);
        assert_eq!(result.deliver.received, result.deliver.expected);
        assert_eq!(result.deliver.expected, result.publish.messages);
        assert_eq!(result.send_lag_us.count, 0);
    }
}
