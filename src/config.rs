//! Engine configuration: `configs/default.toml` is compiled in; a user file overrides any subset.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use crate::proto::DeliveryMode;

/// The embedded default configuration, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../configs/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config {origin}: {message}")]
    Invalid { origin: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub limits: LimitsConfig,
    pub keepalive: KeepaliveConfig,
    pub delivery: DeliveryConfig,
    pub retained: RetainedConfig,
    pub metrics: MetricsConfig,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub auth: AuthConfig,
    pub tls: crate::tls::TlsConfig,
    pub websocket: WebSocketConfig,
    /// UDP multicast channels (`src/mcast/`); none by default.
    pub multicast: crate::mcast::MulticastConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub threads: usize,
    pub pin_threads: bool,
    /// On SIGTERM/SIGINT: how long the engine keeps writing queued frames before it closes
    /// every connection with ERROR 12.
    pub drain_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub max_frame_bytes: usize,
    pub max_topic_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    pub handshake_timeout_ms: u64,
    /// Distinct topics the engine holds, across all reactors.
    pub max_topics: usize,
    /// Longest client id a HELLO may carry.
    pub max_client_id_bytes: usize,
    /// How long the engine remembers a client id after its last connection closed.
    pub client_session_expiry_s: u64,
    /// Connections open at once from one source IP address; 0 = no limit.
    pub max_connections_per_address: usize,
    /// PUBLISH frames one connection may send per second (bursts of one second's worth);
    /// 0 = no limit.
    pub max_publish_rate_per_s: u64,
    /// Most `/`-separated levels in a topic or pattern.
    pub max_topic_levels: usize,
    /// Durable sessions (native clients) the engine keeps at most, live or closed.
    pub max_durable_sessions: usize,
    /// Memory all durable sessions may hold together (patterns, topics, positions).
    pub max_durable_session_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveConfig {
    pub default_ms: u32,
    pub min_ms: u32,
    pub max_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    pub default_mode: DeliveryMode,
    pub queue_max_bytes: usize,
    pub queue_max_messages: usize,
    pub conflate_always: bool,
    pub socket_send_buffer_bytes: usize,
    /// Write coalescing: the writes per second each reactor aims at (see the default config).
    pub reactor_writes_per_s: u64,
    /// Write coalescing: the longest a connection waits between two writes; 0 turns it off.
    pub max_write_interval_us: u64,
    /// Pacing: queued bytes past which a healthy `all` subscriber holds its publishers back;
    /// 0 turns pacing off. See [`DeliveryConfig::pace_window`].
    pub pace_window_bytes: usize,
    /// Pacing: a holding subscriber whose socket takes nothing for this long is released.
    pub stall_ms: u64,
    /// Pacing: a subscriber that holds for this long without once draining is released.
    pub pace_release_ms: u64,
}

impl DeliveryConfig {
    /// The pace window in force: `pace_window_bytes`, capped at half of `queue_max_bytes` so
    /// that the rest of the queue absorbs what is in flight while a publisher is being paused.
    pub fn pace_window(&self) -> usize {
        self.pace_window_bytes.min(self.queue_max_bytes / 2)
    }

    /// Largest accepted `max_write_interval_us`: coalescing longer than this is a
    /// misconfiguration.
    pub const MAX_WRITE_INTERVAL_US: u64 = 100_000;
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetainedConfig {
    pub ring_bytes: usize,
    /// Bytes of retained values (one per topic) kept across all reactors; past it the values
    /// updated longest ago are dropped.
    pub max_bytes: usize,
    /// Snapshot file of the retained values, loaded at start and written every
    /// `persist_interval_ms` and at shutdown; empty turns persistence off.
    pub persist_path: String,
    pub persist_interval_ms: u64,
}

impl RetainedConfig {
    /// The snapshot file, or `None` when persistence is off.
    pub fn persist_file(&self) -> Option<std::path::PathBuf> {
        let text = self.persist_path.trim();
        (!text.is_empty()).then(|| std::path::PathBuf::from(text))
    }
}

/// Logs (`src/log.rs`): one line per connection event on stderr, rate-limited per category.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "off", "error", "warn", "info", "debug" or "trace".
    pub level: String,
    /// Lines each reactor may log per second per category (connect, disconnect, ...); the
    /// rest are counted and summed up in a "suppressed" line.
    pub lines_per_s: u32,
    /// Lines a category may log in a burst before `lines_per_s` applies.
    pub burst_lines: u32,
}

impl LogConfig {
    /// The level names `level` accepts.
    pub const LEVELS: [&'static str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
}

/// The MQTT 3.1.1 listener (docs/PROTOCOL.md §14).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Address of the MQTT listener; empty turns it off.
    pub listen: String,
    /// QoS 1 PUBLISH packets sent to one MQTT connection and not yet acknowledged.
    pub max_inflight: u16,
    /// Delivery mode of a QoS 0 subscription: `all` or `latest`.
    pub qos0_mode: DeliveryMode,
}

impl MqttConfig {
    /// The listener's address, or `None` when it is off. Validation has checked that a
    /// non-empty `listen` parses.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        optional_addr(&self.listen)
    }

    fn validate(&self) -> Result<(), String> {
        check_optional_addr("mqtt.listen", &self.listen, "0.0.0.0:1883")?;
        if self.max_inflight == 0 {
            return Err("mqtt.max_inflight must be at least 1".into());
        }
        if !matches!(self.qos0_mode, DeliveryMode::All | DeliveryMode::Latest) {
            return Err("mqtt.qos0_mode must be \"all\" or \"latest\"".into());
        }
        Ok(())
    }
}

