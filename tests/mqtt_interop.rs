//! Interop of the MQTT listener with clients no one here wrote: `mosquitto_pub` /
//! `mosquitto_sub` (Debian's mosquitto-clients) and Paho (PyPI paho-mqtt), against the real
//! binary on 127.0.0.1 port 0, both directions, retained values, the will, QoS 1, a persistent
//! session.
//!
//! The tools are installed by `.ci/run`. A test whose tool is missing **fails**, with the
//! command that installs it: a skipped interop test would pass while proving nothing.
//! Nothing sleeps to synchronise: each step waits for a line the tool prints (`mosquitto_sub -d`
//! prints "received SUBACK", the Paho scripts print "connected" / "subscribed").

mod util;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use util::{run, Cli, Server, STEP};

const PAHO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqtt");

/// Panics with the install command when `program` cannot be started.
fn require(program: &str, install: &str) {
    match Command::new(program)
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => {}
        Err(e) => panic!(
            "{program} is needed by the MQTT interop tests and cannot be run ({e}); install it \
             with `{install}` (.ci/run does)"
        ),
    }
}

fn require_mosquitto() {
    require("mosquitto_sub", "apt-get install -y mosquitto-clients");
    require("mosquitto_pub", "apt-get install -y mosquitto-clients");
}

fn require_paho() {
    let ok = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "python3 with paho-mqtt is needed by the MQTT interop tests; install it with \
         `pip install paho-mqtt` (.ci/run does)"
    );
}

fn mqtt_server() -> (Server, SocketAddr) {
    let server = Server::start_with(&["--threads", "2", "--mqtt-listen", "127.0.0.1:0"]);
    let mqtt = server.mqtt_addr.expect("started with --mqtt-listen");
    (server, mqtt)
}

