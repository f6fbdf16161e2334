//! Scenario parameters: the same keys on the command line and in `bench/scenarios/*.toml`.
//! Precedence: command line, then the scenario file, then the scenario's defaults.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::recorder::TIMESTAMP_BYTES;

/// The three load shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ScenarioKind {
    /// P publishers (default 1) on one topic, S subscribers to it.
    Fanout,
    /// P publishers on a topic each, S subscribers (default 1) to the wildcard over all of them.
    Fanin,
    /// G gateways publish T tags every C ms as a burst; H HMIs watch overlapping patterns.
    Plant,
}

impl ScenarioKind {
    pub fn name(self) -> &'static str {
        match self {
            ScenarioKind::Fanout => "fanout",
            ScenarioKind::Fanin => "fanin",
            ScenarioKind::Plant => "plant",
        }
    }
}

/// Every tunable of a run. Each field is optional so that a layer (file, command line) only
/// overrides what it names. Also the TOML schema of a scenario file; unknown keys are an error.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct ParamArgs {
    /// Which scenario (scenario files only; on the command line the subcommand says it).
    #[arg(skip)]
    pub scenario: Option<ScenarioKind>,
    /// Total messages per second over all publishers [default: 10000]; 0 = as fast as possible
    /// (throughput run). Ignored by `plant`, whose rate is gateways x tags / cycle.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Seconds measured, after the warm-up [default: 10].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Seconds of load before measuring starts, not in the histogram [default: 1].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Payload bytes per message, >= 8: the first 8 carry the intended send time [default: 64].
    #[arg(long)]
    pub size: Option<usize>,
    /// Subscriber connections (plant: HMIs) [default: fanout 10, fanin 1].
    #[arg(long)]
    pub subscribers: Option<usize>,
    /// Publisher connections (plant: gateways) [default: fanout 1, fanin 10].
    #[arg(long)]
    pub publishers: Option<usize>,
    /// Extra subscriber connections that subscribe to every published topic and then never
    /// read: stalled consumers. Not counted in the delivery or latency figures [default: 0].
    #[arg(long)]
    pub stalled: Option<usize>,
    /// Unpaced runs only: a publisher waits while more than this many of its messages are in
    /// flight (sent, not yet received), averaged over the subscribers that should receive them.
    /// Measures the throughput a target sustains without loss, the same way for every broker;
    /// 0 = open loop, as fast as the socket takes [default: 10000].
    #[arg(long)]
    pub window: Option<u64>,
    /// Engine reactor threads, when the tool starts the engine (default: the engine's own).
    #[arg(long)]
    pub threads: Option<usize>,
    /// plant: gateways (publishers) [default: 4].
    #[arg(long)]
    pub gateways: Option<usize>,
    /// plant: tags per gateway, all published every cycle [default: 500].
    #[arg(long)]
    pub tags: Option<usize>,
    /// plant: scan cycle in milliseconds [default: 100].
    #[arg(long)]
    pub cycle_ms: Option<u64>,
    /// plant: HMIs (subscribers) [default: 20].
    #[arg(long)]
    pub hmis: Option<usize>,
    /// Threads the tool uses for subscribers (default: min(subscribers, cores)).
    #[arg(long)]
    pub sub_threads: Option<usize>,
    /// Threads the tool uses for publishers (default: min(publishers, cores)).
    #[arg(long)]
    pub pub_threads: Option<usize>,
    /// Name of this run in tables, JSON and plot legends.
    #[arg(long)]
    pub label: Option<String>,
}

impl ParamArgs {
    /// Reads a scenario file.
    pub fn from_file(path: &Path) -> Result<Self, BenchError> {
        let text = std::fs::read_to_string(path).map_err(|source| BenchError::Io {
            context: format!("reading scenario {}", path.display()),
            source,
        })?;
        toml::from_str(&text).map_err(|e| BenchError::Scenario(format!("{}: {e}", path.display())))
    }

    /// Fields set in `self` win; the rest come from `lower`.
    pub fn over(self, lower: ParamArgs) -> ParamArgs {
        ParamArgs {
            scenario: self.scenario.or(lower.scenario),
            rate: self.rate.or(lower.rate),
            duration: self.duration.or(lower.duration),
            warmup: self.warmup.or(lower.warmup),
            size: self.size.or(lower.size),
            subscribers: self.subscribers.or(lower.subscribers),
            publishers: self.publishers.or(lower.publishers),
            stalled: self.stalled.or(lower.stalled),
            window: self.window.or(lower.window),
            threads: self.threads.or(lower.threads),
            gateways: self.gateways.or(lower.gateways),
            tags: self.tags.or(lower.tags),
            cycle_ms: self.cycle_ms.or(lower.cycle_ms),
            hmis: self.hmis.or(lower.hmis),
            sub_threads: self.sub_threads.or(lower.sub_threads),
            pub_threads: self.pub_threads.or(lower.pub_threads),
            label: self.label.or(lower.label),
        }
    }
}

/// Parameters of a run with every default filled in and checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub scenario: ScenarioKind,
    /// Total published messages per second (plant: derived); 0 = unpaced.
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub size_bytes: usize,
    pub publishers: usize,
    pub subscribers: usize,
    /// Subscribers that never read (absent from results saved before the option existed).
    #[serde(default)]
    pub stalled: usize,
    /// Unpaced runs: messages in flight per publisher before it waits; 0 = open loop.
    #[serde(default)]
    pub window: u64,
    /// plant only (0 otherwise).
    pub tags: usize,
    /// plant only (0 otherwise).
    pub cycle_ms: u64,
    pub engine_threads: Option<usize>,
    pub sub_threads: usize,
    pub pub_threads: usize,
    pub label: Option<String>,
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Default in-flight window of unpaced publishers (see `--window`).
pub const DEFAULT_WINDOW: u64 = 10_000;

