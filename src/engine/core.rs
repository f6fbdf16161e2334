//! One shard's push engine as a plain value: the sessions of its connections, its subscription
//! index, the topics it owns (sequence numbers, retained values, replay ring) and the
//! shard-to-shard exchange, all without a socket or a clock.
//!
//! **The run-loop contract** (the reactor in `reactor.rs` is one driver, the test harness in
//! `harness.rs` another):
//! 1. Feed inputs as they come, each with the time `now` the driver read once for its turn:
//!    [`FanoutCore::open_wire`] for a new connection, [`FanoutCore::handle_input`] with the bytes a
//!    connection sent, [`FanoutCore::handle_writable`] when its transport can take bytes again,
//!    [`FanoutCore::handle_closed`] when the peer went away, [`FanoutCore::handle_msg`] for each
//!    message from another shard, [`FanoutCore::handle_timeout`] when
//!    [`FanoutCore::poll_timeout`]'s deadline has passed.
//! 2. Then collect the outputs: [`FanoutCore::flush`] writes every connection with queued
//!    frames through a [`Transport`] (vectored writes from the shared frames, no copy);
//!    [`FanoutCore::poll_closed`] names the connections to drop, [`FanoutCore::poll_stats_request`]
//!    the STATS requests for the stats thread (`stats.rs`); [`FanoutCore::outgoing`] holds
//!    the messages for each peer shard, in order (what a peer cannot take yet stays queued, and
//!    the driver holds back its reads until it can: TCP backpressure to the publishers).
//! 3. Sleep until [`FanoutCore::poll_timeout`], an I/O event or a peer's message.
//!
//! Data path: a PUBLISH read on shard A for topic T goes to T's *owner* (the shard of T's first
//! publisher, `owners.rs`): inline if that is A, else in A's outgoing batch for the owner. The
//! owner assigns the next sequence number, encodes the DATA frame once into a [`SharedFrame`],
//! retains it, queues it to its matching sessions and sends it to every other shard, which
//! queues it to theirs (a reference-count increment per subscriber). Per-topic order holds
//! because a topic has one owner and each shard-to-shard channel is FIFO; snapshot-then-live
//! holds because a subscription ignores an owner's live frames until that owner's snapshot
//! reply, which follows every frame it sent before, has arrived.
//!
//! Connections speak to the core in engine operations ([`Op`]): the native protocol's decoder
//! (`native.rs`) turns frames into them; another wire protocol plugs in the same way.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, IoSlice};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;

use super::audit::AuditKind;
use super::durable;
use super::guard::{quote, ShardGuard};
use super::matches::{LocalSubs, TopicKey};
use super::mqtt_session;
use super::native::{self, Op, Reply};
use super::outbox::SharedFrame;
use super::owners::OwnerCache;
use super::pacing::{PaceBook, Release};
use super::session::{
    DeliveryCounters, Enqueued, Fatal, Lag, Outgoing, Phase, Session, Sub, SubRef, Timeout,
};
use super::store::{Replay, TopicStore};
use super::wire::WireKind;
use super::{EngineShared, ShardStats};
use crate::config::Config;
use crate::log::{Admit, Category, LogLimiter};
use crate::metrics::{data_frame_stamp, ShardMetrics};
use crate::proto::{
    self, data_frame_topic, decode_frame, error_code, hello_features, Decoded, DeliveryMode, Frame,
    PublishRef, SubAck, Subscribe, Welcome, PROTOCOL_VERSION,
};
use crate::topic::TopicIndex;

/// The MQTT connections' side of the core (a child module, so it reaches the core's state).
#[path = "mqtt_core.rs"]
mod mqtt_core;

/// The multicast side of the core (a child module, so it reaches the core's state).
#[path = "mcast_core.rs"]
mod mcast_core;

/// The durable sessions' side of the core (a child module, so it reaches the core's state).
#[path = "durable_core.rs"]
mod durable_core;

/// Password checks off the reactor: the core's side (a child module, so it reaches the core's
/// state).
#[path = "auth_core.rs"]
mod auth_core;
#[cfg(test)]
pub(crate) use auth_core::VerifyRequest;
pub(crate) use auth_core::{PendingHello, Verdict};

/// Publisher acknowledgements' side of the core (a child module, so it reaches the core's state).
#[path = "acks_core.rs"]
mod acks_core;

/// Vectored writes per connection per flush; a connection with more left stays dirty.
pub(crate) const MAX_WRITES_PER_FLUSH: usize = 4;
/// Slices per vectored write (Linux IOV_MAX is 1024), and the smaller array used when few
/// frames are queued.
const MAX_IOVECS: usize = 1024;
const SMALL_IOVECS: usize = 64;
/// Bytes per vectored write.
const MAX_WRITE_BYTES: usize = 512 * 1024;
/// Write coalescing (`delivery.reactor_writes_per_s`) stops waiting once this much is queued for
/// a connection: a write() costs about the same up to this size, so waiting longer gains nothing.
pub(crate) const COALESCE_BYTES: usize = 16 * 1024;
/// How often the write-coalescing interval is recomputed from the connections written.
pub(crate) const TICK: Duration = Duration::from_millis(25);

/// Logs one line of a rate-limited category (`log.rs`): nothing is formatted, and no token
/// spent, when the level is off; a line after dropped ones says how many were dropped.
macro_rules! log_event {
    ($core:expr, $category:expr, $level:ident, $($arg:tt)+) => {
        if tracing::enabled!(tracing::Level::$level) {
            if let Admit::Log { suppressed } = $core.log.admit($category, $core.now) {
                if suppressed == 0 {
                    tracing::event!(tracing::Level::$level, $($arg)+);
                } else {
                    tracing::event!(tracing::Level::$level, suppressed, $($arg)+);
                }
            }
        }
    };
}

/// A connection's peer address in a log line, `-` when unknown.
struct Peer(Option<std::net::SocketAddr>);

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Messages between shards, as values.
#[derive(Debug)]
pub(crate) enum CoreMsg {
    /// PUBLISH frames for topics the receiver owns, each preceded by its ingest time (u64 LE ns).
    Publish(Vec<u8>),
    /// DATA frames from owner shard `from`, in the owner's order, each with its topic's id at
    /// the owner (`store.rs`), the key of the receiver's match cache (`matches.rs`).
    Deliver {
        from: u16,
        frames: Vec<(u32, SharedFrame)>,
    },
    /// Send the retained values matching `pattern` (or, with `resume`, the messages after the
    /// given positions) back to shard `from` for subscription `sub`.
    SnapshotRequest {
        from: u16,
        sub: SubRef,
        pattern: String,
        resume: Option<Arc<HashMap<String, u64>>>,
    },
    /// The answer to a `SnapshotRequest`; every frame `from` sent before it precedes it.
    /// `lagged`: topics the reply's byte budget did not cover, with the seq to continue from.
    SnapshotReply {
        from: u16,
        sub: SubRef,
        frames: Vec<SharedFrame>,
        lagged: Vec<(String, u64)>,
    },
    /// Replay these topics of the receiver's from the given sequence numbers to a connection
    /// that fell behind (mode `all`).
    ReplayRequest {
        from: u16,
        conn: ConnRef,
        topics: Vec<(String, u64)>,
    },
    /// The answer to a `ReplayRequest`: the frames, and per topic `None` (caught up) or the seq
    /// to continue from.
    ReplayReply {
        conn: ConnRef,
        frames: Vec<SharedFrame>,
        topics: Vec<(String, Option<u64>)>,
    },
    /// A newer connection of the same identity took the client id of connection `conn`, which
    /// is closed with CLIENT_ID_IN_USE.
    TakenOver { conn: ConnRef, by: u64 },
    /// Subscription `key` of shard `from` is gone: its pattern no longer draws frames there.
    Unsubscribed {
        from: u16,
        key: u64,
        pattern: String,
    },
    /// The stats thread's answer to a connection's STATS_REQUEST.
    StatsReply { conn: ConnRef, frame: SharedFrame },
    /// Pacing (`pacing.rs`), to every shard: the topic's gate opened, its paused publishers
    /// may be read again.
    Resume { topic: String },
    /// Multicast: shard `stream`'s datagram positions for a receiver's subscription, taken
    /// with the snapshot that follows (`mcast_core.rs`).
    StreamPos {
        sub: SubRef,
        stream: u16,
        positions: Vec<(u16, u64)>,
    },
    /// Multicast: a receiver on shard `from` NAKed datagrams of the receiver's stream.
    Nak {
        from: u16,
        conn: ConnRef,
        nak: proto::Nak,
    },
    /// Multicast: REPAIR / REPAIR_GONE frames for a connection of the receiver.
    Repair {
        conn: ConnRef,
        frames: Vec<SharedFrame>,
    },
    /// The verifier thread's verdict on the HELLO of a connection (`auth_core.rs`).
    Verified { conn: ConnRef, verdict: Verdict },
}

/// A subscription on another shard, in this shard's remote-interest index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RemoteSub {
    peer: u16,
    key: u64,
}

/// A connection on a shard: its slot and its engine-wide id (slots are reused, ids are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnRef {
    pub slot: u32,
    pub id: u64,
}

