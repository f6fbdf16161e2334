//! Logs: `tracing` events on stderr, one line each with a UTC timestamp, and the rate limiter
//! that keeps a flood of connection events from filling a disk.
//!
//! The engine logs per connection event (connect, disconnect and its cause, slow-consumer cut,
//! protocol error, time-out), never per message: nothing is formatted on the data path. Each
//! reactor holds one [`LogLimiter`] (sans-IO: it is given `now`), a token bucket per
//! [`Category`]; lines over the bucket are counted, and the next line the bucket lets through,
//! or the reactor's next tick, reports how many were suppressed.

use std::time::{Duration, Instant};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::reload;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::LogConfig;

/// Why logging could not be set up, or its level not changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("log level {0:?} is not one of off, error, warn, info, debug, trace")]
    Level(String),
    #[error("a global logger is already installed: {0}")]
    Install(String),
    #[error("cannot change the log level: {0}")]
    Reload(String),
}

/// Parses a level name as `log.level` and `--log-level` take it.
pub fn parse_level(text: &str) -> Result<LevelFilter, LogError> {
    match text.trim() {
        "off" => Ok(LevelFilter::OFF),
        "error" => Ok(LevelFilter::ERROR),
        "warn" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        other => Err(LogError::Level(other.to_string())),
    }
}

/// Changes the level of the installed logger (SIGHUP).
#[derive(Clone)]
pub struct LogHandle {
    filter: reload::Handle<LevelFilter, tracing_subscriber::Registry>,
}

impl LogHandle {
    pub fn set_level(&self, level: &str) -> Result<(), LogError> {
        let level = parse_level(level)?;
        self.filter
            .modify(|f| *f = level)
            .map_err(|e| LogError::Reload(e.to_string()))
    }
}

/// Installs the process-wide logger: stderr, one line per event, timestamps in UTC (RFC 3339),
/// the target (the module) and the event's fields as `key=value`. Call once, from `main`.
pub fn init(level: &str) -> Result<LogHandle, LogError> {
    let (filter, handle) = reload::Layer::new(parse_level(level)?);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_thread_names(true);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .map_err(|e| LogError::Install(e.to_string()))?;
    Ok(LogHandle { filter: handle })
}

/// The kinds of line that can come in floods, each with its own budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Category {
    Connect,
    Disconnect,
    SlowConsumer,
    ProtocolError,
    Timeout,
}

impl Category {
    pub const ALL: [Category; 5] = [
        Category::Connect,
        Category::Disconnect,
        Category::SlowConsumer,
        Category::ProtocolError,
        Category::Timeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Category::Connect => "connect",
            Category::Disconnect => "disconnect",
            Category::SlowConsumer => "slow_consumer",
            Category::ProtocolError => "protocol_error",
            Category::Timeout => "timeout",
        }
    }
}

/// One category's token bucket, in thousandths of a line so refills need no floats.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    milli_tokens: u64,
    refilled: Instant,
    suppressed: u64,
}

/// Per-category token buckets: at most `lines_per_s` lines a second per category after a burst
/// of `burst_lines`. Plain value, given `now`: tested without sleeping.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    buckets: [Bucket; Category::ALL.len()],
    milli_per_s: u64,
    max_milli: u64,
}

/// What [`LogLimiter::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log the line; `suppressed` lines of its category were dropped since the last one logged
    /// (say so on the line).
    Log { suppressed: u64 },
    /// Drop the line (counted).
    Drop,
}

impl LogLimiter {
    pub fn new(config: &LogConfig, now: Instant) -> LogLimiter {
        let max_milli = u64::from(config.burst_lines.max(1)) * 1000;
        LogLimiter {
            buckets: [Bucket {
                milli_tokens: max_milli,
                refilled: now,
                suppressed: 0,
            }; Category::ALL.len()],
            milli_per_s: u64::from(config.lines_per_s.max(1)) * 1000,
            max_milli,
        }
    }

    /// Takes a new budget (SIGHUP); the buckets keep their tokens, within the new burst.
    pub fn handle_reload(&mut self, config: &LogConfig) {
        self.max_milli = u64::from(config.burst_lines.max(1)) * 1000;
        self.milli_per_s = u64::from(config.lines_per_s.max(1)) * 1000;
        for b in &mut self.buckets {
            b.milli_tokens = b.milli_tokens.min(self.max_milli);
        }
    }

    fn refill(&mut self, category: Category, now: Instant) -> &mut Bucket {
        let (rate, max) = (self.milli_per_s, self.max_milli);
        let b = &mut self.buckets[category as usize];
        let elapsed = now.saturating_duration_since(b.refilled);
        let add = (elapsed.as_micros() as u64).saturating_mul(rate) / 1_000_000;
        if add > 0 {
            b.milli_tokens = (b.milli_tokens + add).min(max);
            b.refilled = now;
        }
        b
    }

