//! One reactor thread ("shard"): a mio `Poll` that owns its share of the connections, the
//! subscriptions made on them, and the topics first published through it (`owners.rs`).
//!
//! Data path (see docs/ARCHITECTURE.md for the picture):
//! 1. A PUBLISH read on shard A for topic T goes to T's *owner* shard (the shard of T's first
//!    publisher, `owners.rs`): inline if that is A, else appended to A's outgoing batch for the
//!    owner.
//! 2. The owner assigns the next per-topic sequence number, encodes the DATA frame once into a
//!    [`SharedFrame`], keeps it as the retained value, queues it to its own matching subscribers,
//!    and appends it to its outgoing batch for every other shard.
//! 3. Each shard matches the frame's topic against its own subscription index and pushes the
//!    shared frame (a reference-count increment) onto each matching connection's [`Outbox`].
//! 4. At the end of the loop turn every connection with queued frames is flushed with vectored
//!    writes: many frames per syscall.
//!
//! Per-topic order holds because a topic has one owner and each shard-to-shard channel is FIFO.
//! Snapshot-then-live holds for the same reason: a subscription ignores live frames from an owner
//! until that owner's snapshot reply, which follows every frame it sent before, has arrived.
//!
//! Every loop turn does bounded work: at most `MAX_EVENTS` readiness events, `READ_BUDGET_BYTES`
//! per connection, `MAX_INBOX_MSGS` cross-shard messages and `MAX_WRITES_PER_FLUSH` writes per
//! connection; whatever is left is resumed on the next turn without sleeping.

use ahash::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::TrySendError;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

use super::notify::{Inbox, Mailbox};
use super::outbox::{Outbox, SharedFrame};
use super::owners::OwnerCache;
use super::store::{Replay, TopicStore};
use super::timer::DeadlineTimer;
use super::{now_unix_ns, EngineShared, ShardStats};
use crate::config::Config;
use crate::metrics::{data_frame_stamp, ShardMetrics};
use crate::proto::{
    self, data_frame_topic, decode_frame, error_code, Decoded, DeliveryMode, Frame, PublishRef,
    SubAck, Subscribe, Welcome, WireError, PROTOCOL_VERSION,
};
use crate::topic::TopicIndex;

pub(crate) const WAKER_TOKEN: Token = Token(usize::MAX - 1);
const LISTENER_TOKEN: Token = Token(usize::MAX - 2);
const TIMER_TOKEN: Token = Token(usize::MAX - 3);

/// Readiness events taken per `poll` call.
const MAX_EVENTS: usize = 1024;
/// Bytes read from one connection per loop turn before moving on to the others. Small enough
/// that one turn's fan-out leaves every subscriber's frames for a single vectored write.
const READ_BUDGET_BYTES: usize = 64 * 1024;
/// Size of a connection's read buffer; grows to the largest frame in flight, shrinks back.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Cross-shard messages handled per loop turn, and frames (in publish and delivery batches):
/// whichever bound is reached first ends the turn's share of the inbox.
const MAX_INBOX_MSGS: usize = 256;
const MAX_INBOX_FRAMES: usize = 16 * 1024;
/// Vectored writes per connection per flush; a connection with more left stays dirty.
const MAX_WRITES_PER_FLUSH: usize = 4;
/// Slices per vectored write (Linux IOV_MAX is 1024), and the smaller array used when few
/// frames are queued.
const MAX_IOVECS: usize = 1024;
const SMALL_IOVECS: usize = 64;
/// How often the latency histograms are handed to the metrics board.
const METRICS_SNAPSHOT_EVERY: Duration = Duration::from_millis(250);
/// Bytes per vectored write.
const MAX_WRITE_BYTES: usize = 512 * 1024;
/// Write coalescing (`delivery.reactor_writes_per_s`) stops waiting once this much is queued for a
/// connection: a write() costs about the same up to this size, so waiting longer gains nothing.
const COALESCE_BYTES: usize = 16 * 1024;
/// Longest sleep while reads are held back for a peer shard whose inbox is full.
const THROTTLE_NAP: Duration = Duration::from_micros(200);
/// Connections accepted per loop turn.
const MAX_ACCEPTS: usize = 256;
/// How often keep-alive and handshake deadlines are checked.
const TIMER_TICK: Duration = Duration::from_millis(25);
/// How long a connection being closed with an ERROR may take to read it before it is dropped.
const LINGER: Duration = Duration::from_secs(1);
/// How often the per-connection figures that STATS shows are refreshed.
const CONN_STATS_EVERY: Duration = Duration::from_millis(250);

/// Messages between shards (and from the embedding handle into a shard).
pub(crate) enum ShardMsg {
    /// A connection accepted by shard 0, now owned by the receiver.
    NewConn {
        stream: TcpStream,
        conn_id: u64,
    },
    /// PUBLISH frames for topics the receiver owns, each preceded by its ingest time (u64 LE ns).
    Publish(Vec<u8>),
    /// DATA frames from owner shard `from`, in the owner's order.
    Deliver {
        from: u16,
        frames: Vec<SharedFrame>,
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
    /// Replay these topics of the receiver's from the given sequence numbers to a connection that
    /// fell behind (mode `all`).
    ReplayRequest {
        from: u16,
        conn: ConnRef,
        topics: Vec<(String, u64)>,
    },
    /// The answer to a `ReplayRequest`: the frames, and per topic `None` (caught up) or the seq to
    /// continue from.
    ReplayReply {
        conn: ConnRef,
        frames: Vec<SharedFrame>,
        topics: Vec<(String, Option<u64>)>,
    },
    Shutdown,
}

/// A connection on a shard: its slot and its engine-wide id (slots are reused, ids are not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnRef {
    slot: u32,
    id: u64,
}

/// Where a subscription lives on a shard: a connection slot and a shard-unique key (never reused,
/// so a late snapshot reply cannot land on a newer subscription with the same client id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubRef {
    slot: u32,
    key: u64,
}

struct Sub {
    sub_id: u32,
    key: u64,
    pattern: String,
    mode: DeliveryMode,
    /// Bit i set: the snapshot from shard i has not arrived; its live frames are skipped.
    pending: u64,
}

enum Phase {
    AwaitHello {
        deadline: Instant,
    },
    Open,
    /// ERROR sent and write side shut; input is read and discarded until EOF or the deadline.
    Closing {
        deadline: Instant,
        /// The ERROR has been written and the write side shut.
        write_shut: bool,
    },
}