/// Where the core's writes go: the reactor's sockets, or the test harness's pretend network.
pub(crate) trait Transport {
    /// One vectored write to connection `slot`; `WouldBlock` when it takes nothing now.
    fn write(&mut self, slot: usize, slices: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Shut the write side of `slot` (FIN after a fatal ERROR).
    fn shutdown_write(&mut self, slot: usize);
    /// The wall clock (ns since the UNIX epoch) for the latency of a write just made.
    fn unix_ns(&mut self) -> u64;
}

/// Counters kept as plain integers on the hot path and published once a turn. Each counts one
/// cause; docs/PROTOCOL.md §11 defines them.
#[derive(Default, Clone, Copy, Debug)]
pub(crate) struct Counters {
    pub publishes_in: u64,
    pub delivery: DeliveryCounters,
    pub bytes_written: u64,
    pub writes: u64,
    /// Connections cut because a `disconnect` subscription overflowed or replies went unread.
    pub slow_disconnects: u64,
    /// Connections closed for a malformed or forbidden frame.
    pub protocol_errors: u64,
    /// Requests refused with a non-fatal ERROR (bad topic, unknown subscription, limits),
    /// except new topics past `limits.max_topics`, counted as `topics_refused`.
    pub requests_refused: u64,
    pub topics_refused: u64,
    pub keepalive_timeouts: u64,
    pub handshake_timeouts: u64,
    /// Connections closed with SHUTTING_DOWN.
    pub shutdown_closes: u64,
    /// DATA frames this shard (as owner) sent to other shards: one per interested shard.
    pub frames_to_peers: u64,
    /// Connections closed with UNAUTHENTICATED or CLIENT_ID_IN_USE (each cause has its own
    /// counter in `guard.counters`; this one only keeps them out of `protocol_errors`).
    pub security_closes: u64,
    /// Times a publishing connection stopped being read because a subscriber held its topic.
    pub publishers_paused: u64,
    /// Subscribers released from pacing by the rule (stalled, or behind for too long).
    pub pace_releases: u64,
    /// PUBLISHes of an acknowledged publisher dropped as already taken (`acks.rs`).
    pub publish_duplicates: u64,
    /// ACK frames queued.
    pub acks_sent: u64,
}

pub(crate) struct FanoutCore {
    id: u16,
    n_shards: u16,
    config: Arc<Config>,
    shared: Arc<EngineShared>,
    /// Sessions by connection slot; the driver allocates slots. Boxed: the table keeps its
    /// high-water mark of slots, and a free one costs 8 bytes instead of a `Session` (760),
    /// so memory comes back after a mass disconnect (`trim.rs`).
    sessions: Vec<Option<Box<Session>>>,
    live: usize,
    /// The local subscriptions, with their match cache (`matches.rs`).
    index: LocalSubs<SubRef>,
    store: TopicStore,
    owners: OwnerCache,
    /// Messages for each peer shard, in order.
    outgoing: Vec<Vec<CoreMsg>>,
    dirty: Vec<usize>,
    /// `flush`'s second list, kept empty between flushes: the two swap, so neither loses its
    /// capacity and a flush allocates nothing however many connections it writes.
    spare_dirty: Vec<usize>,
    closed: Vec<usize>,
    /// Session deadlines (time, slot, connection id); stale entries are skipped when popped.
    deadlines: BinaryHeap<Reverse<(Instant, u32, u64)>>,
    matches: Vec<SubRef>,
    /// `deliver`'s copy of a topic name the match cache gave (kept for its capacity).
    topic_name: String,
    scratch: Vec<u8>,
    next_sub_key: u64,
    stamp: u64,
    pub(crate) counters: Counters,
    metrics: ShardMetrics,
    /// Write coalescing: least time between two writes to one connection.
    write_interval: Duration,
    /// Some dirty connection can be written now.
    flush_now: bool,
    /// Earliest moment a dirty connection held back by write coalescing may be written.
    flush_at: Option<Instant>,
    next_tick: Instant,
    tick_started: Instant,
    /// Connections written since `tick_started`: the busy count for the coalescing interval.
    written_this_tick: usize,
    /// The time of the input being handled (every `handle_*` sets it).
    now: Instant,
    /// STATS requests for the stats thread.
    stats_requests: Vec<ConnRef>,
    /// Every other shard's subscriptions (learnt from their snapshot requests): a topic's
    /// frames go only to the shards with a match (cached per topic in the store).
    remote: TopicIndex<RemoteSub>,
    remote_matches: Vec<RemoteSub>,
    /// Bumped at every change of `remote`: cached interest with another epoch is stale.
    interest_epoch: u64,
    /// Authentication budget, audit log and security counters (`guard.rs`).
    pub(crate) guard: ShardGuard,
    /// Pacing: this shard's holders, paused topics and paused connections.
    pace: PaceBook,
    /// Paused connections that may be read again, for the driver.
    resumed: Vec<usize>,
    /// Rate limits of the connection-event log lines.
    log: LogLimiter,
    /// Multicast channels this shard sends its topics on (`mcast_core.rs`); `None`: none
    /// configured.
    mcast: Option<Box<mcast_core::McastShard>>,
    /// Connections with an ACK to send (`acks_core.rs`).
    ack_dirty: Vec<usize>,
    /// argon2 runs for the driver to make off the core (`auth_core.rs`).
    verifications: auth_core::VerifyQueue,
}

impl FanoutCore {
    pub(crate) fn new(
        id: u16,
        n_shards: u16,
        config: Arc<Config>,
        shared: Arc<EngineShared>,
        now: Instant,
    ) -> FanoutCore {
        let mut store = TopicStore::new(
            config.retained.ring_bytes / n_shards as usize,
            config.retained.max_bytes / n_shards as usize,
        );
        for frame in shared.take_restored(id) {
            if let Some(topic) = data_frame_topic(&frame).map(str::to_owned) {
                store.restore(&topic, frame);
            }
        }
        let mcast = mcast_core::McastShard::new(&config, id, shared.engine_id, now).map(Box::new);
        FanoutCore {
            mcast,
            store,
            log: LogLimiter::new(&config.log, now),
            metrics: ShardMetrics::new(&config.metrics),
            id,
            n_shards,
            shared,
            sessions: Vec::new(),
            live: 0,
            index: LocalSubs::default(),
            owners: OwnerCache::default(),
            outgoing: (0..n_shards).map(|_| Vec::new()).collect(),
            dirty: Vec::new(),
            spare_dirty: Vec::new(),
            closed: Vec::new(),
            deadlines: BinaryHeap::new(),
            matches: Vec::new(),
            topic_name: String::new(),
            scratch: Vec::with_capacity(4096),
            next_sub_key: 1,
            stamp: 0,
            counters: Counters::default(),
            write_interval: Duration::ZERO,
            flush_now: false,
            flush_at: None,
            next_tick: now,
            tick_started: now,
            written_this_tick: 0,
            now,
            stats_requests: Vec::new(),
            remote: TopicIndex::new(),
            remote_matches: Vec::new(),
            interest_epoch: 1,
            guard: ShardGuard::new(id, &config, now),
            config,
            pace: PaceBook::new(id),
            resumed: Vec::new(),
            ack_dirty: Vec::new(),
            verifications: auth_core::VerifyQueue::new(),
        }
    }

    pub(crate) fn session(&self, slot: usize) -> Option<&Session> {
        self.sessions.get(slot).and_then(Option::as_deref)
    }

    fn session_mut(&mut self, slot: usize) -> Option<&mut Session> {
        self.sessions.get_mut(slot).and_then(Option::as_deref_mut)
    }

    // ----- inputs -----

    /// A new connection in slot `slot` (free: never used, or named by `poll_closed` since),
    /// speaking `wire` (the listener that accepted it). It must send HELLO (MQTT: CONNECT)
    /// within the handshake time-out.
    pub(crate) fn open_wire(&mut self, now: Instant, slot: usize, conn_id: u64, wire: WireKind) {
        self.now = now;
        let limits = &self.config.limits;
        let delivery = &self.config.delivery;
        let mut session = Session::new(
            conn_id,
            now,
            Duration::from_millis(limits.handshake_timeout_ms),
            Duration::from_millis(self.config.keepalive.default_ms as u64),
            delivery.queue_max_bytes,
            delivery.queue_max_messages,
            delivery.conflate_always,
        );
        if wire == WireKind::Mqtt {
            session.mqtt = Some(self.new_mqtt_state());
        }
        if self.sessions.len() <= slot {
            self.sessions.resize_with(slot + 1, || None);
        }
        debug_assert!(self.sessions[slot].is_none(), "slot {slot} is in use");
        self.sessions[slot] = Some(Box::new(session));
        self.live += 1;
        self.arm(slot);
    }

    /// Before any input of `slot`: it speaks `wire` after all. A WebSocket connection is opened
    /// as native and learns its subprotocol at the upgrade (`ws_link.rs`).
    pub(crate) fn set_wire(&mut self, slot: usize, wire: WireKind) {
        let mqtt = (wire == WireKind::Mqtt).then(|| self.new_mqtt_state());
        if let Some(session) = self.session_mut(slot) {
            session.mqtt = mqtt;
        }
    }

    /// The transport of `slot` can take bytes (again).
    pub(crate) fn handle_writable(&mut self, slot: usize) {
        if let Some(s) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
            s.writable = true;
            mark_dirty(s, slot, &mut self.dirty);
        }
    }

    /// The peer closed the connection or its transport failed: the session ends at once.
    pub(crate) fn handle_closed(&mut self, now: Instant, slot: usize) {
        self.now = now;
        self.close(slot);
    }

    /// Bytes the connection in `slot` sent, from the start of a frame. Handles every whole frame
    /// and returns how many bytes it used; the caller keeps the rest and passes it again with
    /// more. `read_ns` is the wall-clock time the bytes were read: the ingest time of the
    /// messages in them.
    pub(crate) fn handle_input(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        bytes: &[u8],
    ) -> usize {
        self.now = now;
        let max_frame = self.config.limits.max_frame_bytes;
        let Some(session) = self.session_mut(slot) else {
            return bytes.len();
        };
        if session.is_closing() {
            return bytes.len();
        }
        // Paced, or waiting for the verdict on its HELLO: the bytes wait in the driver's buffer.
        if session.paused || session.verifying.is_some() {
            return 0;
        }
        if session.mqtt.is_some() {
            return self.handle_mqtt_input(now, read_ns, slot, bytes);
        }
        // Keep-alive counts whole frames, as MQTT counts control packets: a peer that trickles
        // a frame byte by byte, or starts one and never finishes it, is not heard.
        if frame_complete(bytes, max_frame) {
            session.last_heard = now;
        }
        let mut used = 0;
        loop {
            let result = match decode_frame(&bytes[used..], max_frame) {
                Ok(Decoded::Frame(frame, n)) => {
                    used += n;
                    native::op(frame).and_then(|op| self.handle_op(now, read_ns, slot, op))
                }
                Ok(Decoded::NeedMore(_)) => return used,
                Err(e) => Err(Fatal::new(e.code(), e.to_string())),
            };
            if let Err(fatal) = result {
                self.fail(now, slot, fatal);
                return bytes.len();
            }
            // Delivering its own publish may have cut this connection (mode `disconnect`).
            match self.session(slot) {
                None => return bytes.len(),
                Some(s) if s.is_closing() => return bytes.len(),
                // Paced: the rest waits in the driver's read buffer until the topic resumes.
                Some(s) if s.paused => return used,
                // HELLO parked for its argon2 run: the rest waits for the verdict.
                Some(s) if s.verifying.is_some() => return used,
                Some(_) => {}
            }
        }
    }

