//! Helpers for tests that run the real `lanpush` binary on loopback: a server guard that reads
//! the "listening on" line and kills the child on drop, a CLI runner with a deadline, and a raw
//! protocol connection for the misbehaving peers. Nothing here sleeps to synchronise: waits poll
//! a condition until a deadline.
#![allow(dead_code)] // each test file uses its own subset

pub mod netns;
pub mod tls;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lanpush::proto::{
    decode_frame, encode_frame, Decoded, Frame, Gap, Hello, SubAck, Welcome, WireError,
    PROTOCOL_VERSION,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_lanpush");

/// The `lanpush` binary the tests run: [`BIN`], or the one `LANPUSH_TEST_BIN` names, so that a
/// test can be shown to fail against an older build (`LANPUSH_TEST_BIN=/path/to/old/lanpush`).
pub fn bin() -> String {
    std::env::var("LANPUSH_TEST_BIN").unwrap_or_else(|_| BIN.to_string())
}

/// Generous bound for anything that should take milliseconds; only a broken build reaches it.
pub const STEP: Duration = Duration::from_secs(10);

/// A `lanpush serve` child. Killed (and reaped) on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// The MQTT listener's address, when started with `--mqtt-listen` (second stdout line).
    pub mqtt_addr: Option<SocketAddr>,
    /// The WebSocket listener's address, when started with `--ws-listen` (the line after the
    /// MQTT one).
    pub ws_addr: Option<SocketAddr>,
    stderr: Arc<Mutex<String>>,
    /// The stdout lines after those read at start (the TLS listeners'), for [`Server::line_addr`].
    lines: Mutex<Receiver<String>>,
}

impl Server {
    /// `lanpush serve --listen 127.0.0.1:0 --threads 2`.
    pub fn start() -> Server {
        Server::start_with(&["--threads", "2"])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        Server::start_via(&[], "127.0.0.1:0", extra)
    }

    /// `lanpush serve --listen LISTEN EXTRA...`: e.g. an engine restarted on the port of the
    /// one before it.
    pub fn start_on(listen: &str, extra: &[&str]) -> Server {
        Server::start_via(&[], listen, extra)
    }

    /// `PREFIX... lanpush serve --listen LISTEN EXTRA...`: e.g. with `ip netns exec NS` as the
    /// prefix, an engine inside a network namespace (`netns.rs`). The prefix must exec the
    /// engine, so that the child's pid is the engine's.
    pub fn start_via(prefix: &[&str], listen: &str, extra: &[&str]) -> Server {
        let bin = bin();
        let (program, args) = match prefix.split_first() {
            Some((program, rest)) => (program.to_string(), [rest, &[bin.as_str()]].concat()),
            None => (bin.clone(), Vec::new()),
        };
        let mut child = Command::new(program)
            .args(args)
            .args(["serve", "--listen", listen])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lanpush serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        drain_into(child.stderr.take().expect("piped stderr"), stderr.clone());
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            // The "listening on" lines come first; nobody waits for the later ones.
            for line in lines.by_ref().take(5) {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
            // Keep draining so the engine never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match rx.recv_timeout(STEP) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "lanpush serve printed no first line; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("first line is not `listening on ADDR`: {line:?}"));
        let mqtt_addr = extra.contains(&"--mqtt-listen").then(|| {
            let line = rx
                .recv_timeout(STEP)
                .unwrap_or_else(|_| panic!("no `mqtt listening on` line"));
            line.strip_prefix("mqtt listening on ")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("second line is not `mqtt listening on ADDR`: {line:?}"))
        });
        let ws_addr = extra.contains(&"--ws-listen").then(|| {
            let line = rx
                .recv_timeout(STEP)
                .unwrap_or_else(|_| panic!("no `ws listening on` line"));
            line.strip_prefix("ws listening on ")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("line is not `ws listening on ADDR`: {line:?}"))
        });
        Server {
            child,
            addr,
            mqtt_addr,
            ws_addr,
            stderr,
            lines: Mutex::new(rx),
        }
    }

    /// The address on the next stdout line that starts with `{name} listening on ` (lines
    /// before it are skipped): `line_addr("tls")` for `tls listening on ADDR`.
    pub fn line_addr(&self, name: &str) -> SocketAddr {
        let prefix = format!("{name} listening on ");
        let rx = self.lines.lock().unwrap();
        loop {
            let line = rx
                .recv_timeout(STEP)
                .unwrap_or_else(|_| panic!("no `{prefix}ADDR` line"));
            if let Some(addr) = line.strip_prefix(&prefix) {
                return addr.parse().expect("a socket address");
            }
        }
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Sends SIGTERM to the engine.
    pub fn terminate(&self) {
        signal(self.child.id(), libc::SIGTERM);
    }

    /// Waits for the engine to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_deadline(&mut self.child, timeout)
    }

    /// Whether the engine process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) with the pid of a child this test spawned and has not reaped (the guard
    // reaps it only on drop); it has no memory-safety preconditions.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