/// The WebSocket listener (`src/ws/`, docs/PROTOCOL.md §15).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketConfig {
    /// Address of the WebSocket listener; empty turns it off.
    pub listen: String,
    /// Origins (`scheme://host[:port]`) whose pages may connect; `*` allows any.
    pub origins: Vec<String>,
    /// Largest message (all its fragments) a WebSocket client may send.
    pub max_message_bytes: usize,
}

impl WebSocketConfig {
    /// The listener's address, or `None` when it is off.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        optional_addr(&self.listen)
    }

    fn validate(&self) -> Result<(), String> {
        check_optional_addr("websocket.listen", &self.listen, "0.0.0.0:8080")?;
        for origin in &self.origins {
            let ok = origin == "*"
                || ((origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.contains(char::is_whitespace));
            if !ok {
                return Err(format!(
                    "websocket.origins: {origin:?} is not \"*\" or an origin such as \"http://hmi.plant:8080\""
                ));
            }
        }
        if self.max_message_bytes < 1024 {
            return Err("websocket.max_message_bytes must be at least 1024".into());
        }
        Ok(())
    }
}

/// Authentication and authorisation (`src/auth/`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// A HELLO without a token is accepted, as the identity `anonymous`.
    pub anonymous: bool,
    /// The roles of the anonymous identity.
    pub anonymous_roles: Vec<String>,
    /// argon2 verifications each reactor runs per second at most (a remembered secret costs
    /// none); past it a HELLO needing one is refused.
    pub max_verifications_per_s: u32,
    pub users: Vec<UserConfig>,
    pub roles: Vec<RoleConfig>,
}

/// One user: a name, the argon2 PHC hash of its secret, its roles and its own patterns.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub secret_hash: String,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub admin: bool,
    /// May read the HTTP `/metrics` and `/stats` (which require credentials when
    /// `anonymous = false`).
    #[serde(default)]
    pub metrics: bool,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("roles", &self.roles)
            .field("publish", &self.publish)
            .field("subscribe", &self.subscribe)
            .field("admin", &self.admin)
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

/// A named set of rights users (and the anonymous identity) can have.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    pub name: String,
    /// Topic patterns it may PUBLISH to.
    #[serde(default)]
    pub publish: Vec<String>,
    /// Topic patterns it may receive (SUBSCRIBE, snapshot and replay).
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Sees every connection in STATS.
    #[serde(default)]
    pub admin: bool,
    /// May read the HTTP `/metrics` and `/stats` when they require credentials.
    #[serde(default)]
    pub metrics: bool,
}