    /// One operation from a connection, whatever its wire protocol.
    pub(crate) fn handle_op(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        op: Op<'_>,
    ) -> Result<(), Fatal> {
        let Some(session) = self.session_mut(slot) else {
            return Ok(());
        };
        if let Phase::AwaitHello { .. } = session.phase {
            let Op::Hello {
                version,
                client_id,
                keepalive_ms,
                token,
                features,
            } = op
            else {
                return Err(Fatal::new(
                    error_code::HANDSHAKE,
                    "the first frame must be HELLO",
                ));
            };
            if version != PROTOCOL_VERSION {
                return Err(Fatal::new(
                    error_code::VERSION,
                    format!(
                        "protocol version {version} is not supported (this engine speaks {PROTOCOL_VERSION})"
                    ),
                ));
            }
            return self.handle_hello(now, slot, client_id, keepalive_ms, &token.0, features);
        }
        match op {
            Op::Hello { .. } => Err(Fatal::new(error_code::HANDSHAKE, "HELLO sent twice")),
            Op::Publish(publish) if session.acks.is_some() => {
                self.handle_acked_publish(now, read_ns, slot, publish)
            }
            Op::Publish(publish) => self.handle_publish(now, read_ns, slot, publish),
            Op::AckRequest {
                publisher_id,
                next_seq,
            } => {
                self.handle_ack_request(slot, publisher_id, next_seq);
                Ok(())
            }
            Op::Subscribe(subscribe) => self.handle_subscribe(now, slot, subscribe),
            Op::ChannelsRequest => self.handle_channels_request(slot),
            Op::Nak(nak) => self.handle_nak(slot, nak),
            Op::Unsubscribe { sub_id } => {
                let session = self.session_mut(slot).expect("looked up above");
                match session.remove_sub(sub_id) {
                    Some((pos, sub)) => {
                        self.forget_sub(slot, pos, sub);
                        Ok(())
                    }
                    None => self.refuse(
                        slot,
                        error_code::UNKNOWN_SUBSCRIPTION,
                        format!("UNSUBSCRIBE {sub_id}: no subscription with this id"),
                    ),
                }
            }
            Op::Ping { nonce } => {
                // A PING after PUBLISHes is a barrier for their ACK too.
                if session.acks.is_some() {
                    self.queue_ack(slot, true)?;
                }
                self.reply(slot, Reply::Pong { nonce })
            }
            Op::Pong => {
                session.ping_outstanding = false;
                // The next PING may now be due earlier than the expiry the heap holds.
                self.arm(slot);
                Ok(())
            }
            Op::StatsRequest => {
                // Built by the stats thread; requests while one is pending are answered by it.
                if session.wants_stats() {
                    session.stats_in_flight = true;
                    let conn = ConnRef {
                        slot: slot as u32,
                        id: session.id,
                    };
                    self.stats_requests.push(conn);
                }
                Ok(())
            }
        }
    }

    /// A PUBLISH from a connection: validated, then routed to its topic's owner. `Ok` means
    /// handled: taken, or refused with a non-fatal ERROR.
    fn handle_publish(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        publish: PublishRef<'_>,
    ) -> Result<(), Fatal> {
        let limits = &self.config.limits;
        if let Err(e) = proto::validate_topic(publish.topic, limits.max_topic_bytes)
            .and_then(|()| proto::check_depth(publish.topic, limits.max_topic_levels))
        {
            let reason = format!("PUBLISH to {}: {e}", quote(publish.topic));
            return self.refuse_topic(now, slot, e, reason);
        }
        if let Some(refused) = self.guard_publish(now, slot, publish.topic) {
            return refused;
        }
        // Frames from the engine obey the same limit as frames to it.
        let data_len = data_frame_len(publish.topic.len(), publish.payload.len());
        let max_frame = self.config.limits.max_frame_bytes;
        if data_len > max_frame {
            let reason = format!(
                "PUBLISH to {}: its DATA frame would be {data_len} bytes, over max_frame_bytes {max_frame}",
                quote(publish.topic)
            );
            return self.refuse(slot, error_code::FRAME_TOO_LARGE, reason);
        }
        if let Some(held) = self.route_publish(&publish, read_ns) {
            if held {
                self.pause(slot, publish.topic);
            }
            return Ok(());
        }
        let reason = format!(
            "PUBLISH to {}: the engine holds limits.max_topics = {} topics",
            quote(publish.topic),
            self.config.limits.max_topics
        );
        // Not `refuse`: counted once, as topics_refused.
        self.reply(
            slot,
            Reply::Error {
                code: error_code::TOO_MANY_TOPICS,
                reason: super::session::bounded_reason(reason),
            },
        )
    }

    /// A message from another shard.
    pub(crate) fn handle_msg(&mut self, now: Instant, msg: CoreMsg) {
        self.now = now;
        match msg {
            CoreMsg::Publish(batch) => self.handle_publish_batch(&batch),
            CoreMsg::Deliver { from, frames } => {
                for (id, frame) in &frames {
                    let key = TopicKey {
                        owner: from,
                        id: *id,
                    };
                    self.deliver(key, None, frame);
                }
            }
            CoreMsg::SnapshotRequest {
                from,
                sub,
                pattern,
                resume,
            } => {
                // From now on the topics it matches are sent to `from`; what was sent before is
                // skipped there until this reply arrives.
                self.remote.insert(
                    &pattern,
                    RemoteSub {
                        peer: from,
                        key: sub.key,
                    },
                );
                self.interest_epoch += 1;
                if self.mcast.is_some() {
                    // Before the snapshot it continues (a receiver holds its streams until SUBACK).
                    let positions = self.mcast_positions();
                    self.outgoing[from as usize].push(CoreMsg::StreamPos {
                        sub,
                        stream: self.id,
                        positions,
                    });
                }
                let (frames, lagged) = self.snapshot(&pattern, resume.as_deref());
                let reply = CoreMsg::SnapshotReply {
                    from: self.id,
                    sub,
                    frames,
                    lagged,
                };
                self.outgoing[from as usize].push(reply);
            }
            CoreMsg::SnapshotReply {
                from,
                sub,
                frames,
                lagged,
            } => self.handle_snapshot_reply(from, sub, frames, lagged),
            CoreMsg::ReplayRequest { from, conn, topics } => {
                let (frames, topics) = self.replay(topics);
                self.outgoing[from as usize].push(CoreMsg::ReplayReply {
                    conn,
                    frames,
                    topics,
                });
            }
            CoreMsg::ReplayReply {
                conn,
                frames,
                topics,
            } => self.handle_replay_reply(conn, frames, topics),
            CoreMsg::TakenOver { conn, by } => self.handle_taken_over(now, conn, by),
            CoreMsg::Unsubscribed { from, key, pattern } => {
                self.remote.remove(&pattern, &RemoteSub { peer: from, key });
                self.interest_epoch += 1;
            }
            CoreMsg::Resume { topic } => self.resume(Some(&topic)),
            CoreMsg::StreamPos {
                sub,
                stream,
                positions,
            } => self.handle_stream_pos(sub, stream, &positions),
            CoreMsg::Nak { from, conn, nak } => {
                let frames = self.answer_nak(nak);
                if from == self.id {
                    self.handle_repairs(conn, frames);
                } else {
                    self.outgoing[from as usize].push(CoreMsg::Repair { conn, frames });
                }
            }
            CoreMsg::Repair { conn, frames } => self.handle_repairs(conn, frames),
            CoreMsg::Verified { conn, verdict } => {
                self.handle_verified(now, conn.slot as usize, conn.id, verdict)
            }
            CoreMsg::StatsReply { conn, frame } => {
                let Some(session) = live_session(&mut self.sessions, conn) else {
                    return;
                };
                session.queue_stats(frame);
                mark_dirty(session, conn.slot as usize, &mut self.dirty);
            }
        }
    }

    /// A STATS request the driver must hand to the stats thread.
    pub(crate) fn poll_stats_request(&mut self) -> Option<ConnRef> {
        self.stats_requests.pop()
    }

    /// The stats thread cannot take the request now: the client is told to ask again.
    pub(crate) fn handle_stats_busy(&mut self, conn: ConnRef) {
        let slot = conn.slot as usize;
        let Some(session) = self.session_mut(slot).filter(|s| s.id == conn.id) else {
            return;
        };
        session.stats_in_flight = false;
        let reason = "STATS: too many requests queued, ask again later".to_string();
        if let Err(fatal) = self.refuse(slot, error_code::BUSY, reason) {
            let now = self.now;
            self.fail(now, slot, fatal);
        }
    }

    /// How many frames a message carries, for the driver's per-turn inbox budget.
    pub(crate) fn msg_weight(msg: &CoreMsg) -> usize {
        match msg {
            // A publish batch holds frames of at least PUBLISH_FIXED_BYTES each.
            CoreMsg::Publish(batch) => batch.len() / 64 + 1,
            CoreMsg::Deliver { frames, .. } => frames.len(),
            _ => 1,
        }
    }

    /// Bytes a message carries, for the bound on what is in flight to a peer's inbox.
    pub(crate) fn msg_bytes(msg: &CoreMsg) -> usize {
        let frames = |f: &[SharedFrame]| f.iter().map(|f| f.len()).sum::<usize>();
        match msg {
            CoreMsg::Publish(batch) => batch.len(),
            CoreMsg::Deliver { frames: f, .. } => f.iter().map(|(_, f)| f.len()).sum(),
            CoreMsg::SnapshotReply { frames: f, .. } | CoreMsg::ReplayReply { frames: f, .. } => {
                frames(f)
            }
            _ => 64,
        }
    }

    // ----- time -----

    /// The next moment [`FanoutCore::handle_timeout`] has work, or a held-back write is due.
    pub(crate) fn poll_timeout(&self) -> Instant {
        let mut at = self.next_tick;
        if let Some(Reverse((deadline, _, _))) = self.deadlines.peek() {
            at = at.min(*deadline);
        }
        if let Some(flush_at) = self.flush_at {
            at = at.min(flush_at);
        }
        if let Some(mcast_at) = self.mcast_timeout() {
            at = at.min(mcast_at);
        }
        at
    }

    /// Some connection can be written now: the driver must not sleep before `flush`.
    pub(crate) fn wants_flush(&self) -> bool {
        self.flush_now
    }

