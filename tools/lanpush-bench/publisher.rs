//! Publishing on a fixed schedule.
//!
//! Message `i` of a publisher is *intended* at `start + (i / burst) * period`, whatever happened
//! to the messages before it. The loop sleeps until the earliest intended time of its
//! publishers, then sends every message whose time has come (one burst, or a backlog after a
//! stall) and flushes once. The intended time goes into the payload, so a subscriber's
//! `arrival - intended` includes any time the message waited to be sent: a stalled broker that
//! blocks the publisher cannot hide the stall by delaying the measurements themselves.

use std::sync::atomic::{AtomicBool, Ordering};

use hdrhistogram::Histogram;

use crate::clock::Clock;
use crate::driver::PubConn;
use crate::recorder::{new_histogram, write_intended, Window, LATENCY_HIGH_NS};
use crate::runner::Progress;

/// Most messages one publisher sends in one turn before the loop flushes and looks at the
/// others: a publisher far behind its schedule cannot starve the rest of its thread.
const MAX_MESSAGES_PER_TURN: usize = 4096;
/// How long an unpaced publisher at its in-flight window waits before looking again.
const WINDOW_RECHECK_NS: u64 = 20_000;
/// Unpaced publishers send batches of about this many bytes per flush.
const UNPACED_BATCH_BYTES: usize = 16 * 1024;

/// When message `i` is intended: `start_ns + (i / burst) * period_num / period_den` ns. The period
/// is a fraction so that a rate like 3 msg/s has no drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub start_ns: u64,
    /// Messages sent together at each tick (the tags of one PLC scan); 1 for a plain rate.
    pub burst: u64,
    pub period_num: u128,
    pub period_den: u128,
}

impl Schedule {
    /// `rate_per_s` messages a second, one per tick.
    pub fn at_rate(start_ns: u64, rate_per_s: f64) -> Self {
        // Rates are given with up to 3 decimals (e.g. 0.5 msg/s): keep them exact in millis.
        let millirate = (rate_per_s * 1000.0).round().max(1.0) as u128;
        Self {
            start_ns,
            burst: 1,
            period_num: 1_000_000_000_000,
            period_den: millirate,
        }
    }

    /// `burst` messages every `period_ns`.
    pub fn bursts(start_ns: u64, burst: u64, period_ns: u64) -> Self {
        Self {
            start_ns,
            burst: burst.max(1),
            period_num: period_ns as u128,
            period_den: 1,
        }
    }

    pub fn intended_ns(&self, index: u64) -> u64 {
        let tick = (index / self.burst) as u128;
        self.start_ns + (tick * self.period_num / self.period_den) as u64
    }
}

/// How a publisher paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Scheduled(Schedule),
    /// As fast as the connection takes them; the intended time is the time of sending.
    Unpaced,
}

/// One publishing connection and its place in its schedule.
pub struct PubSlot {
    pub client_id: String,
    pub conn: Box<dyn PubConn>,
    /// Message `i` goes to `topics[i % topics.len()]`.
    pub topics: Vec<String>,
    pub pace: Pace,
    pub payload: Vec<u8>,
    /// Index of the next message.
    pub next: u64,
    pub sent_warmup: u64,
    /// Messages intended in the measured window, per topic (same indices as `topics`).
    pub sent_measured: Vec<u64>,
    /// The error that stopped this publisher, if any.
    pub failed: Option<String>,
    done: bool,
}