struct Conn {
    stream: TcpStream,
    id: u64,
    phase: Phase,
    client_id: String,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    outbox: Outbox,
    subs: Vec<Sub>,
    keepalive: Duration,
    last_heard: Instant,
    last_sent: Instant,
    ping_outstanding: bool,
    /// False after a write hit WouldBlock, until the next writable event.
    writable: bool,
    in_dirty: bool,
    /// Last delivery stamp this connection was given a frame for (dedups overlapping subs).
    stamp: u64,
    /// `latest` mode overflow: newest frame per topic, waiting for room.
    conflated: HashMap<String, SharedFrame>,
    /// `delivery.conflate_always`: `latest` subscriptions conflate even when the queue has room.
    conflate_always: bool,
    /// `all` mode overflow: per topic the next sequence number it needs from the replay ring.
    /// Live frames of a lagged topic are skipped: the replay will carry them.
    lag: HashMap<String, Lag>,
    stats: ConnCounters,
}

#[derive(Debug, Clone, Copy)]
struct Lag {
    next_seq: u64,
    /// A ReplayRequest is in flight for this topic.
    requested: bool,
}

/// What `lanpush stats` shows for one connection.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ConnCounters {
    pub delivered: u64,
    pub conflated: u64,
    /// Live frames skipped while the topic was being caught up from the ring.
    pub lagged: u64,
    pub replayed: u64,
    pub gaps: u64,
    /// Earlier connections with the same client id.
    pub reconnects: u64,
}

/// Counters kept as plain integers on the hot path and published to [`ShardStats`] once a turn.
#[derive(Default, Clone, Copy)]
struct Counters {
    publishes_in: u64,
    delivered: u64,
    bytes_written: u64,
    writes: u64,
    dropped_all: u64,
    conflated: u64,
    slow_disconnects: u64,
    protocol_errors: u64,
    keepalive_timeouts: u64,
    handshake_timeouts: u64,
    accepted: u64,
    /// Loop turns that held socket reads back because a peer shard's inbox was full.
    throttled_turns: u64,
}

pub(crate) struct Shard {
    id: u16,
    n_shards: u16,
    config: Arc<Config>,
    shared: Arc<EngineShared>,
    poll: Poll,
    listener: Option<TcpListener>,
    next_target: usize,
    inbox: Inbox<ShardMsg>,
    peers: Vec<Mailbox<ShardMsg>>,
    /// Messages for each peer shard, sent at the end of the turn (in order).
    outgoing: Vec<Vec<ShardMsg>>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    dirty: Vec<usize>,
    read_again: Vec<usize>,
    index: TopicIndex<SubRef>,
    store: TopicStore,
    matches: Vec<SubRef>,
    scratch: Vec<u8>,
    next_sub_key: u64,
    stamp: u64,
    next_tick: Instant,
    next_conn_stats: Instant,
    metrics: ShardMetrics,
    next_metrics: Instant,
    counters: Counters,
    shutting_down: bool,
    /// A peer's inbox was full at the end of the last turn: socket reads wait (the publishers
    /// feel TCP backpressure) until it has taken this shard's backlog. Bounds what the engine
    /// holds for a peer to about one turn of input.
    throttled: bool,
    /// Write coalescing: least time between two writes to one connection, from
    /// [`coalescing_interval`] at every timer tick.
    write_interval: Duration,
    /// Some dirty connection can be written now: the next poll must not sleep.
    flush_now: bool,
    /// Earliest moment a dirty connection held back by write coalescing may be written.
    flush_at: Option<Instant>,
    /// Wakes the poll at `flush_at` with microsecond precision.
    timer: DeadlineTimer,
    /// Topic owners this shard has looked up.
    owners: OwnerCache,
}

/// A fatal error on a connection: the ERROR frame to send before closing.
struct Fatal {
    code: u16,
    reason: String,
}

