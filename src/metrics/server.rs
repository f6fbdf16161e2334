//! [`MetricsServer`]: a minimal HTTP/1.1 endpoint for `/metrics` and `/stats`.
//!
//! One std thread, one request per connection, served one connection at a time: a scrape every
//! few seconds needs no more. A client is bounded in time ([`REQUEST_TIMEOUT`] to send its whole
//! request head, [`RESPONSE_TIMEOUT`] to take the whole response: deadlines, not per-read
//! timeouts, so trickling bytes does not extend them) and in memory ([`MAX_REQUEST_BYTES`] of
//! request head), so a bad one delays the next scrape by seconds and cannot grow the server.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::auth::Identity;

use super::prometheus::prometheus_text;
use super::snapshot::MetricsSnapshot;

/// Longest a client may take to send its whole request head (then 408).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a client may take to read the whole response (then the connection is dropped).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a response waits, after its last byte, for the client to close first.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(200);
/// Largest request head (request line and headers) read; a longer one gets 431.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Content type of the Prometheus text format this server speaks.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// HTTP Basic authentication of `/metrics` and `/stats`, used when the engine does not admit
/// anonymous clients (`auth.anonymous = false`). `check` gets the user, the secret and the
/// client's address, and returns the identity (then the server requires `admin` or `metrics`),
/// or `None` (401). It runs on the server's thread; the engine budgets argon2 runs there.
pub struct HttpAuth {
    #[allow(clippy::type_complexity)]
    pub check: Box<dyn Fn(&str, &[u8], Option<SocketAddr>) -> Option<Arc<Identity>> + Send>,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpAuth")
    }
}

/// What the source of a response is asked for: everything (`None`: no authentication
/// configured, or an `admin` identity), or what the identity may see (its ACL's topic
/// prefixes, no connections).
pub type Viewer<'a> = Option<&'a Identity>;

/// The `WWW-Authenticate` challenge of a 401.
pub const CHALLENGE: &str = "Basic realm=\"lanpush\", charset=\"UTF-8\"";

/// The user and secret of an `Authorization: Basic` header in a request head, if it has a
/// well-formed one (RFC 7617: base64 of `user:secret`; the user is not empty and has no ':').
pub fn basic_credentials(head: &[u8]) -> Option<(String, Vec<u8>)> {
    use base64::Engine as _;
    let text = std::str::from_utf8(head).ok()?;
    let value = text.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("authorization")
            .then(|| value.trim())
    })?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    let user = std::str::from_utf8(&decoded[..colon]).ok()?;
    if user.is_empty() {
        return None;
    }
    Some((user.to_string(), decoded[colon + 1..].to_vec()))
}

