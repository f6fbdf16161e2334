//! The engine: reactor threads ("shards"), the hand-off between them, and the handle an
//! embedding process holds.
//!
//! `Engine::start` binds one listening socket (socket2), starts N shard threads (each pinned to a
//! core when `server.pin_threads` is on) and returns. Shard 0 also accepts connections and deals
//! them round-robin to the shards, so every shard gets an even share of long-lived connections
//! (the kernel's SO_REUSEPORT hash can leave one shard with most of a handful of connections).
//! After accept, a connection belongs to its reactor (`reactor.rs`, the only code holding file
//! descriptors), which feeds the sans-IO fan-out core (`core.rs`, sessions in `session.rs`).

mod acks;
#[cfg(test)]
mod acks_tests;
mod audit;
#[cfg(test)]
mod auth_core_tests;
mod bench_api;
mod clients;
mod core;
#[cfg(test)]
mod core_tests;
mod durable;
#[cfg(test)]
mod durable_tests;
mod guard;
#[cfg(test)]
mod guard_tests;
#[cfg(test)]
mod handle_tests;
#[cfg(test)]
mod harness;
mod http_auth;
pub mod limits;
mod matches;
mod mcast_io;
#[cfg(test)]
mod mcast_tests;
mod mqtt_session;
mod mqtt_sessions;
#[cfg(test)]
mod mqtt_tests;
mod native;
mod notify;
pub mod outbox;
mod owners;
mod pacing;
pub mod persist;
mod reactor;
mod readbuf;
mod session;
mod stats;
mod store;
mod timer;
mod tls_link;
mod trim;
mod verifier;
mod wire;
mod ws_link;
#[cfg(test)]
mod ws_link_tests;

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::TrySendError;
use mio::Poll;

use crate::config::Config;
use crate::proto::{self, PublishRef};
use notify::{Inbox, Mailbox, Notifier};
use reactor::{Reactor, ShardMsg, WAKER_TOKEN};

#[doc(hidden)]
pub use bench_api::{mcast_send, FanoutBench};

/// Bound of each shard's inbox, in messages (each message is a batch from one loop turn).
const INBOX_CAPACITY: usize = 256;
/// At most this many shards: subscription snapshot state is a u64 bitmask of shards.
pub const MAX_SHARDS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start reactor thread: {0}")]
    Thread(io::Error),
    #[error("threads = {0}: the engine runs 1 ..= {MAX_SHARDS} reactor threads")]
    Threads(usize),
    #[error("cannot set up reactor {id}: {source}")]
    Setup { id: usize, source: io::Error },
    #[error("reactor {id} failed: {source}")]
    Reactor { id: usize, source: io::Error },
    #[error("reactor {id} panicked: {message}")]
    Panicked { id: usize, message: String },
    #[error("reactor {id} stopped without a shutdown request")]
    Stopped { id: usize },
    #[error("the stats thread panicked: {message}")]
    StatsPanicked { message: String },
    #[error("the password verifier thread panicked: {message}")]
    VerifierPanicked { message: String },
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("invalid topic {topic:?}: {source}")]
    Topic {
        topic: String,
        source: proto::TopicError,
    },
    #[error("payload of {len} bytes exceeds max_frame_bytes")]
    TooLarge { len: usize },
    #[error("the engine holds limits.max_topics topics: {topic:?} would be a new one")]
    TooManyTopics { topic: String },
    #[error("the engine is overloaded: the owner shard's inbox is full")]
    Overloaded,
    #[error("the engine has shut down")]
    ShutDown,
}

/// Counters one shard publishes once per loop turn; read by STATS from any thread.
/// Aligned to its own cache lines: each reactor stores into its `ShardStats` every loop turn,
/// and neighbours in the `Vec` must not share a line (false sharing between reactors).
#[derive(Default)]
#[repr(align(128))]
pub(crate) struct ShardStats {
    /// Per multicast channel (empty when none is configured); written by the reactor each turn.
    pub mcast: Mutex<Vec<mcast_io::McastChannelStats>>,
    pub connections: AtomicUsize,
    pub subscriptions: AtomicUsize,
    pub topics_owned: AtomicUsize,
    pub accepted: AtomicU64,
    pub publishes_in: AtomicU64,
    pub delivered: AtomicU64,
    pub replayed: AtomicU64,
    pub gaps: AtomicU64,
    pub lagged: AtomicU64,
    pub bytes_written: AtomicU64,
    pub writes: AtomicU64,
    pub conflated: AtomicU64,
    pub slow_disconnects: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub requests_refused: AtomicU64,
    pub keepalive_timeouts: AtomicU64,
    pub handshake_timeouts: AtomicU64,
    pub shutdown_closes: AtomicU64,
    pub io_errors: AtomicU64,
    pub tls_failures: AtomicU64,
    pub ring_bytes: AtomicUsize,
    pub retained_bytes: AtomicUsize,
    pub retained_evicted: AtomicU64,
    pub topics_refused: AtomicU64,
    pub frames_to_peers: AtomicU64,
    pub throttled_turns: AtomicU64,
    pub auth_failures: AtomicU64,
    pub acl_denied: AtomicU64,
    pub acl_filtered: AtomicU64,
    pub id_conflicts: AtomicU64,
    pub id_takeovers: AtomicU64,
    pub rate_limited: AtomicU64,
    pub subscriptions_refused: AtomicU64,
    pub topic_limit: AtomicU64,
    pub address_refused: AtomicU64,
    pub publishers_paused: AtomicU64,
    pub pace_releases: AtomicU64,
    pub publish_duplicates: AtomicU64,
    pub acks_sent: AtomicU64,
    /// Bytes of messages in this reactor's inbox (sent by peers, not yet taken): a sender
    /// holds its reads back while it is past `reactor::MAX_IN_FLIGHT_BYTES`.
    pub inbox_bytes: AtomicUsize,
}