impl Fatal {
    fn new(code: u16, reason: impl Into<String>) -> Fatal {
        Fatal {
            code,
            reason: reason.into(),
        }
    }
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u16,
        n_shards: u16,
        config: Arc<Config>,
        shared: Arc<EngineShared>,
        poll: Poll,
        listener: Option<TcpListener>,
        inbox: Inbox<ShardMsg>,
        peers: Vec<Mailbox<ShardMsg>>,
    ) -> io::Result<Shard> {
        let mut listener = listener;
        if let Some(l) = listener.as_mut() {
            poll.registry()
                .register(l, LISTENER_TOKEN, Interest::READABLE)?;
        }
        let mut timer = DeadlineTimer::new()?;
        poll.registry()
            .register(&mut timer, TIMER_TOKEN, Interest::READABLE)?;
        let store = TopicStore::new(config.retained.ring_bytes / n_shards as usize);
        let metrics = ShardMetrics::new(&config.metrics);
        Ok(Shard {
            store,
            metrics,
            id,
            n_shards,
            config,
            shared,
            poll,
            listener,
            next_target: 0,
            inbox,
            peers,
            outgoing: (0..n_shards).map(|_| Vec::new()).collect(),
            conns: Vec::new(),
            free_slots: Vec::new(),
            dirty: Vec::new(),
            read_again: Vec::new(),
            index: TopicIndex::new(),
            matches: Vec::new(),
            scratch: Vec::with_capacity(4096),
            next_sub_key: 1,
            stamp: 0,
            next_tick: Instant::now(),
            next_conn_stats: Instant::now(),
            next_metrics: Instant::now(),
            counters: Counters::default(),
            shutting_down: false,
            throttled: false,
            write_interval: Duration::ZERO,
            flush_now: false,
            flush_at: None,
            timer,
            owners: OwnerCache::default(),
        })
    }

    /// The event loop. Returns when the engine shuts down.
    pub(crate) fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(MAX_EVENTS);
        while !self.shutting_down {
            let busy = self.flush_now || (!self.read_again.is_empty() && !self.throttled);
            let timeout = if busy || !self.inbox.arm_and_check_empty() {
                Duration::ZERO
            } else {
                let before = Instant::now();
                let mut wake = if self.throttled {
                    before + THROTTLE_NAP
                } else {
                    self.next_tick
                };
                if let Some(at) = self.flush_at.filter(|&at| at < wake) {
                    // The poll's own timeout has millisecond steps; the timer is exact.
                    self.timer.arm(at, before)?;
                    wake = at;
                }
                wake.saturating_duration_since(before)
            };
            match self.poll.poll(&mut events, Some(timeout)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER_TOKEN => {}
                    TIMER_TOKEN => self.timer.fired(),
                    LISTENER_TOKEN => self.accept(now),
                    Token(slot) => {
                        if event.is_writable() {
                            if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
                                conn.writable = true;
                                mark_dirty(conn, slot, &mut self.dirty);
                            }
                        }
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            if self.throttled {
                                self.read_again.push(slot);
                            } else {
                                self.handle_readable(slot, now);
                            }
                        }
                    }
                }
            }
            if !self.throttled {
                for slot in std::mem::take(&mut self.read_again) {
                    self.handle_readable(slot, now);
                }
            }
            self.drain_inbox(now);
            if now >= self.next_tick {
                self.check_timers(now);
                self.next_tick = now + TIMER_TICK;
                if now >= self.next_conn_stats {
                    self.publish_conn_stats();
                    self.next_conn_stats = now + CONN_STATS_EVERY;
                }
                if now >= self.next_metrics {
                    let snapshot = self.metrics.snapshot();
                    self.shared.metrics.publish(self.id as usize, snapshot);
                    self.next_metrics = now + METRICS_SNAPSHOT_EVERY;
                }
            }
            self.flush_dirty(now);
            self.send_outgoing();
            self.publish_stats();
        }
        self.close_all();
        Ok(())
    }

    // ----- accepting -----

    fn accept(&mut self, now: Instant) {
        for _ in 0..MAX_ACCEPTS {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (stream, _peer) = match listener.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the backlog until the next event.
                    eprintln!("lanpush: accept failed: {e}");
                    return;
                }
            };
            let open = self.shared.open_connections.fetch_add(1, Ordering::Relaxed);
            if open >= self.config.limits.max_connections {
                self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
                refuse(
                    stream,
                    error_code::TOO_MANY_CONNECTIONS,
                    "the engine is at max_connections",
                );
                continue;
            }
            let _ = stream.set_nodelay(true);
            let sndbuf = self.config.delivery.socket_send_buffer_bytes;
            if sndbuf > 0 {
                // Bounds what the kernel holds for a subscriber that stopped reading: less to
                // retransmit into its full window, less latency hidden below the outbox.
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(sndbuf);
            }
            let conn_id = self.shared.next_conn_id.fetch_add(1, Ordering::Relaxed);
            self.counters.accepted += 1;
            let target = self.next_target % self.n_shards as usize;
            self.next_target = self.next_target.wrapping_add(1);
            if target == self.id as usize {
                self.add_conn(stream, conn_id, now);
            } else {
                self.outgoing[target].push(ShardMsg::NewConn { stream, conn_id });
            }
        }
        // Budget spent: connections may remain in the backlog, and mio will not report them again.
        self.next_tick = now;
    }

    fn add_conn(&mut self, mut stream: TcpStream, conn_id: u64, now: Instant) {
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.conns.push(None);
            self.conns.len() - 1
        });
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(slot),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            eprintln!("lanpush: cannot register connection {conn_id}: {e}");
            self.free_slots.push(slot);
            self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let limits = &self.config.limits;
        let delivery = &self.config.delivery;
        self.conns[slot] = Some(Conn {
            stream,
            id: conn_id,
            phase: Phase::AwaitHello {
                deadline: now + Duration::from_millis(limits.handshake_timeout_ms),
            },
            client_id: String::new(),
            rbuf: vec![0; READ_BUFFER_BYTES],
            rstart: 0,
            rend: 0,
            outbox: Outbox::new(delivery.queue_max_bytes, delivery.queue_max_messages),
            subs: Vec::new(),
            keepalive: Duration::from_millis(self.config.keepalive.default_ms as u64),
            last_heard: now,
            last_sent: now,
            ping_outstanding: false,
            writable: false,
            in_dirty: false,
            stamp: 0,
            conflated: HashMap::default(),
            lag: HashMap::default(),
            conflate_always: self.config.delivery.conflate_always,
            stats: ConnCounters::default(),
        });
        // Data may have arrived before registration: edge-triggered readiness would not report it.
        self.read_again.push(slot);
    }

    // ----- reading -----

    fn handle_readable(&mut self, slot: usize, now: Instant) {
        let max_frame = self.config.limits.max_frame_bytes;
        let mut budget = READ_BUDGET_BYTES;
        loop {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            if conn.rend == conn.rbuf.len() {
                compact(conn, max_frame);
            }
            let (rend, len) = (conn.rend, conn.rbuf.len());
            match conn.stream.read(&mut conn.rbuf[rend..len]) {
                Ok(0) => {
                    self.close(slot);
                    return;
                }
                Ok(n) => {
                    conn.rend += n;
                    conn.last_heard = now;
                    if let Phase::Closing { .. } = conn.phase {
                        conn.rstart = 0;
                        conn.rend = 0;
                    } else if let Err(fatal) = self.handle_frames(slot, now) {
                        self.fail(slot, fatal, now);
                        return;
                    }
                    budget = budget.saturating_sub(n);
                    if budget == 0 {
                        self.read_again.push(slot);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.close(slot);
                    return;
                }
            }
        }
    }

    /// Decodes and handles every whole frame in the connection's read buffer.
    fn handle_frames(&mut self, slot: usize, now: Instant) -> Result<(), Fatal> {
        let max_frame = self.config.limits.max_frame_bytes;
        let conn = self.conn_mut(slot);
        let rbuf = std::mem::take(&mut conn.rbuf);
        let (mut start, end) = (conn.rstart, conn.rend);
        // The ingest time of every PUBLISH in this read: when the engine took it off the socket
        // (one clock read per read, not per message).
        let read_ns = now_unix_ns();
        let result = loop {
            match decode_frame(&rbuf[start..end], max_frame) {
                Ok(Decoded::Frame(frame, used)) => {
                    start += used;
                    if let Err(fatal) = self.handle_frame(slot, frame, now, read_ns) {
                        break Err(fatal);
                    }
                }
                Ok(Decoded::NeedMore(_)) => break Ok(()),
                Err(e) => break Err(Fatal::new(e.code(), e.to_string())),
            }
        };
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return result;
        };
        conn.rbuf = rbuf;
        conn.rstart = start;
        if start == end {
            conn.rstart = 0;
            conn.rend = 0;
        }
        result
    }

    fn handle_frame(
        &mut self,
        slot: usize,
        frame: Frame<'_>,
        now: Instant,
        read_ns: u64,
    ) -> Result<(), Fatal> {
        let conn = self.conn_mut(slot);
        if let Phase::AwaitHello { .. } = conn.phase {
            let Frame::Hello(hello) = frame else {
                return Err(Fatal::new(
                    error_code::HANDSHAKE,
                    "the first frame must be HELLO",
                ));
            };
            return self.handle_hello(slot, hello, now);
        }
        match frame {
            Frame::Publish(publish) => self.handle_publish(slot, &publish, read_ns),
            Frame::Subscribe(subscribe) => self.handle_subscribe(slot, subscribe),
            Frame::Unsubscribe(u) => {
                let conn = self.conn_mut(slot);
                match conn.subs.iter().position(|s| s.sub_id == u.sub_id) {
                    Some(i) => {
                        let sub = conn.subs.swap_remove(i);
                        self.index.remove(
                            &sub.pattern,
                            &SubRef {
                                slot: slot as u32,
                                key: sub.key,
                            },
                        );
                    }
                    None => self.send_error(
                        slot,
                        error_code::UNKNOWN_SUBSCRIPTION,
                        &format!("UNSUBSCRIBE: no subscription with id {}", u.sub_id),
                    ),
                }
                Ok(())
            }
            Frame::Ping { nonce } => {
                self.scratch.clear();
                proto::encode_pong(&mut self.scratch, nonce);
                self.send_control(slot);
                Ok(())
            }
            Frame::Pong { .. } => {
                self.conn_mut(slot).ping_outstanding = false;
                Ok(())
            }
            Frame::StatsRequest => {
                let json = self.shared.stats_json();
                self.scratch.clear();
                proto::encode_control(&mut self.scratch, &Frame::Stats(json));
                self.send_control(slot);
                Ok(())
            }
            Frame::Hello(_) => Err(Fatal::new(error_code::HANDSHAKE, "HELLO sent twice")),
            Frame::Error(e) => Err(Fatal::new(
                error_code::UNEXPECTED_FRAME,
                format!("client sent ERROR {}: {}", e.code, e.reason),
            )),
            Frame::Welcome(_)
            | Frame::SubAck(_)
            | Frame::Data { .. }
            | Frame::Gap(_)
            | Frame::Stats(_) => Err(Fatal::new(
                error_code::UNEXPECTED_FRAME,
                "this frame kind is sent only by the engine",
            )),
        }
    }

    fn handle_hello(
        &mut self,
        slot: usize,
        hello: proto::Hello,
        now: Instant,
    ) -> Result<(), Fatal> {
        if hello.version != PROTOCOL_VERSION {
            return Err(Fatal::new(
                error_code::VERSION,
                format!(
                    "protocol version {} is not supported (this engine speaks {PROTOCOL_VERSION})",
                    hello.version
                ),
            ));
        }
        let k = &self.config.keepalive;
        let keepalive_ms = match hello.keepalive_ms {
            0 => k.default_ms,
            ms => ms.clamp(k.min_ms, k.max_ms),
        };
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            keepalive_ms,
            max_frame_bytes: self.config.limits.max_frame_bytes as u32,
            max_subscriptions: self.config.limits.max_subscriptions_per_connection as u32,
            reactor: self.id,
            connection_id: self.conn_mut(slot).id,
            engine_id: self.shared.engine_id,
        };
        let reconnects = if hello.client_id.is_empty() {
            0
        } else {
            let mut sessions = self
                .shared
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let seen = sessions.entry(hello.client_id.clone()).or_insert(0);
            *seen += 1;
            *seen - 1
        };
        let conn = self.conn_mut(slot);
        conn.stats.reconnects = reconnects;
        conn.phase = Phase::Open;
        conn.client_id = hello.client_id;
        conn.keepalive = Duration::from_millis(keepalive_ms as u64);
        conn.last_heard = now;
        self.scratch.clear();
        proto::encode_control(&mut self.scratch, &Frame::Welcome(welcome));
        self.send_control(slot);
        Ok(())
    }

    fn handle_publish(
        &mut self,
        slot: usize,
        publish: &PublishRef<'_>,
        ingest_ts_ns: u64,
    ) -> Result<(), Fatal> {
        if let Err(e) = proto::validate_topic(publish.topic, self.config.limits.max_topic_bytes) {
            self.send_error(
                slot,
                error_code::BAD_TOPIC,
                &format!("PUBLISH to {:?}: {e}", publish.topic),
            );
            return Ok(());
        }
        self.route_publish(publish, ingest_ts_ns);
        Ok(())
    }

    /// Sends a validated publish to its topic's owner (maybe this shard).
    fn route_publish(&mut self, publish: &PublishRef<'_>, ingest_ts_ns: u64) {
        self.counters.publishes_in += 1;
        let owner = self
            .owners
            .for_publish(&self.shared.owners, publish.topic, self.id);
        if owner == self.id {
            self.ingest(publish, ingest_ts_ns);
            return;
        }
        let batch = match self.outgoing[owner as usize].last_mut() {
            Some(ShardMsg::Publish(buf)) => buf,
            _ => {
                self.outgoing[owner as usize]
                    .push(ShardMsg::Publish(Vec::with_capacity(16 * 1024)));
                let Some(ShardMsg::Publish(buf)) = self.outgoing[owner as usize].last_mut() else {
                    unreachable!("just pushed a Publish batch")
                };
                buf
            }
        };
        batch.extend_from_slice(&ingest_ts_ns.to_le_bytes());
        proto::encode_publish(batch, publish);
    }

    /// The owner's half of a publish: sequence, encode once, retain, fan out.
    fn ingest(&mut self, publish: &PublishRef<'_>, ingest_ts_ns: u64) {
        let frame = self.store.ingest(publish, ingest_ts_ns, &mut self.scratch);
        for peer in 0..self.n_shards {
            if peer == self.id {
                continue;
            }
            let queue = &mut self.outgoing[peer as usize];
            match queue.last_mut() {
                Some(ShardMsg::Deliver { frames, .. }) => frames.push(frame.clone()),
                _ => queue.push(ShardMsg::Deliver {
                    from: self.id,
                    frames: vec![frame.clone()],
                }),
            }
        }
        self.deliver(self.id, &frame);
    }

    /// Queues a DATA frame from owner `from` to every matching local subscription.
    fn deliver(&mut self, from: u16, frame: &SharedFrame) {
        let Some(topic) = data_frame_topic(frame) else {
            return;
        };
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        self.index.collect_matches(topic, &mut matches);
        if matches.is_empty() {
            self.matches = matches;
            return;
        }
        self.stamp += 1;
        let from_bit = 1u64 << from;
        for m in &matches {
            let slot = m.slot as usize;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.stamp == self.stamp {
                continue;
            }
            let Some(sub) = conn.subs.iter().find(|s| s.key == m.key) else {
                continue;
            };
            if sub.pending & from_bit != 0 {
                continue;
            }
            let mode = sub.mode;
            conn.stamp = self.stamp;
            match enqueue(conn, topic, frame, mode, &mut self.counters) {
                Ok(()) => mark_dirty(conn, slot, &mut self.dirty),
                Err(()) => self.slow_consumer(slot),
            }
        }
        self.matches = matches;
    }

    fn handle_subscribe(&mut self, slot: usize, subscribe: Subscribe) -> Result<(), Fatal> {
        let limits = &self.config.limits;
        let conn = self.conns[slot].as_ref().expect("slot is live");
        let refusal =
            if let Err(e) = proto::validate_pattern(&subscribe.pattern, limits.max_topic_bytes) {
                Some((
                    error_code::BAD_TOPIC,
                    format!("SUBSCRIBE {:?}: {e}", subscribe.pattern),
                ))
            } else if conn.subs.iter().any(|s| s.sub_id == subscribe.sub_id) {
                Some((
                    error_code::UNKNOWN_SUBSCRIPTION,
                    format!("SUBSCRIBE: id {} is already in use", subscribe.sub_id),
                ))
            } else if conn.subs.len() >= limits.max_subscriptions_per_connection {
                Some((
                    error_code::TOO_MANY_SUBSCRIPTIONS,
                    format!(
                        "SUBSCRIBE: at most {} subscriptions per connection",
                        limits.max_subscriptions_per_connection
                    ),
                ))
            } else {
                None
            };
        if let Some((code, reason)) = refusal {
            self.send_error(slot, code, &reason);
            return Ok(());
        }
        let mode = match subscribe.mode {
            DeliveryMode::Default => self.config.delivery.default_mode,
            mode => mode,
        };
        // A non-empty resume list makes this a resume (an entry with the empty topic, which no
        // message can have, says "resuming, but nothing seen yet").
        let resume = (!subscribe.resume.is_empty()).then(|| {
            Arc::new(
                subscribe
                    .resume
                    .iter()
                    .filter(|p| !p.topic.is_empty())
                    .map(|p| (p.topic.clone(), p.last_seq))
                    .collect::<HashMap<String, u64>>(),
            )
        });
        let key = self.next_sub_key;
        self.next_sub_key += 1;
        let sub_ref = SubRef {
            slot: slot as u32,
            key,
        };
        let all_peers = ((1u64 << self.n_shards) - 1) & !(1u64 << self.id);
        self.index.insert(&subscribe.pattern, sub_ref);
        self.conn_mut(slot).subs.push(Sub {
            sub_id: subscribe.sub_id,
            key,
            pattern: subscribe.pattern.clone(),
            mode,
            pending: all_peers,
        });
        for peer in 0..self.n_shards {
            if peer != self.id {
                self.outgoing[peer as usize].push(ShardMsg::SnapshotRequest {
                    from: self.id,
                    sub: sub_ref,
                    pattern: subscribe.pattern.clone(),
                    resume: resume.clone(),
                });
            }
        }
        let (frames, lagged) = self.snapshot(&subscribe.pattern, resume.as_deref());
        self.handle_snapshot_reply(self.id, sub_ref, frames, lagged);
        Ok(())
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
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let Some(s) = conn.subs.iter_mut().find(|s| s.key == sub.key) else {
            return;
        };
        s.pending &= !(1u64 << from);
        let (mode, sub_id, complete) = (s.mode, s.sub_id, s.pending == 0);
        // Bounded by the number of topics (snapshot) or the replay budget (resume).
        queue_replayed(conn, frames);
        for (topic, next_seq) in lagged {
            conn.lag.insert(
                topic,
                Lag {
                    next_seq,
                    requested: false,
                },
            );
        }
        if complete {
            // SUBACK closes the snapshot: every snapshot frame of this subscription precedes it.
            self.scratch.clear();
            proto::encode_control(&mut self.scratch, &Frame::SubAck(SubAck { sub_id, mode }));
            self.send_control(slot);
        } else {
            mark_dirty(conn, slot, &mut self.dirty);
        }
    }

    /// Asks the owners of a lagging connection's topics for the messages it missed, once its
    /// outbox has room again.
    fn request_replays(&mut self, slot: usize) {
        let conn = self.conns[slot].as_mut().expect("slot is live");
        let mut by_owner: Vec<Vec<(String, u64)>> = vec![Vec::new(); self.n_shards as usize];
        for (topic, lag) in conn.lag.iter_mut().filter(|(_, lag)| !lag.requested) {
            lag.requested = true;
            let owner = self.owners.lookup(&self.shared.owners, topic);
            by_owner[owner as usize].push((topic.clone(), lag.next_seq));
        }
        let conn_ref = ConnRef {
            slot: slot as u32,
            id: conn.id,
        };
        for (owner, topics) in by_owner.into_iter().enumerate() {
            if topics.is_empty() {
                continue;
            }
            if owner == self.id as usize {
                let reply = self.replay(topics);
                self.handle_replay_reply(conn_ref, reply.0, reply.1);
            } else {
                self.outgoing[owner].push(ShardMsg::ReplayRequest {
                    from: self.id,
                    conn: conn_ref,
                    topics,
                });
            }
        }
    }

    /// The owner's side of a catch-up: frames from the ring, within one outbox's worth of bytes.
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
        conn_ref: ConnRef,
        frames: Vec<SharedFrame>,
        topics: Vec<(String, Option<u64>)>,
    ) {
        let slot = conn_ref.slot as usize;
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if conn.id != conn_ref.id || !matches!(conn.phase, Phase::Open) {
            return;
        }
        queue_replayed(conn, frames);
        for (topic, next) in topics {
            match next {
                None => {
                    conn.lag.remove(&topic);
                }
                Some(next_seq) => {
                    conn.lag.insert(
                        topic,
                        Lag {
                            next_seq,
                            requested: false,
                        },
                    );
                }
            }
        }
        mark_dirty(conn, slot, &mut self.dirty);
    }

    // ----- cross-shard messages -----

    fn drain_inbox(&mut self, now: Instant) {
        let mut frames_budget = MAX_INBOX_FRAMES;
        for _ in 0..MAX_INBOX_MSGS {
            if frames_budget == 0 {
                return;
            }
            let Ok(msg) = self.inbox.rx.try_recv() else {
                return;
            };
            match &msg {
                // A publish batch holds frames of at least PUBLISH_FIXED_BYTES each.
                ShardMsg::Publish(buf) => {
                    frames_budget = frames_budget.saturating_sub(buf.len() / 64 + 1)
                }
                ShardMsg::Deliver { frames, .. } => {
                    frames_budget = frames_budget.saturating_sub(frames.len())
                }
                _ => {}
            }
            match msg {
                ShardMsg::NewConn { stream, conn_id } => self.add_conn(stream, conn_id, now),
                ShardMsg::Publish(buf) => self.handle_publish_batch(&buf),
                ShardMsg::Deliver { from, frames } => {
                    for frame in &frames {
                        self.deliver(from, frame);
                    }
                }
                ShardMsg::SnapshotRequest {
                    from,
                    sub,
                    pattern,
                    resume,
                } => {
                    let (frames, lagged) = self.snapshot(&pattern, resume.as_deref());
                    let reply = ShardMsg::SnapshotReply {
                        from: self.id,
                        sub,
                        frames,
                        lagged,
                    };
                    self.outgoing[from as usize].push(reply);
                }
                ShardMsg::SnapshotReply {
                    from,
                    sub,
                    frames,
                    lagged,
                } => self.handle_snapshot_reply(from, sub, frames, lagged),
                ShardMsg::ReplayRequest { from, conn, topics } => {
                    let (frames, topics) = self.replay(topics);
                    self.outgoing[from as usize].push(ShardMsg::ReplayReply {
                        conn,
                        frames,
                        topics,
                    });
                }
                ShardMsg::ReplayReply {
                    conn,
                    frames,
                    topics,
                } => self.handle_replay_reply(conn, frames, topics),
                ShardMsg::Shutdown => self.shutting_down = true,
            }
        }
    }

    fn handle_publish_batch(&mut self, mut buf: &[u8]) {
        let max_frame = usize::MAX;
        while buf.len() > 8 {
            let ingest_ts_ns = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            match decode_frame(&buf[8..], max_frame) {
                Ok(Decoded::Frame(Frame::Publish(publish), used)) => {
                    self.ingest(&publish, ingest_ts_ns);
                    buf = &buf[8 + used..];
                }
                // Batches are built by shards and the local publisher from validated frames.
                other => unreachable!("corrupt internal publish batch: {other:?}"),
            }
        }
    }

    fn send_outgoing(&mut self) {
        for peer in 0..self.n_shards as usize {
            if self.outgoing[peer].is_empty() {
                continue;
            }
            let mut kept = Vec::new();
            for msg in self.outgoing[peer].drain(..) {
                if !kept.is_empty() {
                    kept.push(msg);
                    continue;
                }
                match self.peers[peer].try_send(msg) {
                    Ok(()) => {}
                    Err(TrySendError::Full(msg)) => kept.push(msg),
                    Err(TrySendError::Disconnected(_)) => {}
                }
            }
            // A full inbox means the peer is behind; keep the rest, in order, for the next turn.
            self.outgoing[peer] = kept;
        }
        self.throttled = self.outgoing.iter().any(|q| !q.is_empty());
        if self.throttled {
            self.counters.throttled_turns += 1;
        }
    }

    // ----- writing -----

    fn send_control(&mut self, slot: usize) {
        let frame: SharedFrame = Arc::from(&self.scratch[..]);
        let conn = self.conns[slot].as_mut().expect("slot is live");
        conn.outbox.push_unbounded(frame);
        mark_dirty(conn, slot, &mut self.dirty);
    }

    fn send_error(&mut self, slot: usize, code: u16, reason: &str) {
        self.counters.protocol_errors += 1;
        self.scratch.clear();
        proto::encode_control(
            &mut self.scratch,
            &Frame::Error(WireError {
                code,
                reason: reason.to_string(),
            }),
        );
        self.send_control(slot);
    }

    fn flush_dirty(&mut self, now: Instant) {
        let dirty = std::mem::take(&mut self.dirty);
        let mut still = Vec::new();
        self.flush_now = false;
        self.flush_at = None;
        for slot in dirty {
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if let Some(due) = coalesce_until(conn, self.write_interval, now) {
                // Stays dirty (in_dirty still set) and is written when the interval is up.
                still.push(slot);
                self.flush_at = Some(self.flush_at.map_or(due, |at| at.min(due)));
                continue;
            }
            conn.in_dirty = false;
            match flush(conn, now, &mut self.counters, &mut self.metrics) {
                Ok(()) => {
                    shut_write_when_flushed(conn);
                    let needs_replay =
                        conn.outbox.is_below_half() && conn.lag.values().any(|l| !l.requested);
                    if conn.writable && !conn.outbox.is_empty() {
                        conn.in_dirty = true;
                        still.push(slot);
                        self.flush_now = true;
                    }
                    if needs_replay {
                        self.request_replays(slot);
                    }
                }
                Err(_) => self.close(slot),
            }
        }
        // Marked dirty while flushing (replay requests, closes): write them next turn.
        self.flush_now |= !self.dirty.is_empty();
        still.append(&mut self.dirty);
        self.dirty = still;
    }

    // ----- timers, errors and closing -----

    fn check_timers(&mut self, now: Instant) {
        // Busy connections: written within the last tick, or within two intervals, so that
        // connections held back by coalescing still count while they are held back.
        let recent = TIMER_TICK.max(2 * self.write_interval);
        let mut recently_written = 0;
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else {
                continue;
            };
            if now.saturating_duration_since(conn.last_sent) < recent {
                recently_written += 1;
            }
            match conn.phase {
                Phase::AwaitHello { deadline } if now >= deadline => {
                    self.counters.handshake_timeouts += 1;
                    let reason = format!(
                        "no HELLO within {} ms",
                        self.config.limits.handshake_timeout_ms
                    );
                    self.fail(slot, Fatal::new(error_code::HANDSHAKE_TIMEOUT, reason), now);
                }
                Phase::Closing { deadline, .. } if now >= deadline => self.close(slot),
                Phase::Open => {
                    let silent = now.saturating_duration_since(conn.last_heard);
                    if silent >= conn.keepalive.mul_f32(1.5) {
                        self.counters.keepalive_timeouts += 1;
                        let reason = format!(
                            "nothing heard for {} ms (keep-alive {} ms)",
                            silent.as_millis(),
                            conn.keepalive.as_millis()
                        );
                        self.fail(slot, Fatal::new(error_code::KEEPALIVE_TIMEOUT, reason), now);
                    } else if !conn.ping_outstanding
                        && (silent >= conn.keepalive
                            || now.saturating_duration_since(conn.last_sent) >= conn.keepalive)
                    {
                        conn.ping_outstanding = true;
                        self.scratch.clear();
                        proto::encode_ping(&mut self.scratch, now_unix_ns());
                        self.send_control(slot);
                    }
                }
                _ => {}
            }
        }
        let d = &self.config.delivery;
        self.write_interval = coalescing_interval(
            recently_written,
            d.reactor_writes_per_s,
            Duration::from_micros(d.max_write_interval_us),
        );
    }

    fn slow_consumer(&mut self, slot: usize) {
        self.counters.slow_disconnects += 1;
        let fatal = Fatal::new(
            error_code::SLOW_CONSUMER,
            "outbound queue full and the subscription's mode is disconnect",
        );
        self.fail(slot, fatal, Instant::now());
    }

    /// Sends ERROR, shuts the write side and lingers so the peer can read it before the close.
    fn fail(&mut self, slot: usize, fatal: Fatal, now: Instant) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if let Phase::Closing { .. } = conn.phase {
            return;
        }
        self.counters.protocol_errors += 1;
        self.scratch.clear();
        proto::encode_control(
            &mut self.scratch,
            &Frame::Error(WireError {
                code: fatal.code,
                reason: fatal.reason,
            }),
        );
        self.remove_subs(slot);
        let frame: SharedFrame = Arc::from(&self.scratch[..]);
        let conn = self.conns[slot].as_mut().expect("slot is live");
        // The ERROR goes right after whatever frame the socket is in the middle of: queued data
        // behind it would only delay the reason (a slow consumer's queue is full by definition).
        conn.outbox.discard_unstarted();
        conn.conflated.clear();
        conn.lag.clear();
        conn.outbox.push_unbounded(frame);
        conn.writable = true;
        conn.phase = Phase::Closing {
            deadline: now + LINGER,
            write_shut: false,
        };
        conn.rstart = 0;
        conn.rend = 0;
        if flush(conn, now, &mut self.counters, &mut self.metrics).is_err() {
            self.close(slot);
            return;
        }
        shut_write_when_flushed(conn);
        mark_dirty(conn, slot, &mut self.dirty);
    }

    fn remove_subs(&mut self, slot: usize) {
        let conn = self.conns[slot].as_mut().expect("slot is live");
        for sub in conn.subs.drain(..) {
            self.index.remove(
                &sub.pattern,
                &SubRef {
                    slot: slot as u32,
                    key: sub.key,
                },
            );
        }
    }

    fn close(&mut self, slot: usize) {
        if self.conns.get(slot).and_then(Option::as_ref).is_none() {
            return;
        }
        self.remove_subs(slot);
        let mut conn = self.conns[slot].take().expect("checked above");
        self.metrics.remove_conn(conn.id);
        let _ = self.poll.registry().deregister(&mut conn.stream);
        self.free_slots.push(slot);
        self.shared.open_connections.fetch_sub(1, Ordering::Relaxed);
    }

    fn close_all(&mut self) {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            if self.conns[slot].is_some() {
                self.fail(
                    slot,
                    Fatal::new(error_code::SHUTTING_DOWN, "the engine is shutting down"),
                    now,
                );
                self.close(slot);
            }
        }
        self.publish_stats();
    }

    fn conn_mut(&mut self, slot: usize) -> &mut Conn {
        // Callers hold a slot they just looked up or were handed by the event loop for a live
        // connection; closing happens only through `close`, after which the slot is not used.
        self.conns[slot].as_mut().expect("slot is live")
    }

    fn publish_conn_stats(&self) {
        let list: Vec<serde_json::Value> = self
            .conns
            .iter()
            .flatten()
            .filter(|c| matches!(c.phase, Phase::Open))
            .map(|c| {
                let subs: Vec<serde_json::Value> = c
                    .subs
                    .iter()
                    .map(|s| serde_json::json!({"id": s.sub_id, "pattern": s.pattern, "mode": s.mode}))
                    .collect();
                serde_json::json!({
                    "id": c.id,
                    "client_id": c.client_id,
                    "reactor": self.id,
                    "subscriptions": subs,
                    "queue_frames": c.outbox.queued_frames(),
                    "queue_bytes": c.outbox.queued_bytes(),
                    "delivered": c.stats.delivered,
                    "conflated": c.stats.conflated,
                    "lagged": c.stats.lagged,
                    "lagging_topics": c.lag.len(),
                    "replayed": c.stats.replayed,
                    "gaps": c.stats.gaps,
                    "reconnects": c.stats.reconnects,
                })
            })
            .collect();
        let shard_stats = &self.shared.shards[self.id as usize];
        shard_stats
            .ring_bytes
            .store(self.store.ring_bytes(), Ordering::Relaxed);
        *shard_stats.conns.lock().unwrap_or_else(|e| e.into_inner()) = list;
    }

    /// Hands this turn's counters to readers on other threads: a few relaxed stores per turn,
    /// cheaper than deciding whether anything changed.
    fn publish_stats(&mut self) {
        let c = self.counters;
        let s: &ShardStats = &self.shared.shards[self.id as usize];
        s.publishes_in.store(c.publishes_in, Ordering::Relaxed);
        s.delivered.store(c.delivered, Ordering::Relaxed);
        s.bytes_written.store(c.bytes_written, Ordering::Relaxed);
        s.writes.store(c.writes, Ordering::Relaxed);
        s.dropped_all.store(c.dropped_all, Ordering::Relaxed);
        s.conflated.store(c.conflated, Ordering::Relaxed);
        s.slow_disconnects
            .store(c.slow_disconnects, Ordering::Relaxed);
        s.protocol_errors
            .store(c.protocol_errors, Ordering::Relaxed);
        s.keepalive_timeouts
            .store(c.keepalive_timeouts, Ordering::Relaxed);
        s.handshake_timeouts
            .store(c.handshake_timeouts, Ordering::Relaxed);
        s.accepted.store(c.accepted, Ordering::Relaxed);
        s.throttled_turns
            .store(c.throttled_turns, Ordering::Relaxed);
        s.connections
            .store(self.conns.len() - self.free_slots.len(), Ordering::Relaxed);
        s.subscriptions.store(self.index.len(), Ordering::Relaxed);
        s.topics_owned.store(self.store.len(), Ordering::Relaxed);
    }
}

