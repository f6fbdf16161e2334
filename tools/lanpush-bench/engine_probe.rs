//! What the engine spent over the measured window, for an engine the tool did not start too
//! (`--engine-pid`): CPU time from `/proc/PID/stat` (utime + stime), its own counters from the
//! stats document (`--engine-stats`: vectored writes, multicast datagrams and send calls, as
//! deltas), and every syscall its threads made (`--engine-syscalls`: `perf stat -e
//! raw_syscalls:sys_enter -p PID`, started at the window's start and stopped at its end; needs
//! `perf` and the right to trace the engine), and the busy and softirq time of the CPU the engine
//! is pinned to (`--engine-cpu N`, from `/proc/stat`: the kernel's receive work for the engine
//! that ran while the engine slept is charged to no process).

use std::io::Read;
use std::process::{Child, Command, Stdio};

use serde::{Deserialize, Serialize};

/// The engine's figures over the measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineFigures {
    /// utime + stime of the engine process, ns.
    pub cpu_ns: Option<u64>,
    /// Syscalls entered by the engine's threads (perf), if asked and counted.
    pub syscalls: Option<u64>,
    /// Deltas of the engine's own counters, if asked.
    pub stats: Option<StatsDelta>,
    /// The engine's CPU (`--engine-cpu`): time not idle, and of it in softirq, ns.
    #[serde(default)]
    pub cpu_busy_ns: Option<u64>,
    #[serde(default)]
    pub cpu_softirq_ns: Option<u64>,
}

/// Deltas of the stats document's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsDelta {
    pub publishes_in: u64,
    /// Live DATA frames queued to connections.
    pub delivered: u64,
    /// Vectored socket writes to connections (one syscall each).
    pub writes: u64,
    /// Multicast, summed over the channels.
    pub mcast_datagrams: u64,
    pub mcast_send_syscalls: u64,
    pub mcast_unicast_repairs: u64,
    pub mcast_multicast_repairs: u64,
}

impl StatsDelta {
    fn of(doc: &str) -> Option<StatsDelta> {
        let v: serde_json::Value = serde_json::from_str(doc).ok()?;
        let total = |k: &str| v["totals"][k].as_u64().unwrap_or(0);
        let mcast = |k: &str| {
            v["multicast"].as_array().map_or(0, |chs| {
                chs.iter().map(|c| c[k].as_u64().unwrap_or(0)).sum::<u64>()
            })
        };
        Some(StatsDelta {
            publishes_in: total("publishes_in"),
            delivered: total("delivered"),
            writes: total("writes"),
            mcast_datagrams: mcast("datagrams_sent"),
            mcast_send_syscalls: mcast("send_syscalls"),
            mcast_unicast_repairs: mcast("unicast_repairs"),
            mcast_multicast_repairs: mcast("multicast_repairs"),
        })
    }

    fn since(&self, start: &StatsDelta) -> StatsDelta {
        StatsDelta {
            publishes_in: self.publishes_in.saturating_sub(start.publishes_in),
            delivered: self.delivered.saturating_sub(start.delivered),
            writes: self.writes.saturating_sub(start.writes),
            mcast_datagrams: self.mcast_datagrams.saturating_sub(start.mcast_datagrams),
            mcast_send_syscalls: self
                .mcast_send_syscalls
                .saturating_sub(start.mcast_send_syscalls),
            mcast_unicast_repairs: self
                .mcast_unicast_repairs
                .saturating_sub(start.mcast_unicast_repairs),
            mcast_multicast_repairs: self
                .mcast_multicast_repairs
                .saturating_sub(start.mcast_multicast_repairs),
        }
    }
}

/// What to probe.
#[derive(Debug, Clone, Default)]
pub struct ProbeSpec {
    pub pid: Option<u32>,
    /// The engine's address, for its stats document.
    pub stats_addr: Option<String>,
    pub syscalls: bool,
    /// The CPU the engine is pinned to.
    pub cpu: Option<usize>,
}

/// A probe started at the window's start.
pub struct EngineProbe {
    spec: ProbeSpec,
    cpu_ns: Option<u64>,
    stats: Option<StatsDelta>,
    perf: Option<Child>,
    cpu_times: Option<(u64, u64)>,
}

