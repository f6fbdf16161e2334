//! Connection options and the reconnect back-off.

use std::hash::{BuildHasher, RandomState};
use std::time::{Duration, Instant};

/// The address `lanpush serve` listens on with the default config.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7411";

/// How to reach the engine and how to behave on the connection. Plain public fields, plus
/// chainable setters: `ClientOptions::new("10.0.0.5:7411").client_id("hmi-3").keepalive_ms(2000)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientOptions {
    /// `host:port` of the engine.
    pub server: String,
    /// Shown in the engine's logs and stats.
    pub client_id: String,
    /// Keep-alive asked for in HELLO; 0 takes the engine's default. The engine clamps it and
    /// WELCOME says what is in force; the client PINGs after half of that without sending.
    pub keepalive_ms: u32,
    /// Bound on TCP connect plus the HELLO → WELCOME (and SUBSCRIBE → SUBACK) exchange.
    pub connect_timeout: Duration,
    /// Bound on one blocking write, and on waiting for a STATS answer.
    pub io_timeout: Duration,
    pub reconnect: Backoff,
    /// Longest topic or pattern accepted client-side (the engine's `limits.max_topic_bytes`,
    /// default 1024); longer ones fail with a clear error before anything is sent.
    pub max_topic_bytes: usize,
    /// Initial size of a subscriber's receive buffer; it grows to fit a larger frame.
    pub read_buffer_bytes: usize,
    /// Credentials sent in HELLO, `user:secret`; `None` connects anonymously. `lanpush pub`,
    /// `sub` and `stats` take it from `--token` or the `LANPUSH_TOKEN` environment variable.
    pub token: Option<Token>,
    /// A subscriber asks the engine for the durable session of its `client_id` (the session
    /// marker in every SUBSCRIBE, docs/PROTOCOL.md §8): a new process with the same id resumes
    /// where the last one stopped. Off by default: the default id is per process.
    pub durable_session: bool,
    /// Publisher acknowledgements (docs/PROTOCOL.md §5.8): `Some(bytes)` asks the engine to
    /// confirm what it has taken, keeps up to `bytes` of unconfirmed PUBLISH frames, and resends
    /// them after a reconnect. `None` (the default): no acknowledgements, as before.
    pub publisher_acks: Option<usize>,
    /// Connect with TLS (`lanpush pub/sub --tls --ca FILE`): the CA to trust, an optional
    /// client certificate (mTLS), the name to check. `None`: plain TCP.
    pub tls: Option<crate::tls::ClientTls>,
}

/// A HELLO token, `user:secret`. Its `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    pub fn new(token: impl Into<String>) -> Token {
        Token(token.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The user part, before the first ':'.
    pub fn user(&self) -> &str {
        self.0.split(':').next().unwrap_or("")
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}:<redacted>)", self.user())
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            server: DEFAULT_SERVER.to_string(),
            client_id: format!("lanpush-client-{}", std::process::id()),
            keepalive_ms: 10_000,
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            reconnect: Backoff::default(),
            max_topic_bytes: 1024,
            read_buffer_bytes: 64 * 1024,
            token: None,
            durable_session: false,
            publisher_acks: None,
            tls: None,
        }
    }
}

impl ClientOptions {
    pub fn new(server: impl Into<String>) -> Self {
        ClientOptions {
            server: server.into(),
            ..ClientOptions::default()
        }
    }
    pub fn client_id(mut self, client_id: impl Into<String>) -> Self {
        self.client_id = client_id.into();
        self
    }
    /// See [`ClientOptions::durable_session`]; use it with a stable [`ClientOptions::client_id`].
    pub fn durable_session(mut self, durable: bool) -> Self {
        self.durable_session = durable;
        self
    }
    /// See [`ClientOptions::publisher_acks`]: acknowledgements on, with at most
    /// `max_unconfirmed_bytes` of PUBLISH frames kept for a resend.
    pub fn publisher_acks(mut self, max_unconfirmed_bytes: usize) -> Self {
        self.publisher_acks = Some(max_unconfirmed_bytes);
        self
    }
    pub fn keepalive_ms(mut self, keepalive_ms: u32) -> Self {
        self.keepalive_ms = keepalive_ms;
        self
    }
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
    pub fn io_timeout(mut self, timeout: Duration) -> Self {
        self.io_timeout = timeout;
        self
    }
    pub fn reconnect(mut self, backoff: Backoff) -> Self {
        self.reconnect = backoff;
        self
    }
    pub fn max_topic_bytes(mut self, max_topic_bytes: usize) -> Self {
        self.max_topic_bytes = max_topic_bytes;
        self
    }
    /// Authenticates as `token` (`user:secret`).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token::new(token));
        self
    }
    /// Connects with TLS ([`crate::tls::ClientTls::from_files`]).
    pub fn tls(mut self, tls: crate::tls::ClientTls) -> Self {
        self.tls = Some(tls);
        self
    }
    pub fn read_buffer_bytes(mut self, read_buffer_bytes: usize) -> Self {
        self.read_buffer_bytes = read_buffer_bytes;
        self
    }
}

/// Exponential back-off with full jitter: before attempt `n` (0-based) the client waits a
/// uniformly random time in `[0, min(max, initial * 2^n)]`. Spreading the whole interval, not
/// just its edge, is what keeps a thousand clients dropped together from returning together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    /// The upper bound of the wait before attempt `attempt` (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial
            .checked_mul(factor)
            .map_or(self.max, |d| d.min(self.max))
    }

    /// The wait before attempt `attempt`, given a uniformly random `random`.
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        let ceiling_ns = self.ceiling(attempt).as_nanos();
        let ns = (ceiling_ns * u128::from(random)) >> 64;
        Duration::from_nanos(ns as u64)
    }
}

/// Reconnect bookkeeping shared by the publisher and the subscriber.
#[derive(Debug)]
pub(crate) struct Reconnect {
    backoff: Backoff,
    /// Failed attempts since the connection was lost.
    pub(crate) attempt: u32,
    pub(crate) next_at: Instant,
    rng: u64,
}

impl Reconnect {
    pub(crate) fn new(backoff: Backoff) -> Self {
        // RandomState is seeded from the OS once per thread and bumped per instance, so every
        // client (in this process or another) draws its own jitter sequence.
        let rng = RandomState::new().hash_one(super::now_ns());
        Reconnect {
            backoff,
            attempt: 0,
            next_at: Instant::now(),
            rng,
        }
    }

    /// The connection just broke: the first attempt waits a jittered `[0, initial]`.
    pub(crate) fn on_lost(&mut self, now: Instant) {
        self.attempt = 0;
        self.schedule(now);
    }

    /// An attempt failed: wait longer before the next.
    pub(crate) fn on_failed(&mut self, now: Instant) {
        self.attempt = self.attempt.saturating_add(1);
        self.schedule(now);
    }

    fn schedule(&mut self, now: Instant) {
        let random = self.next_random();
        self.next_at = now + self.backoff.delay(self.attempt, random);
    }

    /// splitmix64: small, fast and plenty for jitter.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
