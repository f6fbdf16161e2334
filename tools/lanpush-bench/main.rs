//! `lanpush-bench`: latency and throughput of a push broker under a plant-like load, measured
//! free of coordinated omission (see `bench/README.md`).
//!
//! ```text
//! lanpush-bench fanout --subscribers 100 --rate 10000 --duration 10
//! lanpush-bench fanin  --publishers 100 --rate 100000 --json fanin.json
//! lanpush-bench plant  --scenario bench/scenarios/plant.toml --hgrm plant.hgrm
//! lanpush-bench run bench/scenarios/fanout-100.toml --target mqtt://127.0.0.1:1883
//! lanpush-bench plot a.json b.json --out ab.svg
//! ```

mod clock;
mod driver;
mod engine;
mod engine_probe;
mod error;
mod hgrm;
mod lanpush_driver;
mod mcast_floor;
mod params;
mod peers;
mod plot;
mod publisher;
mod recorder;
mod report;
mod runner;
mod scenario;
mod subscriber;
mod sys;
#[cfg(test)]
mod testutil;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::driver::Driver;
use crate::engine::EngineProcess;
use crate::error::BenchError;
use crate::params::{ParamArgs, Params, ScenarioKind};
use crate::report::{RunResult, TargetInfo};

#[derive(Parser)]
#[command(
    name = "lanpush-bench",
    version,
    about = "Latency (free of coordinated omission) and throughput of lanpush and its peers",
    long_about = "Latency is measured from the time each message was scheduled to be sent (written \
                  into its payload) to the time it arrived, so stalls count against every message \
                  they delay. By default the tool starts `lanpush serve` on 127.0.0.1 itself."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// P publishers (default 1) to S subscribers (default 10) on one topic.
    Fanout(RunArgs),
    /// P publishers (default 10), one topic each, to S subscribers (default 1) on a wildcard.
    Fanin(RunArgs),
    /// G gateways publish T tags every C ms as a burst; H HMIs watch overlapping patterns.
    Plant(RunArgs),
    /// Runs the scenario a file names (its `scenario` key); flags override the file.
    Run {
        /// A scenario file, e.g. bench/scenarios/fanout-100.toml.
        file: PathBuf,
        #[command(flatten)]
        args: RunArgs,
    },
    /// The multicast floor, no broker: a sender writing timestamped datagrams straight to a
    /// group and N plain group sockets read by a minimal loop (bench/multicast.sh's `floor`
    /// rows; the counterpart of the TCP ceiling).
    #[command(name = "mcast-floor", subcommand)]
    McastFloor(mcast_floor::Role),
    /// Plots saved results (--json files) into one latency-by-percentile chart.
    Plot {
        /// Result files written by --json.
        #[arg(required = true)]
        results: Vec<PathBuf>,
        /// The SVG to write.
        #[arg(long, short)]
        out: PathBuf,
        /// Chart title.
        #[arg(long, default_value = "Latency by percentile")]
        title: String,
    },
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    params: ParamArgs,
    /// Scenario file (TOML, same keys as the flags); flags override it.
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// A lanpush engine that is already running (host:port); default: start one on loopback.
    #[arg(long, value_name = "ADDR", conflicts_with = "target")]
    server: Option<String>,
    /// Another broker: mqtt://host:port, nats://host:port, redis://host:port
    /// (or lanpush://host:port, the same as --server).
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// The lanpush binary to start (default: `lanpush` next to this executable).
    #[arg(long, value_name = "PATH")]
    engine_bin: Option<PathBuf>,
    /// Config file for the engine the tool starts (`lanpush serve --config FILE`); its
    /// `server.listen` is overridden with 127.0.0.1:0.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["server", "target"])]
    engine_config: Option<PathBuf>,
    /// Drive the engine the tool starts through its MQTT 3.1.1 listener (QoS 0, the same
    /// client as `--target mqtt://`), to compare with another MQTT broker client for client.
    #[arg(long, conflicts_with_all = ["server", "target", "multicast"])]
    mqtt: bool,
    /// lanpush only: subscribers receive by UDP multicast (`McastSubscriber`); the engine needs
    /// a channel carrying the scenario's topics (`--engine-config bench/multicast.toml`) and
    /// multicast on loopback, i.e. a private network namespace (bench/README.md).
    #[arg(long)]
    multicast: bool,
    /// The pid of the engine given by --server, so that its CPU time over the measured window
    /// (utime + stime, /proc/PID/stat) is reported as for an engine the tool starts.
    #[arg(long, value_name = "PID")]
    engine_pid: Option<u32>,
    /// lanpush only: read the engine's stats document at the start and end of the measured
    /// window and report the deltas (vectored writes, multicast datagrams and send calls).
    #[arg(long)]
    engine_stats: bool,
    /// Count every syscall of the engine over the measured window with `perf stat -e
    /// raw_syscalls:sys_enter -p PID` (needs `perf`, root or perf_event_paranoid ≤ 1, and the
    /// engine's pid: started by the tool or --engine-pid).
    #[arg(long)]
    engine_syscalls: bool,
    /// The CPU the engine is pinned to (taskset): its busy and softirq time over the measured
    /// window from /proc/stat, which includes the kernel's receive work for the engine that
    /// ran while the engine slept (charged to no process), and anything else on that CPU.
    #[arg(long, value_name = "N")]
    engine_cpu: Option<usize>,
    /// Write the latency histogram as HdrHistogram percentile-distribution text (µs).
    #[arg(long, value_name = "FILE")]
    hgrm: Option<PathBuf>,
    /// Write parameters, counts, rates, percentiles and the histogram as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a latency-by-percentile SVG of this run and any --overlay runs.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Earlier results (--json files, comma-separated) to draw on the --plot chart too.
    #[arg(
        long,
        value_name = "A.json,B.json",
        value_delimiter = ',',
        requires = "plot"
    )]
    overlay: Vec<PathBuf>,
    /// No progress line.
    #[arg(long, short)]
    quiet: bool,
    /// Folder for the files --json, --hgrm and --plot name by a relative path (created if
    /// missing); absolute paths are used as given.
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    out: PathBuf,
}