/// An external program whose stdout lines the test reads as they come; killed on drop.
struct Tool {
    child: Child,
    lines: Receiver<String>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Tool {
    fn spawn(program: &str, args: &[&str]) -> Tool {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let (pipe, seen) = (child.stdout.take().expect("piped"), stdout.clone());
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut seen) = seen.lock() {
                    seen.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut pipe, sink) = (child.stderr.take().expect("piped"), stderr.clone());
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            if let Ok(mut sink) = sink.lock() {
                sink.push_str(&text);
            }
        });
        Tool {
            child,
            lines,
            stdout,
            stderr,
        }
    }

    /// The next stdout line for which `want` holds (earlier ones are skipped).
    fn wait_line(&self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + STEP;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(_) => {
                    let stdout = self.stdout.lock().map(|l| l.join("\n")).unwrap_or_default();
                    let stderr = self.stderr.lock().map(|e| e.clone()).unwrap_or_default();
                    panic!("no {what} within {STEP:?}; stdout:\n{stdout}\nstderr:\n{stderr}")
                }
            }
        }
    }

    /// Waits for the program to exit by itself (killing it after [`STEP`]).
    fn wait_exit(mut self) -> std::process::ExitStatus {
        util::wait_deadline(&mut self.child, STEP).unwrap_or_else(|| {
            self.kill();
            panic!("the program did not exit within {STEP:?}")
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mosquitto_sub -d` on `filter`, returned once its SUBACK came back. `format` is
/// mosquitto_sub's `-F` (`%t` topic, `%p` payload, `%r` retain flag, `%q` QoS). Run under
/// `stdbuf -oL`: into a pipe its output would otherwise wait in a stdio buffer.
fn mosquitto_sub(mqtt: SocketAddr, filter: &str, qos: &str, format: &str) -> Tool {
    let port = mqtt.port().to_string();
    let sub = Tool::spawn(
        "stdbuf",
        &[
            "-oL",
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            filter,
            "-q",
            qos,
            "-d",
            "-F",
            format,
        ],
    );
    sub.wait_line("SUBACK", |l| l.contains("received SUBACK"));
    sub
}

/// A message line of `mosquitto_sub -d` (its debug lines start with "Client ").
fn message_line(line: &str) -> bool {
    !line.starts_with("Client ") && !line.starts_with("Subscribed")
}

fn mosquitto_pub(mqtt: SocketAddr, args: &[&str]) {
    let port = mqtt.port().to_string();
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port])
        .args(args)
        .status()
        .expect("run mosquitto_pub");
    assert!(status.success(), "mosquitto_pub {args:?}: {status}");
}

#[test]
fn mosquitto_sub_receives_what_lanpush_pub_and_mosquitto_pub_publish() {
    require_mosquitto();
    let (server, mqtt) = mqtt_server();
    let sub = mosquitto_sub(mqtt, "plant/#", "0", "%t %p");
    let out = run(
        &[
            "pub",
            "--server",
            &server.addr_string(),
            "plant/line1/temp",
            "21.5",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(
        sub.wait_line("the native publish", message_line),
        "plant/line1/temp 21.5"
    );
    mosquitto_pub(mqtt, &["-t", "plant/line2/flow", "-m", "7"]);
    assert_eq!(
        sub.wait_line("the MQTT publish", message_line),
        "plant/line2/flow 7"
    );
}

#[test]
fn lanpush_sub_receives_what_mosquitto_pub_publishes() {
    require_mosquitto();
    let (server, mqtt) = mqtt_server();
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &server.addr_string(),
        "plant/#",
        "--count",
        "2",
        "--json",
        "--timeout",
        "30",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    mosquitto_pub(mqtt, &["-t", "plant/a", "-m", "from-mosquitto"]);
    mosquitto_pub(mqtt, &["-t", "plant/b", "-m", "at-least-once", "-q", "1"]);
    let out = sub.finish(STEP);
    assert!(out.status.success(), "{}", out.stderr);
    let mut got: Vec<(String, String, u64)> = out
        .stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["topic"].as_str().unwrap().to_string(),
                v["value"].as_str().unwrap_or_default().to_string(),
                v["quality"].as_u64().unwrap(),
            )
        })
        .collect();
    // Two topics from two connections (two mosquitto_pub processes, maybe on two reactors):
    // the engine orders each topic, not one topic against another (CI saw b before a once).
    got.sort();
    assert_eq!(
        got,
        vec![
            ("plant/a".into(), "from-mosquitto".into(), 192),
            ("plant/b".into(), "at-least-once".into(), 192)
        ],
        "payload byte for byte, quality 192 (MQTT carries none)"
    );
}

#[test]
fn a_retained_value_reaches_a_late_mosquitto_sub_flagged_retained() {
    require_mosquitto();
    let (server, mqtt) = mqtt_server();
    mosquitto_pub(mqtt, &["-t", "plant/setpoint", "-m", "42", "-r"]);
    let out = run(
        &[
            "pub",
            "--server",
            &server.addr_string(),
            "plant/mode",
            "auto",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    // Late: both values were published before it connected. `%r` prints the RETAIN flag.
    let port = mqtt.port().to_string();
    let late = Tool::spawn(
        "mosquitto_sub",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "plant/#",
            "-F",
            "%r %t %p",
            "-C",
            "2",
        ],
    );
    let mut got = vec![
        late.wait_line("a retained value", |_| true),
        late.wait_line("a retained value", |_| true),
    ];
    got.sort();
    assert_eq!(got, vec!["1 plant/mode auto", "1 plant/setpoint 42"]);
}

#[test]
fn a_will_is_published_when_a_paho_client_dies() {
    require_mosquitto();
    require_paho();
    let (_server, mqtt) = mqtt_server();
    let watcher = mosquitto_sub(mqtt, "plant/status/#", "0", "%t %p");
    let port = mqtt.port().to_string();
    let mut gateway = Tool::spawn(
        "python3",
        &[
            &format!("{PAHO_DIR}/paho_will.py"),
            "127.0.0.1",
            &port,
            "plant/status/gw7",
            "offline",
        ],
    );
    gateway.wait_line("connected", |l| l == "connected");
    // SIGKILL: no DISCONNECT, the kernel closes the socket.
    gateway.kill();
    assert_eq!(
        watcher.wait_line("the will", message_line),
        "plant/status/gw7 offline"
    );
}

#[test]
fn qos1_both_ways_with_paho() {
    require_paho();
    let (server, mqtt) = mqtt_server();
    let port = mqtt.port().to_string();
    let paho = Tool::spawn(
        "python3",
        &[
            &format!("{PAHO_DIR}/paho_qos1.py"),
            "127.0.0.1",
            &port,
            "plant/q1/#",
            "plant/q1/from-paho",
            "2",
        ],
    );
    paho.wait_line("subscribed", |l| l == "subscribed");
    let out = run(
        &[
            "pub",
            "--server",
            &server.addr_string(),
            "plant/q1/from-lanpush",
            "native",
        ],
        None,
        STEP,
    );
    assert!(out.status.success(), "{}", out.stderr);
    let mut got: Vec<serde_json::Value> = (0..3)
        .map(|_| {
            let line = paho.wait_line("a JSON line", |l| l.starts_with('{'));
            serde_json::from_str(&line).unwrap()
        })
        .collect();
    let summary = got.pop().unwrap();
    assert_eq!(
        summary,
        serde_json::json!({"puback": true, "granted": [1]}),
        "QoS 1 granted, and the engine acknowledged Paho's QoS 1 PUBLISH"
    );
    got.sort_by_key(|v| v["topic"].as_str().unwrap().to_string());
    assert_eq!(
        got,
        vec![
            serde_json::json!({"topic": "plant/q1/from-lanpush", "payload": "native", "qos": 1, "retain": false}),
            serde_json::json!({"topic": "plant/q1/from-paho", "payload": "from-paho", "qos": 1, "retain": false}),
        ]
    );
}

#[test]
fn a_refused_mqtt_client_does_not_disturb_the_others() {
    // MQTT 5 CONNECT: refused with CONNACK 1 and closed; the listener goes on serving.
    require_mosquitto();
    let (_server, mqtt) = mqtt_server();
    let mut s = std::net::TcpStream::connect(mqtt).unwrap();
    use std::io::Write;
    s.write_all(&[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0, 0])
        .unwrap();
    s.set_read_timeout(Some(STEP)).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    assert_eq!(got, [0x20, 2, 0, 1], "CONNACK 1, then the close");
    let sub = mosquitto_sub(mqtt, "x", "0", "%t %p");
    mosquitto_pub(mqtt, &["-t", "x", "-m", "still-serving"]);
    assert_eq!(sub.wait_line("a message", message_line), "x still-serving");
}

#[test]
fn a_persistent_paho_session_gets_what_was_published_while_it_was_away() {
    require_paho();
    let (server, mqtt) = mqtt_server();
    let port = mqtt.port().to_string();
    let script = format!("{PAHO_DIR}/paho_persistent.py");
    let paho = |mode: &str, count: &str| {
        Tool::spawn(
            "python3",
            &[
                &script,
                mode,
                "127.0.0.1",
                &port,
                "historian-7",
                "plant/hist/#",
                count,
            ],
        )
    };
    let first = paho("subscribe", "0");
    first.wait_line("subscribed", |l| l == "subscribed");
    // Gone (DISCONNECT): the session stays. Published while it is away:
    let out = first.wait_exit();
    assert!(out.success(), "the first Paho run failed");
    for value in ["1", "2"] {
        let out = run(
            &[
                "pub",
                "--server",
                &server.addr_string(),
                "plant/hist/flow",
                value,
            ],
            None,
            STEP,
        );
        assert!(out.status.success(), "{}", out.stderr);
    }
    let second = paho("resume", "2");
    let line = |what| {
        serde_json::from_str::<serde_json::Value>(&second.wait_line(what, |l| l.starts_with('{')))
            .unwrap()
    };
    assert_eq!(
        line("CONNACK"),
        serde_json::json!({"session_present": true})
    );
    assert_eq!(
        [line("a message"), line("a message")],
        [
            serde_json::json!({"topic": "plant/hist/flow", "payload": "1", "qos": 1}),
            serde_json::json!({"topic": "plant/hist/flow", "payload": "2", "qos": 1}),
        ]
    );
}