/// The HTTP endpoint: `GET /metrics` (Prometheus text, [`prometheus_text`]) and `GET /stats`
/// (the stats JSON with a `latency` member holding [`MetricsSnapshot::to_json`]); 404 for
/// other paths, 405 for other methods, 400 for a malformed request. `HEAD` is answered like
/// `GET` without the body. Every response closes the connection.
///
/// Stopped by [`shutdown`](Self::shutdown) or on drop.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` and serves from a new thread. `source` is called once per `/metrics` or
    /// `/stats` request, on the server's thread, for the merged snapshot and the engine's stats
    /// document; a panic in it answers 500 and the server goes on.
    pub fn start(
        addr: SocketAddr,
        source: impl Fn() -> (MetricsSnapshot, Value) + Send + 'static,
    ) -> io::Result<MetricsServer> {
        Self::start_with(
            addr,
            move |_: Viewer<'_>| source(),
            None,
            Timeouts::default(),
            None,
        )
    }

    /// As [`start`](Self::start), and serves the live page (`GET /` and `/live`, [`LIVE_PAGE`])
    /// pointed at the WebSocket listener `ws` (`None`: the page says it is off).
    pub fn start_with_live_page(
        addr: SocketAddr,
        ws: Option<SocketAddr>,
        source: impl Fn() -> (MetricsSnapshot, Value) + Send + 'static,
    ) -> io::Result<MetricsServer> {
        Self::start_with(
            addr,
            move |_: Viewer<'_>| source(),
            None,
            Timeouts::default(),
            Some(live_page(ws)),
        )
    }

    /// As [`MetricsServer::start_with_live_page`], with HTTP Basic authentication on every
    /// path: a request without valid credentials gets 401 and the [`CHALLENGE`], one whose
    /// identity has neither `admin` nor `metrics` 403; `source` is told what the identity may
    /// see ([`Viewer`]).
    pub fn start_authenticated(
        addr: SocketAddr,
        ws: Option<SocketAddr>,
        source: impl Fn(Viewer<'_>) -> (MetricsSnapshot, Value) + Send + 'static,
        auth: HttpAuth,
    ) -> io::Result<MetricsServer> {
        Self::start_with(
            addr,
            source,
            Some(auth),
            Timeouts::default(),
            Some(live_page(ws)),
        )
    }

    fn start_with(
        addr: SocketAddr,
        source: impl Fn(Viewer<'_>) -> (MetricsSnapshot, Value) + Send + 'static,
        auth: Option<HttpAuth>,
        timeouts: Timeouts,
        page: Option<Vec<u8>>,
    ) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("lanpush-metrics".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    serve(
                        listener,
                        &stop,
                        &source,
                        auth.as_ref(),
                        timeouts,
                        page.as_deref(),
                    )
                }
            })?;
        Ok(MetricsServer {
            local_addr,
            stop,
            thread: Some(thread),
        })
    }

    /// The bound address (the real port when started on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the thread (at most one request in progress, bounded by
    /// [`REQUEST_TIMEOUT`] + [`RESPONSE_TIMEOUT`]).
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, REQUEST_TIMEOUT);
        let _ = thread.join();
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[derive(Debug, Clone, Copy)]
struct Timeouts {
    request: Duration,
    response: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request: REQUEST_TIMEOUT,
            response: RESPONSE_TIMEOUT,
        }
    }
}

fn serve(
    listener: TcpListener,
    stop: &AtomicBool,
    source: &(impl Fn(Viewer<'_>) -> (MetricsSnapshot, Value) + Send),
    auth: Option<&HttpAuth>,
    timeouts: Timeouts,
    live: Option<&[u8]>,
) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            // A failed client is that client's problem: nothing to report to anyone.
            Ok((stream, peer)) => {
                let _ = handle(stream, peer, source, auth, timeouts, live);
            }
            // Out of descriptors or similar: back off instead of spinning.
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    allow: bool,
    /// A 401: the response carries the [`CHALLENGE`].
    challenge: bool,
}

impl Response {
    fn error(status: &'static str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{status}\n").into_bytes(),
            allow: false,
            challenge: false,
        }
    }
}