/// A closing connection's write side is shut once its ERROR is out (FIN after the reason).
fn shut_write_when_flushed(conn: &mut Conn) {
    if let Phase::Closing {
        write_shut: shut @ false,
        ..
    } = &mut conn.phase
    {
        if conn.outbox.is_empty() {
            let _ = conn.stream.shutdown(Shutdown::Write);
            *shut = true;
        }
    }
}

fn mark_dirty(conn: &mut Conn, slot: usize, dirty: &mut Vec<usize>) {
    let pending = !conn.outbox.is_empty() || !conn.conflated.is_empty();
    if !conn.in_dirty && conn.writable && pending {
        conn.in_dirty = true;
        dirty.push(slot);
    }
}

/// Puts a frame on a connection's queue, applying the subscription's mode on overflow.
/// `Err` means the connection must be cut (mode `disconnect`).
fn enqueue(
    conn: &mut Conn,
    topic: &str,
    frame: &SharedFrame,
    mode: DeliveryMode,
    counters: &mut Counters,
) -> Result<(), ()> {
    // A topic with overflow state must not overtake it: newer values go the same way.
    if !conn.lag.is_empty() && conn.lag.contains_key(topic) {
        conn.stats.lagged += 1;
        return Ok(());
    }
    let conflating = mode == DeliveryMode::Latest
        && (conn.conflate_always || conn.conflated.contains_key(topic));
    if !conflating && conn.outbox.push(frame.clone()).is_ok() {
        counters.delivered += 1;
        conn.stats.delivered += 1;
        return Ok(());
    }
    match mode {
        DeliveryMode::Latest => {
            if conn
                .conflated
                .insert(topic.to_string(), frame.clone())
                .is_some()
            {
                counters.conflated += 1;
                conn.stats.conflated += 1;
            }
            Ok(())
        }
        DeliveryMode::All | DeliveryMode::Default => {
            counters.dropped_all += 1;
            conn.stats.lagged += 1;
            conn.lag.insert(
                topic.to_string(),
                Lag {
                    next_seq: data_seq(frame),
                    requested: false,
                },
            );
            Ok(())
        }
        DeliveryMode::Disconnect => Err(()),
    }
}