/// State every shard and handle can see.
pub(crate) struct EngineShared {
    pub open_connections: AtomicUsize,
    pub next_conn_id: AtomicU64,
    pub shards: Vec<ShardStats>,
    pub started_unix_ns: u64,
    /// Sent in WELCOME: changes at every start, so clients know when positions are void.
    pub engine_id: u64,
    /// Latency histograms, one slot per shard, refreshed every few hundred ms.
    pub metrics: crate::metrics::MetricsBoard,
    /// The client ids seen, for reconnect counts; bounded (`clients.rs`).
    pub clients: clients::ClientSessions,
    /// Which shard owns each topic (`owners.rs`).
    pub owners: owners::OwnerTable,
    /// Persistent MQTT sessions of the clients that are gone (`mqtt_sessions.rs`).
    pub mqtt_sessions: mqtt_sessions::MqttSessions,
    /// Checks HELLO credentials (`crate::auth`).
    pub auth: crate::auth::Authenticator,
    /// Connections open per source address (`limits.rs`); touched at accept and close only.
    pub sources: std::sync::Mutex<limits::SourceLimits>,
    /// Durable sessions of native clients (`durable.rs`).
    pub durable: durable::DurableSessions,
    /// One sender into each reactor's inbox, indexed by reactor.
    mailboxes: Vec<Mailbox<ShardMsg>>,
    /// Set once, by [`EngineShared::request_shutdown`]; see [`EngineShared::shutdown_requested`].
    shutting_down: AtomicBool,
    /// Reactor threads that ended with an error, a panic, or unasked.
    reactor_failures: AtomicU64,
    /// Retained values loaded from the snapshot file, per owner shard; each core takes its
    /// list when it is made (`persist.rs`).
    restored: Mutex<Vec<Vec<store::RetainedFrame>>>,
    /// What each reactor's store held when it stopped, for the save at shutdown.
    final_retained: Mutex<Vec<Option<Vec<store::RetainedFrame>>>>,
    /// Reactors that, draining, stopped reading and sent every publish they had read: once all
    /// have, no publish is on its way anywhere but in an inbox.
    drain_quiesced: AtomicUsize,
    /// Draining reactors with nothing in their inbox or outgoing queues (`Reactor::drain`).
    drain_settled: AtomicUsize,
    /// Where the Prometheus endpoint listens, once it does: the stats document names it.
    metrics_addr: std::sync::OnceLock<SocketAddr>,
}

/// Reads one counter of a shard, for the stats document.
type StatField = fn(&ShardStats) -> u64;

impl EngineShared {
    /// The state of an engine of `n_shards` reactors, with no mailboxes: `Engine::start` sets
    /// them (tests of a core need none).
    pub fn new(n_shards: usize, config: &Config) -> EngineShared {
        EngineShared {
            open_connections: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            shards: (0..n_shards).map(|_| ShardStats::default()).collect(),
            started_unix_ns: now_unix_ns(),
            engine_id: now_unix_ns() ^ (u64::from(std::process::id()) << 40),
            metrics: crate::metrics::MetricsBoard::new(n_shards, &config.metrics),
            clients: clients::ClientSessions::new(
                std::time::Duration::from_secs(config.limits.client_session_expiry_s),
                config.limits.max_connections,
            ),
            owners: owners::OwnerTable::new(n_shards as u16, config.limits.max_topics),
            mqtt_sessions: mqtt_sessions::MqttSessions::new(
                std::time::Duration::from_secs(config.limits.client_session_expiry_s),
                config.limits.max_connections,
            ),
            auth: crate::auth::Authenticator::new(&config.auth),
            sources: std::sync::Mutex::new(limits::SourceLimits::new(
                config.limits.max_connections_per_address,
            )),
            durable: durable::DurableSessions::new(
                std::time::Duration::from_secs(config.limits.client_session_expiry_s),
                config.limits.max_durable_sessions,
                config.limits.max_durable_session_bytes,
            ),
            mailboxes: Vec::new(),
            shutting_down: AtomicBool::new(false),
            reactor_failures: AtomicU64::new(0),
            restored: Mutex::new(Vec::new()),
            final_retained: Mutex::new((0..n_shards).map(|_| None).collect()),
            drain_quiesced: AtomicUsize::new(0),
            drain_settled: AtomicUsize::new(0),
            metrics_addr: std::sync::OnceLock::new(),
        }
    }