    /// Deadlines that passed by `now`: keep-alive PINGs and expiries, handshake time-outs,
    /// lingering closes; every [`TICK`] the write-coalescing interval and the histograms.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(&Reverse((at, slot, id))) = self.deadlines.peek() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let slot = slot as usize;
            let handshake_ms = self.config.limits.handshake_timeout_ms;
            let Some(session) = self.session_mut(slot) else {
                continue;
            };
            if session.id != id || session.armed != Some(at) {
                continue;
            }
            session.armed = None;
            match session.handle_timeout(now, handshake_ms) {
                Timeout::None => {}
                Timeout::Ping => {
                    // The nonce is free for the engine to choose; its clock would do, but the
                    // core reads none.
                    if let Err(fatal) = self.reply(slot, Reply::Ping { nonce: id }) {
                        self.fail(now, slot, fatal);
                    }
                }
                Timeout::Expired(fatal) => self.fail(now, slot, fatal),
                Timeout::Drop => {
                    self.close(slot);
                    continue;
                }
            }
            let d = &self.config.delivery;
            let (stall, release) = (
                Duration::from_millis(d.stall_ms),
                Duration::from_millis(d.pace_release_ms),
            );
            if let Some(session) = self.sessions.get(slot).and_then(Option::as_ref) {
                if let Some(why) =
                    session
                        .holds
                        .release_due(now, session.blocked_since, stall, release)
                {
                    self.release_holds(slot, Some(why));
                }
            }
            self.arm(slot);
        }
        if now >= self.next_tick {
            let d = &self.config.delivery;
            self.write_interval = coalescing_interval(
                self.written_this_tick,
                d.reactor_writes_per_s,
                Duration::from_micros(d.max_write_interval_us),
            );
            self.written_this_tick = 0;
            self.tick_started = now;
            // Pacing's safety net: a connection paused on a gate that has opened, whatever
            // became of the message saying so.
            if self.pace.paused_connections() > 0 {
                self.resume(None);
            }
            self.next_tick = now + TICK;
            while let Some((category, suppressed)) = self.log.poll_suppressed(now) {
                tracing::warn!(
                    category = category.name(),
                    suppressed,
                    reactor = self.id,
                    "log lines suppressed by the rate limit (log.lines_per_s)"
                );
            }
        }
    }

    /// The peer address of the connection in `slot`, for its log lines.
    /// The TLS handshake of `slot` verified a client certificate carrying `names` (empty: the
    /// client sent none); HELLO may be admitted on it (`Authenticator::authenticate_token`).
    pub(crate) fn set_certificate_names(&mut self, slot: usize, names: Vec<String>) {
        if let Some(session) = self.session_mut(slot) {
            session.guard.certificate = (!names.is_empty()).then_some(names);
        }
    }

    pub(crate) fn set_peer(&mut self, slot: usize, peer: std::net::SocketAddr) {
        if let Some(session) = self.session_mut(slot) {
            session.peer = Some(peer);
            session.guard.peer = Some(peer);
        }
    }

    /// The transport of `slot` failed (`cause` says how): the session ends at once.
    pub(crate) fn handle_transport_error(&mut self, now: Instant, slot: usize, cause: String) {
        if let Some(session) = self.session_mut(slot) {
            session.close_cause.get_or_insert(cause);
        }
        self.handle_closed(now, slot);
    }

    /// A reloaded configuration (SIGHUP). The caller passes one whose restart-only keys are
    /// unchanged (`Config::reload_plan`): limits, keep-alive and delivery values apply to
    /// connections and subscriptions made from now on, write coalescing from the next tick.
    pub(crate) fn handle_reload(&mut self, config: Arc<Config>) {
        self.log.handle_reload(&config.log);
        self.config = config;
    }

    /// Some connection still has frames queued for its transport (the drain waits for none).
    pub(crate) fn has_output(&self) -> bool {
        self.sessions
            .iter()
            .flatten()
            .any(|s| s.has_output() && !s.is_closing())
    }

    /// Changes whenever a retained value of this shard does.
    pub(crate) fn retained_version(&self) -> u64 {
        self.store.retained_version()
    }

    /// The retained value of every topic this shard owns.
    pub(crate) fn retained_frames(&self) -> Vec<super::store::RetainedFrame> {
        let mut out = Vec::new();
        self.store.retained_frames(&mut out);
        out
    }

    /// Makes sure the heap holds the session's next deadline (an earlier one than it holds
    /// already; a later one is found when the earlier pops).
    fn arm(&mut self, slot: usize) {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let d = &self.config.delivery;
        let mut at = session.poll_timeout();
        if let Some(release_at) = session.holds.deadline(
            session.blocked_since,
            Duration::from_millis(d.stall_ms),
            Duration::from_millis(d.pace_release_ms),
        ) {
            at = at.min(release_at);
        }
        if session.armed.is_none_or(|armed| at < armed) {
            session.armed = Some(at);
            self.deadlines.push(Reverse((at, slot as u32, session.id)));
        }
    }

    // ----- outputs -----

    /// Messages for peer shard `peer`, oldest first. The driver sends from the front and leaves
    /// what the peer cannot take yet.
    pub(crate) fn outgoing(&mut self, peer: usize) -> &mut Vec<CoreMsg> {
        &mut self.outgoing[peer]
    }

    /// Connections whose session ended since the last call: the driver drops their transport
    /// and may reuse the slot.
    pub(crate) fn poll_closed(&mut self) -> Option<usize> {
        self.closed.pop()
    }

    /// Writes every connection with queued output that write coalescing lets go now, in
    /// vectored writes through `transport`.
    pub(crate) fn flush(&mut self, now: Instant, transport: &mut impl Transport) {
        if self.mcast.is_some() {
            let unix_ns = transport.unix_ns();
            self.mcast_close(now, unix_ns);
        }
        if !self.ack_dirty.is_empty() {
            self.queue_acks();
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        let mut still = std::mem::take(&mut self.spare_dirty);
        self.flush_now = false;
        self.flush_at = None;
        for slot in dirty.drain(..) {
            let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Some(due) = coalesce_until(session, self.write_interval, now) {
                // Stays dirty (in_dirty still set) and is written when the interval is up.
                still.push(slot);
                self.flush_at = Some(self.flush_at.map_or(due, |at| at.min(due)));
                continue;
            }
            session.in_dirty = false;
            // First write since the tick started (a session opened at the tick counts too).
            if session.last_sent <= self.tick_started {
                self.written_this_tick += 1;
            }
            let result = write_session(
                session,
                slot,
                now,
                transport,
                &mut self.counters,
                &mut self.metrics,
            );
            if let Err(e) = result {
                session
                    .close_cause
                    .get_or_insert_with(|| format!("write failed: {e}"));
                self.close(slot);
                continue;
            }
            if session.wants_write_shutdown() {
                transport.shutdown_write(slot);
            }
            if session.writable && session.has_output() {
                session.in_dirty = true;
                still.push(slot);
                self.flush_now = true;
            }
            // Pacing: a holder that drained below half the window, with nothing left to catch
            // up from the ring, lets go; a released one may pace again once its queue is empty.
            let window = self.config.delivery.pace_window();
            let drained = session.holds.is_holding()
                && session.outbox.queued_bytes() <= window / 2
                && session.lag.is_empty();
            // A holder whose socket just stopped taking bytes: its stall deadline is due sooner.
            let rearm = session.holds.is_holding() && session.blocked_since == Some(now);
            if session.holds.released && session.outbox.is_empty() && session.lag.is_empty() {
                session.holds.released = false;
            }
            let topics = session.take_replay_requests();
            if drained {
                self.release_holds(slot, None);
            } else if rearm {
                self.arm(slot);
            }
            if !topics.is_empty() {
                self.request_replays(slot, topics);
            }
        }
        // ACKs held back behind one this flush has just written go now, not a turn later.
        if !self.ack_dirty.is_empty() {
            self.queue_acks();
        }
        // Marked dirty while flushing (replays answered locally): write them next turn.
        self.flush_now |= !self.dirty.is_empty();
        still.append(&mut self.dirty);
        self.dirty = still;
        self.spare_dirty = dirty;
    }

    /// Closes every connection with SHUTTING_DOWN (the driver flushes once more, then drops
    /// them all).
    pub(crate) fn shut_down(&mut self, now: Instant) {
        for slot in 0..self.sessions.len() {
            if self.sessions[slot].is_some() {
                self.fail(
                    now,
                    slot,
                    Fatal::new(error_code::SHUTTING_DOWN, "the engine is shutting down"),
                );
            }
        }
    }

    /// Hands this shard's counters to readers on other threads.
    pub(crate) fn publish_stats(&self, s: &ShardStats) {
        let c = &self.counters;
        s.publishes_in.store(c.publishes_in, Ordering::Relaxed);
        s.delivered.store(c.delivery.delivered, Ordering::Relaxed);
        s.replayed.store(c.delivery.replayed, Ordering::Relaxed);
        s.gaps.store(c.delivery.gaps, Ordering::Relaxed);
        s.lagged.store(c.delivery.lagged, Ordering::Relaxed);
        s.conflated.store(c.delivery.conflated, Ordering::Relaxed);
        s.bytes_written.store(c.bytes_written, Ordering::Relaxed);
        s.writes.store(c.writes, Ordering::Relaxed);
        s.slow_disconnects
            .store(c.slow_disconnects, Ordering::Relaxed);
        s.protocol_errors
            .store(c.protocol_errors, Ordering::Relaxed);
        s.requests_refused
            .store(c.requests_refused, Ordering::Relaxed);
        s.keepalive_timeouts
            .store(c.keepalive_timeouts, Ordering::Relaxed);
        s.handshake_timeouts
            .store(c.handshake_timeouts, Ordering::Relaxed);
        s.shutdown_closes
            .store(c.shutdown_closes, Ordering::Relaxed);
        s.connections.store(self.live, Ordering::Relaxed);
        s.subscriptions.store(self.index.len(), Ordering::Relaxed);
        s.topics_owned.store(self.store.len(), Ordering::Relaxed);
        s.ring_bytes
            .store(self.store.ring_bytes(), Ordering::Relaxed);
        s.retained_bytes
            .store(self.store.retained_bytes(), Ordering::Relaxed);
        s.retained_evicted
            .store(self.store.retained_evicted(), Ordering::Relaxed);
        s.topics_refused.store(c.topics_refused, Ordering::Relaxed);
        let g = &self.guard.counters;
        s.auth_failures.store(g.auth_failures, Ordering::Relaxed);
        s.acl_denied.store(g.acl_denied, Ordering::Relaxed);
        s.acl_filtered.store(g.acl_filtered, Ordering::Relaxed);
        s.id_conflicts.store(g.id_conflicts, Ordering::Relaxed);
        s.id_takeovers.store(g.id_takeovers, Ordering::Relaxed);
        s.rate_limited.store(g.rate_limited, Ordering::Relaxed);
        s.subscriptions_refused
            .store(g.subscriptions_refused, Ordering::Relaxed);
        s.topic_limit.store(g.topic_limit, Ordering::Relaxed);
        s.address_refused
            .store(g.address_refused, Ordering::Relaxed);
        s.publishers_paused
            .store(c.publishers_paused, Ordering::Relaxed);
        s.pace_releases.store(c.pace_releases, Ordering::Relaxed);
        self.publish_mcast_stats(s);
        s.publish_duplicates
            .store(c.publish_duplicates, Ordering::Relaxed);
        s.acks_sent.store(c.acks_sent, Ordering::Relaxed);
    }

    /// This shard's part of a stats document, made when someone asks (never on a timer): posts
    /// its latency histograms to the metrics board and returns its connections' figures.
    pub(crate) fn report(&self) -> Vec<serde_json::Value> {
        self.shared
            .metrics
            .publish(self.id as usize, self.metrics.snapshot());
        self.connections_json()
    }

    /// What `lanpush stats` shows for each open connection of this shard.
    fn connections_json(&self) -> Vec<serde_json::Value> {
        self.sessions
            .iter()
            .flatten()
            .filter(|s| s.is_open())
            .map(|s| {
                let subs: Vec<serde_json::Value> = s
                    .subs()
                    .map(|s| serde_json::json!({"id": s.sub_id, "pattern": s.pattern, "mode": s.mode}))
                    .collect();
                let mut conn = serde_json::json!({
                    "id": s.id,
                    "protocol": if s.mqtt.is_some() { "mqtt" } else { "native" },
                    "client_id": s.client_id,
                    "reactor": self.id,
                    "subscriptions": subs,
                    "queue_frames": s.outbox.queued_frames(),
                    "queue_bytes": s.outbox.queued_bytes(),
                    "delivered": s.stats.delivered,
                    "conflated": s.stats.conflated,
                    "lagged": s.stats.lagged,
                    "lagging_topics": s.lag.len(),
                    "replayed": s.stats.replayed,
                    "gaps": s.stats.gaps,
                    "reconnects": s.stats.reconnects,
                    "paced": s.stats.paced,
                    "paused": s.paused,
                    "holding": s.holds.is_holding(),
                    "pacing_released": s.holds.released,
                });
                if let Some(m) = s.mqtt.as_deref() {
                    conn["mqtt_inflight"] = m.inflight().into();
                }
                conn
            })
            .collect()
    }

    // ----- sessions -----

    fn handle_hello(
        &mut self,
        now: Instant,
        slot: usize,
        client_id: String,
        keepalive_ms: u32,
        token: &str,
        features: u32,
    ) -> Result<(), Fatal> {
        let k = &self.config.keepalive;
        let keepalive_ms = match keepalive_ms {
            0 => k.default_ms,
            ms => ms.clamp(k.min_ms, k.max_ms),
        };
        let max_id = self.config.limits.max_client_id_bytes;
        if client_id.len() > max_id {
            return Err(Fatal::new(
                error_code::HANDSHAKE,
                format!(
                    "client id of {} bytes is longer than limits.max_client_id_bytes = {max_id}",
                    client_id.len()
                ),
            ));
        }
        self.authenticate_hello(now, slot, client_id, keepalive_ms, token, features)
    }

    /// HELLO's identity is known (at once, or after its argon2 run: `auth_core.rs`): the
    /// client id is claimed and WELCOME queued.
    fn admit_hello(
        &mut self,
        now: Instant,
        slot: usize,
        identity: Arc<crate::auth::Identity>,
        client_id: String,
        keepalive_ms: u32,
        features: u32,
    ) -> Result<(), Fatal> {
        let conn_id = self.session(slot).expect("caller looked it up").id;
        let user = identity.user.clone();
        // Admitted before the client id is claimed, so the audit lines of a takeover or a
        // conflict name the identity (the session is not open until WELCOME).
        let config = self.config.clone();
        let session = self.session_mut(slot).expect("caller looked it up");
        session.guard.admit(identity, &config, now);
        let reconnects = if client_id.is_empty() {
            0
        } else {
            let holder = (
                self.id,
                ConnRef {
                    slot: slot as u32,
                    id: conn_id,
                },
            );
            match self
                .shared
                .clients
                .hello(&client_id, now, user.as_deref(), holder)
            {
                Ok(claim) => {
                    if let Some(old) = claim.taken_from {
                        self.take_over(now, slot, &client_id, old);
                    }
                    claim.reconnects
                }
                Err(()) => {
                    self.guard.counters.id_conflicts += 1;
                    let detail = format!(
                        "HELLO refused: client id {} is held by another identity",
                        quote(&client_id)
                    );
                    self.audit(now, slot, AuditKind::IdConflict, &detail);
                    return Err(Fatal::new(
                        error_code::CLIENT_ID_IN_USE,
                        format!(
                            "client id {} is in use by another identity",
                            quote(&client_id)
                        ),
                    ));
                }
            }
        };
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            keepalive_ms,
            max_frame_bytes: self.config.limits.max_frame_bytes as u32,
            max_subscriptions: self.config.limits.max_subscriptions_per_connection as u32,
            reactor: self.id,
            connection_id: 0,
            engine_id: self.shared.engine_id,
            engine_version: if features & hello_features::ENGINE_VERSION != 0 {
                env!("CARGO_PKG_VERSION").to_string()
            } else {
                String::new()
            },
        };
        let session = self.session_mut(slot).expect("caller looked it up");
        let welcome = Welcome {
            connection_id: session.id,
            ..welcome
        };
        session.stats.reconnects = reconnects;
        session.phase = Phase::Open;
        session.client_id = client_id;
        session.keepalive = Duration::from_millis(keepalive_ms as u64);
        session.last_heard = now;
        let (conn, peer) = (session.id, session.peer);
        log_event!(self, Category::Connect, INFO,
            conn, client_id = %self.session(slot).map_or("", |s| s.client_id.as_str()),
            peer = %Peer(peer), keepalive_ms, reactor = self.id, "connect");
        self.arm(slot);
        self.reply(slot, Reply::Welcome(welcome))
    }

    fn handle_subscribe(
        &mut self,
        now: Instant,
        slot: usize,
        subscribe: Subscribe,
    ) -> Result<(), Fatal> {
        let limits = &self.config.limits;
        if let Err(e) = proto::validate_pattern(&subscribe.pattern, limits.max_topic_bytes)
            .and_then(|()| proto::check_depth(&subscribe.pattern, limits.max_topic_levels))
        {
            let reason = format!(
                "SUBSCRIBE {}: pattern {}: {e}",
                subscribe.sub_id,
                quote(&subscribe.pattern)
            );
            return self.refuse_topic(now, slot, e, reason);
        }
        let session = self.session(slot).expect("caller looked it up");
        let refusal = if session.has_sub_id(subscribe.sub_id) {
            Some((
                error_code::UNKNOWN_SUBSCRIPTION,
                format!("SUBSCRIBE {}: the id is already in use", subscribe.sub_id),
            ))
        } else if session.sub_count() >= limits.max_subscriptions_per_connection {
            self.guard.counters.subscriptions_refused += 1;
            Some((
                error_code::TOO_MANY_SUBSCRIPTIONS,
                format!(
                    "SUBSCRIBE {}: at most {} subscriptions per connection",
                    subscribe.sub_id, limits.max_subscriptions_per_connection
                ),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            if code == error_code::TOO_MANY_SUBSCRIPTIONS {
                let session = self.session(slot).expect("caller looked it up");
                let (conn_id, guard) = (session.id, session.guard.clone());
                self.guard
                    .record(now, AuditKind::LimitHit, conn_id, &guard, &reason);
            }
            return self.refuse(slot, code, reason);
        }
        let filter = match self.guard_subscribe(now, slot, &subscribe) {
            Ok(filter) => filter,
            Err(refused) => return refused,
        };
        let mode = match subscribe.mode {
            DeliveryMode::Default => self.config.delivery.default_mode,
            mode => mode,
        };
        // The session marker (`durable.rs`) asks for the client id's durable session: its
        // positions, if it had this pattern, make this a resume.
        let kept = if durable::has_session_marker(&subscribe.resume) {
            self.durable_subscribe(slot, &subscribe.pattern, mode)
        } else {
            None
        };
        // A non-empty resume list makes this a resume (an entry with the empty topic, which no
        // message can have, says "resuming, but nothing seen yet").
        let explicit = subscribe
            .resume
            .iter()
            .any(|p| !(p.topic.is_empty() && p.last_seq == durable::SESSION_MARKER_SEQ));
        let resume = (explicit || kept.is_some()).then(|| {
            Arc::new(
                kept.into_iter()
                    .flatten()
                    .chain(
                        subscribe
                            .resume
                            .iter()
                            .filter(|p| !p.topic.is_empty())
                            .map(|p| (p.topic.clone(), p.last_seq)),
                    )
                    .collect::<HashMap<String, u64>>(),
            )
        });
        let key = self.next_sub_key;
        self.next_sub_key += 1;
        let pending = peers_mask(self.n_shards, self.id);
        let session = self.session_mut(slot).expect("caller looked it up");
        let pos = session.add_sub(Sub {
            sub_id: subscribe.sub_id,
            key,
            pattern: subscribe.pattern.clone(),
            mode,
            pending,
            filter,
        });
        let sub_ref = SubRef {
            slot: slot as u32,
            pos,
            key,
        };
        self.index.insert(&subscribe.pattern, sub_ref);
        for peer in 0..self.n_shards {
            if peer != self.id {
                self.outgoing[peer as usize].push(CoreMsg::SnapshotRequest {
                    from: self.id,
                    sub: sub_ref,
                    pattern: subscribe.pattern.clone(),
                    resume: resume.clone(),
                });
            }
        }
        if self.mcast.is_some() {
            let positions = self.mcast_positions();
            self.handle_stream_pos(sub_ref, self.id, &positions);
        }
        let (frames, lagged) = self.snapshot(&subscribe.pattern, resume.as_deref());
        self.handle_snapshot_reply(self.id, sub_ref, frames, lagged);
        Ok(())
    }

    /// Queues a reply in the connection's wire format; a connection that leaves too many unread
    /// is cut (the `Err` closes it).
    fn reply(&mut self, slot: usize, reply: Reply) -> Result<(), Fatal> {
        self.scratch.clear();
        let mqtt = self
            .sessions
            .get_mut(slot)
            .and_then(Option::as_mut)
            .and_then(|s| s.mqtt.as_deref_mut());
        match mqtt {
            None => native::encode_reply(&mut self.scratch, reply),
            Some(m) => {
                if !mqtt_session::encode_reply(&mut self.scratch, reply, m) {
                    // No packet, but what came before it (a snapshot's values) waits to go.
                    if let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                        mark_dirty(session, slot, &mut self.dirty);
                    }
                    return Ok(());
                }
            }
        }
        let frame: SharedFrame = Arc::from(&self.scratch[..]);
        self.queue_reply(slot, frame)
    }

    fn queue_reply(&mut self, slot: usize, frame: SharedFrame) -> Result<(), Fatal> {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        session.queue_reply(frame)?;
        mark_dirty(session, slot, &mut self.dirty);
        Ok(())
    }

    /// A refused request: a non-fatal ERROR.
    fn refuse(&mut self, slot: usize, code: u16, reason: String) -> Result<(), Fatal> {
        self.counters.requests_refused += 1;
        let reason = super::session::bounded_reason(reason);
        self.reply(slot, Reply::Error { code, reason })
    }

    /// Queues the ERROR and turns the session towards closing (see [`Session::fail`]); counts
    /// the close under its cause.
    fn fail(&mut self, now: Instant, slot: usize, fatal: Fatal) {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if session.is_closing() {
            return;
        }
        let code = fatal.code;
        if code == error_code::SHUTTING_DOWN {
            self.drop_will(slot);
        } else {
            self.publish_will(slot);
        }
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let category = match code {
            error_code::SHUTTING_DOWN => None,
            error_code::SLOW_CONSUMER => Some(Category::SlowConsumer),
            error_code::HANDSHAKE_TIMEOUT | error_code::KEEPALIVE_TIMEOUT => {
                Some(Category::Timeout)
            }
            _ => Some(Category::ProtocolError),
        };
        let (conn, peer) = (session.id, session.peer);
        match category {
            Some(Category::SlowConsumer) => log_event!(self, Category::SlowConsumer, WARN,
                conn, client_id = %session.client_id, peer = %Peer(peer), reason = %fatal.reason,
                "slow consumer disconnected (ERROR 10)"),
            Some(Category::Timeout) => log_event!(self, Category::Timeout, INFO,
                conn, client_id = %session.client_id, peer = %Peer(peer),
                code = error_code::name(code), reason = %fatal.reason, "time-out"),
            Some(category) => log_event!(self, category, WARN,
                conn, client_id = %session.client_id, peer = %Peer(peer),
                code = error_code::name(code), reason = %fatal.reason, "protocol error"),
            None => {}
        }
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !session.fail(now, fatal) {
            return;
        }
        session.close_code = Some(code);
        let c = &mut self.counters;
        *match code {
            error_code::HANDSHAKE_TIMEOUT => &mut c.handshake_timeouts,
            error_code::KEEPALIVE_TIMEOUT => &mut c.keepalive_timeouts,
            error_code::SLOW_CONSUMER => &mut c.slow_disconnects,
            error_code::SHUTTING_DOWN => &mut c.shutdown_closes,
            // Counted where they are decided (`guard.counters`).
            error_code::UNAUTHENTICATED | error_code::CLIENT_ID_IN_USE => &mut c.security_closes,
            _ => &mut c.protocol_errors,
        } += 1;
        self.remove_subs(slot);
        self.flush_now = true;
        if let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
            // An MQTT close with nothing to say (no CONNACK refusal) need not linger.
            if session.mqtt.is_some() && !session.has_output() {
                self.close(slot);
                return;
            }
            mark_dirty(session, slot, &mut self.dirty);
        }
        self.arm(slot);
    }

    fn remove_subs(&mut self, slot: usize) {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let subs: Vec<(u32, Sub)> = session.drain_subs().collect();
        for (pos, sub) in subs {
            self.forget_sub(slot, pos, sub);
        }
    }

    /// A subscription removed from its session leaves the index here and the interest
    /// summaries of the other shards.
    fn forget_sub(&mut self, slot: usize, pos: u32, sub: Sub) {
        self.index.remove(
            &sub.pattern,
            &SubRef {
                slot: slot as u32,
                pos,
                key: sub.key,
            },
        );
        for peer in 0..self.n_shards {
            if peer != self.id {
                self.outgoing[peer as usize].push(CoreMsg::Unsubscribed {
                    from: self.id,
                    key: sub.key,
                    pattern: sub.pattern.clone(),
                });
            }
        }
    }

    /// The other shards with a subscription that matches topic `id`'s name `topic`: computed
    /// from the remote-interest index once per topic and change of interest, then cached.
    fn peers_interested(&mut self, id: u32, topic: &str) -> u64 {
        let cached = self.store.interest(id);
        if cached.0 == self.interest_epoch {
            return cached.1;
        }
        let mut remote = std::mem::take(&mut self.remote_matches);
        remote.clear();
        self.remote.collect_matches(topic, &mut remote);
        let mask = remote.iter().fold(0u64, |m, r| m | 1u64 << r.peer);
        self.remote_matches = remote;
        *self.store.interest(id) = (self.interest_epoch, mask);
        mask
    }

    fn close(&mut self, slot: usize) {
        if self.session(slot).is_none() {
            return;
        }
        self.publish_will(slot);
        self.save_mqtt_session(slot);
        self.save_durable_session(slot);
        self.remove_subs(slot);
        self.release_holds(slot, None);
        if let Some(session) = self.sessions[slot].take() {
            if session.paused {
                self.pace.forget(slot, session.id);
            }
            // Connections refused at accept never reach the core; those shut down by the engine
            // are summed up by the drain's own line.
            if session.close_code != Some(error_code::SHUTTING_DOWN) {
                let cause = match (session.close_code, &session.close_cause) {
                    (Some(code), _) => error_code::name(code),
                    (None, Some(cause)) => cause.as_str(),
                    (None, None) => "closed by the peer",
                };
                log_event!(self, Category::Disconnect, INFO,
                    conn = session.id, client_id = %session.client_id, peer = %Peer(session.peer),
                    code = session.close_code, cause, "disconnect");
            }
            // A session that said HELLO (not refused at it) holds its client id until now.
            if !session.client_id.is_empty() {
                self.shared
                    .clients
                    .gone(&session.client_id, session.id, self.now);
            }
            self.metrics.remove_conn(session.id);
            self.live -= 1;
            self.closed.push(slot);
        }
    }

    // ----- publishing and fan-out -----

    /// Sends a validated publish to its topic's owner (maybe this shard). `None`: a new topic
    /// past `limits.max_topics`, not taken; else whether the topic's pacing gate is closed.
    fn route_publish(&mut self, publish: &PublishRef<'_>, ingest_ts_ns: u64) -> Option<bool> {
        // One lookup by name: the owner, its gate and, if it is this shard, the store's id.
        let store = &mut self.store;
        let Some(route) = self
            .owners
            .route(&self.shared.owners, publish.topic, self.id, |topic| {
                store.topic_id(topic)
            })
        else {
            self.counters.topics_refused += 1;
            return None;
        };
        self.counters.publishes_in += 1;
        let held = route.held;
        if let Some(id) = route.local_id {
            self.ingest(id, publish, ingest_ts_ns);
            return Some(held);
        }
        let queue = &mut self.outgoing[route.owner as usize];
        if !matches!(queue.last(), Some(CoreMsg::Publish(_))) {
            queue.push(CoreMsg::Publish(Vec::with_capacity(16 * 1024)));
        }
        if let Some(CoreMsg::Publish(batch)) = queue.last_mut() {
            batch.extend_from_slice(&ingest_ts_ns.to_le_bytes());
            proto::encode_publish(batch, publish);
        }
        Some(held)
    }

    fn handle_publish_batch(&mut self, mut buf: &[u8]) {
        while buf.len() > 8 {
            let (ts, rest) = buf.split_at(8);
            let ingest_ts_ns = u64::from_le_bytes(ts.try_into().expect("split at 8"));
            match decode_frame(rest, usize::MAX) {
                Ok(Decoded::Frame(Frame::Publish(publish), used)) => {
                    let id = self.store.topic_id(publish.topic);
                    self.ingest(id, &publish, ingest_ts_ns);
                    buf = &rest[used..];
                }
                // Batches are built by shards and the local publisher from validated frames.
                other => unreachable!("corrupt internal publish batch: {other:?}"),
            }
        }
    }

    /// The owner's half of a publish of topic `id` (this shard's store's): sequence, encode
    /// once, retain, fan out.
    fn ingest(&mut self, id: u32, publish: &PublishRef<'_>, ingest_ts_ns: u64) {
        let frame = self.store.ingest_as(id, publish, ingest_ts_ns);
        self.mcast_ingest(publish.topic, &frame, ingest_ts_ns);
        // Only to the shards that have a subscription it can match.
        let mut peers = if self.n_shards > 1 {
            self.peers_interested(id, publish.topic)
        } else {
            0
        };
        while peers != 0 {
            let peer = peers.trailing_zeros() as u16;
            peers &= peers - 1;
            self.counters.frames_to_peers += 1;
            let queue = &mut self.outgoing[peer as usize];
            match queue.last_mut() {
                Some(CoreMsg::Deliver { frames, .. }) => frames.push((id, frame.clone())),
                _ => queue.push(CoreMsg::Deliver {
                    from: self.id,
                    frames: vec![(id, frame.clone())],
                }),
            }
        }
        // The topic as the PUBLISH decoder validated it, not read back out of the frame.
        let key = TopicKey { owner: self.id, id };
        self.deliver(key, Some(publish.topic), &frame);
    }

    /// Queues a DATA frame of topic `key` from its owner to every matching local subscription,
    /// once per connection however many of its subscriptions match. `topic` is the topic's
    /// name if the caller has it; else it comes from the match cache or, on a miss, the frame.
    fn deliver(&mut self, key: TopicKey, topic: Option<&str>, frame: &SharedFrame) {
        let mut matches = std::mem::take(&mut self.matches);
        let mut name = std::mem::take(&mut self.topic_name);
        matches.clear();
        // A hit costs no walk of the trie, and no read (nor UTF-8 check) of the frame's topic.
        let topic = match (self.index.cached(key), topic) {
            (Some((_, subs)), Some(topic)) => {
                matches.extend_from_slice(subs);
                topic
            }
            (Some((cached, subs)), None) => {
                matches.extend_from_slice(subs);
                name.clear();
                name.push_str(cached);
                &name
            }
            (None, topic) => {
                let Some(topic) = topic.or_else(|| data_frame_topic(frame)) else {
                    self.matches = matches;
                    self.topic_name = name;
                    return;
                };
                self.index.collect_matches(key, topic, &mut matches);
                topic
            }
        };
        if matches.is_empty() {
            self.matches = matches;
            self.topic_name = name;
            return;
        }
        self.stamp += 1;
        let from_bit = 1u64 << key.owner;
        // MQTT encodings of this message, made at most once on this shard and shared by every
        // MQTT subscriber here (mqtt_session.rs): the QoS 0 packet, the QoS 1 payload.
        let mut mqtt_qos0: Option<SharedFrame> = None;
        let mut mqtt_payload: Option<SharedFrame> = None;
        // Multicast receivers get a carried topic's live messages from the group only.
        let mut carried: Option<bool> = None;
        for m in &matches {
            let slot = m.slot as usize;
            let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if session.stamp == self.stamp {
                continue;
            }
            if session.mcast
                && *carried.get_or_insert_with(|| {
                    self.mcast.as_deref().is_some_and(|mc| mc.carries(topic))
                })
            {
                continue;
            }
            let Some(sub) = session.sub(m.pos, m.key) else {
                continue;
            };
            if sub.pending & from_bit != 0 {
                continue;
            }
            if sub.filter.as_ref().is_some_and(|f| !f.allows(topic)) {
                self.guard.counters.acl_filtered += 1;
                continue;
            }
            let (mode, sub_id) = (sub.mode, sub.sub_id);
            session.stamp = self.stamp;
            let out = match session.mqtt.as_deref() {
                None => Outgoing::Data,
                Some(m) if m.is_qos1(sub_id) => Outgoing::MqttQos1 {
                    payload: mqtt_payload.get_or_insert_with(|| mqtt_session::payload_of(frame)),
                },
                Some(_) => Outgoing::MqttQos0(
                    mqtt_qos0.get_or_insert_with(|| mqtt_session::qos0_packet(frame)),
                ),
            };
            let enqueued = session.enqueue_as(topic, frame, out, mode, &mut self.counters.delivery);
            // Pacing: a healthy `all` subscriber past the window, or lagging this topic (its
            // frames deferred to a replay), holds the topic back.
            let window = self.config.delivery.pace_window();
            let hold = window > 0
                && matches!(mode, DeliveryMode::All | DeliveryMode::Default)
                && (session.outbox.queued_bytes() > window || enqueued == Enqueued::Deferred)
                && !session.holds.released
                && !session.holds.holds(topic);
            match enqueued {
                Enqueued::Queued | Enqueued::Deferred => mark_dirty(session, slot, &mut self.dirty),
                Enqueued::Overflow => {
                    let fatal = Fatal::new(
                        error_code::SLOW_CONSUMER,
                        "outbound queue full and the subscription's mode is disconnect",
                    );
                    self.fail(self.now, slot, fatal);
                }
            }
            if hold {
                self.hold(slot, topic);
            }
        }
        self.matches = matches;
        self.topic_name = name;
    }

    // ----- pacing (pacing.rs) -----

    /// Connection `slot` holds `topic` back: its queue passed the pace window while an `all`
    /// subscription took the topic's frames, or their frames wait for a replay.
    fn hold(&mut self, slot: usize, topic: &str) {
        let Some(gate) = self.owners.gate(&self.shared.owners, topic) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let first = session.holds.add(self.now, topic);
        self.pace.hold(topic, gate);
        if first {
            self.arm(slot);
        }
    }

    /// Connection `slot` lets go of every topic it holds: it drained, closed, or was released
    /// by the rule (`release`, counted and logged).
    fn release_holds(&mut self, slot: usize, release: Option<Release>) {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if let Some(release) = release {
            session.holds.released = true;
            self.counters.pace_releases += 1;
            let (conn, client_id, peer) = (session.id, session.client_id.clone(), session.peer);
            log_event!(self, Category::SlowConsumer, WARN,
                conn, client_id = %client_id, peer = %Peer(peer), reason = %release,
                "released from pacing; its subscriptions' modes apply");
        }
        let topics: Vec<String> = session.holds.take().collect();
        for topic in topics {
            if self.pace.unhold(&topic) {
                // Open for every shard: each resumes the connections it paused on the topic.
                for peer in 0..self.n_shards {
                    if peer != self.id {
                        let topic = topic.clone();
                        self.outgoing[peer as usize].push(CoreMsg::Resume { topic });
                    }
                }
                self.resume(Some(&topic));
            }
        }
    }

    /// Connection `slot` published to a topic whose gate is closed: it is not read until the
    /// gate opens.
    fn pause(&mut self, slot: usize, topic: &str) {
        let Some(gate) = self.owners.gate(&self.shared.owners, topic) else {
            return;
        };
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        session.paused = true;
        session.stats.paced += 1;
        self.pace.pause(slot, session.id, topic, gate);
        self.counters.publishers_paused += 1;
    }

    /// `topic`'s gate opened (`None`: the periodic check of every gate): the connections
    /// paused on it are read again.
    fn resume(&mut self, topic: Option<&str>) {
        self.pace.handle_resume(topic);
        while let Some(slot) = self.pace.poll_resumed() {
            if let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
                session.paused = false;
                self.resumed.push(slot);
            }
        }
    }

    /// Whether the driver must leave connection `slot` unread (pacing, or its HELLO waits for
    /// its argon2 verdict: `auth_core.rs`).
    pub(crate) fn is_paused(&self, slot: usize) -> bool {
        self.session(slot)
            .is_some_and(|s| s.paused || s.verifying.is_some())
    }

    /// A paused connection (pacing, or a HELLO whose verdict came) that may be read again: the
    /// driver hands it the bytes it kept ([`FanoutCore::handle_input`]) and reads its socket
    /// until it would block.
    pub(crate) fn poll_resumed(&mut self) -> Option<usize> {
        self.resumed.pop()
    }

    /// This shard's answer to a subscription: retained values, or the replay after `resume`.
    fn snapshot(
        &mut self,
        pattern: &str,
        resume: Option<&HashMap<String, u64>>,
    ) -> (Vec<SharedFrame>, Vec<(String, u64)>) {
        let (mut frames, mut lagged) = (Vec::new(), Vec::new());
        match resume {
            None => self.store.snapshot(pattern, &mut frames),
            Some(positions) => {
                let mut budget = self.config.delivery.queue_max_bytes / 2;
                self.store
                    .resume(pattern, positions, &mut budget, &mut frames, &mut lagged);
            }
        }
        (frames, lagged)
    }

    fn handle_snapshot_reply(
        &mut self,
        from: u16,
        sub: SubRef,
        frames: Vec<SharedFrame>,
        lagged: Vec<(String, u64)>,
    ) {
        let slot = sub.slot as usize;
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(s) = session.sub_mut(sub.pos, sub.key) else {
            return;
        };
        s.pending &= !(1u64 << from);
        let (mode, sub_id, complete) = (s.mode, s.sub_id, s.pending == 0);
        let (mut frames, mut lagged) = (frames, lagged);
        if let Some(filter) = &s.filter {
            // A partly allowed subscription: the snapshot and the replay obey the ACL too.
            let before = frames.len();
            frames.retain(|f| frame_topic(f).is_some_and(|t| filter.allows(&t)));
            lagged.retain(|(topic, _)| filter.allows(topic));
            self.guard.counters.acl_filtered += (before - frames.len()) as u64;
        }
        // Bounded by the number of topics (snapshot) or the replay budget (resume).
        session.queue_replayed(frames, &mut self.counters.delivery);
        for (topic, next_seq) in lagged {
            session.lag.insert(
                topic,
                Lag {
                    next_seq,
                    requested: false,
                },
            );
        }
        if complete {
            // SUBACK closes the snapshot: every snapshot frame of this subscription precedes it.
            if let Err(fatal) = self.reply(slot, Reply::SubAck(SubAck { sub_id, mode })) {
                self.fail(self.now, slot, fatal);
            }
        } else {
            mark_dirty(session, slot, &mut self.dirty);
        }
    }

    /// Asks the owners of a lagging connection's topics for the messages it missed.
    fn request_replays(&mut self, slot: usize, topics: Vec<(String, u64)>) {
        let Some(session) = self.session(slot) else {
            return;
        };
        let conn = ConnRef {
            slot: slot as u32,
            id: session.id,
        };
        let mut by_owner: Vec<Vec<(String, u64)>> = vec![Vec::new(); self.n_shards as usize];
        for (topic, next_seq) in topics {
            let owner = self.owners.lookup(&self.shared.owners, &topic);
            by_owner[owner as usize].push((topic, next_seq));
        }
        for (owner, topics) in by_owner.into_iter().enumerate() {
            if topics.is_empty() {
                continue;
            }
            if owner == self.id as usize {
                let (frames, topics) = self.replay(topics);
                self.handle_replay_reply(conn, frames, topics);
            } else {
                self.outgoing[owner].push(CoreMsg::ReplayRequest {
                    from: self.id,
                    conn,
                    topics,
                });
            }
        }
    }

    /// The owner's side of a catch-up: frames from the ring, within half an outbox's bytes.
    fn replay(&self, topics: Vec<(String, u64)>) -> (Vec<SharedFrame>, Vec<(String, Option<u64>)>) {
        let mut budget = self.config.delivery.queue_max_bytes / 2;
        let mut frames = Vec::new();
        let done = topics
            .into_iter()
            .map(|(topic, from_seq)| {
                let next = match self
                    .store
                    .replay(&topic, from_seq, &mut budget, &mut frames)
                {
                    Replay::CaughtUp => None,
                    Replay::More(next) => Some(next),
                };
                (topic, next)
            })
            .collect();
        (frames, done)
    }

    fn handle_replay_reply(
        &mut self,
        conn: ConnRef,
        frames: Vec<SharedFrame>,
        topics: Vec<(String, Option<u64>)>,
    ) {
        let slot = conn.slot as usize;
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if session.id != conn.id || !session.is_open() {
            return;
        }
        session.queue_replayed(frames, &mut self.counters.delivery);
        for (topic, next) in topics {
            match next {
                None => {
                    session.lag.remove(&topic);
                }
                Some(next_seq) => {
                    session.lag.insert(
                        topic,
                        Lag {
                            next_seq,
                            requested: false,
                        },
                    );
                }
            }
        }
        mark_dirty(session, slot, &mut self.dirty);
    }
}