impl AuthConfig {
    fn validate(&self, max_topic_bytes: usize) -> Result<(), String> {
        let mut role_names = std::collections::HashSet::new();
        for role in &self.roles {
            if role.name.is_empty() || !role_names.insert(role.name.as_str()) {
                return Err(format!(
                    "auth.roles: role name {:?} is empty or defined twice",
                    role.name
                ));
            }
            check_patterns(
                &format!("auth.roles {:?}", role.name),
                role,
                max_topic_bytes,
            )?;
        }
        let known_role = |what: &str, name: &str| {
            if role_names.contains(name) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: role {name:?} is not defined in auth.roles"
                ))
            }
        };
        for name in &self.anonymous_roles {
            known_role("auth.anonymous_roles", name)?;
        }
        let mut user_names = std::collections::HashSet::new();
        for user in &self.users {
            let what = format!("auth.users {:?}", user.name);
            if user.name.is_empty() || user.name.contains(':') {
                return Err(format!("{what}: a user name is not empty and has no ':'"));
            }
            if !user_names.insert(user.name.as_str()) {
                return Err(format!("{what}: defined twice"));
            }
            crate::auth::check_phc(&user.secret_hash).map_err(|e| {
                format!(
                    "{what}: secret_hash is not an argon2 PHC string from `lanpush passwd` ({e})"
                )
            })?;
            for name in &user.roles {
                known_role(&what, name)?;
            }
            let own = RoleConfig {
                name: user.name.clone(),
                publish: user.publish.clone(),
                subscribe: user.subscribe.clone(),
                admin: user.admin,
                metrics: user.metrics,
            };
            check_patterns(&what, &own, max_topic_bytes)?;
        }
        if self.max_verifications_per_s == 0 {
            return Err("auth.max_verifications_per_s must be at least 1".into());
        }
        Ok(())
    }
}

fn check_patterns(what: &str, role: &RoleConfig, max_topic_bytes: usize) -> Result<(), String> {
    for p in role.publish.iter().chain(&role.subscribe) {
        crate::proto::validate_pattern(p, max_topic_bytes)
            .map_err(|e| format!("{what}: pattern {p:?}: {e}"))?;
    }
    Ok(())
}

/// Latency histograms and the Prometheus endpoint (`src/metrics/`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the HTTP endpoint serving `/metrics` and `/stats`; empty turns it off.
    /// Must be loopback unless `prometheus_allow_remote` (checked by [`Config`] validation).
    pub prometheus_listen: String,
    pub prometheus_allow_remote: bool,
    /// Topic levels that name a prefix for the per-prefix histograms (`plant/line1/x` -> 2 ->
    /// `plant/line1`).
    pub prefix_levels: usize,
    /// Highest latency the histograms track; larger values are recorded as this one.
    pub histogram_max_ms: u64,
}

impl MetricsConfig {
    /// Largest accepted `prefix_levels`.
    pub const MAX_PREFIX_LEVELS: usize = 32;
    /// Largest accepted `histogram_max_ms`: one day.
    pub const MAX_HISTOGRAM_MS: u64 = 86_400_000;

    /// The endpoint's address, or `None` when it is off. Validation has checked that a
    /// non-empty `prometheus_listen` parses.
    pub fn prometheus_addr(&self) -> Option<SocketAddr> {
        optional_addr(&self.prometheus_listen)
    }

    fn validate(&self) -> Result<(), String> {
        let text = self.prometheus_listen.trim();
        if let Some(addr) =
            check_optional_addr("metrics.prometheus_listen", text, "127.0.0.1:9464")?
        {
            if !addr.ip().is_loopback() && !self.prometheus_allow_remote {
                return Err(format!(
                    "metrics.prometheus_listen = {text:?} is not a loopback address: the endpoint is plain HTTP (credentials, when auth.anonymous = false asks for them, cross in the clear); set metrics.prometheus_allow_remote = true to expose it anyway"
                ));
            }
        }
        if self.prefix_levels == 0 || self.prefix_levels > Self::MAX_PREFIX_LEVELS {
            return Err(format!(
                "metrics.prefix_levels = {} is outside 1 ..= {}",
                self.prefix_levels,
                Self::MAX_PREFIX_LEVELS
            ));
        }
        if self.histogram_max_ms == 0 || self.histogram_max_ms > Self::MAX_HISTOGRAM_MS {
            return Err(format!(
                "metrics.histogram_max_ms = {} is outside 1 ..= {}",
                self.histogram_max_ms,
                Self::MAX_HISTOGRAM_MS
            ));
        }
        Ok(())
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Config::default().metrics
    }
}