fn handle(
    mut stream: TcpStream,
    peer: SocketAddr,
    source: &(impl Fn(Viewer<'_>) -> (MetricsSnapshot, Value) + Send),
    auth: Option<&HttpAuth>,
    timeouts: Timeouts,
    live: Option<&[u8]>,
) -> io::Result<()> {
    let mut head_only = false;
    let response = match read_head(&mut stream, Instant::now() + timeouts.request) {
        Err(HeadError::Io(e)) if is_timeout(&e) => Response::error("408 Request Timeout"),
        Err(HeadError::Io(e)) => return Err(e),
        Err(HeadError::TooLarge) => Response::error("431 Request Header Fields Too Large"),
        Err(HeadError::Closed) => return Ok(()),
        Ok(head) => match parse_request_line(&head) {
            None => Response::error("400 Bad Request"),
            Some((method, path)) => {
                head_only = method == "HEAD";
                match auth.map(|auth| admit(auth, &head, peer)) {
                    None => route(&method, &path, || source(None), live),
                    Some(Ok(identity)) => {
                        let viewer = (!identity.admin).then_some(&*identity);
                        route(&method, &path, || source(viewer), live)
                    }
                    Some(Err(refused)) => refused,
                }
            }
        },
    };
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    if response.challenge {
        out.push_str(&format!("WWW-Authenticate: {CHALLENGE}\r\n"));
    }
    out.push_str("\r\n");
    let deadline = Instant::now() + timeouts.response;
    write_by(&mut stream, out.as_bytes(), deadline)?;
    if !head_only {
        write_by(&mut stream, &response.body, deadline)?;
    }
    // Half-close and let the client read everything before the socket goes (an unread request
    // body would otherwise turn our close into a reset that can discard the response).
    let _ = stream.shutdown(Shutdown::Write);
    stream.set_read_timeout(Some(DRAIN_TIMEOUT))?;
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    Ok(())
}

/// The identity of a request with valid credentials and the right to see metrics, or the
/// refusal: 401 (none, malformed or wrong), 403 (neither `admin` nor `metrics`).
fn admit(auth: &HttpAuth, head: &[u8], peer: SocketAddr) -> Result<Arc<Identity>, Response> {
    let identity = basic_credentials(head)
        .and_then(|(user, secret)| (auth.check)(&user, &secret, Some(peer)))
        .ok_or_else(|| Response {
            challenge: true,
            ..Response::error("401 Unauthorized")
        })?;
    if identity.admin || identity.metrics {
        Ok(identity)
    } else {
        Err(Response::error("403 Forbidden"))
    }
}

fn route(
    method: &str,
    path: &str,
    source: impl FnOnce() -> (MetricsSnapshot, Value),
    live: Option<&[u8]>,
) -> Response {
    if method != "GET" && method != "HEAD" {
        let mut r = Response::error("405 Method Not Allowed");
        r.allow = true;
        return r;
    }
    let path = path.split(['?', '#']).next().unwrap_or(path);
    let prometheus = match path {
        "/metrics" => true,
        "/stats" => false,
        "/" | "/live" if live.is_some() => {
            return Response {
                status: "200 OK",
                content_type: "text/html; charset=utf-8",
                body: live.unwrap_or_default().to_vec(),
                allow: false,
                challenge: false,
            }
        }
        _ => return Response::error("404 Not Found"),
    };
    let rendered = catch_unwind(AssertUnwindSafe(|| {
        let (snapshot, stats) = source();
        if prometheus {
            prometheus_text(&snapshot, &stats).into_bytes()
        } else {
            stats_document(&snapshot, stats).to_string().into_bytes()
        }
    }));
    match rendered {
        Ok(body) => Response {
            status: "200 OK",
            content_type: if prometheus {
                PROMETHEUS_CONTENT_TYPE
            } else {
                "application/json"
            },
            body,
            allow: false,
            challenge: false,
        },
        Err(_) => Response::error("500 Internal Server Error"),
    }
}

/// The live page: one static HTML file, no build step, no CDN. It subscribes over the
/// WebSocket listener's `lanpush.json.v1` subprotocol and asks for STATS every second.
pub const LIVE_PAGE: &str = include_str!("live.html");

/// The live page with the WebSocket listener's address filled in: `{"host": "..", "port": N}`
/// (an empty host when the listener is on every address: the page then uses the host it was
/// loaded from), or `null` when the listener is off.
fn live_page(ws: Option<SocketAddr>) -> Vec<u8> {
    let target = match ws {
        None => Value::Null,
        Some(addr) => {
            let host = if addr.ip().is_unspecified() {
                String::new()
            } else if addr.is_ipv6() {
                format!("[{}]", addr.ip())
            } else {
                addr.ip().to_string()
            };
            serde_json::json!({"host": host, "port": addr.port()})
        }
    };
    LIVE_PAGE
        .replace("\"__LANPUSH_WS__\"", &target.to_string())
        .into_bytes()
}

/// The stats document with the latency histograms added as its `latency` member.
fn stats_document(snapshot: &MetricsSnapshot, stats: Value) -> Value {
    let latency = snapshot.to_json();
    match stats {
        Value::Object(mut map) => {
            map.insert("latency".into(), latency);
            Value::Object(map)
        }
        other => serde_json::json!({ "stats": other, "latency": latency }),
    }
}

enum HeadError {
    Io(io::Error),
    TooLarge,
    /// The client closed before sending a whole head (a port probe): no answer.
    Closed,
}

/// Time left until `deadline`, or a `TimedOut` error.
fn left_until(deadline: Instant) -> io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(io::ErrorKind::TimedOut.into())
    } else {
        Ok(left)
    }
}

