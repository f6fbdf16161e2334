//! The `lanpush` command: run the engine, print or check its config, publish, subscribe, and
//! read its counters.

use std::io::{self, BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};

use lanpush::client::{
    self, now_ns, ClientError, ClientOptions, Event, EventRef, McastOptions, McastSubscriber,
    MessageRef, Publisher, Subscriber, SubscriptionSpec, DEFAULT_SERVER, QUALITY_GOOD,
};
use lanpush::config::{Config, ConfigError, DEFAULT_TOML};
use lanpush::engine::{Engine, EngineError};
use lanpush::proto::{validate_pattern, validate_topic, DeliveryMode};

#[derive(Parser)]
#[command(
    name = "lanpush",
    version,
    about = "A push engine for industrial LANs, and its command-line client."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine. Prints `listening on <ip:port>` on stdout, logs on stderr. Serves
    /// Prometheus metrics at http://127.0.0.1:9464/metrics (metrics.prometheus_listen; "" turns
    /// it off). SIGHUP re-reads the --config file and applies what can change at run time;
    /// SIGTERM/SIGINT drain (server.drain_ms), save the retained values and exit 0.
    Serve(ServeArgs),
    /// Print the embedded default configuration, or check a config file.
    Config(ConfigArgs),
    /// Publish VALUE, one message per stdin line, or --count synthetic messages.
    Pub(PubArgs),
    /// Subscribe to patterns (`+` one level, `#` the rest) and print one line per message.
    Sub(SubArgs),
    /// Print the engine's counters.
    Stats(StatsArgs),
    /// Print an argon2 hash (PHC string) of a password, for `secret_hash` in [[auth.users]].
    /// Reads the password from stdin: one line, or a prompt without echo on a terminal.
    Passwd,
}

#[derive(Args)]
struct ServeArgs {
    /// Config file; keys it leaves out keep their defaults (see `lanpush config`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Listen address, host:port as --server takes it (a host name resolves to its first
    /// address: `localhost:7411`), overriding server.listen (port 0 picks a free port).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    listen: Option<SocketAddr>,
    /// Reactor threads, overriding server.threads (0: one per core).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Log level on stderr, overriding log.level (also on a SIGHUP reload): off, error, warn,
    /// info, debug, trace.
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// MQTT listen address, host:port as --listen, overriding mqtt.listen (port 0 picks a free
    /// port; the second line printed is `mqtt listening on <ip:port>`).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    mqtt_listen: Option<SocketAddr>,
    /// WebSocket listen address, overriding websocket.listen (port 0 picks a free port; the
    /// line after the MQTT one is `ws listening on <ip:port>`).
    #[arg(long, value_name = "ADDR")]
    ws_listen: Option<SocketAddr>,
}

/// host:port the way `--server` reads it (`std::net::ToSocketAddrs`: an IP address or a host
/// name, resolved now), for the listen flags: the first address it resolves to.
fn parse_host_port(text: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    let mut addrs = text
        .to_socket_addrs()
        .map_err(|e| format!("{text:?} is not host:port: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

#[derive(Args)]
struct ConfigArgs {
    /// Validate FILE instead of printing the default.
    #[arg(long, value_name = "FILE")]
    check: Option<PathBuf>,
}

#[derive(Args)]
struct ConnectArgs {
    /// Engine address, host:port.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_SERVER)]
    server: String,
    /// Client id shown in the engine's logs and stats.
    #[arg(long, value_name = "ID")]
    client_id: Option<String>,
    /// Credentials, "user:secret" (default: anonymous). Prefer the LANPUSH_TOKEN environment
    /// variable: a command line is visible to every user of the machine.
    #[arg(
        long,
        value_name = "USER:SECRET",
        env = "LANPUSH_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Connect with TLS (the engine's `tls.listen` address); needs --ca.
    #[arg(long, requires = "ca")]
    tls: bool,
    /// PEM file of the CA that signs the engine's certificate.
    #[arg(long, value_name = "FILE", requires = "tls")]
    ca: Option<PathBuf>,
    /// PEM certificate chain presented to the engine (mTLS); with --key.
    #[arg(long, value_name = "FILE", requires_all = ["tls", "key"])]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Name the engine's certificate must carry (default: the host part of --server).
    #[arg(long, value_name = "NAME", requires = "tls")]
    server_name: Option<String>,
}

impl ConnectArgs {
    fn options(&self, role: &str) -> Result<ClientOptions, CliError> {
        let opts = self.plain_options(role);
        if !self.tls {
            return Ok(opts);
        }
        let ca = self
            .ca
            .as_deref()
            .ok_or_else(|| CliError::Usage("--tls needs --ca FILE".into()))?;
        let cert_key = self.cert.as_deref().zip(self.key.as_deref());
        let tls = lanpush::tls::ClientTls::from_files(ca, cert_key, self.server_name.clone())
            .map_err(|e| CliError::Usage(e.to_string()))?;
        Ok(opts.tls(tls))
    }

    fn plain_options(&self, role: &str) -> ClientOptions {
        // A named client is a durable session: a restarted `sub` resumes where it stopped.
        let durable = self.client_id.is_some();
        let id = self
            .client_id
            .clone()
            .unwrap_or_else(|| format!("lanpush-{role}-{}", std::process::id()));
        let opts = ClientOptions::new(self.server.clone())
            .client_id(id)
            .durable_session(durable);
        match self.token.as_deref().filter(|t| !t.is_empty()) {
            Some(token) => opts.token(token),
            None => opts,
        }
    }
}

#[derive(Args)]
struct PubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Topic to publish on (no wildcards).
    topic: String,
    /// The value; without it (and without --count) each stdin line is one message.
    #[arg(conflicts_with = "count")]
    value: Option<String>,
    /// Publish N synthetic messages: the counter 1..=N as decimal text.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// With --count: messages per second, on a fixed schedule (default: as fast as possible).
    #[arg(long, value_name = "R", requires = "count")]
    rate: Option<f64>,
    /// With --count: pad each payload with leading zeros to at least B bytes.
    #[arg(long, value_name = "B", requires = "count")]
    size: Option<usize>,
    /// Quality flag sent with every message (OPC scale: 0 bad .. 192 good).
    #[arg(long, value_name = "Q", default_value_t = QUALITY_GOOD)]
    quality: u8,
    /// Ask the engine to confirm what it took (publisher acknowledgements, docs/PROTOCOL.md
    /// §5.8): unconfirmed messages are kept and resent after a reconnect (the engine drops what
    /// it already took), the connection is retried for up to 60 s, and the summary on stderr
    /// says how many were confirmed.
    #[arg(long)]
    acks: bool,
    /// With --acks: bytes of unconfirmed messages kept for a resend; publishing waits for
    /// confirmations when they are all in use.
    #[arg(long, value_name = "BYTES", default_value_t = 4 << 20, requires = "acks")]
    acks_buffer: usize,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    All,
    Latest,
    Disconnect,
}

impl From<ModeArg> for DeliveryMode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::All => DeliveryMode::All,
            ModeArg::Latest => DeliveryMode::Latest,
            ModeArg::Disconnect => DeliveryMode::Disconnect,
        }
    }
}