/// Queues the frames of a snapshot, resume or catch-up reply (bounded by their producer).
fn queue_replayed(conn: &mut Conn, frames: Vec<SharedFrame>) {
    for frame in frames {
        if frame.get(proto::LEN_PREFIX_BYTES) == Some(&proto::KIND_GAP) {
            conn.stats.gaps += 1;
        } else {
            conn.stats.replayed += 1;
        }
        conn.outbox.push_unbounded(frame);
    }
}

fn data_seq(frame: &[u8]) -> u64 {
    let at = proto::FRAME_HEADER_BYTES;
    u64::from_le_bytes(frame[at..at + 8].try_into().expect("DATA frame has a seq"))
}

/// Write coalescing: with `busy` connections each written at most once per interval, the
/// reactor makes at most `writes_per_s` writes a second. Capped at `max` (0 = off).
fn coalescing_interval(busy: usize, writes_per_s: u64, max: Duration) -> Duration {
    let nanos = (busy as u64).saturating_mul(1_000_000_000) / writes_per_s.max(1);
    Duration::from_nanos(nanos).min(max)
}

/// Write coalescing: `Some(when)` if `conn` was written to less than `interval` ago and should
/// wait until `when` for more frames to share the write. Connections with a full write's worth
/// queued, and closing ones, never wait.
fn coalesce_until(conn: &Conn, interval: Duration, now: Instant) -> Option<Instant> {
    if interval.is_zero()
        || conn.outbox.queued_bytes() >= COALESCE_BYTES
        || !matches!(conn.phase, Phase::Open)
    {
        return None;
    }
    let due = conn.last_sent + interval;
    (now < due).then_some(due)
}