/// (busy, softirq) ns of CPU `cpu` since boot, from `/proc/stat` (USER_HZ ticks).
fn cpu_times(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let name = format!("cpu{cpu}");
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name.as_str()))?;
    parse_cpu_line(line)
}

/// `cpuN user nice system idle iowait irq softirq steal ...` in 10 ms ticks (USER_HZ 100).
fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3)? + f.get(4)?;
    let tick_ns = 10_000_000;
    Some(((total - idle) * tick_ns, f.get(6)? * tick_ns))
}

fn fetch_stats(addr: &str) -> Option<StatsDelta> {
    let opts = lanpush::client::ClientOptions::new(addr.to_string()).client_id("bench-probe");
    StatsDelta::of(&lanpush::client::stats(&opts).ok()?)
}

impl EngineProbe {
    pub fn start(spec: &ProbeSpec) -> EngineProbe {
        let perf = match (spec.syscalls, spec.pid) {
            (true, Some(pid)) => Command::new("perf")
                .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-p"])
                .arg(pid.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| eprintln!("lanpush-bench: --engine-syscalls: perf: {e}"))
                .ok(),
            _ => None,
        };
        EngineProbe {
            cpu_ns: spec.pid.and_then(crate::sys::other_process_cpu_ns),
            stats: spec.stats_addr.as_deref().and_then(fetch_stats),
            perf,
            cpu_times: spec.cpu.and_then(cpu_times),
            spec: spec.clone(),
        }
    }

    /// At the window's end: the deltas since [`EngineProbe::start`].
    pub fn finish(mut self) -> EngineFigures {
        let cpu_end = self.spec.pid.and_then(crate::sys::other_process_cpu_ns);
        let stats_end = self.spec.stats_addr.as_deref().and_then(fetch_stats);
        let syscalls = self.perf.take().and_then(stop_perf);
        let cpus_end = self.spec.cpu.and_then(cpu_times);
        let cpu_delta = match (self.cpu_times, cpus_end) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        EngineFigures {
            cpu_ns: match (self.cpu_ns, cpu_end) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            syscalls,
            stats: match (self.stats, stats_end) {
                (Some(a), Some(b)) => Some(b.since(&a)),
                _ => None,
            },
            cpu_busy_ns: cpu_delta.map(|d| d.0),
            cpu_softirq_ns: cpu_delta.map(|d| d.1),
        }
    }
}

impl Drop for EngineProbe {
    fn drop(&mut self) {
        if let Some(mut child) = self.perf.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGINT to our own perf child (it prints its count and exits), then its count.
fn stop_perf(mut child: Child) -> Option<u64> {
    crate::sys::interrupt(child.id());
    let mut err = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut err);
    }
    let _ = child.wait();
    let count = parse_perf_count(&err);
    if count.is_none() {
        eprintln!("lanpush-bench: --engine-syscalls: no count in perf's output: {err:?}");
    }
    count
}

/// The count of `perf stat -x ,` CSV output's `raw_syscalls:sys_enter` line.
fn parse_perf_count(csv: &str) -> Option<u64> {
    csv.lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_csv_and_stats_documents_are_read() {
        assert_eq!(
            parse_perf_count("124145,,raw_syscalls:sys_enter,1381669,100.00,,\n"),
            Some(124_145)
        );
        assert_eq!(
            parse_perf_count("<not counted>,,raw_syscalls:sys_enter,0,100.00,,"),
            None
        );
        let a = StatsDelta::of(
            r#"{"totals":{"publishes_in":10,"delivered":100,"writes":50},
                "multicast":[{"datagrams_sent":3,"send_syscalls":2},{"datagrams_sent":1,"send_syscalls":1}]}"#,
        )
        .unwrap();
        assert_eq!(
            (a.writes, a.mcast_datagrams, a.mcast_send_syscalls),
            (50, 4, 3)
        );
        let b = StatsDelta::of(r#"{"totals":{"publishes_in":30,"delivered":300,"writes":70}}"#)
            .unwrap();
        let d = b.since(&a);
        assert_eq!((d.publishes_in, d.delivered, d.writes), (20, 200, 20));
        assert_eq!(
            parse_cpu_line("cpu0 100 5 50 1000 10 2 30 0 0 0"),
            Some((187 * 10_000_000, 30 * 10_000_000))
        );
        assert!(cpu_times(0).is_some());
    }
}