    /// Shard `id`'s retained values from the snapshot file (once; empty after).
    pub(crate) fn take_restored(&self, id: u16) -> Vec<store::RetainedFrame> {
        let mut restored = self.restored.lock().unwrap_or_else(|e| e.into_inner());
        restored
            .get_mut(id as usize)
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// A reactor's retained values as it stops, for the final save.
    pub(crate) fn handle_final_retained(&self, id: u16, frames: Vec<store::RetainedFrame>) {
        let mut finals = self
            .final_retained
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = finals.get_mut(id as usize) {
            *slot = Some(frames);
        }
    }

    /// Whether the engine is shutting down: one atomic load.
    ///
    /// **A reactor must read this once per loop turn** (at the top of the turn will do) and,
    /// when it is set, close its connections and return `Ok(())`: a request can come without a
    /// `ShardMsg::Shutdown`, when the reactor's inbox had no room for one. A reactor does not
    /// sleep through a request it has not read yet: every request leaves its inbox non-empty
    /// (the message, or the messages that filled it), so its arm-then-check-empty before
    /// sleeping (`notify.rs`) keeps it awake.
    pub(crate) fn shutdown_requested(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Asks every reactor to close its connections and exit. Never blocks; only the first call
    /// does anything.
    ///
    /// Sets the flag that [`Self::shutdown_requested`] reads, then wakes every reactor, queuing
    /// a `ShardMsg::Shutdown` for each whose inbox has room (the flag is stored before the wake,
    /// the order the notifier protocol in `notify.rs` needs). A reactor that only obeys the
    /// message still gets it when its inbox was full: a short-lived thread waits for room and
    /// ends once it has sent, or once the reactor is gone.
    pub(crate) fn request_shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut full = Vec::new();
        for mailbox in &self.mailboxes {
            match mailbox.try_send(ShardMsg::Shutdown) {
                // The send has woken it.
                Ok(()) => {}
                // Gone, as far as its inbox goes; woken all the same, as the contract says.
                Err(TrySendError::Disconnected(_)) => mailbox.wake(),
                Err(TrySendError::Full(_)) => {
                    mailbox.wake();
                    full.push(mailbox.clone());
                }
            }
        }
        if full.is_empty() {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("lanpush-shutdown".into())
            .spawn(move || {
                for mailbox in full {
                    // `Err` means the reactor has exited: nothing left to tell it.
                    let _ = mailbox.send(ShardMsg::Shutdown);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(
                error = %e,
                "cannot start a thread to deliver the shutdown to a reactor with a full inbox; \
                 it stops when it next sees the shutdown flag"
            );
        }
    }

    /// The stats document: totals, one object per reactor, the `connections` given (collected
    /// from the reactors on demand, `stats.rs`; `partial` if some did not answer) and the
    /// merged latency histograms.
    pub fn stats_document(
        &self,
        connections: Vec<serde_json::Value>,
        partial: bool,
    ) -> serde_json::Value {
        let fields: &[(&str, StatField)] = &[
            ("connections", |s| {
                s.connections.load(Ordering::Relaxed) as u64
            }),
            ("subscriptions", |s| {
                s.subscriptions.load(Ordering::Relaxed) as u64
            }),
            ("topics", |s| s.topics_owned.load(Ordering::Relaxed) as u64),
            ("accepted", |s| s.accepted.load(Ordering::Relaxed)),
            ("publishes_in", |s| s.publishes_in.load(Ordering::Relaxed)),
            ("delivered", |s| s.delivered.load(Ordering::Relaxed)),
            ("replayed", |s| s.replayed.load(Ordering::Relaxed)),
            ("gaps", |s| s.gaps.load(Ordering::Relaxed)),
            ("lagged", |s| s.lagged.load(Ordering::Relaxed)),
            ("bytes_written", |s| s.bytes_written.load(Ordering::Relaxed)),
            ("writes", |s| s.writes.load(Ordering::Relaxed)),
            ("conflated", |s| s.conflated.load(Ordering::Relaxed)),
            ("slow_disconnects", |s| {
                s.slow_disconnects.load(Ordering::Relaxed)
            }),
            ("protocol_errors", |s| {
                s.protocol_errors.load(Ordering::Relaxed)
            }),
            ("requests_refused", |s| {
                s.requests_refused.load(Ordering::Relaxed)
            }),
            ("shutdown_closes", |s| {
                s.shutdown_closes.load(Ordering::Relaxed)
            }),
            ("io_errors", |s| s.io_errors.load(Ordering::Relaxed)),
            ("tls_failures", |s| s.tls_failures.load(Ordering::Relaxed)),
            ("keepalive_timeouts", |s| {
                s.keepalive_timeouts.load(Ordering::Relaxed)
            }),
            ("handshake_timeouts", |s| {
                s.handshake_timeouts.load(Ordering::Relaxed)
            }),
            ("ring_bytes", |s| {
                s.ring_bytes.load(Ordering::Relaxed) as u64
            }),
            ("retained_bytes", |s| {
                s.retained_bytes.load(Ordering::Relaxed) as u64
            }),
            ("retained_evicted", |s| {
                s.retained_evicted.load(Ordering::Relaxed)
            }),
            ("frames_to_peers", |s| {
                s.frames_to_peers.load(Ordering::Relaxed)
            }),
            ("topics_refused", |s| {
                s.topics_refused.load(Ordering::Relaxed)
            }),
            ("throttled_turns", |s| {
                s.throttled_turns.load(Ordering::Relaxed)
            }),
            ("auth_failures", |s| s.auth_failures.load(Ordering::Relaxed)),
            ("acl_denied", |s| s.acl_denied.load(Ordering::Relaxed)),
            ("acl_filtered", |s| s.acl_filtered.load(Ordering::Relaxed)),
            ("id_conflicts", |s| s.id_conflicts.load(Ordering::Relaxed)),
            ("id_takeovers", |s| s.id_takeovers.load(Ordering::Relaxed)),
            ("rate_limited", |s| s.rate_limited.load(Ordering::Relaxed)),
            ("subscriptions_refused", |s| {
                s.subscriptions_refused.load(Ordering::Relaxed)
            }),
            ("topic_limit", |s| s.topic_limit.load(Ordering::Relaxed)),
            ("address_refused", |s| {
                s.address_refused.load(Ordering::Relaxed)
            }),
            ("publishers_paused", |s| {
                s.publishers_paused.load(Ordering::Relaxed)
            }),
            ("pace_releases", |s| s.pace_releases.load(Ordering::Relaxed)),
            ("acks_sent", |s| s.acks_sent.load(Ordering::Relaxed)),
            ("publish_duplicates", |s| {
                s.publish_duplicates.load(Ordering::Relaxed)
            }),
        ];
        let mut totals = serde_json::Map::new();
        for &(name, get) in fields {
            totals.insert(name.into(), self.shards.iter().map(get).sum::<u64>().into());
        }
        totals.insert(
            "reactor_failures".into(),
            self.reactor_failures.load(Ordering::Relaxed).into(),
        );
        let shards: Vec<serde_json::Value> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut m = serde_json::Map::new();
                m.insert("reactor".into(), i.into());
                for &(name, get) in fields {
                    m.insert(name.into(), get(s).into());
                }
                m.into()
            })
            .collect();
        let durable = self.durable.counts();
        let mut doc = serde_json::json!({
            "engine_version": env!("CARGO_PKG_VERSION"),
            "engine_id": format!("{:016x}", self.engine_id),
            "uptime_ms": now_unix_ns().saturating_sub(self.started_unix_ns) / 1_000_000,
            "open_connections": self.open_connections.load(Ordering::Relaxed),
            "client_ids": self.clients.len(),
            "durable_sessions": durable.sessions,
            "durable_sessions_live": durable.live,
            "durable_session_bytes": durable.bytes,
            "totals": totals,
            "reactors": shards,
            "connections": connections,
            "latency": self.metrics.merged().to_json(),
        });
        if partial {
            doc["partial"] = true.into();
        }
        if let Some(channels) = self.multicast_stats() {
            doc["multicast"] = channels;
        }
        if let Some(addr) = self.metrics_addr.get() {
            doc["metrics_url"] = format!("http://{addr}/metrics").into();
        }
        doc
    }
}

impl EngineShared {
    /// Per channel, summed over the reactors (each sends its own stream): `None` when no
    /// channel is configured.
    fn multicast_stats(&self) -> Option<serde_json::Value> {
        let mut sums: Vec<Vec<(&'static str, u64)>> = Vec::new();
        for shard in &self.shards {
            let Ok(channels) = shard.mcast.lock() else {
                continue;
            };
            for (i, c) in channels.iter().enumerate() {
                if sums.len() <= i {
                    sums.push(c.fields().iter().map(|&(k, _)| (k, 0)).collect());
                }
                for (sum, (_, v)) in sums[i].iter_mut().zip(c.fields()) {
                    sum.1 += v;
                }
            }
        }
        if sums.is_empty() {
            return None;
        }
        Some(
            sums.into_iter()
                .enumerate()
                .map(|(i, fields)| {
                    let mut m = serde_json::Map::new();
                    m.insert("channel".into(), i.into());
                    for (k, v) in fields {
                        m.insert(k.into(), v.into());
                    }
                    serde_json::Value::Object(m)
                })
                .collect(),
        )
    }
}

/// Nanoseconds since the UNIX epoch: the clock of every timestamp on the wire.
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// A running engine. Dropping it does not stop it; call [`ShutdownHandle::shutdown`] then
/// [`Engine::join`]. If a reactor fails, the engine shuts itself down and `join` says why.
pub struct Engine {
    local_addr: SocketAddr,
    /// The MQTT listener's address, when `mqtt.listen` is set.
    mqtt_addr: Option<SocketAddr>,
    /// The WebSocket listener's address, when `websocket.listen` is set.
    ws_addr: Option<SocketAddr>,
    /// The TLS listeners' addresses, when `tls.listen` / `tls.mqtt_listen` are set.
    tls_addr: Option<SocketAddr>,
    tls_mqtt_addr: Option<SocketAddr>,
    threads: Vec<JoinHandle<Result<(), EngineError>>>,
    /// Ends once every reactor (each holding a sender of STATS jobs) has exited.
    stats_thread: JoinHandle<()>,
    /// The `lanpush-auth` thread (`verifier.rs`); ends with the reactors, as the stats thread.
    verifier_thread: JoinHandle<()>,
    shared: Arc<EngineShared>,
    config: Arc<Config>,
    /// The config in force, changed by [`ReloadHandle::reload`].
    current: Arc<Mutex<Arc<Config>>>,
    persist: Option<Persister>,
}

/// The `lanpush-persist` thread (`persist.rs`) and where it writes.
struct Persister {
    path: std::path::PathBuf,
    stop: crossbeam_channel::Sender<()>,
    thread: JoinHandle<()>,
}

impl Engine {
    /// Binds the listener and starts the reactor threads.
    pub fn start(config: Config) -> Result<Engine, EngineError> {
        let n = config.reactor_threads();
        if n == 0 || n > MAX_SHARDS {
            return Err(EngineError::Threads(n));
        }
        let addr = config.server.listen;
        let listener =
            bind_listener(addr).map_err(|source| EngineError::Listen { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| EngineError::Listen { addr, source })?;
        let mqtt_listener = match config.mqtt.listen_addr() {
            None => None,
            Some(addr) => {
                Some(bind_listener(addr).map_err(|source| EngineError::Listen { addr, source })?)
            }
        };
        let mqtt_addr = match &mqtt_listener {
            None => None,
            Some(l) => Some(l.local_addr().map_err(|source| EngineError::Listen {
                addr: config.mqtt.listen_addr().unwrap_or(addr),
                source,
            })?),
        };
        let ws_listener = match config.websocket.listen_addr() {
            None => None,
            Some(addr) => {
                Some(bind_listener(addr).map_err(|source| EngineError::Listen { addr, source })?)
            }
        };
        let ws_addr = match &ws_listener {
            None => None,
            Some(l) => Some(l.local_addr().map_err(|source| EngineError::Listen {
                addr: config.websocket.listen_addr().unwrap_or(addr),
                source,
            })?),
        };
        let bind_optional = |addr: Option<SocketAddr>| match addr {
            None => Ok(None),
            Some(addr) => bind_listener(addr)
                .and_then(|l| {
                    let local = l.local_addr()?;
                    Ok(Some((mio::net::TcpListener::from_std(l), local)))
                })
                .map_err(|source| EngineError::Listen { addr, source }),
        };
        let tls_listener = bind_optional(config.tls.listen_addr())?;
        let tls_mqtt_listener = bind_optional(config.tls.mqtt_listen_addr())?;
        let (tls_addr, tls_mqtt_addr) = (
            tls_listener.as_ref().map(|(_, a)| *a),
            tls_mqtt_listener.as_ref().map(|(_, a)| *a),
        );
        let tls_config = if config.tls.enabled() {
            Some(crate::tls::server_config(&config.tls)?)
        } else {
            None
        };
        let mut tls_listener = tls_listener.map(|(l, _)| l);
        let mut tls_mqtt_listener = tls_mqtt_listener.map(|(l, _)| l);
        let config = Arc::new(config);

        let mut polls = Vec::with_capacity(n);
        let mut mailboxes = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for id in 0..n {
            let setup = |source| EngineError::Setup { id, source };
            let poll = Poll::new().map_err(setup)?;
            let waker = mio::Waker::new(poll.registry(), WAKER_TOKEN).map_err(setup)?;
            let notifier = Arc::new(Notifier::new(waker));
            let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
            mailboxes.push(Mailbox::new(tx, notifier.clone()));
            inboxes.push(Inbox { rx, notifier });
            polls.push(poll);
        }
        let shared = Arc::new(EngineShared {
            mailboxes: mailboxes.clone(),
            ..EngineShared::new(n, &config)
        });
        if let Some(path) = config.retained.persist_file() {
            let restored = persist::restore_at_start(&path, &shared, &config);
            *shared.restored.lock().unwrap_or_else(|e| e.into_inner()) = restored;
        }
        let cores = if config.server.pin_threads {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let (stats_jobs, stats_rx) = crossbeam_channel::bounded(stats::STATS_QUEUE);
        let stats_thread = stats::spawn(
            shared.clone(),
            mailboxes.clone(),
            stats_rx,
            config.limits.max_frame_bytes,
        )
        .map_err(EngineError::Thread)?;
        let (verify_jobs, verify_rx) =
            crossbeam_channel::bounded(verifier::queue_capacity(&config, n));
        let verifier_thread = verifier::spawn(shared.clone(), mailboxes.clone(), verify_rx)
            .map_err(EngineError::Thread)?;
        let mut listener = Some(mio::net::TcpListener::from_std(listener));
        let mut mqtt_listener = mqtt_listener.map(mio::net::TcpListener::from_std);
        let mut ws_listener = ws_listener.map(mio::net::TcpListener::from_std);
        let mut threads = Vec::with_capacity(n);
        for (id, (poll, inbox)) in polls.into_iter().zip(inboxes).enumerate() {
            let started = Reactor::new(
                id as u16,
                n as u16,
                config.clone(),
                shared.clone(),
                poll,
                if id == 0 { listener.take() } else { None },
                if id == 0 { mqtt_listener.take() } else { None },
                if id == 0 { ws_listener.take() } else { None },
                reactor::TlsSetup {
                    listener: if id == 0 { tls_listener.take() } else { None },
                    mqtt_listener: if id == 0 {
                        tls_mqtt_listener.take()
                    } else {
                        None
                    },
                    config: tls_config.clone(),
                },
                inbox,
                mailboxes.clone(),
                stats_jobs.clone(),
                verify_jobs.clone(),
            )
            .map_err(|source| EngineError::Setup { id, source })
            .and_then(|reactor| {
                let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
                spawn_reactor(id, core, shared.clone(), move || reactor.run())
            });
            match started {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    // The reactors already running would otherwise serve on with no handle.
                    shared.request_shutdown();
                    return Err(e);
                }
            }
        }
        drop(stats_jobs);
        drop(verify_jobs);
        let persist = match config.retained.persist_file() {
            None => None,
            Some(path) => {
                let (stop, stopped) = crossbeam_channel::bounded(1);
                let spawned = persist::spawn(
                    path.clone(),
                    Duration::from_millis(config.retained.persist_interval_ms),
                    config.retained.max_bytes,
                    mailboxes.clone(),
                    stopped,
                );
                match spawned {
                    Ok(thread) => Some(Persister { path, stop, thread }),
                    Err(e) => {
                        shared.request_shutdown();
                        return Err(EngineError::Thread(e));
                    }
                }
            }
        };
        Ok(Engine {
            local_addr,
            mqtt_addr,
            ws_addr,
            tls_addr,
            tls_mqtt_addr,
            threads,
            stats_thread,
            verifier_thread,
            shared,
            current: Arc::new(Mutex::new(config.clone())),
            config,
            persist,
        })
    }

    /// A cloneable handle that applies a re-read config (SIGHUP) to the running engine.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            shared: self.shared.clone(),
            current: self.current.clone(),
        }
    }

    /// The address the listener is bound to (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The MQTT listener's address (the real port when the config asked for port 0), when
    /// `mqtt.listen` is set.
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The native TLS listener's address (the real port when configured with port 0), when
    /// `tls.listen` is set.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls_addr
    }

    /// The MQTT-over-TLS listener's address, when `tls.mqtt_listen` is set.
    pub fn tls_mqtt_addr(&self) -> Option<SocketAddr> {
        self.tls_mqtt_addr
    }

    /// The WebSocket listener's address (the real port when the config asked for port 0), when
    /// `websocket.listen` is set.
    pub fn ws_addr(&self) -> Option<SocketAddr> {
        self.ws_addr
    }

    /// Reactor threads running.
    pub fn reactor_count(&self) -> usize {
        self.shared.mailboxes.len()
    }

    /// An in-process publisher: no socket, the lock-free queue path into the reactors. Give
    /// each publishing thread its own (see [`LocalPublisher`]).
    pub fn publisher(&self) -> LocalPublisher {
        LocalPublisher::new(self.config.clone(), self.shared.clone())
    }

    /// A cloneable handle that can stop the engine from another thread (e.g. a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: self.shared.clone(),
        }
    }

    /// Starts the HTTP endpoint (GET /metrics in the Prometheus format, GET /stats) when
    /// `metrics.prometheus_listen` is set. The server stops when the returned value is dropped.
    pub fn start_metrics_server(&self) -> std::io::Result<Option<crate::metrics::MetricsServer>> {
        let Some(addr) = self.config.metrics.prometheus_addr() else {
            return Ok(None);
        };
        let shared = Arc::clone(&self.shared);
        let server = if self.config.auth.anonymous {
            crate::metrics::MetricsServer::start_with_live_page(addr, self.ws_addr, move || {
                let stats = stats::collect(&shared, &shared.mailboxes);
                (shared.metrics.merged(), stats)
            })?
        } else {
            // Not anonymous: the endpoint asks for credentials too (http_auth.rs).
            let auth = http_auth::http_auth(shared.clone(), &self.config);
            crate::metrics::MetricsServer::start_authenticated(
                addr,
                self.ws_addr,
                move |viewer| {
                    let stats = stats::collect(&shared, &shared.mailboxes);
                    let snapshot = shared.metrics.merged();
                    match viewer {
                        None => (snapshot, stats),
                        Some(viewer) => (
                            http_auth::scoped_snapshot(snapshot, viewer),
                            stats::scoped(&stats, viewer, 0),
                        ),
                    }
                },
                auth,
            )?
        };
        let _ = self.shared.metrics_addr.set(server.local_addr());
        Ok(Some(server))
    }

    /// Engine counters, as `lanpush stats` shows them (a JSON document).
    /// Collected from the reactors on demand: blocks the calling thread (never a reactor) for at
    /// most a couple of seconds.
    pub fn stats_json(&self) -> String {
        stats::collect(&self.shared, &self.shared.mailboxes).to_string()
    }

    /// Waits for every reactor thread to finish: after a shutdown, or after one reactor failed
    /// (which shuts the others down). `Err` is the failure of the lowest-numbered reactor that
    /// failed; each failure was also logged on stderr, and counted, when it happened.
    pub fn join(self) -> Result<(), EngineError> {
        let mut first_failure = None;
        for (id, thread) in self.threads.into_iter().enumerate() {
            // `reactor_thread_body` catches the reactor's panics; one here came from its
            // bookkeeping after the catch (the stderr line), when the failure was already
            // counted and the shutdown asked for.
            let result = thread.join().unwrap_or_else(|payload| {
                Err(EngineError::Panicked {
                    id,
                    message: panic_message(payload.as_ref()),
                })
            });
            if let Err(e) = result {
                first_failure.get_or_insert(e);
            }
        }
        // The reactors are gone, and with them every sender of STATS jobs.
        if let Err(payload) = self.stats_thread.join() {
            first_failure.get_or_insert(EngineError::StatsPanicked {
                message: panic_message(payload.as_ref()),
            });
        }
        // And with them every sender of verification jobs.
        if let Err(payload) = self.verifier_thread.join() {
            first_failure.get_or_insert(EngineError::VerifierPanicked {
                message: panic_message(payload.as_ref()),
            });
        }
        if let Some(persister) = self.persist {
            // The last save, from what each reactor held after its drain; if one left nothing
            // (it failed), the last periodic file is kept rather than written without its
            // topics.
            let _ = persister.stop.send(());
            let _ = persister.thread.join();
            let finals = std::mem::take(
                &mut *self
                    .shared
                    .final_retained
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()),
            );
            match finals.into_iter().collect::<Option<Vec<_>>>() {
                Some(frames) => persist::write_values(
                    &persister.path,
                    &frames,
                    self.config.retained.max_bytes,
                    true,
                ),
                None => tracing::warn!(
                    path = %persister.path.display(),
                    "a reactor stopped without handing over its retained values: the last \
                     periodic snapshot file is kept"
                ),
            }
        }
        first_failure.map_or(Ok(()), Err)
    }
}