/// Polls `try_wait` until the child exits or `timeout` passes.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The lines of `pipe`, as they come, from a thread of their own.
pub fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn drain_into(mut pipe: impl Read + Send + 'static, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&chunk[..n]));
        }
    })
}

/// The outcome of a finished CLI run.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `lanpush ARGS` to completion with `stdin` as input; kills it and panics after `timeout`.
pub fn run(args: &[&str], stdin: Option<&str>, timeout: Duration) -> Output {
    let mut cli = Cli::spawn(args);
    if let Some(input) = stdin {
        let mut pipe = cli.stdin.take().expect("piped stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    cli.stdin = None; // EOF
    cli.finish(timeout)
}

/// A running CLI process with its output collected in the background.
pub struct Cli {
    child: Child,
    pub stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stdout_thread: Option<JoinHandle<()>>,
    stderr_lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_thread: Option<JoinHandle<()>>,
}

impl Cli {
    pub fn spawn(args: &[&str]) -> Cli {
        Cli::spawn_env(args, &[])
    }

    /// `lanpush ARGS` with these environment variables set (e.g. `LANPUSH_TOKEN`).
    pub fn spawn_env(args: &[&str], env: &[(&str, &str)]) -> Cli {
        let mut child = Command::new(bin())
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn lanpush");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stdout_thread = drain_into(child.stdout.take().expect("stdout"), stdout.clone());
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, stderr_lines) = mpsc::channel();
        let pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        let stderr_thread = thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
                let _ = tx.send(line);
            }
        });
        Cli {
            stdin: child.stdin.take(),
            child,
            stdout,
            stdout_thread: Some(stdout_thread),
            stderr_lines,
            stderr,
            stderr_thread: Some(stderr_thread),
        }
    }

    /// Waits for a stderr line starting with `prefix` (e.g. `lanpush sub`'s "subscribed:").
    pub fn wait_stderr_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "no stderr line starting with {prefix:?} within {timeout:?}; stderr so far:\n{}",
                    self.stderr.lock().unwrap()
                ),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the process has printed on stdout so far.
    pub fn stdout_so_far(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Polls stdout until it holds at least `n` lines, or panics after `timeout`.
    pub fn wait_stdout_lines(&self, n: usize, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout_so_far();
            let lines: Vec<String> = out.lines().map(str::to_owned).collect();
            if lines.len() >= n {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} stdout lines, not {n}, within {timeout:?}:\n{out}\nstderr:\n{}",
                    lines.len(),
                    self.stderr.lock().unwrap()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for exit (killing the process after `timeout`) and returns everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        self.stdin = None;
        let status = match wait_deadline(&mut self.child, timeout) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "lanpush did not exit within {timeout:?}; stderr:\n{}\nstdout (first 2000 bytes):\n{}",
                    self.stderr.lock().unwrap(),
                    self.stdout.lock().unwrap().chars().take(2000).collect::<String>()
                );
            }
        };
        // The pipes close with the process; the readers finish promptly.
        if let Some(t) = self.stdout_thread.take() {
            t.join().unwrap();
        }
        if let Some(t) = self.stderr_thread.take() {
            t.join().unwrap();
        }
        let stdout = self.stdout.lock().unwrap().clone();
        let stderr = self.stderr.lock().unwrap().clone();
        Output {
            status,
            stdout,
            stderr,
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Raises the soft open-files limit to at least `want` (bounded by the hard limit); returns the
/// soft limit now in force.
pub fn raise_fd_limit(want: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert_eq!(rc, 0, "getrlimit");
    if lim.rlim_cur < want {
        lim.rlim_cur = want.min(lim.rlim_max);
        // SAFETY: setrlimit reads the struct we pass; lowering nothing, raising within the hard
        // limit, affects only this process's fd table size.
        let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
        assert_eq!(rc, 0, "setrlimit");
    }
    lim.rlim_cur
}

/// A frame from the engine, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Got {
    Welcome(Welcome),
    SubAck(SubAck),
    Data {
        topic: String,
        seq: u64,
        flags: u8,
        payload: Vec<u8>,
    },
    Ping(u64),
    Pong(u64),
    Error(WireError),
    Gap(Gap),
    Stats(String),
    /// The engine closed the connection (EOF or reset).
    Closed,
}

