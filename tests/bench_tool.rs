//! lanpush-bench against the real engine binary, as bench/compare.sh runs it.

mod util;

use std::process::Command;
use std::time::Duration;

/// `lanpush-bench --mqtt` starts the engine with its MQTT listener and drives it with the same
/// MQTT client as the mosquitto column of bench/compare.sh: a short closed-loop fan-out loses
/// nothing, and the result names the MQTT driver and the address the engine printed.
#[test]
fn bench_drives_the_engine_through_its_mqtt_listener() {
    let json = util::TempFile::new("bench-mqtt.json", "");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lanpush-bench"))
        .args([
            "fanout",
            "--mqtt",
            "--publishers",
            "1",
            "--subscribers",
            "3",
        ])
        .args([
            "--rate",
            "2000",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--quiet",
        ])
        .args(["--engine-bin", util::BIN, "--json"])
        .arg(&json.path)
        .spawn()
        .expect("start lanpush-bench");
    let status = util::wait_deadline(&mut child, Duration::from_secs(60))
        .expect("lanpush-bench finished within 60 s");
    assert!(status.success(), "lanpush-bench failed: {status}");
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json.path).expect("read --json")).expect("JSON");
    assert_eq!(result["target"]["driver"], "mqtt", "{}", result["target"]);
    assert_eq!(result["target"]["engine_started"], true);
    let address = result["target"]["address"].as_str().unwrap_or_default();
    assert!(address.starts_with("mqtt://127.0.0.1:"), "{address}");
    let deliver = &result["deliver"];
    let expected = deliver["expected"].as_u64().unwrap_or(0);
    assert!(expected >= 1000, "too few measured deliveries: {deliver}");
    assert_eq!(deliver["received"].as_u64(), Some(expected), "{deliver}");
    assert_eq!(deliver["lost"].as_u64(), Some(0), "{deliver}");
}
