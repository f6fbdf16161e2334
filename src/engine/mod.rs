//! The engine: reactor threads ("shards"), the hand-off between them, and the handle an
//! embedding process holds.
//!
//! `Engine::start` binds one listening socket (socket2), starts N shard threads (each pinned to a
//! core when `server.pin_threads` is on) and returns. Shard 0 also accepts connections and deals
//! them round-robin to the shards, so every shard gets an even share of long-lived connections
//! (the kernel's SO_REUSEPORT hash can leave one shard with most of a handful of connections).
//! Everything after accept lives in `shard.rs`.

mod core;
#[cfg(test)]
mod core_tests;
#[cfg(test)]
mod harness;
mod native;
mod notify;
pub mod outbox;
mod owners;
mod reactor;
mod session;
mod stats;
mod store;
mod timer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use mio::Poll;

use crate::config::Config;
use crate::proto::{self, PublishRef};
use notify::{Inbox, Mailbox, Notifier};
use reactor::{Reactor, ShardMsg, WAKER_TOKEN};

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
    Thread(std::io::Error),
    #[error("threads = {0}: the engine runs 1 ..= {MAX_SHARDS} reactor threads")]
    Threads(usize),
    #[error("a reactor thread failed: {0}")]
    Reactor(std::io::Error),
    #[error("a reactor thread panicked")]
    Panicked,
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
    #[error("the engine is overloaded: the owner shard's inbox is full")]
    Overloaded,
    #[error("the engine has shut down")]
    ShutDown,
}

/// Counters one shard publishes once per loop turn; read by STATS from any thread.
#[derive(Default)]
pub(crate) struct ShardStats {
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
    pub ring_bytes: AtomicUsize,
    pub throttled_turns: AtomicU64,
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
    /// HELLOs seen per client id: a client's reconnects are its count minus one. Touched once
    /// per connection, never on the data path.
    pub sessions: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Which shard owns each topic (`owners.rs`).
    pub owners: owners::OwnerTable,
}

/// Reads one counter of a shard, for the stats document.
type StatField = fn(&ShardStats) -> u64;

impl EngineShared {
    pub fn new(n_shards: usize, config: &Config) -> EngineShared {
        EngineShared {
            open_connections: AtomicUsize::new(0),
            next_conn_id: AtomicU64::new(1),
            shards: (0..n_shards).map(|_| ShardStats::default()).collect(),
            started_unix_ns: now_unix_ns(),
            engine_id: now_unix_ns() ^ (u64::from(std::process::id()) << 40),
            metrics: crate::metrics::MetricsBoard::new(n_shards, &config.metrics),
            sessions: Default::default(),
            owners: owners::OwnerTable::new(n_shards as u16),
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
        let fields: [(&str, StatField); 21] = [
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
            ("keepalive_timeouts", |s| {
                s.keepalive_timeouts.load(Ordering::Relaxed)
            }),
            ("handshake_timeouts", |s| {
                s.handshake_timeouts.load(Ordering::Relaxed)
            }),
            ("ring_bytes", |s| {
                s.ring_bytes.load(Ordering::Relaxed) as u64
            }),
            ("throttled_turns", |s| {
                s.throttled_turns.load(Ordering::Relaxed)
            }),
        ];
        let mut totals = serde_json::Map::new();
        for (name, get) in fields {
            totals.insert(name.into(), self.shards.iter().map(get).sum::<u64>().into());
        }
        let shards: Vec<serde_json::Value> = self
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut m = serde_json::Map::new();
                m.insert("reactor".into(), i.into());
                for (name, get) in fields {
                    m.insert(name.into(), get(s).into());
                }
                m.into()
            })
            .collect();
        let mut doc = serde_json::json!({
            "uptime_ms": now_unix_ns().saturating_sub(self.started_unix_ns) / 1_000_000,
            "open_connections": self.open_connections.load(Ordering::Relaxed),
            "totals": totals,
            "reactors": shards,
            "connections": connections,
            "latency": self.metrics.merged().to_json(),
        });
        if partial {
            doc["partial"] = true.into();
        }
        doc
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
/// [`Engine::join`].
pub struct Engine {
    local_addr: SocketAddr,
    mailboxes: Vec<Mailbox<ShardMsg>>,
    threads: Vec<JoinHandle<std::io::Result<()>>>,
    /// Ends once every reactor (each holding a sender of STATS jobs) has exited.
    stats_thread: JoinHandle<()>,
    shared: Arc<EngineShared>,
    config: Arc<Config>,
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
        let config = Arc::new(config);
        let shared = Arc::new(EngineShared::new(n, &config));