/// A hand-driven protocol connection, for peers the client library would never imitate.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        Raw::from_stream(TcpStream::connect(addr).expect("connect"))
    }

    /// A connection made elsewhere (e.g. with a connect timeout), with Nagle off.
    pub fn from_stream(stream: TcpStream) -> Raw {
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// HELLO with `keepalive_ms`, then the WELCOME.
    pub fn hello(&mut self, keepalive_ms: u32) -> Welcome {
        self.send_hello("raw-test", keepalive_ms);
        match self.read(STEP) {
            Some(Got::Welcome(w)) => w,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Sends HELLO and returns without waiting for the WELCOME.
    pub fn send_hello(&mut self, client_id: &str, keepalive_ms: u32) {
        self.send_hello_as(client_id, keepalive_ms, "");
    }

    /// Sends HELLO with `token` (`user:secret`; empty: anonymous), without waiting.
    pub fn send_hello_as(&mut self, client_id: &str, keepalive_ms: u32, token: &str) {
        self.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            client_id: client_id.into(),
            keepalive_ms,
            token: token.into(),
            features: 0,
        }));
    }

    /// HELLO as `token`, then the WELCOME.
    pub fn hello_as(&mut self, client_id: &str, token: &str) -> Welcome {
        self.send_hello_as(client_id, 0, token);
        match self.read(STEP) {
            Some(Got::Welcome(w)) => w,
            other => panic!("expected WELCOME for {client_id}, got {other:?}"),
        }
    }

    /// A PING round trip: sends PING `nonce` and reads until its PONG, answering the engine's
    /// PINGs meanwhile and panicking on anything else. Returns the round-trip time.
    pub fn ping(&mut self, nonce: u64, timeout: Duration) -> Duration {
        let start = Instant::now();
        let deadline = start + timeout;
        self.send(&Frame::Ping { nonce });
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(Got::Pong(n)) if n == nonce => return start.elapsed(),
                Some(Got::Ping(n)) => self.send(&Frame::Pong { nonce: n }),
                None => panic!("no PONG {nonce} within {timeout:?}"),
                Some(other) => panic!("waiting for PONG {nonce}, got {other:?}"),
            }
        }
    }

    pub fn send(&mut self, frame: &Frame<'_>) {
        let mut out = Vec::new();
        encode_frame(&mut out, frame);
        self.stream.write_all(&out).expect("write frame");
    }

    /// Writes raw bytes; a write refused because the engine already closed is not an error.
    pub fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next frame, `Some(Got::Closed)` at EOF or reset, `None` if nothing came in `timeout`.
    pub fn read(&mut self, timeout: Duration) -> Option<Got> {
        self.read_limited(64 * 1024, timeout)
    }

    fn decode(&mut self) -> Option<Got> {
        let (got, used) = match decode_frame(&self.buf, 64 << 20).expect("engine sent garbage") {
            Decoded::NeedMore(_) => return None,
            Decoded::Frame(frame, used) => (
                match frame {
                    Frame::Welcome(w) => Got::Welcome(w),
                    Frame::SubAck(a) => Got::SubAck(a),
                    Frame::Data {
                        header,
                        topic,
                        payload,
                    } => Got::Data {
                        topic: topic.into(),
                        seq: header.seq,
                        flags: header.flags,
                        payload: payload.to_vec(),
                    },
                    Frame::Ping { nonce } => Got::Ping(nonce),
                    Frame::Pong { nonce } => Got::Pong(nonce),
                    Frame::Error(e) => Got::Error(e),
                    Frame::Gap(g) => Got::Gap(g),
                    Frame::Stats(s) => Got::Stats(s),
                    other => panic!("engine sent a client-only frame: {other:?}"),
                },
                used,
            ),
        };
        self.buf.drain(..used);
        Some(got)
    }

    /// Reads frames, skipping PINGs, until an ERROR; then expects the connection to close.
    /// Returns the ERROR and the time until the close was seen.
    pub fn expect_error_then_close(&mut self, timeout: Duration) -> (WireError, Duration) {
        let start = Instant::now();
        let deadline = start + timeout;
        let error = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(Got::Error(e)) => break e,
                Some(Got::Ping(_)) | Some(Got::Pong(_)) => {}
                other => panic!("expected ERROR, got {other:?} after {:?}", start.elapsed()),
            }
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.read(left) {
                Some(Got::Closed) => return (error, start.elapsed()),
                Some(Got::Ping(_)) => {}
                other => panic!(
                    "expected the close after ERROR {error:?}, got {other:?} after {:?}",
                    start.elapsed()
                ),
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failing run can be replayed.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.max(1);
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

// ----- Process inspection, config files, stats, a cuttable proxy (used by tests/delivery.rs) -----

/// Sends `sig` to `pid`; unlike [`signal`], a failure (the process is gone) is only reported in
/// the return value, so drop guards can call it.
pub fn try_signal(pid: u32, sig: libc::c_int) -> bool {
    // SAFETY: kill(2) with a pid this test spawned; no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, sig) == 0 }
}

/// The state letter of a process from /proc/PID/stat: `R` running, `S` sleeping, `T` stopped,
/// `Z` zombie; `None` if it does not exist.
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: the state follows the last ')'.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// Polls until `pid` is in state `want` (e.g. `'T'` after SIGSTOP); panics after `timeout`.
pub fn wait_process_state(pid: u32, want: char, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let state = process_state(pid);
        if state == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process {pid} is in state {state:?}, not {want:?}, after {timeout:?}"
        );
        thread::sleep(Duration::from_millis(2));
    }
}

