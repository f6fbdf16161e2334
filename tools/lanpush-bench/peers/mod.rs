//! Clients for the brokers lanpush is compared against: MQTT 3.1.1 at QoS 0 (mosquitto), NATS
//! (nats-server) and Redis pub/sub (redis-server), behind the benchmark's [`Driver`] trait.
//!
//! Each module holds a sans-IO codec (encode into a caller-owned `Vec`, parse one frame from a
//! byte slice, `Ok(None)` while the slice holds only a prefix of a frame), tested without
//! sockets, and the blocking connection types over `std::net::TcpStream` that use it.
//!
//! What every driver does to stay out of the measurement's way:
//! - publishers append to one buffer and write it with one `write_all` per `flush`, or as soon as
//!   it passes [`FLUSH_AT_BYTES`];
//! - subscribers read into one [`READ_BUF_BYTES`] buffer and parse every complete frame of a read
//!   in place, handing `on_message` slices of that buffer (no allocation per message);
//! - `TCP_NODELAY` is on everywhere, so a flush is a packet now, not after Nagle's delay.
//!
//! Semantics that a peer cannot match exactly are documented in its module and listed here:
//! - NATS and Redis deliver a message once per matching subscription of a connection, so a client
//!   with overlapping patterns gets duplicates there (mosquitto and lanpush deliver once);
//! - Redis globs are approximations of `+`: the driver filters what they over-match (see
//!   [`redis`]);
//! - NATS subjects cannot hold `.` or empty levels, so topics with those are not usable there.

mod mqtt;
mod nats;
mod redis;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use crate::driver::Driver;

/// A publisher writes its buffer once it holds this much, even before `flush`.
pub(crate) const FLUSH_AT_BYTES: usize = 16 * 1024;
/// Initial size of a subscriber's read buffer; it grows only for a frame larger than itself.
pub(crate) const READ_BUF_BYTES: usize = 256 * 1024;
/// Largest frame any driver accepts from a broker; a larger one is an error, not a buffer grow.
pub(crate) const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// How long connecting, the handshake and a subscription confirmation may take.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A write that makes no progress for this long fails the connection (a broker that stopped
/// reading ends the run with an error instead of hanging it).
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection being dropped may wait to write its last bytes.
pub(crate) const GOODBYE_TIMEOUT: Duration = Duration::from_secs(1);
/// Reads one `poll` may make: with a broker sending only what the driver drops (Redis glob
/// over-matches, control frames), a poll still returns promptly.
pub(crate) const MAX_READS_PER_POLL: usize = 4;
/// How often a publisher looks, without blocking, for what the broker sent it (NATS PINGs).
pub(crate) const PUBLISHER_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Makes the driver for a peer broker URL: `mqtt://host:port`, `nats://host:port` or
/// `redis://host:port` (the port defaults to 1883, 4222 and 6379). `None` for any other scheme,
/// so the caller can try its own; `Some(Err)` when the address does not resolve.
pub fn driver_for_url(url: &str) -> Option<io::Result<Box<dyn Driver>>> {
    let (scheme, rest) = url.split_once("://")?;
    let default_port = match scheme {
        "mqtt" => 1883,
        "nats" => 4222,
        "redis" => 6379,
        _ => return None,
    };
    let addr = match resolve(rest, default_port) {
        Ok(addr) => addr,
        Err(e) => return Some(Err(e)),
    };
    let driver: Box<dyn Driver> = match scheme {
        "mqtt" => Box::new(mqtt::MqttDriver::new(addr)),
        "nats" => Box::new(nats::NatsDriver::new(addr)),
        _ => Box::new(redis::RedisDriver::new(addr)),
    };
    Some(Ok(driver))
}

/// Resolves `host[:port][/…]` (anything after the first `/` is ignored) to one address.
fn resolve(authority: &str, default_port: u16) -> io::Result<SocketAddr> {
    let host_port = authority.split('/').next().unwrap_or_default();
    if host_port.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "peer URL has no host",
        ));
    }
    // A bare host, or a bracketed IPv6 literal without a port, takes the scheme's port.
    let has_port = match host_port.rfind(']') {
        Some(bracket) => host_port[bracket..].contains(':'),
        None => host_port.contains(':'),
    };
    let with_port = if has_port {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    with_port.to_socket_addrs()?.next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("{with_port} resolves to no address"),
        )
    })
}