// ----- admission and authorisation: the hooks into `guard.rs` and `crate::auth` -----

impl FanoutCore {
    /// Reactor 0 refused a connection from `peer` at `limits.max_connections_per_address`.
    pub(crate) fn handle_address_refused(&mut self, now: Instant, peer: std::net::SocketAddr) {
        self.guard.counters.address_refused += 1;
        let detail = format!(
            "connection refused: limits.max_connections_per_address = {} reached",
            self.config.limits.max_connections_per_address
        );
        self.guard
            .audit
            .record(now, AuditKind::LimitHit, 0, Some(peer), "-", &detail);
    }

    /// Who asked for STATS on `conn`: `None` for an identity that sees everything, else the
    /// identity whose view the stats thread must cut the document to (`stats::scoped`).
    pub(crate) fn stats_viewer(&self, conn: ConnRef) -> Option<Arc<crate::auth::Identity>> {
        let session = self
            .session(conn.slot as usize)
            .filter(|s| s.id == conn.id)?;
        (!session.guard.identity.admin).then(|| session.guard.identity.clone())
    }

    /// A topic or pattern refused by validation: BAD_TOPIC, and a limit hit when it is too
    /// long or too deep.
    fn refuse_topic(
        &mut self,
        now: Instant,
        slot: usize,
        e: proto::TopicError,
        reason: String,
    ) -> Result<(), Fatal> {
        if matches!(
            e,
            proto::TopicError::TooLong { .. } | proto::TopicError::TooDeep { .. }
        ) {
            self.guard.counters.topic_limit += 1;
            self.audit(now, slot, AuditKind::LimitHit, &reason);
        }
        self.refuse(slot, error_code::BAD_TOPIC, reason)
    }

