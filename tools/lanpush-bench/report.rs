//! The result of a run: what `--json` saves, what the table prints, what `--plot` overlays.

use std::fmt::Write as _;
use std::path::Path;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::params::Params;
use crate::recorder::{new_histogram, Window, LATENCY_HIGH_NS, SIGNIFICANT_DIGITS};

/// Bumped when a field changes meaning; `--plot` refuses results it does not understand.
pub const RESULT_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    pub tool: String,
    pub format: u32,
    pub label: String,
    pub target: TargetInfo,
    pub params: Params,
    pub started_unix_ms: u64,
    /// Instants of the run, ns since the UNIX epoch.
    pub window: Window,
    pub publish: PublishStats,
    pub deliver: DeliverStats,
    /// Latency from intended send time to arrival, measured messages only.
    pub latency_us: Percentiles,
    /// How late publishers sent relative to their schedule (the tool's own lag; unpaced: 0).
    pub send_lag_us: Percentiles,
    /// CPU use during the measured window.
    pub cpu: CpuStats,
    /// What the engine spent over the measured window (`--engine-pid`, `--engine-stats`,
    /// `--engine-syscalls`; absent in older files).
    #[serde(default)]
    pub engine: crate::engine_probe::EngineFigures,
    pub errors: Vec<String>,
    pub histogram: HistogramDump,
    /// Where the figures come from: commit, host, engine config (absent in older files).
    #[serde(default)]
    pub provenance: Provenance,
}

/// What a result needs to be compared later: which build, which machine, which config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `git rev-parse HEAD` in the working directory (with `-dirty` when it has changes);
    /// `None` outside a git checkout.
    pub commit: Option<String>,
    /// The host name and what the tool knows of the machine (`nproc`, kernel).
    pub host: String,
    pub cpus: usize,
    pub kernel: String,
    /// The engine config file the tool started the engine with (`--engine-config`), verbatim.
    pub engine_config: Option<String>,
    /// The command line of the run.
    pub command: Vec<String>,
}

impl Provenance {
    /// Gathers what can be known here; nothing fails the run.
    pub fn gather(engine_config: Option<&std::path::Path>) -> Provenance {
        let git = |args: &[&str]| {
            std::process::Command::new("git")
                .args(args)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        };
        let commit = git(&["rev-parse", "HEAD"]).map(|head| {
            match git(&["status", "--porcelain", "--untracked-files=no"]) {
                Some(changes) if !changes.is_empty() => format!("{head}-dirty"),
                _ => head,
            }
        });
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_string())
                .unwrap_or_default()
        };
        Provenance {
            commit,
            host: read("/proc/sys/kernel/hostname"),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: read("/proc/sys/kernel/osrelease"),
            engine_config: engine_config.and_then(|p| std::fs::read_to_string(p).ok()),
            command: std::env::args().collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// "lanpush", "mqtt", "nats", "redis".
    pub driver: String,
    pub address: String,
    /// Whether the tool started the engine itself.
    pub engine_started: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishStats {
    pub connections: usize,
    pub threads: usize,
    /// Messages intended in the measured window.
    pub messages: u64,
    pub warmup_messages: u64,
    pub msg_per_s: f64,
    /// Payload megabytes (10^6) per second.
    pub payload_mb_per_s: f64,
    pub failed_connections: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliverStats {
    pub connections: usize,
    pub threads: usize,
    /// Deliveries the measured messages should have made (messages x matching subscribers).
    pub expected: u64,
    /// Measured messages received, all subscribers together.
    pub received: u64,
    /// `expected - received` when positive.
    pub lost: u64,
    /// `received - expected` when positive (duplicates).
    pub extra: u64,
    pub warmup_messages: u64,
    /// Ignored: from before this run (e.g. retained values) or without a timestamp.
    pub stale_messages: u64,
    /// Messages that arrived during the measured window, over its length: sustained delivery.
    pub msg_per_s: f64,
    pub payload_mb_per_s: f64,
    /// Subscribers that received fewer than expected.
    pub incomplete_subscribers: usize,
    pub failed_connections: usize,
}

/// Percent of one core used during the measured window (200% = two cores busy).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CpuStats {
    /// This tool (all its publisher and subscriber threads).
    pub tool_pct: f64,
    /// The engine, when the tool started it (unknown otherwise).
    pub engine_pct: Option<f64>,
}

/// Percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub p99_99: f64,
    pub max: f64,
    pub mean: f64,
    pub stdev: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1_000.0;
        if h.is_empty() {
            return Percentiles {
                count: 0,
                p50: 0.0,
                p90: 0.0,
                p99: 0.0,
                p99_9: 0.0,
                p99_99: 0.0,
                max: 0.0,
                mean: 0.0,
                stdev: 0.0,
            };
        }
        Percentiles {
            count: h.len(),
            p50: us(h.value_at_quantile(0.5)),
            p90: us(h.value_at_quantile(0.9)),
            p99: us(h.value_at_quantile(0.99)),
            p99_9: us(h.value_at_quantile(0.999)),
            p99_99: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
            mean: h.mean() / 1_000.0,
            stdev: h.stdev() / 1_000.0,
        }
    }
}