#[derive(Args)]
struct SubArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Patterns to subscribe to.
    #[arg(required = true, value_name = "PATTERN")]
    patterns: Vec<String>,
    /// Exit 0 after N messages (retained snapshot values count).
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// One JSON object per line: messages, and `{"event": "gap", ...}` /
    /// `{"event": "reconnected", ...}` lines. Timestamps are strings (nanoseconds since the
    /// epoch, exact, and RFC 3339 UTC).
    #[arg(long)]
    json: bool,
    /// Timestamps as nanoseconds since the UNIX epoch instead of RFC 3339 UTC (plain output).
    #[arg(long)]
    raw: bool,
    /// Delivery mode (default: the engine's delivery.default_mode).
    #[arg(long, value_enum)]
    mode: Option<ModeArg>,
    /// Give up after SECS; exit non-zero if --count messages have not arrived by then.
    #[arg(long, value_name = "SECS")]
    timeout: Option<f64>,
    /// Receive the topics a multicast channel carries from its group (joined as the engine
    /// announces), repaired over the TCP session; prints the receiver's counters on stderr at
    /// exit. Reconnects as without it: channels joined again, subscriptions resumed.
    #[arg(long)]
    multicast: bool,
    /// With --multicast: the interface to join the groups on, by its address: ADDR for every
    /// group, GROUP=ADDR for one group (a host whose channels arrive on different networks).
    /// Repeatable; default: the kernel's route for each group.
    #[arg(long, value_name = "[GROUP=]ADDR", value_parser = parse_join_interface)]
    multicast_interface: Vec<JoinInterface>,
}

/// One `--multicast-interface`: the group it is for (all when `None`) and the address.
#[derive(Debug, Clone, Copy, PartialEq)]
struct JoinInterface {
    group: Option<std::net::Ipv4Addr>,
    addr: std::net::Ipv4Addr,
}

fn parse_join_interface(s: &str) -> Result<JoinInterface, String> {
    let addr = |a: &str| {
        a.parse::<std::net::Ipv4Addr>()
            .map_err(|_| format!("{a:?} is not an IPv4 interface address"))
    };
    match s.split_once('=') {
        None => Ok(JoinInterface {
            group: None,
            addr: addr(s)?,
        }),
        Some((g, a)) => {
            let group = g
                .parse::<std::net::Ipv4Addr>()
                .ok()
                .filter(|g| g.is_multicast())
                .ok_or_else(|| format!("{g:?} is not an IPv4 multicast group"))?;
            Ok(JoinInterface {
                group: Some(group),
                addr: addr(a)?,
            })
        }
    }
}

#[derive(Args)]
struct StatsArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Print the engine's JSON as is, on one line.
    #[arg(long)]
    json: bool,
    /// Print again every SECS seconds until interrupted (a live view).
    #[arg(long, value_name = "SECS")]
    watch: Option<f64>,
}

