//! mqtt.js, the MQTT client of browser HMIs (npm `mqtt`, installed by .ci/run into
//! ~/.cache/lanpush-node, or where LANPUSH_NODE_MODULES says), connects over the WebSocket
//! listener with subprotocol `mqtt`: it subscribes, its publish reaches a native `lanpush sub`,
//! and a native `lanpush pub` reaches it. Fails when node or the package is missing;
//! LANPUSH_SKIP_BROWSER=1 skips it with a line saying so.

mod util;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use util::{run, Cli, Server, STEP};

fn node_modules() -> Option<PathBuf> {
    if std::env::var("LANPUSH_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: LANPUSH_SKIP_BROWSER=1 (mqtt.js over WebSocket was not tested)");
        return None;
    }
    let dir = match std::env::var("LANPUSH_NODE_MODULES") {
        Ok(d) => PathBuf::from(d),
        // Where .ci/run installs it (`${HOME:-/root}/.cache/lanpush-node`).
        Err(_) => PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .join(".cache/lanpush-node/node_modules"),
    };
    assert!(
        dir.join("mqtt/package.json").exists(),
        "mqtt.js is not installed in {} (.ci/run installs it: npm install --prefix \
         ~/.cache/lanpush-node mqtt@5); LANPUSH_SKIP_BROWSER=1 skips this test",
        dir.display()
    );
    let node = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status();
    assert!(
        node.is_ok_and(|s| s.success()),
        "no `node` on this machine (.ci/run installs Debian's nodejs)"
    );
    Some(dir)
}

#[test]
fn mqtt_js_over_websocket_subscribes_and_publishes_both_ways() {
    let Some(modules) = node_modules() else {
        return;
    };
    let server = Server::start_with(&["--threads", "2", "--ws-listen", "127.0.0.1:0"]);
    let ws = server.ws_addr.unwrap();
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &server.addr_string(),
        "--count",
        "1",
        "--json",
        "hmi/#",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mqttjs/ws_client.js");
    let mut node = Command::new("node")
        .arg(script)
        .arg(format!("ws://{ws}/mqtt"))
        .env("NODE_PATH", &modules)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run node");
    let lines = util::lines_of(node.stdout.take().unwrap());
    let next = |what: &str| -> String {
        lines
            .recv_timeout(STEP)
            .unwrap_or_else(|_| panic!("mqtt.js printed no line ({what})"))
    };
    assert_eq!(next("connect"), "connected");
    assert_eq!(next("suback"), "subscribed plant/#:1");
    // mqtt.js → native subscriber (PUBACK seen by mqtt.js).
    assert_eq!(next("puback"), "published");
    let out = sub.finish(STEP);
    assert!(out.status.success(), "lanpush sub: {}", out.stderr);
    let got: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("one JSON line");
    assert_eq!(got["topic"], "hmi/from-mqttjs", "{got}");
    // Native publisher → mqtt.js.
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
        next("message"),
        "message plant/line1/temp 21.5 retain=false"
    );
    assert_eq!(next("end"), "closed");
    let status = util::wait_deadline(&mut node, Duration::from_secs(10)).expect("node exits");
    assert!(status.success(), "node: {status}");
}