/// Starts reactor `id`'s thread, pinned to `core` if given, running `run` under
/// [`reactor_thread_body`].
fn spawn_reactor(
    id: usize,
    core: Option<core_affinity::CoreId>,
    shared: Arc<EngineShared>,
    run: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> Result<JoinHandle<Result<(), EngineError>>, EngineError> {
    std::thread::Builder::new()
        .name(format!("lanpush-reactor-{id}"))
        .spawn(move || {
            let pinned_run = move || {
                if let Some(core) = core {
                    core_affinity::set_for_current(core);
                }
                run()
            };
            reactor_thread_body(pinned_run, id, &shared)
        })
        .map_err(EngineError::Thread)
}

/// Runs reactor `id`'s loop and makes any end but an asked-for one loud: an error, a panic, or
/// a return before [`EngineShared::shutdown_requested`]. Such an end is logged on stderr with
/// the reactor and the cause, counted in `reactor_failures`, shuts the other reactors down (the
/// engine must not limp on with a reactor whose connections and topics are gone) and is
/// returned, for [`Engine::join`].
fn reactor_thread_body(
    run: impl FnOnce() -> io::Result<()>,
    id: usize,
    shared: &EngineShared,
) -> Result<(), EngineError> {
    // Unwind safety: after a panic nothing the closure owned is used again (the reactor is
    // dropped while unwinding), and what it shares with other threads is atomics and mutexes
    // whose every user already tolerates a poisoned lock.
    let failure = match panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(())) if shared.shutdown_requested() => return Ok(()),
        Ok(Ok(())) => EngineError::Stopped { id },
        Ok(Err(source)) => EngineError::Reactor { id, source },
        Err(payload) => EngineError::Panicked {
            id,
            message: panic_message(payload.as_ref()),
        },
    };
    shared.reactor_failures.fetch_add(1, Ordering::Relaxed);
    shared.request_shutdown();
    tracing::error!(reactor = id, error = %failure, "reactor failed: shutting the engine down");
    Err(failure)
}