/// Why a command failed; printed on stderr as `lanpush: error: ...`.
#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        source: io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Password(#[from] lanpush::auth::PasswordError),
    #[error("timed out after {secs} s: received {received} of {expected} messages")]
    Timeout {
        secs: f64,
        received: u64,
        expected: u64,
    },
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> CliError {
    move |source| CliError::Io { context, source }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Config(args) => config(args),
        Command::Pub(args) => publish(args),
        Command::Sub(args) => subscribe(args),
        Command::Stats(args) => stats(args),
        Command::Passwd => passwd(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lanpush: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), CliError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let config = serve_config(&args)?;
    let log = lanpush::log::init(&config.log.level).map_err(|e| CliError::Usage(e.to_string()))?;
    // Registered before the engine starts, so a signal sent as soon as the "listening on" line
    // is read is already ours (queued until the watcher thread takes it), never the default
    // action: SIGHUP no longer kills the engine.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(io_err("cannot install signal handlers"))?;
    raise_nofile(&config);
    let engine = Engine::start(config)?;
    {
        let mut out = io::stdout().lock();
        writeln!(out, "listening on {}", engine.local_addr())
            .and_then(|()| match engine.mqtt_addr() {
                Some(mqtt) => writeln!(out, "mqtt listening on {mqtt}"),
                None => Ok(()),
            })
            .and_then(|()| match engine.ws_addr() {
                Some(ws) => writeln!(out, "ws listening on {ws}"),
                None => Ok(()),
            })
            .and_then(|()| match engine.tls_addr() {
                Some(tls) => writeln!(out, "tls listening on {tls}"),
                None => Ok(()),
            })
            .and_then(|()| match engine.tls_mqtt_addr() {
                Some(tls) => writeln!(out, "mqtt tls listening on {tls}"),
                None => Ok(()),
            })
            .and_then(|()| out.flush())
            .map_err(io_err("cannot write to stdout"))?;
    }
    tracing::info!(
        addr = %engine.local_addr(),
        reactors = engine.reactor_count(),
        version = env!("CARGO_PKG_VERSION"),
        "engine started"
    );
    let shutdown = engine.shutdown_handle();
    let reload = engine.reload_handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut draining = false;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    if !draining {
                        handle_sighup(&args, &reload, &log);
                    }
                    continue;
                }
                if draining {
                    // The operator insists: stop now, without the rest of the drain or the
                    // final save (the last periodic snapshot file stays).
                    tracing::warn!(
                        signal,
                        "second stop signal: exiting without finishing the drain"
                    );
                    std::process::exit(1);
                }
                draining = true;
                tracing::info!(
                    signal,
                    "signal received: draining, then exiting (again to stop at once)"
                );
                notify("STOPPING=1");
                shutdown.shutdown();
            }
        })
        .map_err(io_err("cannot start the signal thread"))?;
    // A busy metrics port (another engine on this host) costs the endpoint, not the engine.
    let metrics_server = match engine.start_metrics_server() {
        Ok(server) => server,
        Err(e) => {
            tracing::warn!(
                error = %e,
                "cannot start the metrics endpoint (metrics.prometheus_listen): serving without it"
            );
            None
        }
    };
    if let Some(server) = &metrics_server {
        tracing::info!("metrics on http://{}/metrics", server.local_addr());
    }
    notify("READY=1");
    engine.join()?;
    drop(metrics_server);
    tracing::info!("engine stopped");
    Ok(())
}

/// The config `serve` runs with: the file (or the defaults), then the command-line overrides.
fn serve_config(args: &ServeArgs) -> Result<Config, CliError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    if let Some(threads) = args.threads {
        config.server.threads = threads;
    }
    if let Some(level) = &args.log_level {
        lanpush::log::parse_level(level).map_err(|e| CliError::Usage(e.to_string()))?;
        config.log.level = level.trim().to_string();
    }
    if let Some(mqtt) = args.mqtt_listen {
        config.mqtt.listen = mqtt.to_string();
    }
    if let Some(ws) = args.ws_listen {
        config.websocket.listen = ws.to_string();
    }
    Ok(config)
}

/// SIGHUP: re-read the --config file, apply what can change at run time, log what cannot.
/// Never stops the engine: a file that does not parse is logged and the running config stays.
fn handle_sighup(
    args: &ServeArgs,
    reload: &lanpush::engine::ReloadHandle,
    log: &lanpush::log::LogHandle,
) {
    notify(&format!(
        "RELOADING=1\nMONOTONIC_USEC={}",
        lanpush::service::monotonic_usec()
    ));
    if args.config.is_none() {
        tracing::warn!("reload (SIGHUP): serve runs without --config, nothing to re-read");
        notify("READY=1");
        return;
    }
    match serve_config(args) {
        Err(e) => tracing::error!(error = %e, "reload (SIGHUP) failed: the running config stays"),
        Ok(config) => {
            if let Err(e) = log.set_level(&config.log.level) {
                tracing::error!(error = %e, "reload (SIGHUP): log level unchanged");
            }
            match reload.reload(&config) {
                Ok(plan) => {
                    for key in &plan.needs_restart {
                        tracing::warn!(
                            key,
                            "reload (SIGHUP): changed, takes effect after a restart"
                        );
                    }
                    tracing::info!(
                        file = ?args.config,
                        applied = ?plan.applied,
                        needs_restart = ?plan.needs_restart,
                        "reloaded configuration (SIGHUP)"
                    );
                }
                Err(e) => tracing::error!(error = %e, "reload (SIGHUP) incomplete"),
            }
        }
    }
    notify("READY=1");
}

/// Tells systemd (Type=notify) about a state change; nothing when not run by it.
fn notify(state: &str) {
    if let Err(e) = lanpush::service::sd_notify(state) {
        tracing::warn!(error = %e, state, "sd_notify failed");
    }
}