        let mut polls = Vec::with_capacity(n);
        let mut mailboxes = Vec::with_capacity(n);
        let mut inboxes = Vec::with_capacity(n);
        for _ in 0..n {
            let poll = Poll::new().map_err(EngineError::Reactor)?;
            let waker =
                mio::Waker::new(poll.registry(), WAKER_TOKEN).map_err(EngineError::Reactor)?;
            let notifier = Arc::new(Notifier::new(waker));
            let (tx, rx) = crossbeam_channel::bounded(INBOX_CAPACITY);
            mailboxes.push(Mailbox::new(tx, notifier.clone()));
            inboxes.push(Inbox { rx, notifier });
            polls.push(poll);
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
        let mut listener = Some(mio::net::TcpListener::from_std(listener));
        let mut threads = Vec::with_capacity(n);
        for (id, (poll, inbox)) in polls.into_iter().zip(inboxes).enumerate() {
            let reactor = Reactor::new(
                id as u16,
                n as u16,
                config.clone(),
                shared.clone(),
                poll,
                if id == 0 { listener.take() } else { None },
                inbox,
                mailboxes.clone(),
                stats_jobs.clone(),
            )
            .map_err(EngineError::Reactor)?;
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let thread = std::thread::Builder::new()
                .name(format!("lanpush-reactor-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    reactor.run()
                })
                .map_err(EngineError::Thread)?;
            threads.push(thread);
        }
        drop(stats_jobs);
        Ok(Engine {
            local_addr,
            mailboxes,
            threads,
            stats_thread,
            shared,
            config,
        })
    }

    /// The address the listener is bound to (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Reactor threads running.
    pub fn reactor_count(&self) -> usize {
        self.mailboxes.len()
    }

    /// An in-process publisher: no socket, the lock-free queue path into the reactors.
    pub fn publisher(&self) -> LocalPublisher {
        LocalPublisher {
            mailboxes: self.mailboxes.clone(),
            config: self.config.clone(),
            shared: self.shared.clone(),
        }
    }

    /// A cloneable handle that can stop the engine from another thread (e.g. a signal handler).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            mailboxes: self.mailboxes.clone(),
        }
    }

    /// Starts the HTTP endpoint (GET /metrics in the Prometheus format, GET /stats) when
    /// `metrics.prometheus_listen` is set. The server stops when the returned value is dropped.
    pub fn start_metrics_server(&self) -> std::io::Result<Option<crate::metrics::MetricsServer>> {
        let Some(addr) = self.config.metrics.prometheus_addr() else {
            return Ok(None);
        };
        let shared = Arc::clone(&self.shared);
        let mailboxes = self.mailboxes.clone();
        crate::metrics::MetricsServer::start(addr, move || {
            let stats = stats::collect(&shared, &mailboxes);
            (shared.metrics.merged(), stats)
        })
        .map(Some)
    }

    /// Engine counters, as `lanpush stats` shows them (a JSON document).
    /// Collected from the reactors on demand: blocks the calling thread (never a reactor) for at
    /// most a couple of seconds.
    pub fn stats_json(&self) -> String {
        stats::collect(&self.shared, &self.mailboxes).to_string()
    }

    /// Waits for every reactor thread to finish (after a shutdown).
    pub fn join(self) -> Result<(), EngineError> {
        drop(self.mailboxes);
        let mut result = Ok(());
        for thread in self.threads {
            match thread.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => result = Err(EngineError::Reactor(e)),
                Err(_) => result = Err(EngineError::Panicked),
            }
        }
        // The reactors are gone, and with them every sender of STATS jobs.
        if self.stats_thread.join().is_err() {
            result = Err(EngineError::Panicked);
        }
        result
    }
}

/// Stops the engine: every reactor sends ERROR "shutting down" to its connections, closes them,
/// and exits.
#[derive(Clone)]
pub struct ShutdownHandle {
    mailboxes: Vec<Mailbox<ShardMsg>>,
}

impl ShutdownHandle {
    /// Asks every reactor to close its connections and exit. Returns at once.
    pub fn shutdown(&self) {
        for mailbox in &self.mailboxes {
            let _ = mailbox.send(ShardMsg::Shutdown);
        }
    }
}

/// Publishes from inside the engine's process: the message goes straight into its topic's owner
/// shard's queue. Cloneable and `Send`; never blocks on subscribers.
#[derive(Clone)]
pub struct LocalPublisher {
    mailboxes: Vec<Mailbox<ShardMsg>>,
    config: Arc<Config>,
    shared: Arc<EngineShared>,
}

impl LocalPublisher {
    /// Publishes one message. `Err(Overloaded)` if the owner shard is too far behind to take it
    /// (the engine sheds rather than queue without bound).
    pub fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        quality: u8,
        source_ts_ns: u64,
    ) -> Result<(), PublishError> {
        proto::validate_topic(topic, self.config.limits.max_topic_bytes).map_err(|source| {
            PublishError::Topic {
                topic: topic.to_string(),
                source,
            }
        })?;
        if payload.len() + topic.len() + proto::PUBLISH_FIXED_BYTES + 1
            > self.config.limits.max_frame_bytes
        {
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
        let owner = self.shared.owners.claim_for_local(topic) as usize;
        self.mailboxes[owner]
            .try_send(ShardMsg::Core(core::CoreMsg::Publish(buf)))
            .map_err(|e| match e {
                crossbeam_channel::TrySendError::Full(_) => PublishError::Overloaded,
                crossbeam_channel::TrySendError::Disconnected(_) => PublishError::ShutDown,
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