    /// The publish rate and the ACL on one PUBLISH: `None` lets it through, `Some` is the
    /// answer instead (a dropped or refused PUBLISH).
    fn guard_publish(
        &mut self,
        now: Instant,
        slot: usize,
        topic: &str,
    ) -> Option<Result<(), Fatal>> {
        let session = self.sessions.get_mut(slot).and_then(Option::as_mut)?;
        // The rate first: it bounds what even a client sending refused PUBLISHes costs.
        if !session.guard.check_rate(now) {
            self.guard.counters.rate_limited += 1;
            let reason = format!(
                "PUBLISH to {}: over limits.max_publish_rate_per_s = {}, dropped",
                quote(topic),
                self.config.limits.max_publish_rate_per_s
            );
            return Some(self.notify_refused(now, slot, error_code::RATE_LIMITED, reason));
        }
        if session.guard.identity.acl.may_publish(topic) {
            return None;
        }
        let reason = format!(
            "PUBLISH to {}: not allowed for {}",
            quote(topic),
            quote(session.guard.who())
        );
        self.guard.counters.acl_denied += 1;
        Some(self.notify_refused(now, slot, error_code::FORBIDDEN, reason))
    }

    /// Tells the client a PUBLISH was refused (FORBIDDEN, RATE_LIMITED) and audits it, unless
    /// its last such notice is still unwritten: then the refusal is only counted, and the next
    /// notice says how many went untold. So a client pipelining thousands of refused PUBLISHes
    /// gets about one ERROR per write instead of cutting itself off with unread replies, and a
    /// refusal is still always followed by an ERROR before anything queued after it (a PONG:
    /// `Publisher::confirm` sees it).
    fn notify_refused(
        &mut self,
        now: Instant,
        slot: usize,
        code: u16,
        reason: String,
    ) -> Result<(), Fatal> {
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        let Some(untold) = session.guard.take_untold() else {
            return Ok(());
        };
        let reason = if untold > 0 {
            format!("{reason} (and {untold} more PUBLISHes refused since the last notice)")
        } else {
            reason
        };
        let kind = if code == error_code::FORBIDDEN {
            AuditKind::AclDenied
        } else {
            AuditKind::LimitHit
        };
        self.audit(now, slot, kind, &reason);
        self.counters.requests_refused += 1;
        let reason = super::session::bounded_reason(reason);
        if self.session(slot).is_some_and(|s| s.mqtt.is_some()) {
            // MQTT 3.1.1 has no negative acknowledgement: the refusal closes the connection
            // (`mqtt_session::encode_reply`), never a native ERROR frame on an MQTT stream.
            return self.reply(slot, Reply::Error { code, reason });
        }
        self.scratch.clear();
        native::encode_reply(&mut self.scratch, Reply::Error { code, reason });
        let frame: SharedFrame = Arc::from(&self.scratch[..]);
        if let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) {
            session.guard.notice = Some(Arc::downgrade(&frame));
        }
        self.queue_reply(slot, frame)
    }

    /// The ACL on a SUBSCRIBE: `Ok(None)` wholly allowed, `Ok(Some)` the filter of a partly
    /// allowed pattern, `Err` the answer to a denied one.
    #[allow(clippy::type_complexity)]
    fn guard_subscribe(
        &mut self,
        now: Instant,
        slot: usize,
        subscribe: &Subscribe,
    ) -> Result<Option<Arc<crate::auth::TopicFilter>>, Result<(), Fatal>> {
        let Some(session) = self.session(slot) else {
            return Ok(None);
        };
        match session
            .guard
            .identity
            .acl
            .subscribe_scope(&subscribe.pattern)
        {
            crate::auth::SubscribeScope::All => Ok(None),
            crate::auth::SubscribeScope::Partial(filter) => Ok(Some(filter)),
            crate::auth::SubscribeScope::Denied => {
                let reason = format!(
                    "SUBSCRIBE {}: pattern {}: not allowed for {}",
                    subscribe.sub_id,
                    quote(&subscribe.pattern),
                    quote(session.guard.who())
                );
                self.guard.counters.acl_denied += 1;
                self.audit(now, slot, AuditKind::AclDenied, &reason);
                Err(self.refuse(slot, error_code::FORBIDDEN, reason))
            }
        }
    }

    /// The connection in `slot` took `client_id` over from `old` (same identity): the old one
    /// is closed, here or on its shard.
    fn take_over(&mut self, now: Instant, slot: usize, client_id: &str, old: (u16, ConnRef)) {
        self.guard.counters.id_takeovers += 1;
        let by = self.session(slot).map_or(0, |s| s.id);
        let detail = format!(
            "client id {} taken over from connection {} (reactor {})",
            quote(client_id),
            old.1.id,
            old.0
        );
        self.audit(now, slot, AuditKind::IdTakeover, &detail);
        if old.0 == self.id {
            self.handle_taken_over(now, old.1, by);
        } else {
            self.outgoing[old.0 as usize].push(CoreMsg::TakenOver { conn: old.1, by });
        }
    }

    fn handle_taken_over(&mut self, now: Instant, conn: ConnRef, by: u64) {
        let slot = conn.slot as usize;
        if self.session(slot).is_some_and(|s| s.id == conn.id) {
            let fatal = Fatal::new(
                error_code::CLIENT_ID_IN_USE,
                format!("client id taken over by a newer connection ({by}) of the same identity"),
            );
            self.fail(now, slot, fatal);
        }
    }

    /// An audit line about the connection in `slot`.
    fn audit(&mut self, now: Instant, slot: usize, kind: AuditKind, detail: &str) {
        if let Some(session) = self.sessions.get(slot).and_then(Option::as_ref) {
            self.guard
                .record(now, kind, session.id, &session.guard, detail);
        }
    }
}