/// Raises the soft descriptor limit to what limits.max_connections needs, or says how short
/// of it the hard limit leaves the engine.
fn raise_nofile(config: &Config) {
    use lanpush::service::{nofile_needed, raise_nofile, NofileOutcome};
    let needed = nofile_needed(config.limits.max_connections, config.reactor_threads());
    match raise_nofile(needed) {
        Ok(NofileOutcome::Enough { soft }) => {
            tracing::debug!(soft, needed, "RLIMIT_NOFILE covers limits.max_connections")
        }
        Ok(NofileOutcome::Raised { from, to }) => {
            tracing::info!(
                from,
                to,
                "raised the soft RLIMIT_NOFILE for limits.max_connections"
            )
        }
        Ok(NofileOutcome::Short {
            soft,
            needed,
            short,
        }) => tracing::warn!(
            soft,
            needed,
            short,
            max_connections = config.limits.max_connections,
            "RLIMIT_NOFILE is {short} descriptors short of what limits.max_connections needs; \
             accepts will fail past about {} connections (raise LimitNOFILE / ulimit -Hn, or \
             lower limits.max_connections)",
            soft.saturating_sub(needed - config.limits.max_connections as u64)
        ),
        Err(e) => tracing::warn!(error = %e, needed, "cannot read or raise RLIMIT_NOFILE"),
    }
}

/// `lanpush passwd`: the PHC string of a password read from stdin.
fn passwd() -> Result<(), CliError> {
    use std::io::IsTerminal;
    let stdin = io::stdin();
    let password = if stdin.is_terminal() {
        let first = prompt_hidden("password: ")?;
        let again = prompt_hidden("again: ")?;
        if first != again {
            return Err(CliError::Usage("the passwords differ".into()));
        }
        first
    } else {
        let mut line = String::new();
        stdin
            .lock()
            .read_line(&mut line)
            .map_err(io_err("cannot read the password from stdin"))?;
        line.trim_end_matches(['\n', '\r']).to_string()
    };
    let hash = lanpush::auth::hash_password(password.as_bytes())?;
    println!("{hash}");
    Ok(())
}

