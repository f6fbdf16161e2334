//! The engine the tool starts by default: `lanpush serve --listen 127.0.0.1:0` (with `--mqtt`,
//! also `--mqtt-listen 127.0.0.1:0`), found next to the tool's own executable, killed when the
//! guard drops.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::BenchError;

/// How long the engine has to print its "listening on" line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running engine; dropping it kills the process and reaps it.
pub struct EngineProcess {
    child: Child,
    pub addr: String,
    /// The MQTT listener's address, when the engine was started with one.
    pub mqtt_addr: Option<String>,
    pub binary: PathBuf,
}

/// `lanpush` in the directory of the running executable (both come out of the same
/// `cargo build`).
pub fn default_binary() -> Result<PathBuf, BenchError> {
    let exe = std::env::current_exe().map_err(BenchError::io("locating lanpush-bench"))?;
    let dir = exe
        .parent()
        .ok_or_else(|| BenchError::Engine(format!("{} has no directory", exe.display())))?;
    Ok(dir.join("lanpush"))
}

/// The address in a `listening on <ip:port>` line.
pub fn parse_listening_line(line: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("listening on")?.trim();
    let addr = rest.split_whitespace().next()?;
    addr.parse::<std::net::SocketAddr>().ok()?;
    Some(addr.to_string())
}

impl EngineProcess {
    pub fn start(
        binary: &Path,
        threads: Option<usize>,
        config: Option<&Path>,
        mqtt: bool,
    ) -> Result<Self, BenchError> {
        if !binary.exists() {
            return Err(BenchError::Engine(format!(
                "{} not found: build it with `cargo build --release` (or give --engine-bin, \
                 --server or --target)",
                binary.display()
            )));
        }
        let mut command = Command::new(binary);
        command.args(["serve", "--listen", "127.0.0.1:0"]);
        if let Some(file) = config {
            command.arg("--config").arg(file);
        }
        if let Some(n) = threads {
            command.args(["--threads", &n.to_string()]);
        }
        if mqtt {
            command.args(["--mqtt-listen", "127.0.0.1:0"]);
        }
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command
            .spawn()
            .map_err(BenchError::io(format!("starting {}", binary.display())))?;
        let Some(stdout) = child.stdout.take() else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(BenchError::Engine("no stdout pipe".into()));
        };
        // The guard owns the child from here on: any early return kills it.
        let mut engine = EngineProcess {
            child,
            addr: String::new(),
            mqtt_addr: None,
            binary: binary.to_path_buf(),
        };
        let (tx, rx) = mpsc::channel();
        // Passes on the address lines (the first, and the MQTT one after it when asked for),
        // then keeps draining stdout so the engine never blocks on a full pipe; ends when the
        // engine exits.
        let wanted = if mqtt { 2 } else { 1 };
        std::thread::Builder::new()
            .name("engine-stdout".into())
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                for _ in 0..wanted {
                    let _ = tx.send(lines.next());
                }
                for _ in lines {}
            })
            .map_err(BenchError::io("spawning the engine-stdout reader"))?;
        let next_line = |engine: &mut EngineProcess| match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(Some(Ok(line))) => Ok(line),
            Ok(Some(Err(e))) => Err(BenchError::Engine(format!("reading stdout: {e}"))),
            Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = engine.child.try_wait().ok().flatten();
                Err(BenchError::Engine(format!(
                    "exited before printing its address ({})",
                    status.map_or("still running".into(), |s| s.to_string())
                )))
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(BenchError::Engine(format!(
                "no 'listening on' line within {STARTUP_TIMEOUT:?}"
            ))),
        };
        let first = next_line(&mut engine)?;
        engine.addr = parse_listening_line(&first).ok_or_else(|| {
            BenchError::Engine(format!(
                "first line {first:?} is not 'listening on <ip:port>'"
            ))
        })?;
        if mqtt {
            let second = next_line(&mut engine)?;
            let addr = second
                .trim()
                .strip_prefix("mqtt ")
                .and_then(parse_listening_line)
                .ok_or_else(|| {
                    BenchError::Engine(format!(
                        "second line {second:?} is not 'mqtt listening on <ip:port>'"
                    ))
                })?;
            engine.mqtt_addr = Some(addr);
        }
        Ok(engine)
    }
}

impl EngineProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_listening_line() {
        assert_eq!(
            parse_listening_line("listening on 127.0.0.1:40123"),
            Some("127.0.0.1:40123".into())
        );
        assert_eq!(
            parse_listening_line("listening on [::1]:7 (2 reactors)"),
            Some("[::1]:7".into())
        );
        assert_eq!(parse_listening_line("starting"), None);
        assert_eq!(parse_listening_line("listening on nowhere"), None);
    }
}