impl Default for Config {
    fn default() -> Self {
        // The embedded file is checked by a unit test, so parsing it cannot fail here.
        Config::from_toml_str(DEFAULT_TOML, "<embedded default>")
            .expect("embedded default config parses")
    }
}

impl Config {
    /// Parses `text` as a complete-or-partial config: keys it sets override the defaults.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        };
        let mut merged: toml::Table = if origin == "<embedded default>" {
            toml::Table::new()
        } else {
            DEFAULT_TOML
                .parse()
                .expect("embedded default config is valid TOML")
        };
        let user: toml::Table = text.parse().map_err(parse_err)?;
        merge(&mut merged, user);
        let config: Config = toml::Value::Table(merged).try_into().map_err(parse_err)?;
        config.validate(origin)?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml_str(&text, &path.display().to_string())
    }

    /// Reactor threads to run: `server.threads`, or one per core (at most 64) when it is 0.
    pub fn reactor_threads(&self) -> usize {
        match self.server.threads {
            // One per core, within the engine's limit of 64 reactors.
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(crate::engine::MAX_SHARDS),
            n => n,
        }
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |message: String| {
            Err(ConfigError::Invalid {
                origin: origin.to_string(),
                message,
            })
        };
        if self.server.threads > crate::engine::MAX_SHARDS {
            return invalid(format!(
                "server.threads = {} is outside 0 ..= {} (0: one per core)",
                self.server.threads,
                crate::engine::MAX_SHARDS
            ));
        }
        let l = &self.limits;
        if l.max_frame_bytes < 64 || l.max_frame_bytes > u32::MAX as usize {
            return invalid(format!(
                "limits.max_frame_bytes = {} is outside 64 ..= {}",
                l.max_frame_bytes,
                u32::MAX
            ));
        }
        if l.max_topic_bytes == 0 || l.max_topic_bytes > crate::proto::MAX_TOPIC_BYTES {
            return invalid(format!(
                "limits.max_topic_bytes = {} is outside 1 ..= 65535",
                l.max_topic_bytes
            ));
        }
        if l.max_connections == 0 {
            return invalid("limits.max_connections must be at least 1".into());
        }
        if l.max_topics == 0 {
            return invalid("limits.max_topics must be at least 1".into());
        }
        if l.max_client_id_bytes > u16::MAX as usize {
            return invalid(format!(
                "limits.max_client_id_bytes = {} is outside 0 ..= 65535",
                l.max_client_id_bytes
            ));
        }
        let k = &self.keepalive;
        if k.min_ms == 0 || k.min_ms > k.max_ms || !(k.min_ms..=k.max_ms).contains(&k.default_ms) {
            return invalid(format!(
                "keepalive: need 0 < min_ms <= default_ms <= max_ms, have min_ms = {}, default_ms = {}, max_ms = {}",
                k.min_ms, k.default_ms, k.max_ms
            ));
        }
        let d = &self.delivery;
        if d.default_mode == DeliveryMode::Default {
            return invalid(
                "delivery.default_mode must be \"all\", \"latest\" or \"disconnect\"".into(),
            );
        }
        if d.queue_max_bytes < l.max_frame_bytes.min(65536) || d.queue_max_messages == 0 {
            return invalid(format!(
                "delivery.queue_max_bytes = {} must be at least 64 KiB (or max_frame_bytes if smaller) and queue_max_messages at least 1",
                d.queue_max_bytes
            ));
        }
        if d.pace_window_bytes > 0 && (d.stall_ms == 0 || d.pace_release_ms < d.stall_ms) {
            return invalid(format!(
                "delivery: need 0 < stall_ms <= pace_release_ms, have stall_ms = {}, pace_release_ms = {}",
                d.stall_ms, d.pace_release_ms
            ));
        }
        if d.max_write_interval_us > DeliveryConfig::MAX_WRITE_INTERVAL_US {
            return invalid(format!(
                "delivery.max_write_interval_us = {} is outside 0 ..= {} (100 ms)",
                d.max_write_interval_us,
                DeliveryConfig::MAX_WRITE_INTERVAL_US
            ));
        }
        if d.reactor_writes_per_s == 0 {
            return invalid("delivery.reactor_writes_per_s must be at least 1".into());
        }
        if !LogConfig::LEVELS.contains(&self.log.level.as_str()) {
            return invalid(format!(
                "log.level = {:?} is not one of {}",
                self.log.level,
                LogConfig::LEVELS.join(", ")
            ));
        }
        if self.log.lines_per_s == 0 || self.log.burst_lines == 0 {
            return invalid("log.lines_per_s and log.burst_lines must be at least 1".into());
        }
        if self.retained.persist_interval_ms < 100 {
            return invalid(format!(
                "retained.persist_interval_ms = {} is below 100",
                self.retained.persist_interval_ms
            ));
        }
        if self.server.drain_ms > 600_000 {
            return invalid(format!(
                "server.drain_ms = {} is outside 0 ..= 600000",
                self.server.drain_ms
            ));
        }
        if let Err(message) = self.metrics.validate() {
            return invalid(message);
        }
        if let Err(message) = self.mqtt.validate() {
            return invalid(message);
        }
        if let Err(message) = self.websocket.validate() {
            return invalid(message);
        }
        if l.max_topic_levels == 0 {
            return invalid("limits.max_topic_levels must be at least 1".into());
        }
        if let Err(message) = self.auth.validate(l.max_topic_bytes) {
            return invalid(message);
        }
        if let Err(message) = self.tls.validate() {
            return invalid(message);
        }
        if let Err(message) = self.multicast.validate(l.max_topic_bytes) {
            return invalid(message);
        }
        Ok(())
    }
}