impl PubSlot {
    pub fn new(
        client_id: String,
        conn: Box<dyn PubConn>,
        topics: Vec<String>,
        pace: Pace,
        payload_bytes: usize,
    ) -> Self {
        let mut payload = vec![0u8; payload_bytes];
        // Recognisable filler after the timestamp; compressible links would be an unfair win.
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
        }
        let sent_measured = vec![0; topics.len()];
        Self {
            client_id,
            conn,
            topics,
            pace,
            payload,
            next: 0,
            sent_warmup: 0,
            sent_measured,
            failed: None,
            done: false,
        }
    }

    pub fn sent_measured_total(&self) -> u64 {
        self.sent_measured.iter().sum()
    }

    /// Sends one message intended at `intended_ns`; the caller flushes.
    fn send_one(&mut self, intended_ns: u64, window: &Window) -> std::io::Result<()> {
        let topic_index = (self.next % self.topics.len() as u64) as usize;
        write_intended(&mut self.payload, intended_ns);
        self.conn
            .publish(&self.topics[topic_index], &self.payload)?;
        if intended_ns >= window.measure_start_ns {
            self.sent_measured[topic_index] += 1;
        } else {
            self.sent_warmup += 1;
        }
        self.next += 1;
        Ok(())
    }

    fn fail(&mut self, error: std::io::Error) {
        self.failed = Some(format!("publisher {}: {error}", self.client_id));
        self.done = true;
    }
}

/// What a publisher thread measured about itself.
pub struct PubThreadReport {
    /// How late each message was sent relative to its intended time (ns). A high tail here means
    /// the load generator, not the broker, fell behind (or the broker pushed back on writes).
    pub send_lag: Histogram<u64>,
}

/// Runs `slots` until every message intended before `window.end_ns` is sent, a publisher fails
/// (the others go on) or `stop` is set. Returns when all slots are done.
pub fn run_publisher_thread<C: Clock>(
    clock: &C,
    slots: &mut [PubSlot],
    window: &Window,
    stop: &AtomicBool,
    progress: &Progress,
) -> PubThreadReport {
    let mut send_lag = new_histogram();
    // Scheduled publishers would wait anyway; unpaced ones must not flood before the start.
    clock.sleep_until(window.run_start_ns);
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let mut next_deadline = u64::MAX;
        let mut active = 0usize;
        // One clock reading per turn for all idle publishers of the thread; `send_due` reads it
        // again only after it wrote something.
        let mut now = clock.now_ns();
        for slot in slots.iter_mut().filter(|s| !s.done) {
            active += 1;
            let sent = match slot.pace {
                Pace::Scheduled(schedule) => send_due(
                    clock,
                    &mut now,
                    slot,
                    schedule,
                    window,
                    &mut send_lag,
                    &mut next_deadline,
                ),
                Pace::Unpaced if progress.over_window() => {
                    // Closed loop: wait for the subscribers to take what is in flight.
                    next_deadline = next_deadline.min(now + WINDOW_RECHECK_NS);
                    Ok(0)
                }
                Pace::Unpaced => {
                    next_deadline = 0;
                    send_unpaced(clock, slot, window)
                }
            };
            match sent {
                Ok(0) => {}
                Ok(n) => {
                    if let Err(error) = slot.conn.flush() {
                        slot.fail(error);
                    }
                    progress.add_sent(n as u64);
                }
                Err(error) => slot.fail(error),
            }
        }
        if active == 0 {
            break;
        }
        if next_deadline != u64::MAX && next_deadline > clock.now_ns() {
            clock.sleep_until(next_deadline);
        }
    }
    for slot in slots.iter_mut().filter(|s| s.failed.is_none()) {
        if let Err(error) = slot.conn.flush() {
            slot.fail(error);
        }
    }
    PubThreadReport { send_lag }
}

/// Publishes every message of `slot` whose intended time has come by `now` (at most
/// [`MAX_MESSAGES_PER_TURN`]); lowers `next_deadline` to the next one not yet due.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
fn send_due<C: Clock>(
    clock: &C,
    now: &mut u64,
    slot: &mut PubSlot,
    schedule: Schedule,
    window: &Window,
    send_lag: &mut Histogram<u64>,
    next_deadline: &mut u64,
) -> std::io::Result<usize> {
    let mut sent = 0;
    while sent < MAX_MESSAGES_PER_TURN {
        let intended = schedule.intended_ns(slot.next);
        if intended >= window.end_ns {
            slot.done = true;
            return Ok(sent);
        }
        if intended > *now {
            if sent == 0 {
                *next_deadline = (*next_deadline).min(intended);
                return Ok(0);
            }
            // Writing took time: look again before deciding to sleep.
            *now = clock.now_ns();
            if intended > *now {
                *next_deadline = (*next_deadline).min(intended);
                return Ok(sent);
            }
        }
        // The warm-up is left out of every figure, the tool's own lag included.
        if intended >= window.measure_start_ns {
            send_lag.saturating_record((*now - intended).min(LATENCY_HIGH_NS));
        }
        slot.send_one(intended, window)?;
        sent += 1;
    }
    *next_deadline = 0;
    Ok(sent)
}