impl Params {
    /// Fills defaults for `kind` and validates.
    pub fn resolve(kind: ScenarioKind, args: ParamArgs) -> Result<Params, BenchError> {
        if let Some(file_kind) = args.scenario {
            if file_kind != kind {
                return Err(BenchError::Usage(format!(
                    "the scenario file is for '{}', not '{}'",
                    file_kind.name(),
                    kind.name()
                )));
            }
        }
        let bad = |msg: String| Err(BenchError::Usage(msg));
        let (publishers, subscribers, tags, cycle_ms, rate) = match kind {
            ScenarioKind::Fanout | ScenarioKind::Fanin => {
                for (name, set) in [
                    ("gateways", args.gateways.is_some()),
                    ("tags", args.tags.is_some()),
                    ("cycle-ms", args.cycle_ms.is_some()),
                    ("hmis", args.hmis.is_some()),
                ] {
                    if set {
                        return bad(format!("--{name} only applies to the plant scenario"));
                    }
                }
                let (p, s) = if kind == ScenarioKind::Fanout {
                    (1, 10)
                } else {
                    (10, 1)
                };
                (
                    args.publishers.unwrap_or(p),
                    args.subscribers.unwrap_or(s),
                    0,
                    0,
                    args.rate.unwrap_or(10_000.0),
                )
            }
            ScenarioKind::Plant => {
                let gateways = args.gateways.or(args.publishers).unwrap_or(4);
                let hmis = args.hmis.or(args.subscribers).unwrap_or(20);
                let tags = args.tags.unwrap_or(500);
                let cycle_ms = args.cycle_ms.unwrap_or(100);
                if tags == 0 || cycle_ms == 0 {
                    return bad("plant needs --tags >= 1 and --cycle-ms >= 1".into());
                }
                if args.rate.is_some() {
                    eprintln!(
                        "note: plant ignores --rate; it publishes gateways x tags every cycle"
                    );
                }
                let rate = (gateways * tags) as f64 * 1000.0 / cycle_ms as f64;
                (gateways, hmis, tags, cycle_ms, rate)
            }
        };
        let size_bytes = args.size.unwrap_or(64);
        let duration_s = args.duration.unwrap_or(10.0);
        let warmup_s = args.warmup.unwrap_or(1.0);
        if size_bytes < TIMESTAMP_BYTES {
            return bad(format!("--size must be at least {TIMESTAMP_BYTES} bytes"));
        }
        if !(duration_s > 0.0 && duration_s.is_finite()) {
            return bad("--duration must be more than 0 seconds".into());
        }
        if !(warmup_s >= 0.0 && warmup_s.is_finite()) {
            return bad("--warmup must be 0 or more seconds".into());
        }
        if !(rate >= 0.0 && rate.is_finite()) {
            return bad("--rate must be 0 (unpaced) or more".into());
        }
        if rate > 0.0 && rate < 0.001 * publishers as f64 {
            return bad("--rate is below 0.001 msg/s per publisher".into());
        }
        if publishers == 0 || subscribers == 0 {
            return bad("need at least one publisher and one subscriber".into());
        }
        if args.threads == Some(0) || args.sub_threads == Some(0) || args.pub_threads == Some(0) {
            return bad("thread counts must be at least 1".into());
        }
        Ok(Params {
            scenario: kind,
            rate,
            duration_s,
            warmup_s,
            size_bytes,
            publishers,
            subscribers,
            stalled: args.stalled.unwrap_or(0),
            window: args.window.unwrap_or(DEFAULT_WINDOW),
            tags,
            cycle_ms,
            engine_threads: args.threads,
            sub_threads: args
                .sub_threads
                .unwrap_or(subscribers.min(cores()))
                .min(subscribers),
            pub_threads: args
                .pub_threads
                .unwrap_or(publishers.min(cores()))
                .min(publishers),
            label: args.label,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_beats_file_beats_defaults() {
        let file = ParamArgs {
            scenario: Some(ScenarioKind::Fanout),
            rate: Some(5_000.0),
            subscribers: Some(100),
            ..Default::default()
        };
        let cli = ParamArgs {
            rate: Some(20_000.0),
            ..Default::default()
        };
        let p = Params::resolve(ScenarioKind::Fanout, cli.over(file)).unwrap();
        assert_eq!(p.rate, 20_000.0);
        assert_eq!(p.subscribers, 100);
        assert_eq!(p.publishers, 1);
        assert_eq!(p.size_bytes, 64);
    }

    #[test]
    fn plant_derives_its_rate_and_rejects_misplaced_flags() {
        let p = Params::resolve(
            ScenarioKind::Plant,
            ParamArgs {
                gateways: Some(2),
                tags: Some(100),
                cycle_ms: Some(50),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(p.rate, 4_000.0);
        assert_eq!(p.publishers, 2);
        let err = Params::resolve(
            ScenarioKind::Fanout,
            ParamArgs {
                tags: Some(3),
                ..Default::default()
            },
        );
        assert!(err.is_err());
        let small = Params::resolve(
            ScenarioKind::Fanin,
            ParamArgs {
                size: Some(4),
                ..Default::default()
            },
        );
        assert!(small.is_err());
    }

    /// Every scenario shipped in bench/scenarios parses and resolves.
    #[test]
    fn shipped_scenario_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let args = ParamArgs::from_file(&path).unwrap();
            let kind = args
                .scenario
                .unwrap_or_else(|| panic!("{}: no scenario key", path.display()));
            Params::resolve(kind, args).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(
            seen >= 3,
            "expected the shipped scenarios in {}",
            dir.display()
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<ParamArgs>("rat = 5").is_err());
    }
}