/// Flags of the shared parameter set that a subcommand has no use for: hidden from its help
/// (and refused by `Params::resolve` when given anyway).
const NOT_FOR_FANOUT_OR_FANIN: [&str; 4] = ["gateways", "tags", "cycle_ms", "hmis"];
const NOT_FOR_PLANT: [&str; 3] = ["rate", "publishers", "subscribers"];

/// The command line, each scenario subcommand listing only the flags it uses.
fn cli_command() -> clap::Command {
    let hide = |names: &'static [&'static str]| {
        move |mut sub: clap::Command| {
            for name in names {
                sub = sub.mut_arg(*name, |a| a.hide(true));
            }
            sub
        }
    };
    Cli::command()
        .mut_subcommand("fanout", hide(&NOT_FOR_FANOUT_OR_FANIN))
        .mut_subcommand("fanin", hide(&NOT_FOR_FANOUT_OR_FANIN))
        .mut_subcommand("plant", hide(&NOT_FOR_PLANT))
}

impl RunArgs {
    /// `path` as given when absolute, else inside the results folder (made on first use).
    fn output(&self, path: &Path) -> Result<PathBuf, BenchError> {
        if path.is_absolute() {
            return Ok(path.to_path_buf());
        }
        std::fs::create_dir_all(&self.out)
            .map_err(BenchError::io(format!("creating {}", self.out.display())))?;
        Ok(self.out.join(path))
    }
}

fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&cli_command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let outcome = match cli.command {
        Command::Fanout(args) => run_command(ScenarioKind::Fanout, None, args),
        Command::Fanin(args) => run_command(ScenarioKind::Fanin, None, args),
        Command::Plant(args) => run_command(ScenarioKind::Plant, None, args),
        Command::Run { file, args } => match ParamArgs::from_file(&file) {
            Ok(from_file) => match from_file.scenario {
                Some(kind) => run_command(kind, Some(from_file), args),
                None => Err(BenchError::Scenario(format!(
                    "{}: no `scenario = \"fanout\" | \"fanin\" | \"plant\"` key",
                    file.display()
                ))),
            },
            Err(e) => Err(e),
        },
        Command::Plot {
            results,
            out,
            title,
        } => plot_command(&results, &out, &title),
        Command::McastFloor(role) => mcast_floor::run(&role).map_err(BenchError::io("mcast-floor")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lanpush-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// What a run talks to.
struct Target {
    driver: Box<dyn Driver>,
    info: TargetInfo,
    /// The engine the tool started, if it did; dropping it stops the engine.
    engine: Option<EngineProcess>,
}

/// The driver for the target the flags name, and the engine process if the tool started one.
fn make_target(args: &RunArgs, params: &Params) -> Result<Target, BenchError> {
    let lanpush = |addr: &str, engine_started: bool| -> Result<_, BenchError> {
        let mut driver = lanpush_driver::LanpushDriver::new(addr)
            .map_err(BenchError::connect(format!("resolving {addr}")))?;
        driver.multicast = args.multicast;
        Ok((
            Box::new(driver) as Box<dyn Driver>,
            TargetInfo {
                driver: "lanpush".into(),
                address: addr.to_string(),
                engine_started,
            },
        ))
    };
    if let Some(url) = &args.target {
        if let Some(addr) = url.strip_prefix("lanpush://") {
            let (driver, info) = lanpush(addr, false)?;
            return Ok(Target {
                driver,
                info,
                engine: None,
            });
        }
        return match peers::driver_for_url(url) {
            Some(Ok(driver)) => {
                let info = TargetInfo {
                    driver: driver.name().to_string(),
                    address: url.clone(),
                    engine_started: false,
                };
                Ok(Target {
                    driver,
                    info,
                    engine: None,
                })
            }
            Some(Err(e)) => Err(BenchError::connect(format!("target {url}"))(e)),
            None => Err(BenchError::Usage(format!(
                "--target {url}: expected mqtt://, nats://, redis:// or lanpush://"
            ))),
        };
    }
    if let Some(addr) = &args.server {
        let (driver, info) = lanpush(addr, false)?;
        return Ok(Target {
            driver,
            info,
            engine: None,
        });
    }
    let binary = match &args.engine_bin {
        Some(path) => path.clone(),
        None => engine::default_binary()?,
    };
    let engine = EngineProcess::start(
        &binary,
        params.engine_threads,
        args.engine_config.as_deref(),
        args.mqtt,
    )?;
    if !args.quiet {
        eprintln!(
            "started {} on {}{}{}",
            engine.binary.display(),
            engine.addr,
            params
                .engine_threads
                .map_or(String::new(), |n| format!(" with {n} threads")),
            args.engine_config
                .as_ref()
                .map_or(String::new(), |f| format!(", config {}", f.display()))
        );
    }
    if let Some(addr) = engine.mqtt_addr.clone() {
        let url = format!("mqtt://{addr}");
        let driver = match peers::driver_for_url(&url) {
            Some(Ok(driver)) => driver,
            Some(Err(e)) => return Err(BenchError::connect(format!("target {url}"))(e)),
            None => return Err(BenchError::Engine(format!("no MQTT driver for {url}"))),
        };
        return Ok(Target {
            driver,
            info: TargetInfo {
                driver: "mqtt".into(),
                address: url,
                engine_started: true,
            },
            engine: Some(engine),
        });
    }
    let (driver, info) = lanpush(&engine.addr.clone(), true)?;
    Ok(Target {
        driver,
        info,
        engine: Some(engine),
    })
}

fn run_command(
    kind: ScenarioKind,
    preloaded: Option<ParamArgs>,
    args: RunArgs,
) -> Result<(), BenchError> {
    let from_file = match (&args.scenario, preloaded) {
        (Some(_), Some(_)) => {
            return Err(BenchError::Usage(
                "`run FILE` already names a scenario file; drop --scenario".into(),
            ))
        }
        (Some(path), None) => ParamArgs::from_file(path)?,
        (None, Some(loaded)) => loaded,
        (None, None) => ParamArgs::default(),
    };
    let params = Params::resolve(kind, args.params.clone().over(from_file))?;
    // Best effort: without it, 1,000 subscribers may hit the default limit of 1,024 descriptors.
    if let Err(e) = sys::raise_nofile_limit() {
        eprintln!("note: could not raise the open-file limit: {e}");
    }
    let overlays = args
        .overlay
        .iter()
        .map(|path| RunResult::load(path))
        .collect::<Result<Vec<_>, _>>()?;

    let target = make_target(&args, &params)?;
    let probe = engine_probe::ProbeSpec {
        pid: target.engine.as_ref().map(|e| e.pid()).or(args.engine_pid),
        stats_addr: (args.engine_stats && target.info.driver == "lanpush")
            .then(|| target.info.address.clone()),
        syscalls: args.engine_syscalls,
        cpu: args.engine_cpu,
    };
    let result = runner::run(&params, &*target.driver, target.info, &probe, args.quiet);
    // Connections close before the engine is stopped.
    drop(target.driver);
    drop(target.engine);
    let mut result = result?;
    result.provenance = report::Provenance::gather(args.engine_config.as_deref());

    print!("{}", result.table());
    if let Some(path) = &args.json {
        let path = args.output(path)?;
        result.save(&path)?;
        eprintln!("wrote {}", path.display());
    }
    if let Some(path) = &args.hgrm {
        let path = &args.output(path)?;
        let histogram =
            result
                .histogram
                .to_histogram()
                .map_err(|reason| BenchError::BadResult {
                    path: path.display().to_string(),
                    reason,
                })?;
        let title = format!(
            "lanpush-bench {} | latency from intended send time",
            result.label
        );
        write_file(path, &hgrm::percentile_distribution(&histogram, &title))?;
    }
    if let Some(path) = &args.plot {
        let path = &args.output(path)?;
        let mut runs = vec![result];
        runs.extend(overlays);
        let title = format!("Latency by percentile: {}", runs[0].params.scenario.name());
        write_plot(&runs, path, &title)?;
    }
    Ok(())
}

fn plot_command(results: &[PathBuf], out: &Path, title: &str) -> Result<(), BenchError> {
    let runs = results
        .iter()
        .map(|path| RunResult::load(path))
        .collect::<Result<Vec<_>, _>>()?;
    write_plot(&runs, out, title)
}

fn write_plot(runs: &[RunResult], out: &Path, title: &str) -> Result<(), BenchError> {
    let mut series = Vec::with_capacity(runs.len());
    for run in runs {
        let histogram = run
            .histogram
            .to_histogram()
            .map_err(|reason| BenchError::BadResult {
                path: run.label.clone(),
                reason,
            })?;
        series.push(plot::Series::from_histogram(run.label.clone(), &histogram));
    }
    write_file(out, &plot::render(title, &series))
}

fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(BenchError::io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod cli_tests {
    use super::*;

    fn help(sub: &str) -> String {
        let mut cmd = cli_command();
        cmd.build();
        cmd.find_subcommand_mut(sub)
            .unwrap()
            .render_long_help()
            .to_string()
    }

    #[test]
    fn each_subcommand_lists_only_its_own_flags() {
        for sub in ["fanout", "fanin"] {
            let text = help(sub);
            assert!(
                text.contains("--subscribers") && text.contains("--rate"),
                "{text}"
            );
            for flag in ["--hmis", "--gateways", "--tags", "--cycle-ms"] {
                assert!(!text.contains(flag), "{sub} lists {flag}:\n{text}");
            }
        }
        let plant = help("plant");
        assert!(
            plant.contains("--hmis") && plant.contains("--cycle-ms"),
            "{plant}"
        );
        for flag in ["--rate", "--publishers", "--subscribers"] {
            assert!(!plant.contains(flag), "plant lists {flag}:\n{plant}");
        }
        assert!(
            help("run").contains("--hmis"),
            "run takes any scenario's flags"
        );
    }

    #[test]
    fn relative_outputs_go_to_the_results_folder() {
        let dir = std::env::temp_dir().join(format!("lanpush-bench-out-{}", std::process::id()));
        let cli = Cli::from_arg_matches(&cli_command().get_matches_from([
            "lanpush-bench",
            "fanout",
            "--out",
            dir.to_str().unwrap(),
        ]))
        .unwrap();
        let Command::Fanout(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            args.output(Path::new("a.json")).unwrap(),
            dir.join("a.json")
        );
        assert!(dir.is_dir(), "made on first use");
        assert_eq!(
            args.output(Path::new("/tmp/x.json")).unwrap(),
            Path::new("/tmp/x.json")
        );
        let default =
            Cli::from_arg_matches(&cli_command().get_matches_from(["lanpush-bench", "plant"]))
                .unwrap();
        let Command::Plant(args) = default.command else {
            panic!()
        };
        assert_eq!(args.out, Path::new("bench/results"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn provenance_names_the_host_and_the_config() {
        let file = std::env::temp_dir().join(format!("lanpush-bench-cfg-{}", std::process::id()));
        std::fs::write(&file, "[server]\nthreads = 2\n").unwrap();
        let p = report::Provenance::gather(Some(&file));
        assert!(!p.host.is_empty() && p.cpus > 0, "{p:?}");
        assert_eq!(p.engine_config.as_deref(), Some("[server]\nthreads = 2\n"));
        let _ = std::fs::remove_file(file);
    }
}