/// Reads one line from the terminal with echo off (`stty`, so no unsafe code here).
fn prompt_hidden(prompt: &str) -> Result<String, CliError> {
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    eprint!("{prompt}");
    let hidden = stty("-echo");
    let mut line = String::new();
    let read = io::stdin().lock().read_line(&mut line);
    if hidden {
        stty("echo");
    }
    eprintln!();
    read.map_err(io_err("cannot read the password"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn config(args: ConfigArgs) -> Result<(), CliError> {
    match args.check {
        None => print!("{DEFAULT_TOML}"),
        Some(path) => {
            let config = Config::from_file(&path)?;
            check_runnable(&config)?;
            println!("{}: ok", path.display());
        }
    }
    Ok(())
}

/// What `serve` would refuse beyond the file's own rules: a thread count the engine cannot run,
/// a listen address that is not on this host. (Whether the port is free is not checked: the
/// running engine this file is meant for holds it.)
fn check_runnable(config: &Config) -> Result<(), CliError> {
    let threads = config.reactor_threads();
    if threads == 0 || threads > lanpush::engine::MAX_SHARDS {
        return Err(CliError::Engine(EngineError::Threads(threads)));
    }
    let mut addrs = vec![("server.listen", Some(config.server.listen))];
    addrs.push(("mqtt.listen", config.mqtt.listen_addr()));
    for (key, addr) in addrs {
        let Some(addr) = addr else { continue };
        let ip_only = SocketAddr::new(addr.ip(), 0);
        if let Err(e) = std::net::TcpListener::bind(ip_only) {
            return Err(CliError::Usage(format!(
                "{key} = {addr}: cannot listen on {} on this host: {e}",
                addr.ip()
            )));
        }
    }
    Ok(())
}

fn publish(args: PubArgs) -> Result<(), CliError> {
    let opts = args.connect.options("pub")?;
    // Checked before connecting, so the message is about the topic whatever the network does.
    validate_topic(&args.topic, opts.max_topic_bytes).map_err(|source| ClientError::Topic {
        topic: args.topic.clone(),
        source,
    })?;
    if let Some(rate) = args.rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(CliError::Usage(format!(
                "--rate must be a positive number, got {rate}"
            )));
        }
    }
    let opts = if args.acks {
        opts.publisher_acks(args.acks_buffer)
    } else {
        opts
    };
    let mut publisher = Publisher::connect(opts)?;
    let (topic, quality) = (args.topic.as_str(), args.quality);
    let mut retry = Retry::new(args.acks);
    let mut sent = 0u64;
    match (&args.value, args.count) {
        (Some(value), _) => {
            retry.run(&mut publisher, |p| {
                p.publish_with(topic, value.as_bytes(), quality, now_ns())
            })?;
            sent = 1;
        }
        (None, Some(count)) => {
            let started = Instant::now();
            publish_synthetic(
                &mut publisher,
                &mut retry,
                topic,
                quality,
                count,
                args.rate,
                args.size,
            )?;
            retry.run(&mut publisher, |p| p.confirm(CONFIRM_TIMEOUT))?;
            let secs = started.elapsed().as_secs_f64();
            let c = publisher.counters();
            eprintln!(
                "published {count} messages to engine {} in {secs:.3} s ({:.0} msg/s); {}{}",
                publisher
                    .welcome()
                    .map_or_else(|| "?".to_string(), engine_label),
                count as f64 / secs.max(1e-9),
                acks_summary(args.acks, &c, count),
                paced_summary(c.paced_writes, c.paced_ns, c.writes)
            );
            return Ok(());
        }
        (None, None) => {
            // Our own BufReader, to see whether more input is already buffered.
            let mut reader = io::BufReader::with_capacity(64 * 1024, io::stdin().lock());
            let mut line = String::new();
            loop {
                line.clear();
                if reader
                    .read_line(&mut line)
                    .map_err(io_err("cannot read stdin"))?
                    == 0
                {
                    break;
                }
                let value = line.trim_end_matches(['\n', '\r']);
                retry.run(&mut publisher, |p| {
                    p.publish_with(topic, value.as_bytes(), quality, now_ns())
                })?;
                sent += 1;
                // Nothing more is buffered on stdin: send now rather than wait for more lines.
                if reader.buffer().is_empty() {
                    retry.run(&mut publisher, Publisher::flush)?;
                }
            }
        }
    }
    // The round trip makes an ERROR about any of our publishes arrive before we exit.
    retry.run(&mut publisher, |p| p.confirm(CONFIRM_TIMEOUT))?;
    if args.acks {
        let c = publisher.counters();
        eprintln!(
            "published {sent} messages; {}",
            acks_summary(true, &c, sent)
        );
    }
    Ok(())
}

const CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `pub --acks` keeps trying to reach the engine again after losing it.
const RECONNECT_PATIENCE: Duration = Duration::from_secs(60);

/// `pub --acks`: an operation that failed because the connection is down is tried again (the
/// publisher resends what the engine had not confirmed) until the engine is back or
/// [`RECONNECT_PATIENCE`] has passed. Without --acks, errors end the command as before.
struct Retry {
    acks: bool,
    /// When the current outage began.
    down_since: Option<Instant>,
}

impl Retry {
    fn new(acks: bool) -> Retry {
        Retry {
            acks,
            down_since: None,
        }
    }

    fn run(
        &mut self,
        publisher: &mut Publisher,
        mut op: impl FnMut(&mut Publisher) -> Result<(), ClientError>,
    ) -> Result<(), CliError> {
        loop {
            match op(publisher) {
                Ok(()) => {
                    if self.down_since.take().is_some() {
                        let (frames, _) = publisher.unconfirmed();
                        eprintln!(
                            "lanpush: reconnected; {} unconfirmed messages resent so far, {frames} awaiting confirmation",
                            publisher.counters().resent
                        );
                    }
                    return Ok(());
                }
                Err(e) if self.acks && e.is_retryable() => {
                    let since = *self.down_since.get_or_insert_with(|| {
                        eprintln!("lanpush: {e}; retrying, unconfirmed messages will be resent");
                        Instant::now()
                    });
                    if since.elapsed() > RECONNECT_PATIENCE {
                        return Err(e.into());
                    }
                    let wait = match e {
                        ClientError::Reconnecting { retry_in } => retry_in,
                        _ => Duration::from_millis(50),
                    };
                    std::thread::sleep(wait.min(Duration::from_millis(200)));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// `pub --acks`'s account of confirmations ("" without --acks).
fn acks_summary(acks: bool, c: &lanpush::client::PublisherCounters, sent: u64) -> String {
    if !acks {
        return String::new();
    }
    format!(
        "confirmed {} of {sent} by the engine ({} resent after reconnects); ",
        c.confirmed, c.resent
    )
}

/// `pub`'s account of backpressure: how many of its writes waited for the engine.
fn paced_summary(paced_writes: u64, paced_ns: u64, writes: u64) -> String {
    if paced_writes == 0 {
        return "not paced (the engine took every write at once)".to_string();
    }
    format!(
        "paced by the engine: {paced_writes} of {writes} writes waited, {:.1} ms in all (its `all` subscribers were behind; see docs/ARCHITECTURE.md, \"Pacing\")",
        paced_ns as f64 / 1e6
    )
}

/// Publishes 1..=count, padded to `size` bytes, at `rate` messages/s on a fixed schedule
/// (message i is due at start + i/rate, so a late message does not delay the ones after it).
fn publish_synthetic(
    publisher: &mut Publisher,
    retry: &mut Retry,
    topic: &str,
    quality: u8,
    count: u64,
    rate: Option<f64>,
    size: Option<usize>,
) -> Result<(), CliError> {
    let start = Instant::now();
    let width = size.unwrap_or(0);
    let mut payload = String::new();
    for i in 0..count {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            let now = Instant::now();
            if due > now {
                retry.run(publisher, Publisher::flush)?;
                std::thread::sleep(due - now);
            }
        }
        payload.clear();
        use std::fmt::Write as _;
        write!(payload, "{:0>width$}", i + 1).expect("writing to a String cannot fail");
        retry.run(publisher, |p| {
            p.publish_with(topic, payload.as_bytes(), quality, now_ns())
        })?;
    }
    Ok(())
}

/// How often the subscribe loop wakes without traffic (it must poll within half a keep-alive).
const SUB_POLL: Duration = Duration::from_secs(1);

fn subscribe(args: SubArgs) -> Result<(), CliError> {
    let opts = args.connect.options("sub")?;
    for pattern in &args.patterns {
        validate_pattern(pattern, opts.max_topic_bytes).map_err(|source| ClientError::Pattern {
            pattern: pattern.clone(),
            source,
        })?;
    }
    let timeout = match args.timeout {
        Some(secs) if secs.is_finite() && secs >= 0.0 => Some(Duration::from_secs_f64(secs)),
        Some(secs) => {
            return Err(CliError::Usage(format!(
                "--timeout must be a non-negative number of seconds, got {secs}"
            )))
        }
        None => None,
    };
    let mode = args.mode.map_or(DeliveryMode::Default, DeliveryMode::from);
    if args.multicast {
        return subscribe_multicast(&args, opts, mode, timeout);
    }
    let specs = args
        .patterns
        .iter()
        .map(|p| SubscriptionSpec::new(p.clone(), mode))
        .collect();
    let started = Instant::now();
    let mut sub = Subscriber::connect(opts, specs)?;
    // Scripts and tests wait for this line before publishing.
    eprintln!(
        "subscribed: {} (reactor {}, engine {})",
        args.patterns.join(" "),
        sub.welcome().map_or(0, |w| w.reactor),
        sub.welcome().map_or_else(|| "?".to_string(), engine_label)
    );
    let deadline = timeout.map(|t| started + t);
    let mut out = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut received = 0u64;
    let mut write_error: Option<io::Error> = None;
    loop {
        if args.count.is_some_and(|n| received >= n) {
            break;
        }
        let wait = match sub_wait(&args, deadline, received) {
            Ok(wait) => wait,
            Err(end) => {
                out.flush().ok();
                return end;
            }
        };
        sub.next_batch(wait, |event| {
            if args.count.is_some_and(|n| received >= n) || write_error.is_some() {
                return;
            }
            if let EventRef::Message(_) = event {
                received += 1;
            }
            if let Err(e) = print_event(&mut out, &event, args.json, args.raw) {
                write_error = Some(e);
            }
        })?;
        if let Some(e) = write_error.take().or_else(|| out.flush().err()) {
            if e.kind() == io::ErrorKind::BrokenPipe {
                // `lanpush sub ... | head`: the reader has what it wanted.
                return Ok(());
            }
            return Err(CliError::Io {
                context: "cannot write to stdout",
                source: e,
            });
        }
    }
    out.flush().map_err(io_err("cannot write to stdout"))?;
    Ok(())
}

/// Which engine a client reached, as `sub` and `pub` print it: the run's id, and the engine's
/// version when it told it (WELCOME, docs/PROTOCOL.md §4).
fn engine_label(w: &lanpush::proto::Welcome) -> String {
    if w.engine_version.is_empty() {
        format!("{:016x}", w.engine_id)
    } else {
        format!("{:016x}, lanpush {}", w.engine_id, w.engine_version)
    }
}

/// How long a `sub` loop's next poll may wait, or, once `--timeout` has passed, how the command
/// ends: a time-out error when `--count` messages were expected, else success.
fn sub_wait(
    args: &SubArgs,
    deadline: Option<Instant>,
    received: u64,
) -> Result<Duration, Result<(), CliError>> {
    let Some(deadline) = deadline else {
        return Ok(SUB_POLL);
    };
    let now = Instant::now();
    if now < deadline {
        return Ok((deadline - now).min(SUB_POLL));
    }
    Err(match args.count {
        Some(expected) => Err(CliError::Timeout {
            secs: args.timeout.unwrap_or(0.0),
            received,
            expected,
        }),
        None => Ok(()),
    })
}

/// `sub --multicast`: the same output, from a [`McastSubscriber`].
fn subscribe_multicast(
    args: &SubArgs,
    opts: lanpush::client::ClientOptions,
    mode: DeliveryMode,
    timeout: Option<Duration>,
) -> Result<(), CliError> {
    let started = Instant::now();
    let j = &args.multicast_interface;
    let mcast = McastOptions {
        interface: j
            .iter()
            .rev()
            .find(|j| j.group.is_none())
            .map_or(std::net::Ipv4Addr::UNSPECIFIED, |j| j.addr),
        group_interfaces: j.iter().filter_map(|j| Some((j.group?, j.addr))).collect(),
        ..McastOptions::default()
    };
    let mut sub = McastSubscriber::connect(opts, mcast, args.patterns.clone(), mode)?;
    eprintln!(
        "subscribed: {} (multicast, {} channel(s) joined, engine {})",
        args.patterns.join(" "),
        sub.channels_joined(),
        sub.welcome().map_or_else(|| "?".to_string(), engine_label)
    );
    let deadline = timeout.map(|t| started + t);
    let mut out = BufWriter::with_capacity(64 * 1024, io::stdout().lock());
    let mut received = 0u64;
    let result = loop {
        if args.count.is_some_and(|n| received >= n) {
            break Ok(());
        }
        let wait = match sub_wait(args, deadline, received) {
            Ok(wait) => wait,
            Err(end) => break end,
        };
        match sub.next_event(wait) {
            Ok(Some(event)) => {
                if let Event::Message(_) = event {
                    received += 1;
                }
                if let Err(e) = print_event(&mut out, &event.as_event_ref(), args.json, args.raw) {
                    if e.kind() == io::ErrorKind::BrokenPipe {
                        break Ok(());
                    }
                    break Err(CliError::Io {
                        context: "cannot write to stdout",
                        source: e,
                    });
                }
            }
            Ok(None) => {
                let _ = out.flush();
            }
            Err(e) => break Err(e.into()),
        }
    };
    let _ = out.flush();
    let c = sub.counters();
    let r = c.receiver;
    eprintln!(
        "multicast: messages={} tcp_messages={} datagrams={} heartbeats={} duplicates={} naks_sent={} nak_datagrams={} naks_suppressed={} repairs_received={} retransmits_received={} gone={} gaps={} stitched={} skipped={} recv_buffer_overflows={}",
        r.messages,
        c.tcp_messages,
        r.datagrams,
        r.heartbeats,
        r.duplicates,
        r.naks_sent,
        r.nak_datagrams,
        r.naks_suppressed,
        r.repairs_received,
        r.retransmits_received,
        r.gone,
        r.gaps,
        r.stitched,
        r.skipped,
        c.recv_buffer_overflows
    );
    result
}

/// One output line per event. Plain:
/// `TOPIC seq=N src_ts=TIME ingest_ts=TIME q=Q [snapshot] [restored] VALUE`, TIME in RFC 3339
/// UTC (`-` for a source without a clock; nanoseconds since the epoch with `--raw`), VALUE the
/// payload as text if it is UTF-8 without control characters, else `hex:` and its hex digits;
/// `GAP TOPIC FROM..=TO` for a gap; reconnections on stderr. JSON: an object per message with
/// topic, seq, source_ts_ns and ingest_ts_ns (decimal strings: they pass 2^53, which JSON
/// readers round), source_ts and ingest_ts (RFC 3339, null for 0), quality, snapshot, restored
/// and value (UTF-8) or value_hex; `{"event":"gap","gap":{topic,from_seq,to_seq}}` and
/// `{"event":"reconnected","attempt":N,"engine_restarted":B}` in the same stream (a restart
/// also goes to stderr).
fn print_event(
    out: &mut impl Write,
    event: &EventRef<'_>,
    json: bool,
    raw: bool,
) -> io::Result<()> {
    match (event, json) {
        (EventRef::Message(m), false) => print_plain(out, m, raw),
        (EventRef::Message(m), true) => {
            let text = std::str::from_utf8(m.payload).ok();
            let time = |ns: u64| (ns != 0).then(|| client::utc_rfc3339(ns));
            let line = JsonMessage {
                topic: m.topic,
                seq: m.seq,
                source_ts_ns: m.source_ts_ns.to_string(),
                ingest_ts_ns: m.ingest_ts_ns.to_string(),
                source_ts: time(m.source_ts_ns),
                ingest_ts: time(m.ingest_ts_ns),
                quality: m.quality,
                snapshot: m.snapshot,
                restored: m.restored,
                value: text,
                value_hex: text.is_none().then(|| hex(m.payload)),
            };
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")
        }
        (
            EventRef::Gap {
                topic,
                from_seq,
                to_seq,
            },
            false,
        ) => writeln!(out, "GAP {topic} {from_seq}..={to_seq}"),
        (
            EventRef::Gap {
                topic,
                from_seq,
                to_seq,
            },
            true,
        ) => {
            let line = serde_json::json!({
                "event": "gap",
                "gap": { "topic": topic, "from_seq": from_seq, "to_seq": to_seq }
            });
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")
        }
        (
            EventRef::Reconnected {
                attempt,
                engine_restarted,
            },
            json,
        ) => {
            if *engine_restarted {
                eprintln!(
                    "lanpush: reconnected (attempt {attempt}) to a restarted engine: its sequence \
                     numbers started again; messages published while it was down are unknown"
                );
            } else {
                eprintln!("lanpush: reconnected and resumed (attempt {attempt})");
            }
            if !json {
                return Ok(());
            }
            let line = serde_json::json!({
                "event": "reconnected",
                "attempt": attempt,
                "engine_restarted": engine_restarted,
            });
            serde_json::to_writer(&mut *out, &line)?;
            out.write_all(b"\n")
        }
    }
}

#[derive(serde::Serialize)]
struct JsonMessage<'a> {
    topic: &'a str,
    seq: u64,
    source_ts_ns: String,
    ingest_ts_ns: String,
    source_ts: Option<String>,
    ingest_ts: Option<String>,
    quality: u8,
    snapshot: bool,
    restored: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_hex: Option<String>,
}

fn print_plain(out: &mut impl Write, m: &MessageRef<'_>, raw: bool) -> io::Result<()> {
    if raw {
        write!(
            out,
            "{} seq={} src_ts={} ingest_ts={} q={}",
            m.topic, m.seq, m.source_ts_ns, m.ingest_ts_ns, m.quality
        )?;
    } else {
        write!(
            out,
            "{} seq={} src_ts={} ingest_ts={} q={}",
            m.topic,
            m.seq,
            client::utc_rfc3339(m.source_ts_ns),
            client::utc_rfc3339(m.ingest_ts_ns),
            m.quality
        )?;
    }
    if m.snapshot {
        out.write_all(b" snapshot")?;
    }
    if m.restored {
        out.write_all(b" restored")?;
    }
    match std::str::from_utf8(m.payload) {
        Ok(text) if !text.chars().any(char::is_control) => writeln!(out, " {text}"),
        _ => writeln!(out, " hex:{}", hex(m.payload)),
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        write!(s, "{b:02x}").expect("writing to a String cannot fail");
    }
    s
}

fn stats(args: StatsArgs) -> Result<(), CliError> {
    let opts = args.connect.options("stats")?;
    loop {
        let (json, welcome) = client::stats_with_welcome(&opts)?;
        let text = if args.json {
            json
        } else {
            match serde_json::from_str::<serde_json::Value>(&json) {
                Ok(value) => render_stats(&value, welcome.connection_id),
                Err(_) => json,
            }
        };
        let mut out = io::stdout().lock();
        writeln!(out, "{text}")
            .and_then(|()| out.flush())
            .map_err(io_err("cannot write to stdout"))?;
        match args.watch {
            Some(secs) if secs > 0.0 => std::thread::sleep(Duration::from_secs_f64(secs)),
            _ => return Ok(()),
        }
    }
}

/// The stats document for people: engine totals, one line per connection (not the one that
/// asked, `own_connection`), latency tables.
fn render_stats(doc: &serde_json::Value, own_connection: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let num = |v: &serde_json::Value, key: &str| v.get(key).and_then(|x| x.as_u64()).unwrap_or(0);
    let text = |key: &str| doc.get(key).and_then(|x| x.as_str()).unwrap_or("?");
    let _ = writeln!(
        out,
        "engine {} (lanpush {})",
        text("engine_id"),
        text("engine_version")
    );
    let _ = writeln!(
        out,
        "uptime {} s, {} open connections, {} durable sessions ({} live, {} bytes)",
        num(doc, "uptime_ms") / 1000,
        num(doc, "open_connections"),
        num(doc, "durable_sessions"),
        num(doc, "durable_sessions_live"),
        num(doc, "durable_session_bytes")
    );
    if let Some(url) = doc.get("metrics_url").and_then(|u| u.as_str()) {
        let _ = writeln!(out, "Prometheus metrics: {url}");
    }
    if let Some(totals) = doc.get("totals").and_then(|t| t.as_object()) {
        for (name, value) in totals {
            let _ = writeln!(out, "  {name:<20} {value}");
        }
    }
    if let Some(channels) = doc.get("multicast").and_then(|c| c.as_array()) {
        let _ = writeln!(
            out,
            "\nmulticast {:>7} {:>12} {:>8} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9}",
            "channel",
            "datagrams",
            "MB",
            "naks",
            "unicast",
            "mcast_rtx",
            "suppressed",
            "unrecoverable",
            "send_err"
        );
        for c in channels {
            let _ = writeln!(
                out,
                "          {:>7} {:>12} {:>8.1} {:>9} {:>9} {:>9} {:>10} {:>12} {:>9}",
                num(c, "channel"),
                num(c, "datagrams_sent"),
                num(c, "bytes_sent") as f64 / 1e6,
                num(c, "naks_received"),
                num(c, "unicast_repairs"),
                num(c, "multicast_repairs"),
                num(c, "naks_suppressed"),
                num(c, "unrecoverable"),
                num(c, "send_errors")
            );
        }
    }
    let conns: Vec<serde_json::Value> = doc
        .get("connections")
        .and_then(|c| c.as_array())
        .map(|c| {
            c.iter()
                .filter(|c| num(c, "id") != own_connection)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if !conns.is_empty() {
        // `reactor`: the engine thread holding the connection; `queued`: frames (and bytes)
        // waiting in the engine for its socket; `reconnects`: earlier connections of its id.
        let _ = writeln!(
            out,
            "\nconnections (this stats connection, {own_connection}, not listed):\n{:>8} {:<24} {:>7} {:>8} {:>12} {:>12} {:>10} {:>10} {:>9} {:>6} {:>10}  subscriptions",
            "conn_id", "client_id", "reactor", "queued", "queued_bytes", "delivered", "conflated", "lagged", "replayed", "gaps", "reconnects"
        );
        for c in &conns {
            let subs: Vec<String> = c
                .get("subscriptions")
                .and_then(|s| s.as_array())
                .map(|s| {
                    s.iter()
                        .map(|s| {
                            let field = |k: &str| {
                                s.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string()
                            };
                            format!("{} ({})", field("pattern"), field("mode"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let client_id = c.get("client_id").and_then(|v| v.as_str()).unwrap_or("");
            let _ = writeln!(
                out,
                "{:>8} {:<24} {:>7} {:>8} {:>12} {:>12} {:>10} {:>10} {:>9} {:>6} {:>10}  {}",
                num(c, "id"),
                client_id,
                num(c, "reactor"),
                num(c, "queue_frames"),
                num(c, "queue_bytes"),
                num(c, "delivered"),
                num(c, "conflated"),
                num(c, "lagged"),
                num(c, "replayed"),
                num(c, "gaps"),
                num(c, "reconnects"),
                subs.join(", ")
            );
        }
    }
    if let Some(latency) = doc.get("latency") {
        let _ = writeln!(out);
        out.push_str(&lanpush::metrics::render_latency_table(latency));
    }
    out
}