/// The topic of a DATA or GAP frame.
fn frame_topic(frame: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    if let Some(topic) = data_frame_topic(frame) {
        return Some(topic.into());
    }
    match decode_frame(frame, usize::MAX) {
        Ok(Decoded::Frame(Frame::Gap(gap), _)) => Some(gap.topic.into()),
        _ => None,
    }
}

/// Whether `bytes` start with a whole frame, or with a length prefix the decoder will refuse
/// (an error is news from the peer too).
fn frame_complete(bytes: &[u8], max_frame: usize) -> bool {
    match proto::frame_len_hint(bytes) {
        None => false,
        Some(total) => {
            let len = total - proto::LEN_PREFIX_BYTES;
            len == 0 || len > max_frame || bytes.len() >= total
        }
    }
}

/// The `len` of the DATA frame for a topic and payload of these sizes (length prefix excluded).
pub(crate) fn data_frame_len(topic_bytes: usize, payload_bytes: usize) -> usize {
    proto::FRAME_HEADER_BYTES - proto::LEN_PREFIX_BYTES
        + proto::DATA_FIXED_BYTES
        + topic_bytes
        + payload_bytes
}

/// Every shard but `me`, as a bit set (`n` ≤ 64).
fn peers_mask(n: u16, me: u16) -> u64 {
    let all = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    all & !(1u64 << me)
}

