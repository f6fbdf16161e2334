//! Helpers for tests that run the real `lanpush` binary on loopback: a server guard that reads
//! the "listening on" line and kills the child on drop, a CLI runner with a deadline, and a raw
//! protocol connection for the misbehaving peers. Nothing here sleeps to synchronise: waits poll
//! a condition until a deadline.
#![allow(dead_code)] // each test file uses its own subset

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use lanpush::proto::{
    decode_frame, encode_frame, Decoded, Frame, Gap, Hello, SubAck, Welcome, WireError,
    PROTOCOL_VERSION,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_lanpush");

/// Generous bound for anything that should take milliseconds; only a broken build reaches it.
pub const STEP: Duration = Duration::from_secs(10);

/// A `lanpush serve` child. Killed (and reaped) on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    stderr: Arc<Mutex<String>>,
}

impl Server {
    /// `lanpush serve --listen 127.0.0.1:0 --threads 2`.
    pub fn start() -> Server {
        Server::start_with(&["--threads", "2"])
    }

    pub fn start_with(extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args(["serve", "--listen", "127.0.0.1:0"])
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
            if let Some(Ok(line)) = lines.next() {
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
        Server {
            child,
            addr,
            stderr,
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
        let mut child = Command::new(BIN)
            .args(args)
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
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        Raw {
            stream,
            buf: Vec::new(),
        }
    }

    /// HELLO with `keepalive_ms`, then the WELCOME.
    pub fn hello(&mut self, keepalive_ms: u32) -> Welcome {
        self.send(&Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            client_id: "raw-test".into(),
            keepalive_ms,
        }));
        match self.read(STEP) {
            Some(Got::Welcome(w)) => w,
            other => panic!("expected WELCOME, got {other:?}"),
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
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(Got::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Some(Got::Closed),
            }
        }
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