/// A broker sent something the driver cannot accept. Converted to `io::ErrorKind::InvalidData`
/// at the trait boundary, keeping the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum WireError {
    #[error("{proto}: malformed {what}")]
    Malformed {
        proto: &'static str,
        what: &'static str,
    },
    #[error("{proto}: frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        proto: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{proto}: broker refused: {reason}")]
    Refused { proto: &'static str, reason: String },
    #[error("{proto}: cannot express {what}")]
    Unsupported { proto: &'static str, what: String },
}

impl From<WireError> for io::Error {
    fn from(e: WireError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Connects with a bounded wait, `TCP_NODELAY` on, and writes bounded by [`WRITE_TIMEOUT`].
pub(crate) fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(stream)
}

/// Appends the decimal digits of `n` without going through `fmt`.
pub(crate) fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Parses a non-empty run of ASCII digits; `None` for anything else or an overflow.
pub(crate) fn parse_decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0usize, |n, &d| {
        if d.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(usize::from(d - b'0'))
        } else {
            None
        }
    })
}

/// lanpush/MQTT topic matching: `+` is one level, a trailing `#` the rest, including the parent
/// itself (`a/#` matches `a`). Used where a peer's own matching is wider than the pattern.
pub(crate) fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut levels = topic.split('/');
    for want in pattern.split('/') {
        match want {
            "#" => return true,
            "+" => {
                if levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    levels.next().is_none()
}

/// The receive side of a connection: one large buffer that the parser reads frames from in
/// place. The caller parses `data()`, `consume`s what it parsed, and calls `fill` when the rest
/// is only a prefix of a frame.
pub(crate) struct RxBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RxBuf {
    pub(crate) fn with_capacity(bytes: usize) -> Self {
        Self {
            buf: vec![0; bytes],
            start: 0,
            end: 0,
        }
    }

    /// Bytes received and not yet consumed.
    pub(crate) fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drops `n` parsed bytes from the front. `n` must not exceed `data().len()`.
    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, after moving a partial frame to the front or, when the buffer holds
    /// nothing but one partial frame, doubling it (bounded by [`MAX_FRAME_BYTES`]).
    fn spare(&mut self) -> io::Result<&mut [u8]> {
        // Moving is cheap for the small remainder a parse leaves; do it when the tail gets short
        // so reads stay large.
        if self.start > 0 && self.buf.len() - self.end < self.buf.len() / 4 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            if self.buf.len() >= MAX_FRAME_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a frame exceeds the read limit of {MAX_FRAME_BYTES} bytes"),
                ));
            }
            let grown = (self.buf.len() * 2).clamp(4096, MAX_FRAME_BYTES);
            self.buf.resize(grown, 0);
        }
        Ok(&mut self.buf[self.end..])
    }

    /// Reads once from `src` into the spare room. `Ok(false)` when the read timed out or would
    /// block; an error when the peer closed the connection.
    pub(crate) fn fill(&mut self, src: &mut impl Read) -> io::Result<bool> {
        loop {
            let spare = self.spare()?;
            match src.read(spare) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the broker closed the connection",
                    ))
                }
                Ok(n) => {
                    self.end += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// One socket with its receive buffer, and the read mode last set on it (so a poll loop that
/// asks for the same wait again costs no `setsockopt`).
pub(crate) struct Conn {
    pub(crate) stream: TcpStream,
    pub(crate) rx: RxBuf,
    wait_set: Option<Wait>,
}

/// How a read waits: not at all, or up to a duration (never forever: every loop is bounded).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    NonBlocking,
    UpTo(Duration),
}

impl Conn {
    pub(crate) fn new(stream: TcpStream, rx_bytes: usize) -> Self {
        Self {
            stream,
            rx: RxBuf::with_capacity(rx_bytes),
            wait_set: None,
        }
    }

    /// Reads once, waiting until `deadline` at most (not at all when it has passed).
    /// `Ok(false)` when nothing arrived in time.
    pub(crate) fn fill_until(&mut self, deadline: Instant) -> io::Result<bool> {
        let left = deadline.saturating_duration_since(Instant::now());
        // Millisecond granularity keeps repeated polls with one timeout on one cached setting.
        let wait = match Duration::from_millis(left.as_millis() as u64) {
            Duration::ZERO => Wait::NonBlocking,
            ms => Wait::UpTo(ms),
        };
        self.set_wait(wait)?;
        self.rx.fill(&mut self.stream)
    }

    /// Reads once, waiting until `deadline` at most, or not at all without one (the contract
    /// of `SubConn::poll` with a zero timeout). `Ok(false)` when nothing arrived in time.
    pub(crate) fn fill_by(&mut self, deadline: Option<Instant>) -> io::Result<bool> {
        match deadline {
            Some(deadline) => self.fill_until(deadline),
            None => self.fill_now(),
        }
    }

    /// Reads whatever is already there without waiting; `Ok(false)` when nothing was.
    pub(crate) fn fill_now(&mut self) -> io::Result<bool> {
        self.set_wait(Wait::NonBlocking)?;
        self.rx.fill(&mut self.stream)
    }