    /// Whether a line of `category` may be logged at `now`.
    pub fn admit(&mut self, category: Category, now: Instant) -> Admit {
        let b = self.refill(category, now);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            Admit::Log {
                suppressed: std::mem::take(&mut b.suppressed),
            }
        } else {
            b.suppressed += 1;
            Admit::Drop
        }
    }

    /// Categories with suppressed lines whose bucket has room again: the caller logs one
    /// summary line for each (`suppressed N <category> lines`). Called on a periodic tick, so a
    /// flood that stops is still reported.
    pub fn poll_suppressed(&mut self, now: Instant) -> Option<(Category, u64)> {
        for category in Category::ALL {
            let b = self.refill(category, now);
            if b.suppressed > 0 && b.milli_tokens >= 1000 {
                b.milli_tokens -= 1000;
                return Some((category, std::mem::take(&mut b.suppressed)));
            }
        }
        None
    }

    /// Time until a bucket that dropped lines has room for their summary; `None` if none did.
    pub fn summary_due_in(&self) -> Option<Duration> {
        self.buckets
            .iter()
            .filter(|b| b.suppressed > 0)
            .map(|b| {
                let missing = 1000u64.saturating_sub(b.milli_tokens);
                Duration::from_micros(missing.saturating_mul(1_000_000) / self.milli_per_s)
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(lines_per_s: u32, burst_lines: u32, now: Instant) -> LogLimiter {
        LogLimiter::new(
            &LogConfig {
                level: "info".into(),
                lines_per_s,
                burst_lines,
            },
            now,
        )
    }

    #[test]
    fn a_burst_passes_then_the_rate_applies_and_drops_are_counted() {
        let t0 = Instant::now();
        let mut l = limiter(10, 3, t0);
        for _ in 0..3 {
            assert_eq!(l.admit(Category::Connect, t0), Admit::Log { suppressed: 0 });
        }
        for _ in 0..5 {
            assert_eq!(l.admit(Category::Connect, t0), Admit::Drop);
        }
        // Other categories have their own budget.
        assert_eq!(l.admit(Category::Timeout, t0), Admit::Log { suppressed: 0 });
        // 10 lines/s: one token after 100 ms, and the line says what was dropped.
        let t1 = t0 + Duration::from_millis(99);
        assert_eq!(l.admit(Category::Connect, t1), Admit::Drop);
        let t2 = t0 + Duration::from_millis(100);
        assert_eq!(l.admit(Category::Connect, t2), Admit::Log { suppressed: 6 });
        assert_eq!(l.admit(Category::Connect, t2), Admit::Drop);
    }

    #[test]
    fn a_flood_is_bounded_by_the_rate() {
        let t0 = Instant::now();
        let mut l = limiter(20, 100, t0);
        let mut logged = 0u64;
        let mut dropped = 0u64;
        // One million disconnects over 10 s of virtual time.
        for i in 0..1_000_000u64 {
            let now = t0 + Duration::from_micros(i * 10);
            match l.admit(Category::Disconnect, now) {
                Admit::Log { suppressed } => {
                    logged += 1;
                    dropped += suppressed;
                }
                Admit::Drop => {}
            }
        }
        assert!(logged <= 100 + 20 * 10 + 1, "{logged}");
        assert!(logged + dropped <= 1_000_000);
        assert!(dropped > 990_000, "{dropped}");
    }

    #[test]
    fn suppressed_lines_are_summed_up_once_the_bucket_refills() {
        let t0 = Instant::now();
        let mut l = limiter(1, 1, t0);
        assert!(matches!(
            l.admit(Category::ProtocolError, t0),
            Admit::Log { .. }
        ));
        assert_eq!(l.admit(Category::ProtocolError, t0), Admit::Drop);
        assert_eq!(l.admit(Category::ProtocolError, t0), Admit::Drop);
        assert_eq!(l.poll_suppressed(t0), None);
        assert_eq!(l.summary_due_in(), Some(Duration::from_secs(1)));
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.poll_suppressed(t1), Some((Category::ProtocolError, 2)));
        assert_eq!(l.poll_suppressed(t1), None);
        assert_eq!(l.summary_due_in(), None);
    }

    #[test]
    fn levels_parse_by_name() {
        assert_eq!(parse_level("debug").unwrap(), LevelFilter::DEBUG);
        assert_eq!(parse_level(" off ").unwrap(), LevelFilter::OFF);
        assert!(parse_level("loud").is_err());
        for name in LogConfig::LEVELS {
            parse_level(name).unwrap();
        }
    }
}
