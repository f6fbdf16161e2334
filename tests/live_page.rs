//! The live page in a real browser: headless Chromium (Debian's `chromium`, installed by
//! .ci/run) opens http://<metrics>/live, driven over the DevTools protocol (CDP over
//! tungstenite). The test publishes after the page loaded and reads the DOM until the new value
//! shows, checks the per-connection stats table filled in, and takes a screenshot that it
//! decodes (a PNG of the viewport's size, not blank) and saves under the target dir.
//!
//! Fails when chromium is missing; `LANPUSH_SKIP_BROWSER=1` skips it (with a line saying so)
//! on a machine without one. CI never sets it.

mod util;

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use util::{run, Server, TempFile, STEP};

const WIDTH: u32 = 1100;
const HEIGHT: u32 = 700;

fn skip_browser() -> bool {
    if std::env::var("LANPUSH_SKIP_BROWSER").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: LANPUSH_SKIP_BROWSER=1 (the live page was not tested in a browser)");
        return true;
    }
    false
}

/// Chromium, killed on drop, and the DevTools endpoint it printed.
struct Browser {
    child: Child,
    devtools: String,
    _profile: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn chromium_binary() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return name.to_string();
        }
    }
    panic!(
        "no chromium on this machine: .ci/run installs Debian's `chromium`; \
         set LANPUSH_SKIP_BROWSER=1 to skip this test where there is none"
    );
}

fn launch() -> Browser {
    let bin = chromium_binary();
    let profile = std::env::temp_dir().join(format!("lanpush-chromium-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&profile);
    std::fs::create_dir_all(&profile).unwrap();
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            // CI runs as root, where Chromium's sandbox cannot start.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            &format!("--window-size={WIDTH},{HEIGHT}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = tx.send(url.trim().to_string());
                    sent = true;
                }
            }
        }
    });
    let devtools = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium printed no `DevTools listening on ws://...` line within 30 s");
    Browser {
        child,
        devtools,
        _profile: TempDir(profile),
    }
}

/// One CDP connection (the browser endpoint) with a flattened session on one page.
struct Cdp {
    ws: WebSocket<TcpStream>,
    next_id: u64,
    session: Option<String>,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let hostport = url
            .strip_prefix("ws://")
            .and_then(|r| r.split('/').next())
            .expect("ws:// URL");
        let stream = TcpStream::connect(hostport).expect("connect to DevTools");
        stream.set_read_timeout(Some(STEP)).unwrap();
        let (ws, _) = tungstenite::client(url, stream).expect("DevTools WebSocket");
        Cdp {
            ws,
            next_id: 0,
            session: None,
        }
    }

    /// Sends a command and waits for its answer (events in between are skipped).
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = s.clone().into();
        }
        self.ws.send(Message::text(msg.to_string())).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "no answer to {method}");
            let Message::Text(text) = self.ws.read().expect("CDP read") else {
                continue;
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"].clone()
    }

    /// Evaluates `expr` until it returns `want`, or panics with what it returned last.
    fn wait_for(&mut self, expr: &str, want: &Value, what: &str) {
        let deadline = Instant::now() + STEP;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            last = self.eval(expr);
            if &last == want {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let events = self.eval("document.getElementById('events').innerText");
        panic!("{what}: {expr} is {last}, not {want}; page events: {events}");
    }
}

fn lanpush_pub(server: &Server, topic: &str, value: &str) {
    let out = run(
        &["pub", "--server", &server.addr_string(), topic, value],
        None,
        STEP,
    );
    assert!(out.status.success(), "lanpush pub: {}", out.stderr);
}

/// The metrics (HTTP) address, from `lanpush stats` once the endpoint is up.
fn http_addr(server: &Server) -> String {
    let deadline = Instant::now() + STEP;
    loop {
        let stats = server.stats();
        if let Some(url) = stats["metrics_url"].as_str() {
            return url
                .strip_prefix("http://")
                .and_then(|r| r.strip_suffix("/metrics"))
                .unwrap()
                .to_string();
        }
        assert!(Instant::now() < deadline, "no metrics_url in stats");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_live_page_in_headless_chromium_shows_a_value_published_after_it_loaded() {
    if skip_browser() {
        return;
    }
    let config = TempFile::new(
        "live.toml",
        "[metrics]\nprometheus_listen = \"127.0.0.1:0\"\n",
    );
    let server = Server::start_with(&[
        "--threads",
        "2",
        "--config",
        config.path_str(),
        "--ws-listen",
        "127.0.0.1:0",
    ]);
    let http = http_addr(&server);
    lanpush_pub(&server, "plant/line1/temp", "20.0");
    lanpush_pub(&server, "plant/line1/flow", "3.25");

    let browser = launch();
    let mut cdp = Cdp::connect(&browser.devtools);
    let target = cdp.call("Target.createTarget", json!({"url": "about:blank"}));
    let attached = cdp.call(
        "Target.attachToTarget",
        json!({"targetId": target["targetId"], "flatten": true}),
    );
    cdp.session = Some(attached["sessionId"].as_str().unwrap().to_string());
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
    );
    cdp.call("Page.enable", json!({}));
    cdp.call(
        "Page.navigate",
        json!({"url": format!("http://{http}/live")}),
    );

    let value_of = |topic: &str| {
        format!(
            "(document.querySelector('tr[data-topic=\"{topic}\"] td.value') || {{}}).textContent || null"
        )
    };
    cdp.wait_for(
        "document.getElementById('status').textContent",
        &json!("connected"),
        "the page's WebSocket",
    );
    cdp.wait_for(
        &value_of("plant/line1/temp"),
        &json!("20.0"),
        "the snapshot",
    );
    // Published after the page loaded: the row updates in place.
    lanpush_pub(&server, "plant/line1/temp", "23.5");
    cdp.wait_for(
        &value_of("plant/line1/temp"),
        &json!("23.5"),
        "the live value",
    );
    assert_eq!(
        cdp.eval("document.querySelectorAll('#tags tr').length"),
        json!(2),
        "one row per tag, updated in place"
    );
    // The stats table, refreshed over the same WebSocket: the page's own connection at least.
    cdp.wait_for(
        "document.querySelectorAll('#conns tr').length > 0",
        &json!(true),
        "the connection stats",
    );
    let conn_row = cdp.eval("document.querySelector('#conns tr').innerText");
    assert!(
        conn_row.as_str().is_some_and(|r| r.contains("native")),
        "{conn_row}"
    );
    // Let the highlight of the last update fade, for a stable picture.
    std::thread::sleep(Duration::from_millis(500));

    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png_bytes = base64_decode(shot["data"].as_str().expect("screenshot data"));
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("live_page.png");
    std::fs::write(&path, &png_bytes).unwrap();
    let decoder = png::Decoder::new(std::io::Cursor::new(&png_bytes));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("PNG pixels");
    assert_eq!(
        (info.width, info.height),
        (WIDTH, HEIGHT),
        "{}",
        path.display()
    );
    let channels = info.line_size / info.width as usize;
    let pixels = &pixels[..info.buffer_size()];
    // Not blank: the dark header bar and text on the light background.
    let dark = pixels
        .chunks(channels)
        .filter(|p| p[..3].iter().map(|&c| c as u32).sum::<u32>() < 150)
        .count();
    let total = (WIDTH * HEIGHT) as usize;
    assert!(
        dark > total / 50 && dark < total / 2,
        "{dark} dark pixels of {total}: blank or unreadable? {}",
        path.display()
    );
    eprintln!("screenshot of the live page: {}", path.display());
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("base64")
}