    fn set_wait(&mut self, wait: Wait) -> io::Result<()> {
        if self.wait_set == Some(wait) {
            return Ok(());
        }
        match wait {
            Wait::NonBlocking => self.stream.set_nonblocking(true)?,
            Wait::UpTo(d) => {
                if self.wait_set == Some(Wait::NonBlocking) || self.wait_set.is_none() {
                    self.stream.set_nonblocking(false)?;
                }
                self.stream.set_read_timeout(Some(d))?;
            }
        }
        self.wait_set = Some(wait);
        Ok(())
    }

    /// Writes all of `bytes`, blocking as the socket requires (writes are always blocking: a
    /// publisher that outruns the broker is held back by TCP, as with any real client), up to
    /// [`WRITE_TIMEOUT`] without progress.
    pub(crate) fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.wait_set == Some(Wait::NonBlocking) {
            self.stream.set_nonblocking(false)?;
            self.wait_set = None;
        }
        self.stream.write_all(bytes)
    }

    /// Best-effort goodbye from `Drop`: writes `bytes` waiting [`GOODBYE_TIMEOUT`] at most, so
    /// dropping a connection to a stuck broker does not hang, and ignores errors.
    pub(crate) fn write_goodbye(&mut self, bytes: &[u8]) {
        let _ = self.stream.set_write_timeout(Some(GOODBYE_TIMEOUT));
        let _ = self.write_all(bytes);
    }
}

/// Messages read while waiting for a confirmation (a subscription's acknowledgement arrives
/// behind data for earlier subscriptions). Owned copies: this happens only during `subscribe`.
#[derive(Default)]
pub(crate) struct Stash {
    messages: Vec<(String, Vec<u8>)>,
}

impl Stash {
    pub(crate) fn push(&mut self, topic: &str, payload: &[u8]) {
        self.messages.push((topic.to_string(), payload.to_vec()));
    }

    /// Hands every stashed message to `on_message`, oldest first; returns how many.
    pub(crate) fn deliver(&mut self, on_message: &mut dyn FnMut(&str, &[u8])) -> usize {
        let n = self.messages.len();
        for (topic, payload) in self.messages.drain(..) {
            on_message(&topic, &payload);
        }
        n
    }
}

/// The deadline of a `poll` with this timeout; `None` (do not wait at all) for zero, which
/// spares the benchmark's hot loop a clock read.
pub(crate) fn poll_deadline(timeout: Duration) -> Option<Instant> {
    (!timeout.is_zero()).then(|| Instant::now() + timeout)
}