/// Publishes one batch of about [`UNPACED_BATCH_BYTES`], all stamped with the time of sending.
fn send_unpaced<C: Clock>(
    clock: &C,
    slot: &mut PubSlot,
    window: &Window,
) -> std::io::Result<usize> {
    let now = clock.now_ns();
    if now >= window.end_ns {
        slot.done = true;
        return Ok(0);
    }
    let frame_bytes = slot.payload.len() + slot.topics[0].len() + 16;
    let batch = (UNPACED_BATCH_BYTES / frame_bytes).clamp(1, MAX_MESSAGES_PER_TURN);
    for _ in 0..batch {
        slot.send_one(now, window)?;
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::VirtualClock;
    use crate::recorder::{intended_ns, Class, Recorder};
    use std::io;
    use std::sync::{Arc, Mutex};

    #[test]
    fn schedule_has_no_drift() {
        let s = Schedule::at_rate(1_000, 3.0);
        assert_eq!(s.intended_ns(0), 1_000);
        assert_eq!(s.intended_ns(1), 1_000 + 333_333_333);
        assert_eq!(s.intended_ns(3_000_000), 1_000 + 1_000_000 * 1_000_000_000);
        let b = Schedule::bursts(0, 10, 100_000_000);
        assert_eq!(b.intended_ns(9), 0);
        assert_eq!(b.intended_ns(10), 100_000_000);
        assert_eq!(b.intended_ns(25), 200_000_000);
    }

    /// A system under test that delivers each message the moment it is published, except that one
    /// publish blocks the caller for `stall_ns` (a broker that stops reading its socket). It
    /// records both the corrected latency (the real `Recorder`, from the payload's intended time)
    /// and the naive one (from the moment the publisher actually handed the message over).
    struct StallingBroker {
        clock: Arc<VirtualClock>,
        stall_at_publish: u64,
        stall_ns: u64,
        publishes: u64,
        corrected: Arc<Mutex<Recorder>>,
        naive: Arc<Mutex<Histogram<u64>>>,
    }

    impl PubConn for StallingBroker {
        fn publish(&mut self, _topic: &str, payload: &[u8]) -> io::Result<()> {
            let sent_at = self.clock.now_ns();
            if self.publishes == self.stall_at_publish {
                self.clock.advance(self.stall_ns);
            }
            self.publishes += 1;
            // One microsecond of honest work per message.
            self.clock.advance(1_000);
            let arrived = self.clock.now_ns();
            let class = self
                .corrected
                .lock()
                .unwrap()
                .handle_message(arrived, payload);
            if class == Class::Measured {
                assert!(intended_ns(payload).unwrap() <= sent_at);
                self.naive
                    .lock()
                    .unwrap()
                    .saturating_record(arrived - sent_at);
            }
            Ok(())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// Coordinated omission: 1,000 msg/s for 20 s with one 1 s stall. A naive measurement sees one
    /// slow message in 20,000 (p99.9 still 1 µs); measuring from the intended time shows the
    /// ~1,000 messages the stall delayed, so p99 is hundreds of milliseconds.
    #[test]
    fn a_stall_shows_in_the_corrected_percentiles_but_not_in_naive_ones() {
        const START: u64 = 1_700_000_000_000_000_000;
        let clock = Arc::new(VirtualClock::starting_at(START));
        let window = Window {
            run_start_ns: START,
            measure_start_ns: START,
            end_ns: START + 20_000_000_000,
        };
        let corrected = Arc::new(Mutex::new(Recorder::new(window)));
        let naive = Arc::new(Mutex::new(new_histogram()));
        let broker = StallingBroker {
            clock: clock.clone(),
            stall_at_publish: 5_000,
            stall_ns: 1_000_000_000,
            publishes: 0,
            corrected: corrected.clone(),
            naive: naive.clone(),
        };
        let mut slots = vec![PubSlot::new(
            "p0".into(),
            Box::new(broker),
            vec!["bench/co".into()],
            Pace::Scheduled(Schedule::at_rate(START, 1_000.0)),
            64,
        )];
        let stop = AtomicBool::new(false);
        let progress = Progress::default();
        let report = run_publisher_thread(&*clock, &mut slots, &window, &stop, &progress);

        assert_eq!(slots[0].sent_measured_total(), 20_000);
        let corrected = corrected.lock().unwrap();
        let corrected = &corrected.histogram;
        let naive = naive.lock().unwrap();
        assert_eq!(corrected.len(), 20_000);
        assert_eq!(naive.len(), 20_000);

        // Naive: the stall is a single outlier, invisible up to p99.99.
        assert!(
            naive.value_at_quantile(0.999) <= 2_000,
            "naive p99.9 {}",
            naive.value_at_quantile(0.999)
        );
        assert!(naive.max() >= 1_000_000_000);
        // Corrected: ~5% of messages (1,000 of 20,000) were delayed, from 1 s down to 0.
        assert!(corrected.value_at_quantile(0.5) <= 2_000);
        let p99 = corrected.value_at_quantile(0.99);
        assert!(p99 >= 750_000_000, "corrected p99 {p99}");
        assert!(corrected.value_at_quantile(0.999) >= 950_000_000);
        assert!(corrected.max() >= 1_000_000_000);
        // The publisher knew it was behind: its own send lag shows the stall too.
        assert!(report.send_lag.value_at_quantile(0.99) >= 750_000_000);
    }

    struct CountingConn {
        published: Arc<Mutex<Vec<(String, u64)>>>,
        flushes: Arc<Mutex<u64>>,
    }

    impl PubConn for CountingConn {
        fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
            self.published
                .lock()
                .unwrap()
                .push((topic.to_string(), intended_ns(payload).unwrap()));
            Ok(())
        }
        fn flush(&mut self) -> io::Result<()> {
            *self.flushes.lock().unwrap() += 1;
            Ok(())
        }
    }

    /// A burst schedule sends each tick's tags together with one flush, and counts warm-up apart.
    #[test]
    fn bursts_go_out_together_with_one_flush_per_tick() {
        let clock = VirtualClock::starting_at(0);
        let window = Window {
            run_start_ns: 0,
            measure_start_ns: 100_000_000,
            end_ns: 500_000_000,
        };
        let published = Arc::new(Mutex::new(Vec::new()));
        let flushes = Arc::new(Mutex::new(0));
        let topics: Vec<String> = (0..3).map(|t| format!("plant/gw0/tag{t}")).collect();
        let mut slots = vec![PubSlot::new(
            "gw0".into(),
            Box::new(CountingConn {
                published: published.clone(),
                flushes: flushes.clone(),
            }),
            topics,
            Pace::Scheduled(Schedule::bursts(0, 3, 100_000_000)),
            16,
        )];
        run_publisher_thread(
            &clock,
            &mut slots,
            &window,
            &AtomicBool::new(false),
            &Progress::default(),
        );
        let published = published.lock().unwrap();
        assert_eq!(published.len(), 15);
        assert_eq!(*flushes.lock().unwrap(), 5 + 1);
        assert_eq!(published[4], ("plant/gw0/tag1".to_string(), 100_000_000));
        assert_eq!(slots[0].sent_warmup, 3);
        assert_eq!(slots[0].sent_measured, vec![4, 4, 4]);
    }
}