/// What a reload (SIGHUP) does with a re-read config file: `config` is the one to run with (the
/// new values of the keys that can change at run time, the running values of the others),
/// `applied` names the keys it changes, `needs_restart` the changed keys it leaves alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadPlan {
    pub config: Config,
    pub applied: Vec<&'static str>,
    pub needs_restart: Vec<&'static str>,
}

/// For each listed key (a field path): if `new` differs from `old`, records it in `$list` and,
/// for a run-time key, copies it into `$out`.
macro_rules! diff_keys {
    ($old:ident, $new:ident, $out:ident, $list:expr, copy, $($section:ident . $key:ident),+ $(,)?) => {
        $(if $old.$section.$key != $new.$section.$key {
            $list.push(concat!(stringify!($section), ".", stringify!($key)));
            $out.$section.$key = $new.$section.$key.clone();
        })+
    };
    ($old:ident, $new:ident, $out:ident, $list:expr, keep, $($section:ident . $key:ident),+ $(,)?) => {
        $(if $old.$section.$key != $new.$section.$key {
            $list.push(concat!(stringify!($section), ".", stringify!($key)));
        })+
    };
}

impl Config {
    /// How to go from the running config `self` to a re-read `new` one without a restart.
    ///
    /// At run time: the log level and its rate limits, the limits a connection meets at accept,
    /// HELLO and SUBSCRIBE (`max_connections`, `max_subscriptions_per_connection`,
    /// `handshake_timeout_ms`, `max_client_id_bytes`), keep-alive, and every `delivery` key.
    /// They apply to connections (and subscriptions) made after the reload; write coalescing
    /// from the next 25 ms tick. Everything else is sized or announced at start (listener,
    /// threads, frame and topic limits announced in WELCOME or holding memory, retained and
    /// metrics settings; `[auth]` and the per-client limits of issue 11) and needs a restart.
    pub fn reload_plan(&self, new: &Config) -> ReloadPlan {
        let (old, mut out) = (self, self.clone());
        let (mut applied, mut needs_restart) = (Vec::new(), Vec::new());
        diff_keys!(
            old,
            new,
            out,
            applied,
            copy,
            log.level,
            log.lines_per_s,
            log.burst_lines,
            limits.max_connections,
            limits.max_subscriptions_per_connection,
            limits.handshake_timeout_ms,
            limits.max_client_id_bytes,
            keepalive.default_ms,
            keepalive.min_ms,
            keepalive.max_ms,
            delivery.default_mode,
            delivery.queue_max_bytes,
            delivery.queue_max_messages,
            delivery.conflate_always,
            delivery.socket_send_buffer_bytes,
            delivery.reactor_writes_per_s,
            delivery.max_write_interval_us,
            delivery.pace_window_bytes,
            delivery.stall_ms,
            delivery.pace_release_ms,
        );
        diff_keys!(
            old,
            new,
            out,
            needs_restart,
            keep,
            server.listen,
            server.threads,
            server.pin_threads,
            server.drain_ms,
            limits.max_frame_bytes,
            limits.max_topic_bytes,
            limits.max_topics,
            limits.client_session_expiry_s,
            retained.ring_bytes,
            retained.max_bytes,
            retained.persist_path,
            retained.persist_interval_ms,
            metrics.prometheus_listen,
            metrics.prometheus_allow_remote,
            metrics.prefix_levels,
            metrics.histogram_max_ms,
            mqtt.listen,
            mqtt.max_inflight,
            mqtt.qos0_mode,
            websocket.listen,
            websocket.origins,
            websocket.max_message_bytes,
            // Senders and sockets are made at start.
            multicast.channels,
            multicast.heartbeat_ms,
            multicast.repair_ring_bytes,
            multicast.unicast_repair_max,
            multicast.repair_window_ms,
            multicast.test_loss,
            // The authenticator, the per-address table and each connection's rate are built at
            // start and at HELLO: a reload would apply them to some connections only.
            limits.max_connections_per_address,
            limits.max_publish_rate_per_s,
            limits.max_topic_levels,
            auth.anonymous,
            auth.anonymous_roles,
            auth.max_verifications_per_s,
            auth.users,
            auth.roles,
            tls.listen,
            tls.mqtt_listen,
            tls.cert_path,
            tls.key_path,
            tls.client_ca_path,
            tls.require_client_cert,
        );
        ReloadPlan {
            config: out,
            applied,
            needs_restart,
        }
    }
}