/// The message of a panic, from its payload (`panic!` makes a `&str` or a `String`).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".into()
    }
}

/// Stops the engine: every reactor sends ERROR "shutting down" to its connections, closes them,
/// and exits.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<EngineShared>,
}

impl ShutdownHandle {
    /// Asks every reactor to close its connections and exit. Returns at once: it sets a flag
    /// and wakes the reactors, and never waits for room in a full inbox.
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }
}

/// Applies a re-read configuration to the running engine (SIGHUP).
#[derive(Clone)]
pub struct ReloadHandle {
    shared: Arc<EngineShared>,
    current: Arc<Mutex<Arc<Config>>>,
}

impl ReloadHandle {
    /// Hands every reactor the run-time keys of `new` that differ from the config in force
    /// ([`Config::reload_plan`]) and returns the plan: what was applied, and the changed keys
    /// that need a restart (left as they are). Blocks at most a second per reactor whose inbox
    /// is full; such a reactor keeps its old values (`applied` is then not true for it, and
    /// the `Err` says so).
    pub fn reload(&self, new: &Config) -> Result<crate::config::ReloadPlan, ReloadError> {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let plan = current.reload_plan(new);
        if plan.applied.is_empty() {
            return Ok(plan);
        }
        let config = Arc::new(plan.config.clone());
        let mut missed = 0;
        for mailbox in &self.shared.mailboxes {
            if mailbox
                .send_timeout(ShardMsg::Reload(config.clone()), Duration::from_secs(1))
                .is_err()
            {
                missed += 1;
            }
        }
        *current = config;
        if missed > 0 {
            return Err(ReloadError::Missed { reactors: missed });
        }
        Ok(plan)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{reactors} reactor(s) could not take the new configuration (inbox full or gone)")]
    Missed { reactors: usize },
}

/// Publishes from inside the engine's process: the message goes straight into its topic's owner
/// shard's queue. Never blocks on subscribers.
///
/// `Send` but not `Sync`: give each publishing thread its own clone. Each publisher keeps its
/// own cache of topic owners (`owners::OwnerCache`, in a `RefCell`), so only the first publish
/// of a topic through it asks the engine-wide owner table, which is a mutex; every later one
/// takes no lock (ownership never changes, so a cached owner never goes stale). The trade-off,
/// against a lock-free table shared by every publisher: one cache entry per topic per publisher
/// and one locked look-up per topic per clone (a clone starts with an empty cache), for a data
/// path with no lock, no atomic read-modify-write and no new dependency.
pub struct LocalPublisher {
    config: Arc<Config>,
    shared: Arc<EngineShared>,
    owners: RefCell<owners::OwnerCache>,
}

impl Clone for LocalPublisher {
    fn clone(&self) -> Self {
        LocalPublisher::new(self.config.clone(), self.shared.clone())
    }
}

impl LocalPublisher {
    fn new(config: Arc<Config>, shared: Arc<EngineShared>) -> LocalPublisher {
        LocalPublisher {
            config,
            shared,
            owners: RefCell::default(),
        }
    }