/// `write_all` that gives up at `deadline`, however the client paces its reads.
fn write_by(stream: &mut TcpStream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(Some(left_until(deadline)?))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to the blank line ending the request head, at most [`MAX_REQUEST_BYTES`], until
/// `deadline`.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    loop {
        let left = left_until(deadline).map_err(HeadError::Io)?;
        stream.set_read_timeout(Some(left)).map_err(HeadError::Io)?;
        let n = match stream.read(&mut buf) {
            Ok(0) if head.is_empty() => return Err(HeadError::Closed),
            // A head cut short by the client's close is still answered (400 if it is garbage).
            Ok(0) => return Ok(head),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(HeadError::Io(e)),
        };
        let searched_from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = find_head_end(&head[searched_from..]) {
            head.truncate(searched_from + end);
            return Ok(head);
        }
        if head.len() > MAX_REQUEST_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| {
        // Bare-LF clients (netcat, curl --raw scripts) end the head with "\n\n".
        bytes.windows(2).position(|w| w == b"\n\n")
    })
}

/// `METHOD SP PATH SP HTTP/1.x` from the head's first line, parsed by httparse; `None` if it
/// is not one. The method must be upper case and the path absolute (origin form).
fn parse_request_line(head: &[u8]) -> Option<(String, String)> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    // httparse wants a whole head; only the request line is of interest here.
    let mut line = head[..line_end].to_vec();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    line.extend_from_slice(b"\r\n\r\n");
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&line) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    let (method, path) = (req.method?, req.path?);
    let is_token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !is_token(method) || !path.starts_with('/') {
        return None;
    }
    Some((method.to_string(), path.to_string()))
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MetricsConfig;
    use crate::metrics::ShardMetrics;

    fn start() -> MetricsServer {
        let config = MetricsConfig::default();
        let mut shard = ShardMetrics::new(&config);
        shard.record_delivery(5, "plant/line1/t", 1_000_000, 500_000, 1_042_000);
        let snapshot = shard.snapshot();
        MetricsServer::start("127.0.0.1:0".parse().unwrap(), move || {
            let stats = serde_json::json!({
                "open_connections": 1,
                "totals": {"connections": 1, "delivered": 1},
                "reactors": [], "connections": [],
            });
            (snapshot.clone(), stats)
        })
        .unwrap()
    }

    /// Sends `request` raw and returns (status line, headers, body).
    fn fetch(server: &MetricsServer, request: &[u8]) -> (String, String, String) {
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(request).unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).unwrap();
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_string(), headers.to_string(), body.to_string())
    }

    fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
        headers.split("\r\n").find_map(|h| {
            let (k, v) = h.split_once(": ")?;
            k.eq_ignore_ascii_case(name).then_some(v)
        })
    }

    #[test]
    fn basic_credentials_are_read_from_the_authorization_header() {
        use base64::Engine as _;
        let b64 = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        let head = |value: &str| format!("GET /metrics HTTP/1.1\r\nHost: x\r\n{value}\r\n");
        let creds = basic_credentials(
            head(&format!("Authorization: Basic {}", b64(b"ops:p:w"))).as_bytes(),
        );
        assert_eq!(creds, Some(("ops".to_string(), b"p:w".to_vec())));
        let lower = format!("authorization:   basic {}", b64(b"ops:pw"));
        assert!(basic_credentials(head(&lower).as_bytes()).is_some());
        for bad in [
            "Authorization: Bearer abc".to_string(),
            "Authorization: Basic !!!not-base64".to_string(),
            format!("Authorization: Basic {}", b64(b"no-colon")),
            format!("Authorization: Basic {}", b64(b":empty-user")),
            format!("Authorization: Basic {}", b64(b"\xff\xfe:pw")),
            "Authorization: Basic".to_string(),
            "X-Other: 1".to_string(),
        ] {
            assert_eq!(basic_credentials(head(&bad).as_bytes()), None, "{bad}");
        }
        // The request line is not a header, whatever it says.
        let trick = format!("GET /Authorization: Basic {} HTTP/1.1\r\n\r\n", b64(b"a:b"));
        assert_eq!(basic_credentials(trick.as_bytes()), None);
    }

    #[test]
    fn authenticated_endpoint_answers_401_403_or_the_viewers_share() {
        use crate::auth::{Acl, PatternSet};
        use base64::Engine as _;
        let config = MetricsConfig::default();
        let mut shard = ShardMetrics::new(&config);
        shard.record_delivery(5, "plant/line1/t", 1_000_000, 500_000, 1_042_000);
        let snapshot = shard.snapshot();
        let person = |name: &str, admin: bool, metrics: bool| {
            Arc::new(Identity {
                user: Some(name.into()),
                acl: Acl {
                    publish: PatternSet::new(Vec::<&str>::new()),
                    subscribe: PatternSet::new(vec!["plant/line1/#"]),
                },
                admin,
                metrics,
            })
        };
        let auth = HttpAuth {
            check: Box::new(move |user, secret, _| match (user, secret) {
                ("root", b"pw") => Some(person("root", true, false)),
                ("scraper", b"pw") => Some(person("scraper", false, true)),
                ("hmi", b"pw") => Some(person("hmi", false, false)),
                _ => None,
            }),
        };
        let server = MetricsServer::start_authenticated(
            "127.0.0.1:0".parse().unwrap(),
            None,
            move |viewer| {
                let view = viewer.map_or("everything".to_string(), |v| v.name().to_string());
                (snapshot.clone(), serde_json::json!({ "view": view }))
            },
            auth,
        )
        .unwrap();
        let get = |path: &str, creds: Option<&[u8]>| {
            let auth = creds.map_or(String::new(), |c| {
                format!(
                    "Authorization: Basic {}\r\n",
                    base64::engine::general_purpose::STANDARD.encode(c)
                )
            });
            fetch(
                &server,
                format!("GET {path} HTTP/1.1\r\n{auth}\r\n").as_bytes(),
            )
        };
        for creds in [None, Some(&b"root:wrong"[..]), Some(b"nobody:pw")] {
            for path in ["/metrics", "/stats"] {
                let (status, headers, _) = get(path, creds);
                assert_eq!(status, "HTTP/1.1 401 Unauthorized", "{path} {creds:?}");
                assert_eq!(header(&headers, "WWW-Authenticate"), Some(CHALLENGE));
            }
        }
        let (status, headers, _) = get("/stats", Some(b"hmi:pw"));
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        assert_eq!(header(&headers, "WWW-Authenticate"), None);
        let (status, _, body) = get("/stats", Some(b"root:pw"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains(r#""view":"everything""#), "{body}");
        let (status, _, body) = get("/stats", Some(b"scraper:pw"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains(r#""view":"scraper""#), "{body}");
        let (status, _, body) = get("/metrics", Some(b"scraper:pw"));
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("lanpush_"), "{body}");
        // Unknown paths still need credentials first: nothing is learnt without them.
        let (status, _, _) = get("/nope", None);
        assert_eq!(status, "HTTP/1.1 401 Unauthorized");
    }

    #[test]
    fn serves_metrics_and_stats() {
        let server = start();
        let (status, headers, body) = fetch(
            &server,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(
            header(&headers, "Content-Type"),
            Some(PROMETHEUS_CONTENT_TYPE)
        );
        assert_eq!(header(&headers, "Connection"), Some("close"));
        assert_eq!(
            header(&headers, "Content-Length"),
            Some(body.len().to_string().as_str())
        );
        assert!(body.contains("lanpush_delivered_total 1\n"), "{body}");
        assert!(
            body.contains(
                "lanpush_prefix_ingest_to_write_seconds_count{prefix=\"plant/line1\"} 1\n"
            ),
            "{body}"
        );

        let (status, headers, body) = fetch(&server, b"GET /stats?x=1 HTTP/1.0\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_eq!(header(&headers, "Content-Type"), Some("application/json"));
        let doc: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(doc["totals"]["delivered"], 1);
        assert_eq!(doc["latency"]["ingest_to_write"]["count"], 1);
        assert_eq!(doc["latency"]["ingest_to_write"]["max_us"], 42);
        assert_eq!(
            doc["latency"]["connections"]["5"]["ingest_to_write"]["count"],
            1
        );

        let (status, headers, body) = fetch(&server, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert_ne!(header(&headers, "Content-Length"), Some("0"));
        assert_eq!(body, "");
        server.shutdown();
    }

    #[test]
    fn errors_and_the_server_keeps_serving() {
        let server = start();
        let cases: [(&[u8], &str); 6] = [
            (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (
                b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
                "HTTP/1.1 405 Method Not Allowed",
            ),
            (b"\x00\x01garbage\xff\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics HTTP/2.0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ];
        for (request, want) in cases {
            let (status, headers, _) = fetch(&server, request);
            assert_eq!(status, want, "{}", String::from_utf8_lossy(request));
            if want.contains("405") {
                assert_eq!(header(&headers, "Allow"), Some("GET, HEAD"));
            }
        }
        // A head past the limit is refused without being kept.
        let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
        while big.len() <= MAX_REQUEST_BYTES + 1024 {
            big.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        big.extend_from_slice(b"\r\n");
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The server may answer and close before taking it all: a failed write is fine.
        let _ = stream.write_all(&big);
        let mut response = Vec::new();
        let _ = stream.read_to_end(&mut response);
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 431 "), "{response}");
        // A client that connects and leaves without a word gets nothing and harms nothing.
        drop(TcpStream::connect(server.local_addr()).unwrap());
        let (status, _, _) = fetch(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
        server.shutdown();
    }

    /// A client trickling its request is cut off at the request deadline, not kept for as long
    /// as it keeps sending, and the server goes on serving.
    #[test]
    fn a_trickling_client_gets_408_at_the_deadline() {
        let timeouts = Timeouts {
            request: Duration::from_millis(300),
            response: Duration::from_secs(1),
        };
        let server = MetricsServer::start_with(
            "127.0.0.1:0".parse().unwrap(),
            |_: Viewer<'_>| (MetricsSnapshot::new(&MetricsConfig::default()), Value::Null),
            None,
            timeouts,
            None,
        )
        .unwrap();
        let started = Instant::now();
        let mut stream = TcpStream::connect(server.local_addr()).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut response = Vec::new();
        let mut buf = [0u8; 256];
        while started.elapsed() < Duration::from_secs(5) {
            // One header byte every 50 ms: each read on the server side succeeds in time.
            let _ = stream.write_all(b"X");
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) if is_timeout(&e) => {}
                Err(_) => break,
            }
        }
        let response = String::from_utf8_lossy(&response);
        assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let (status, _, _) = fetch(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_panicking_source_answers_500() {
        let server =
            MetricsServer::start("127.0.0.1:0".parse().unwrap(), || panic!("source broke"))
                .unwrap();
        let (status, _, _) = fetch(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 500 Internal Server Error");
        let (status, _, _) = fetch(&server, b"GET /other HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        drop(server);
    }

    #[test]
    fn request_line_parsing() {
        let owned = |m: &str, p: &str| Some((m.to_string(), p.to_string()));
        assert_eq!(
            parse_request_line(b"GET /metrics HTTP/1.1\r\nHost: a"),
            owned("GET", "/metrics")
        );
        assert_eq!(parse_request_line(b"GET /a HTTP/1.0"), owned("GET", "/a"));
        for bad in [
            &b""[..],
            b"GET",
            b"GET / HTTP/1.1 x",
            b"get / HTTP/1.1",
            b"GET  / HTTP/1.1",
        ] {
            assert_eq!(parse_request_line(bad), None, "{bad:?}");
        }
    }
}