/// Writes as much of the outbox as the socket takes, in vectored writes.
fn flush(
    conn: &mut Conn,
    now: Instant,
    counters: &mut Counters,
    metrics: &mut ShardMetrics,
) -> io::Result<()> {
    move_conflated(conn, counters);
    for _ in 0..MAX_WRITES_PER_FLUSH {
        if !conn.writable || conn.outbox.is_empty() {
            break;
        }
        // Most writes carry a few frames: a small slice array spares zeroing 16 KiB each time.
        let result = if conn.outbox.queued_frames() <= SMALL_IOVECS {
            write_queued::<SMALL_IOVECS>(conn)
        } else {
            write_queued::<MAX_IOVECS>(conn)
        };
        match result {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => {
                let (conn_id, now_ns) = (conn.id, now_unix_ns());
                conn.outbox.consume_with(written, |frame| {
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
                conn.last_sent = now;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.writable = false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    move_conflated(conn, counters);
    Ok(())
}

/// One vectored write of up to `N` queued frames.
fn write_queued<const N: usize>(conn: &mut Conn) -> io::Result<usize> {
    let mut slices = [IoSlice::new(&[]); N];
    let n = conn.outbox.fill_slices(&mut slices, MAX_WRITE_BYTES);
    conn.stream.write_vectored(&slices[..n])
}

/// Moves the conflated values (newest per topic) into the outbox once it has drained far
/// enough: below half its bounds after an overflow, or empty with `conflate_always` (a value
/// then waits only for the previous write, and newer values of its topic replace it meanwhile).
fn move_conflated(conn: &mut Conn, counters: &mut Counters) {
    let ready = if conn.conflate_always {
        conn.outbox.is_empty()
    } else {
        conn.outbox.is_below_half()
    };
    if ready && !conn.conflated.is_empty() {
        for (_topic, frame) in conn.conflated.drain() {
            conn.outbox.push_unbounded(frame);
            counters.delivered += 1;
            conn.stats.delivered += 1;
        }
    }
}

/// Makes room at the end of the read buffer: moves a partial frame to the front, and grows the
/// buffer (up to the largest allowed frame) when one frame does not fit.
fn compact(conn: &mut Conn, max_frame: usize) {
    let pending = conn.rend - conn.rstart;
    conn.rbuf.copy_within(conn.rstart..conn.rend, 0);
    conn.rstart = 0;
    conn.rend = pending;
    let need = proto::frame_len_hint(&conn.rbuf[..pending]).unwrap_or(0);
    if need > conn.rbuf.len() && need <= max_frame + proto::LEN_PREFIX_BYTES {
        conn.rbuf.resize(need, 0);
    } else if pending == 0 && conn.rbuf.len() > READ_BUFFER_BYTES {
        conn.rbuf.truncate(READ_BUFFER_BYTES);
        conn.rbuf.shrink_to_fit();
    }
}

/// Refuses a connection at accept time with an ERROR frame, best effort.
fn refuse(mut stream: TcpStream, code: u16, reason: &str) {
    let mut buf = Vec::new();
    proto::encode_control(
        &mut buf,
        &Frame::Error(WireError {
            code,
            reason: reason.to_string(),
        }),
    );
    let _ = stream.write(&buf);
    let _ = stream.shutdown(Shutdown::Write);
}

#[cfg(test)]
mod coalescing_tests {
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
}