    /// Publishes one message. `Err(Overloaded)` if the owner shard is too far behind to take it
    /// (the engine sheds rather than queue without bound); `Err(ShutDown)` once the engine is
    /// shutting down.
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        quality: u8,
        source_ts_ns: u64,
    ) -> Result<(), PublishError> {
        if self.shared.shutdown_requested() {
            return Err(PublishError::ShutDown);
        }
        proto::validate_topic(topic, self.config.limits.max_topic_bytes).map_err(|source| {
            PublishError::Topic {
                topic: topic.to_string(),
                source,
            }
        })?;
        // The DATA frame subscribers get obeys the frame limit, as for a socket publisher.
        if core::data_frame_len(topic.len(), payload.len()) > self.config.limits.max_frame_bytes {
            return Err(PublishError::TooLarge { len: payload.len() });
        }
        let mut buf = Vec::with_capacity(
            8 + proto::FRAME_HEADER_BYTES
                + proto::PUBLISH_FIXED_BYTES
                + topic.len()
                + payload.len(),
        );
        buf.extend_from_slice(&now_unix_ns().to_le_bytes());
        proto::encode_publish(
            &mut buf,
            &PublishRef {
                topic,
                source_ts_ns,
                quality,
                payload,
            },
        );
        // The cache is borrowed only here, for one look-up that calls no code of the caller's,
        // and the type is not `Sync`: no other borrow can overlap this one.
        let owner = self
            .owners
            .borrow_mut()
            .for_local_publish(&self.shared.owners, topic)
            .ok_or_else(|| PublishError::TooManyTopics {
                topic: topic.to_string(),
            })? as usize;
        self.shared.mailboxes[owner]
            .try_send(ShardMsg::Core(core::CoreMsg::Publish(buf)))
            .map_err(|e| match e {
                TrySendError::Full(_) => PublishError::Overloaded,
                TrySendError::Disconnected(_) => PublishError::ShutDown,
            })
    }
}

fn bind_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests;