/// Resident memory of a process in KiB (`VmRSS` in /proc/PID/status).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// A KiB figure from /proc/PID/status: `VmRSS`, `RssAnon` (heap and stacks), `RssFile`
/// (mapped files: the binary's pages as they are first run), ...
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| {
        l.strip_prefix(field)
            .is_some_and(|rest| rest.starts_with(':'))
    })?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples the engine's VmRSS every 10 ms until dropped; keeps the peak.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kib: Arc<AtomicU64>,
    samples: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kib = Arc::new(AtomicU64::new(0));
        let samples = Arc::new(AtomicU64::new(0));
        let (stop2, peak2, samples2) = (stop.clone(), peak_kib.clone(), samples.clone());
        let thread = thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                if let Some(kib) = vm_rss_kib(pid) {
                    peak2.fetch_max(kib, Ordering::Relaxed);
                    samples2.fetch_add(1, Ordering::Relaxed);
                }
                thread::sleep(Duration::from_millis(10));
            }
        });
        RssSampler {
            stop,
            peak_kib,
            samples,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (peak KiB, number of samples).
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        (
            self.peak_kib.load(Ordering::Relaxed),
            self.samples.load(Ordering::Relaxed),
        )
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A CLI child stopped with SIGSTOP: it never reads its socket. On drop it is sent SIGCONT and
/// then killed and reaped (by [`Cli`]'s drop), so no stopped process outlives the test.
pub struct Stopped {
    cli: Option<Cli>,
    pid: u32,
}

impl Stopped {
    /// Stops `cli` and waits until the kernel reports it stopped.
    pub fn stop(cli: Cli) -> Stopped {
        let pid = cli.pid();
        signal(pid, libc::SIGSTOP);
        wait_process_state(pid, 'T', STEP);
        Stopped {
            cli: Some(cli),
            pid,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if let Some(cli) = self.cli.take() {
            try_signal(self.pid, libc::SIGCONT);
            drop(cli);
        }
    }
}

/// A file in the temp directory with a name unique to this process, removed on drop: for
/// `lanpush serve --config FILE`.
pub struct TempFile {
    pub path: std::path::PathBuf,
}

impl TempFile {
    pub fn new(name: &str, contents: &str) -> TempFile {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("lanpush-test-{}-{n}-{name}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile { path }
    }

    pub fn path_str(&self) -> &str {
        self.path.to_str().expect("temp paths are UTF-8")
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Server {
    /// `lanpush serve --threads 2 --config FILE`, FILE holding `toml` (the keys it leaves out
    /// keep their defaults). The file lives as long as the returned guard.
    pub fn start_with_config(toml: &str) -> (Server, TempFile) {
        let file = TempFile::new("engine.toml", toml);
        let server = Server::start_with(&["--threads", "2", "--config", file.path_str()]);
        (server, file)
    }

    /// `lanpush stats --json` against this engine, parsed.
    pub fn stats(&self) -> serde_json::Value {
        self.stats_as("")
    }

    /// `lanpush stats --json --token TOKEN` (anonymous when empty), parsed.
    pub fn stats_as(&self, token: &str) -> serde_json::Value {
        let addr = self.addr_string();
        let mut args = vec!["stats", "--json", "--server", &addr];
        if !token.is_empty() {
            args.extend(["--token", token]);
        }
        let out = run(&args, None, STEP);
        assert!(out.status.success(), "lanpush stats failed: {}", out.stderr);
        serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
            panic!("lanpush stats --json printed no JSON ({e}): {}", out.stdout)
        })
    }
}

impl Raw {
    /// Connects with a receive buffer of about `bytes` (the kernel doubles it and stops
    /// auto-tuning it), so that the engine's queue for this connection fills after little data.
    pub fn connect_with_recv_buffer(addr: SocketAddr, bytes: usize) -> Raw {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .expect("socket");
        socket.set_recv_buffer_size(bytes).expect("SO_RCVBUF");
        socket.connect(&addr.into()).expect("connect");
        let stream: TcpStream = socket.into();
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// As [`Raw::read`], but each `read` call takes at most `max_read_bytes`: a slow reader.
    pub fn read_limited(&mut self, max_read_bytes: usize, timeout: Duration) -> Option<Got> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(got) = self.decode() {
                return Some(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = vec![0u8; max_read_bytes.max(1)];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(Got::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Some(Got::Closed),
            }
        }
    }
}

/// A loopback TCP proxy in front of the engine whose connections can be cut, to break a
/// client's connection without touching the engine. Records the client-side port of every
/// connection it accepted (a reconnecting client comes from a new one).
pub struct Proxy {
    pub addr: SocketAddr,
    live: Arc<Mutex<Vec<TcpStream>>>,
    client_ports: Arc<Mutex<Vec<u16>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: SocketAddr) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let client_ports: Arc<Mutex<Vec<u16>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (live2, ports2, stop2) = (live.clone(), client_ports.clone(), stop.clone());
        thread::spawn(move || {
            for client in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(engine) = TcpStream::connect(upstream) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = engine.set_nodelay(true);
                if let Ok(peer) = client.peer_addr() {
                    ports2.lock().unwrap().push(peer.port());
                }
                let mut live = live2.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(engine.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    thread::spawn(move || {
                        let mut buf = [0u8; 64 * 1024];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            addr,
            live,
            client_ports,
            stop,
        }
    }

    /// Breaks every connection made so far (both legs: the client and the engine see a close).
    pub fn cut(&self) {
        for s in self.live.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The client-side port of each connection accepted so far, in order.
    pub fn client_ports(&self) -> Vec<u16> {
        self.client_ports.lock().unwrap().clone()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
        let _ = TcpStream::connect(self.addr); // wake the accept loop so it sees `stop`
    }
}