/// A histogram in JSON: every non-empty bucket as `[value_ns, count]`, lossless for replotting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramDump {
    pub unit: String,
    pub significant_digits: u8,
    pub highest_trackable: u64,
    pub counts: Vec<(u64, u64)>,
}

impl HistogramDump {
    pub fn of(h: &Histogram<u64>) -> Self {
        HistogramDump {
            unit: "ns".into(),
            significant_digits: h.sigfig(),
            highest_trackable: h.high(),
            counts: h
                .iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        }
    }

    pub fn to_histogram(&self) -> Result<Histogram<u64>, String> {
        if self.unit != "ns" || self.significant_digits != SIGNIFICANT_DIGITS {
            return Err(format!(
                "histogram in {} with {} digits; expected ns with {SIGNIFICANT_DIGITS}",
                self.unit, self.significant_digits
            ));
        }
        let mut h = new_histogram();
        for &(value, count) in &self.counts {
            h.record_n(value.min(LATENCY_HIGH_NS), count)
                .map_err(|e| format!("bucket {value}: {e:?}"))?;
        }
        Ok(h)
    }
}

impl RunResult {
    /// The `--engine-*` figures, per measured message: CPU per delivery, syscalls per publish.
    fn engine_line(&self) -> Option<String> {
        let e = &self.engine;
        let per = |x: u64, n: u64| x as f64 / n.max(1) as f64;
        let mut parts = Vec::new();
        if let Some(ns) = e.cpu_ns {
            parts.push(format!(
                "cpu {:.1} ms = {:.3} µs per delivered msg",
                ns as f64 / 1e6,
                per(ns, self.deliver.received) / 1e3
            ));
        }
        if let (Some(busy), Some(softirq)) = (e.cpu_busy_ns, e.cpu_softirq_ns) {
            parts.push(format!(
                "its CPU busy {:.0} ms (softirq {:.0} ms) = {:.3} µs per delivered msg",
                busy as f64 / 1e6,
                softirq as f64 / 1e6,
                per(busy, self.deliver.received) / 1e3
            ));
        }
        if let Some(n) = e.syscalls {
            parts.push(format!(
                "syscalls {n} (perf) = {:.2} per published msg",
                per(n, self.publish.messages)
            ));
        }
        if let Some(s) = e.stats {
            parts.push(format!(
                "writes {} = {:.2} per published msg, multicast datagrams {} in {} send calls, \
                 repairs {} unicast / {} multicast",
                s.writes,
                per(s.writes, self.publish.messages),
                s.mcast_datagrams,
                s.mcast_send_syscalls,
                s.mcast_unicast_repairs,
                s.mcast_multicast_repairs
            ));
        }
        (!parts.is_empty()).then(|| format!("engine (measured window): {}", parts.join("; ")))
    }

    pub fn save(&self, path: &Path) -> Result<(), BenchError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| BenchError::BadResult {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        std::fs::write(path, text + "\n")
            .map_err(BenchError::io(format!("writing {}", path.display())))
    }