/// The error for a confirmation that did not come within [`HANDSHAKE_TIMEOUT`].
pub(crate) fn confirmation_timeout(proto: &str, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{proto}: no {what} within {HANDSHAKE_TIMEOUT:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_schemes() {
        assert!(driver_for_url("lanpush://127.0.0.1:1").is_none());
        assert!(driver_for_url("127.0.0.1:1883").is_none());
        for (url, name) in [
            ("mqtt://127.0.0.1:1883", "mqtt"),
            ("nats://127.0.0.1", "nats"),
            ("redis://127.0.0.1:6379/", "redis"),
        ] {
            let driver = driver_for_url(url)
                .expect("known scheme")
                .expect("resolves");
            assert_eq!(driver.name(), name);
        }
        assert!(driver_for_url("mqtt://").expect("known scheme").is_err());
    }

    #[test]
    fn resolve_default_ports() {
        assert_eq!(
            resolve("127.0.0.1", 4222).unwrap(),
            "127.0.0.1:4222".parse().unwrap()
        );
        assert_eq!(
            resolve("127.0.0.1:9/x", 4222).unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert_eq!(
            resolve("[::1]", 6379).unwrap(),
            "[::1]:6379".parse().unwrap()
        );
        assert_eq!(
            resolve("[::1]:7", 6379).unwrap(),
            "[::1]:7".parse().unwrap()
        );
    }

    #[test]
    fn decimal_roundtrip() {
        for n in [0usize, 7, 10, 65535, usize::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, n);
            assert_eq!(out, n.to_string().as_bytes());
            assert_eq!(parse_decimal(&out), Some(n));
        }
        assert_eq!(parse_decimal(b""), None);
        assert_eq!(parse_decimal(b"1a"), None);
        assert_eq!(parse_decimal(b"99999999999999999999999"), None);
    }

    #[test]
    fn matching() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(!topic_matches("a/b/c", "a/b"));
        assert!(topic_matches("a/+/c", "a/x/c"));
        assert!(!topic_matches("a/+", "a/x/c"));
        assert!(!topic_matches("a/+", "a"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("a/#", "a/x/y"));
        assert!(!topic_matches("a/#", "ab"));
        assert!(topic_matches("#", "anything/at/all"));
        assert!(topic_matches("+/#", "a"));
    }

    /// Hands out a script of reads, one per call, then reports WouldBlock.
    struct Script(Vec<Vec<u8>>);

    impl Read for Script {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let chunk = &mut self.0[0];
            let n = chunk.len().min(out.len());
            out[..n].copy_from_slice(&chunk[..n]);
            chunk.drain(..n);
            if chunk.is_empty() {
                self.0.remove(0);
            }
            Ok(n)
        }
    }

    #[test]
    fn rxbuf_compacts_and_grows() {
        let mut rx = RxBuf::with_capacity(8);
        let mut src = Script(vec![b"abcdefgh".to_vec(), b"ijklmnopqr".to_vec()]);
        assert!(rx.fill(&mut src).unwrap());
        assert_eq!(rx.data(), b"abcdefgh");
        rx.consume(7);
        // 1 byte left at the end of a full buffer: moved to the front, then read after it.
        assert!(rx.fill(&mut src).unwrap());
        assert_eq!(rx.data(), b"hijklmno");
        // Full with one partial frame: the buffer doubles (to the 4 KiB floor).
        assert!(rx.fill(&mut src).unwrap());
        assert_eq!(rx.data(), b"hijklmnopqr");
        assert!(!rx.fill(&mut src).unwrap());
        rx.consume(11);
        assert!(rx.data().is_empty());
    }

    #[test]
    fn rxbuf_eof_is_an_error() {
        let mut rx = RxBuf::with_capacity(8);
        let mut empty: &[u8] = &[];
        assert_eq!(
            rx.fill(&mut empty).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }

    /// Against a running broker: 2 subscribers (one exact, one wildcard), 1 publisher, 20,000
    /// messages, every one delivered to both, in order. Bounded to 20 s.
    fn live_fanout(env: &str, default_url: &str) {
        const MESSAGES: u32 = 20_000;
        let url = std::env::var(env).unwrap_or_else(|_| default_url.to_string());
        let driver = driver_for_url(&url)
            .expect("peer scheme")
            .expect("resolves");
        let mut subs = Vec::new();
        for (i, pattern) in ["live/a/t", "live/+/#"].iter().enumerate() {
            let mut sub = driver
                .subscriber(&format!("live-sub-{i}"))
                .expect("subscriber");
            sub.subscribe(pattern).expect("subscribe");
            subs.push(sub);
        }
        let mut publisher = driver.publisher("live-pub").expect("publisher");
        for n in 0..MESSAGES {
            publisher.publish("live/a/t", &n.to_le_bytes()).unwrap();
            publisher.publish("other/a/t", b"not matched").unwrap();
            if n % 100 == 99 {
                publisher.flush().unwrap();
            }
        }
        publisher.flush().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        for sub in &mut subs {
            let mut next = 0u32;
            while next < MESSAGES && Instant::now() < deadline {
                sub.poll(Duration::from_millis(100), &mut |topic, payload| {
                    assert_eq!(topic, "live/a/t");
                    assert_eq!(payload, next.to_le_bytes(), "in order, none lost");
                    next += 1;
                })
                .unwrap();
            }
            assert_eq!(next, MESSAGES, "{url}: delivered before the deadline");
        }
    }

    #[test]
    #[ignore = "needs mosquitto on 127.0.0.1:18830 (or LANPUSH_PEER_MQTT)"]
    fn live_mqtt() {
        live_fanout("LANPUSH_PEER_MQTT", "mqtt://127.0.0.1:18830");
    }

    #[test]
    #[ignore = "needs nats-server on 127.0.0.1:14222 (or LANPUSH_PEER_NATS)"]
    fn live_nats() {
        live_fanout("LANPUSH_PEER_NATS", "nats://127.0.0.1:14222");
    }

    #[test]
    #[ignore = "needs redis-server on 127.0.0.1:16379 (or LANPUSH_PEER_REDIS)"]
    fn live_redis() {
        live_fanout("LANPUSH_PEER_REDIS", "redis://127.0.0.1:16379");
    }

    #[test]
    fn stash_delivers_in_order_once() {
        let mut stash = Stash::default();
        stash.push("a", b"1");
        stash.push("b", b"2");
        let mut seen = Vec::new();
        assert_eq!(
            stash.deliver(&mut |t, p| seen.push((t.to_string(), p.to_vec()))),
            2
        );
        assert_eq!(
            seen,
            [("a".into(), b"1".to_vec()), ("b".into(), b"2".to_vec())]
        );
        assert_eq!(stash.deliver(&mut |_, _| panic!("delivered twice")), 0);
    }
}