/// Checks an optional listen address: "" (off) or a socket address; the error names `key` and
/// shows `example`.
pub(crate) fn check_optional_addr(
    key: &str,
    text: &str,
    example: &str,
) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        format!("{key} = {text:?} is not a socket address such as \"{example}\" (or \"\" for off)")
    })
}

/// An optional listen address: `None` for "" (off); validation has checked that the rest parse.
fn optional_addr(text: &str) -> Option<SocketAddr> {
    let text = text.trim();
    if text.is_empty() {
        None
    } else {
        text.parse().ok()
    }
}

/// Overlays `user` onto `base`, table by table, so a partial file keeps the other defaults.
fn merge(base: &mut toml::Table, user: toml::Table) {
    for (key, value) in user {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge(b, u),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_interval_is_bounded() {
        let c = Config::from_toml_str("[delivery]\nmax_write_interval_us = 250\n", "test").unwrap();
        assert_eq!(c.delivery.max_write_interval_us, 250);
        let e = Config::from_toml_str("[delivery]\nmax_write_interval_us = 100001\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("delivery.max_write_interval_us = 100001"), "{e}");
        let e = Config::from_toml_str("[delivery]\nreactor_writes_per_s = 0\n", "test")
            .unwrap_err()
            .to_string();
        assert!(e.contains("reactor_writes_per_s"), "{e}");
    }

    #[test]
    fn embedded_default_parses_and_is_valid() {
        let c = Config::default();
        assert_eq!(c.delivery.default_mode, DeliveryMode::All);
        assert_eq!(c.limits.max_frame_bytes, 1 << 20);
    }

    #[test]
    fn every_file_in_configs_parses() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                seen += 1;
            } else {
                // Every other file is checked by a test of its own.
                let checked_elsewhere = ["lanpush.service", "grafana-dashboard.json"]; // tests/service.rs
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                assert!(
                    checked_elsewhere.contains(&name),
                    "{}: no test parses this file",
                    path.display()
                );
            }
        }
        assert!(seen >= 1);
    }

    #[test]
    fn partial_file_overrides_only_its_keys() {
        let c = Config::from_toml_str("[server]\nthreads = 3\n", "test").unwrap();
        assert_eq!(c.server.threads, 3);
        assert_eq!(c.limits, Config::default().limits);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[limits]\nmax_framebytes = 3\n", "test").unwrap_err();
        assert!(err.to_string().contains("max_framebytes"), "{err}");
        let err = Config::from_toml_str("[nope]\n", "test").unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn invalid_values_are_refused_with_the_key() {
        let err = Config::from_toml_str("[keepalive]\nmin_ms = 0\n", "test").unwrap_err();
        assert!(err.to_string().contains("min_ms"), "{err}");
        let err = Config::from_toml_str("[delivery]\ndefault_mode = \"sometimes\"\n", "test")
            .unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn a_reload_applies_run_time_keys_and_names_the_others() {
        let old = Config::default();
        let new = Config::from_toml_str(
            "[log]\nlevel = \"debug\"\n[delivery]\nqueue_max_bytes = 131072\n\
             [limits]\nmax_connections = 5\nmax_frame_bytes = 4096\n\
             [server]\nthreads = 7\n",
            "test",
        )
        .unwrap();
        let plan = old.reload_plan(&new);
        assert_eq!(
            plan.applied,
            [
                "log.level",
                "limits.max_connections",
                "delivery.queue_max_bytes"
            ]
        );
        assert_eq!(
            plan.needs_restart,
            ["server.threads", "limits.max_frame_bytes"]
        );
        assert_eq!(plan.config.log.level, "debug");
        assert_eq!(plan.config.limits.max_connections, 5);
        assert_eq!(plan.config.delivery.queue_max_bytes, 131072);
        assert_eq!(
            plan.config.limits.max_frame_bytes,
            old.limits.max_frame_bytes
        );
        assert_eq!(plan.config.server.threads, old.server.threads);
        // Authentication is set up at start: a change is named, not applied.
        let secure = Config::from_toml_str(include_str!("../configs/secure.toml"), "test").unwrap();
        let plan_auth = old.reload_plan(&secure);
        for key in [
            "auth.anonymous",
            "auth.users",
            "limits.max_publish_rate_per_s",
        ] {
            assert!(plan_auth.needs_restart.contains(&key), "{key}");
        }
        assert!(plan_auth.config.auth.anonymous);
        // The same file again: nothing to do.
        let again = plan.config.reload_plan(&plan.config);
        assert!(again.applied.is_empty() && again.needs_restart.is_empty());
    }

    #[test]
    fn service_keys_have_sane_defaults_and_bounds() {
        let c = Config::default();
        assert_eq!(c.log.level, "info");
        assert_eq!(c.retained.persist_file(), None);
        assert_eq!(c.server.drain_ms, 2000);
        let e = Config::from_toml_str("[log]\nlevel = \"loud\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
        let e = Config::from_toml_str("[retained]\npersist_interval_ms = 5\n", "test").unwrap_err();
        assert!(e.to_string().contains("persist_interval_ms"), "{e}");
        let c = Config::from_toml_str("[retained]\npersist_path = \"/x/r.bin\"\n", "test").unwrap();
        assert_eq!(c.retained.persist_file(), Some("/x/r.bin".into()));
    }

    #[test]
    fn mqtt_is_off_by_default_and_on_in_the_plant_example() {
        let m = Config::default().mqtt;
        assert_eq!(m.listen_addr(), None);
        assert_eq!(m.qos0_mode, DeliveryMode::Latest);
        assert_eq!(m.max_inflight, 64);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/plant.toml");
        let plant = Config::from_file(Path::new(path)).unwrap();
        assert_eq!(
            plant.mqtt.listen_addr(),
            Some("0.0.0.0:1883".parse().unwrap())
        );
    }

    #[test]
    fn multicast_is_off_by_default_and_on_in_its_example() {
        assert!(Config::default().multicast.channels.is_empty());
        assert_eq!(Config::default().multicast.test_loss.percent, 0.0);
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/multicast.toml");
        let m = Config::from_file(Path::new(path)).unwrap().multicast;
        assert_eq!(m.channels.len(), 1);
        assert_eq!(m.channels[0].group, std::net::Ipv4Addr::new(239, 192, 0, 1));
        assert_eq!(m.channels[0].datagram_bytes, 1472);
        assert_eq!(m.channels[0].ttl, 1);
        assert!(
            m.channels[0].loopback,
            "local receivers hear the group by default"
        );
        let channel = |extra: &str| {
            format!("[[multicast.channels]]\ngroup = \"239.1.1.1\"\nport = 7000\npatterns = [\"a/#\"]\n{extra}")
        };
        for (text, key) in [
            (
                channel("").replace("239.1.1.1", "10.0.0.1"),
                "not a multicast address",
            ),
            (channel("ttl = 0"), "ttl"),
            (channel("datagram_bytes = 20"), "datagram_bytes"),
            (channel("").replace("[\"a/#\"]", "[]"), "patterns is empty"),
            (channel("").replace("a/#", "a/#/b"), "patterns"),
            (channel("").replace("7000", "0"), "port"),
            (channel("loopback = \"no\""), "loopback"),
            (
                "[multicast.test_loss]\npercent = 101.0\n".to_string(),
                "test_loss",
            ),
        ] {
            let e = Config::from_toml_str(&text, "test").unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn mqtt_invalid_values_are_refused_with_the_key() {
        let cases = [
            ("listen = \"localhost:1883\"", "mqtt.listen"),
            ("max_inflight = 0", "mqtt.max_inflight"),
            ("qos0_mode = \"disconnect\"", "mqtt.qos0_mode"),
            ("port = 1883", "port"),
        ];
        for (line, key) in cases {
            let err = Config::from_toml_str(&format!("[mqtt]\n{line}\n"), "test")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn websocket_is_off_by_default_on_in_the_plant_example_and_checked() {
        let w = Config::default().websocket;
        assert_eq!(w.listen_addr(), None);
        assert!(w.origins.is_empty());
        let plant = Config::from_toml_str(include_str!("../configs/plant.toml"), "plant").unwrap();
        assert_eq!(
            plant.websocket.listen_addr(),
            Some("0.0.0.0:8080".parse().unwrap())
        );
        for (line, key) in [
            ("listen = \"localhost:80\"", "websocket.listen"),
            ("origins = [\"hmi.plant\"]", "websocket.origins"),
            ("max_message_bytes = 10", "websocket.max_message_bytes"),
        ] {
            let err = Config::from_toml_str(&format!("[websocket]\n{line}\n"), "test")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }

    #[test]
    fn metrics_defaults() {
        let m = Config::default().metrics;
        assert_eq!(m.prometheus_listen, "127.0.0.1:9464");
        assert_eq!(m.prometheus_addr(), Some("127.0.0.1:9464".parse().unwrap()));
        let off = Config::from_toml_str("[metrics]\nprometheus_listen = \"\"\n", "test").unwrap();
        assert_eq!(off.metrics.prometheus_addr(), None);
        assert!(!m.prometheus_allow_remote);
        assert_eq!(m.prefix_levels, 2);
        assert_eq!(m.histogram_max_ms, 60_000);
        assert_eq!(MetricsConfig::default(), m);
    }

    #[test]
    fn metrics_loopback_listen_is_accepted() {
        for addr in ["127.0.0.1:9464", "127.0.0.2:0", "[::1]:9464"] {
            let text = format!("[metrics]\nprometheus_listen = \"{addr}\"\n");
            let c = Config::from_toml_str(&text, "test").unwrap_or_else(|e| panic!("{addr}: {e}"));
            assert_eq!(c.metrics.prometheus_addr(), Some(addr.parse().unwrap()));
        }
    }

    #[test]
    fn metrics_remote_listen_is_refused_unless_allowed() {
        for addr in ["0.0.0.0:9464", "10.0.0.5:9464", "[::]:9464"] {
            let text = format!("[metrics]\nprometheus_listen = \"{addr}\"\n");
            let err = Config::from_toml_str(&text, "test")
                .unwrap_err()
                .to_string();
            assert!(err.contains("metrics.prometheus_listen"), "{err}");
            assert!(err.contains("prometheus_allow_remote"), "{err}");
            let allowed = format!("{text}prometheus_allow_remote = true\n");
            let c = Config::from_toml_str(&allowed, "test").unwrap();
            assert_eq!(c.metrics.prometheus_addr(), Some(addr.parse().unwrap()));
        }
    }

    #[test]
    fn metrics_invalid_values_are_refused_with_the_key() {
        let cases = [
            (
                "prometheus_listen = \"localhost:9464\"",
                "metrics.prometheus_listen",
            ),
            (
                "prometheus_listen = \"127.0.0.1\"",
                "metrics.prometheus_listen",
            ),
            ("prefix_levels = 0", "metrics.prefix_levels"),
            ("prefix_levels = 33", "metrics.prefix_levels"),
            ("histogram_max_ms = 0", "metrics.histogram_max_ms"),
            ("histogram_max_ms = 86400001", "metrics.histogram_max_ms"),
            ("prometheus_port = 1", "prometheus_port"),
        ];
        for (line, key) in cases {
            let err = Config::from_toml_str(&format!("[metrics]\n{line}\n"), "test")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{line}: {err}");
        }
    }
}