    pub fn load(path: &Path) -> Result<RunResult, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(BenchError::io(format!("reading {}", path.display())))?;
        let result: RunResult = serde_json::from_str(&text).map_err(|e| BenchError::BadResult {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        if result.format != RESULT_FORMAT {
            return Err(BenchError::BadResult {
                path: path.display().to_string(),
                reason: format!(
                    "result format {} (this tool reads {RESULT_FORMAT})",
                    result.format
                ),
            });
        }
        Ok(result)
    }

    /// The human-readable summary printed at the end of a run.
    pub fn table(&self) -> String {
        let p = &self.params;
        let mut out = String::new();
        let rate = if p.rate == 0.0 && p.window > 0 {
            format!(
                "unpaced, at most {} in flight (max sustained throughput)",
                fmt_count(p.window as f64)
            )
        } else if p.rate == 0.0 {
            "unpaced, open loop (max throughput)".to_string()
        } else {
            format!("{} msg/s", fmt_count(p.rate))
        };
        let _ = writeln!(
            out,
            "== {} | {} {} | target {} {}{}",
            self.label,
            p.scenario.name(),
            rate,
            self.target.driver,
            self.target.address,
            if self.target.engine_started {
                " (started by the tool)"
            } else {
                ""
            },
        );
        let _ = writeln!(
            out,
            "   publishers {}, subscribers {}{}, payload {} B, warm-up {} s, measured {} s{}",
            p.publishers,
            p.subscribers,
            if p.stalled > 0 {
                format!(
                    " (+{} stalled: subscribed, never read, not counted)",
                    p.stalled
                )
            } else {
                String::new()
            },
            p.size_bytes,
            p.warmup_s,
            p.duration_s,
            if p.tags > 0 {
                format!(", {} tags per gateway every {} ms", p.tags, p.cycle_ms)
            } else {
                String::new()
            }
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<10} {:>6} {:>14} {:>14} {:>10}",
            "role", "conns", "messages", "msg/s", "MB/s"
        );
        let _ = writeln!(
            out,
            "{:<10} {:>6} {:>14} {:>14} {:>10.2}",
            "publish",
            self.publish.connections,
            self.publish.messages,
            fmt_count(self.publish.msg_per_s),
            self.publish.payload_mb_per_s
        );
        let _ = writeln!(
            out,
            "{:<10} {:>6} {:>14} {:>14} {:>10.2}",
            "deliver",
            self.deliver.connections,
            self.deliver.received,
            fmt_count(self.deliver.msg_per_s),
            self.deliver.payload_mb_per_s
        );
        let d = &self.deliver;
        let loss_pct = if d.expected > 0 {
            d.lost as f64 * 100.0 / d.expected as f64
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "expected {}  received {}  lost {} ({:.3}%)  duplicates {}  incomplete subscribers {}",
            d.expected, d.received, d.lost, loss_pct, d.extra, d.incomplete_subscribers
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "latency (µs)      {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   samples",
            "p50", "p90", "p99", "p99.9", "p99.99", "max"
        );
        for (name, l) in [
            ("intended→deliver", &self.latency_us),
            ("publisher lag", &self.send_lag_us),
        ] {
            if l.count == 0 {
                let _ = writeln!(out, "{name:<17} {:>9}", "-");
                continue;
            }
            let _ = writeln!(
                out,
                "{:<17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}   {}",
                name,
                fmt_us(l.p50),
                fmt_us(l.p90),
                fmt_us(l.p99),
                fmt_us(l.p99_9),
                fmt_us(l.p99_99),
                fmt_us(l.max),
                l.count
            );
        }
        let _ = writeln!(
            out,
            "cpu (% of one core, measured window): tool {:.0}%, engine {}",
            self.cpu.tool_pct,
            self.cpu.engine_pct.map_or(
                "unknown (not started by the tool)".to_string(),
                |p| format!("{p:.0}%")
            )
        );
        if let Some(line) = self.engine_line() {
            let _ = writeln!(out, "{line}");
        }
        if !self.errors.is_empty() {
            let _ = writeln!(out, "\n{} error(s):", self.errors.len());
            for e in self.errors.iter().take(10) {
                let _ = writeln!(out, "  {e}");
            }
            if self.errors.len() > 10 {
                let _ = writeln!(
                    out,
                    "  ... and {} more (see --json)",
                    self.errors.len() - 10
                );
            }
        }
        out
    }
}

/// 1234567.8 -> "1,234,568".
pub fn fmt_count(x: f64) -> String {
    let n = x.round() as u64;
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Three significant figures, enough for 3-digit histograms.
pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 {
        format!("{us:.0}")
    } else if us >= 100.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_dump_roundtrips() {
        let mut h = new_histogram();
        for v in [1u64, 999, 1_000, 123_456, 7_000_000, 59_000_000_000] {
            h.record_n(v, v % 7 + 1).unwrap();
        }
        let back = HistogramDump::of(&h).to_histogram().unwrap();
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q));
        }
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn counts_are_grouped() {
        assert_eq!(fmt_count(0.0), "0");
        assert_eq!(fmt_count(999.0), "999");
        assert_eq!(fmt_count(1_234_567.8), "1,234,568");
    }
}