/// The session `conn` names, if it is still the one in its slot (not closed, the slot not
/// reused). A free function, so that the caller can borrow the core's other fields beside it.
fn live_session(sessions: &mut [Option<Box<Session>>], conn: ConnRef) -> Option<&mut Session> {
    sessions
        .get_mut(conn.slot as usize)
        .and_then(Option::as_deref_mut)
        .filter(|s| s.id == conn.id)
}

fn mark_dirty(session: &mut Session, slot: usize, dirty: &mut Vec<usize>) {
    if !session.in_dirty && session.writable && session.has_output() {
        session.in_dirty = true;
        dirty.push(slot);
    }
}

/// Writes as much of a session's outbox as the transport takes, in vectored writes.
fn write_session(
    session: &mut Session,
    slot: usize,
    now: Instant,
    transport: &mut impl Transport,
    counters: &mut Counters,
    metrics: &mut ShardMetrics,
) -> io::Result<()> {
    session.move_conflated(&mut counters.delivery);
    for _ in 0..MAX_WRITES_PER_FLUSH {
        if !session.writable || session.outbox.is_empty() {
            break;
        }
        // Most writes carry a few frames: a small slice array spares zeroing 16 KiB each time.
        let result = if session.outbox.queued_frames() <= SMALL_IOVECS {
            write_queued::<SMALL_IOVECS>(session, slot, transport)
        } else {
            write_queued::<MAX_IOVECS>(session, slot, transport)
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                let (conn_id, now_ns) = (session.id, transport.unix_ns());
                let mqtt = &mut session.mqtt;
                let durable = &mut session.durable;
                session.outbox.consume_with(written, |frame| {
                    // The honest position of a durable session: what left for the socket.
                    if let Some(d) = durable.as_deref_mut() {
                        d.handle_written(frame);
                    }
                    // An MQTT packet is stamped from the DATA frame it was made from.
                    let data;
                    let frame = match mqtt.as_deref_mut() {
                        None => frame,
                        Some(m) => match m.take_stamp(frame) {
                            Some(d) => {
                                data = d;
                                &data[..]
                            }
                            None => return,
                        },
                    };
                    if let Some(s) = data_frame_stamp(frame) {
                        metrics.record_delivery(
                            conn_id,
                            s.topic,
                            s.ingest_ts_ns,
                            s.source_ts_ns,
                            now_ns,
                        );
                    }
                });
                counters.writes += 1;
                counters.bytes_written += written as u64;
                session.last_sent = now;
                session.blocked_since = None;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                session.writable = false;
                session.blocked_since.get_or_insert(now);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    session.move_conflated(&mut counters.delivery);
    Ok(())
}

/// One vectored write of up to `N` queued frames.
fn write_queued<const N: usize>(
    session: &Session,
    slot: usize,
    transport: &mut impl Transport,
) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); N];
    let n = session.outbox.fill_slices(&mut slices, MAX_WRITE_BYTES);
    transport.write(slot, &slices[..n])
}

/// Write coalescing: with `busy` connections each written at most once per interval, the
/// reactor makes at most `writes_per_s` writes a second. Capped at `max` (0 = off).
fn coalescing_interval(busy: usize, writes_per_s: u64, max: Duration) -> Duration {
    let nanos = (busy as u64).saturating_mul(1_000_000_000) / writes_per_s.max(1);
    Duration::from_nanos(nanos).min(max)
}

/// Write coalescing: `Some(when)` if `session` was written to less than `interval` ago and
/// should wait until `when` for more frames to share the write. Sessions with a full write's
/// worth queued, and closing ones, never wait.
fn coalesce_until(session: &Session, interval: Duration, now: Instant) -> Option<Instant> {
    if interval.is_zero() || session.outbox.queued_bytes() >= COALESCE_BYTES || !session.is_open() {
        return None;
    }
    let due = session.last_sent + interval;
    (now < due).then_some(due)
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn interval_spreads_the_write_budget_over_busy_connections() {
        let max = Duration::from_millis(2);
        // 50 busy connections at 100 k writes/s: one write each per 500 µs.
        assert_eq!(
            coalescing_interval(50, 100_000, max),
            Duration::from_micros(500)
        );
        // Few busy connections hardly wait; none do not wait at all.
        assert_eq!(
            coalescing_interval(5, 100_000, max),
            Duration::from_micros(50)
        );
        assert_eq!(coalescing_interval(0, 100_000, max), Duration::ZERO);
        // Many connections: capped.
        assert_eq!(coalescing_interval(10_000, 100_000, max), max);
        // Off.
        assert_eq!(
            coalescing_interval(50, 100_000, Duration::ZERO),
            Duration::ZERO
        );
    }

    #[test]
    fn peer_masks_cover_every_shard_count_up_to_64() {
        assert_eq!(peers_mask(1, 0), 0);
        assert_eq!(peers_mask(2, 0), 0b10);
        assert_eq!(peers_mask(64, 0), u64::MAX - 1);
        assert_eq!(peers_mask(64, 63), u64::MAX >> 1);
    }
}
