//! A deterministic test harness for the sans-IO core (quinn's `Pair` is the model): the cores
//! of N shards wired together in memory, clients as pretend sockets whose receive window the
//! test sets, and a virtual clock the test advances. No threads, no sockets, no sleeps.
//!
//! `Cluster::run` plays the reactors' turns until nothing moves: it flushes every core into its
//! pipes, then hands each core's outgoing messages to their peers in order, as the inboxes do.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{FanoutCore, Transport};
use super::wire::WireKind;
use super::EngineShared;
use crate::config::Config;
use crate::proto::{
    self, decode_frame, encode_frame, Decoded, DeliveryMode, Frame, Hello, PublishRef, Subscribe,
    TopicPosition, Unsubscribe,
};

/// What the driver reads of a resumed connection's waiting bytes per turn (a reactor reads
/// `READ_BUDGET_BYTES` per connection and turn; the tests' queues are small to match).
const READ_TURN_BYTES: usize = 4096;

/// The wall clock of the virtual time origin (ns since the UNIX epoch).
const T0_UNIX_NS: u64 = 1_700_000_000_000_000_000;

/// A client: the shard its connection is on and its slot there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Client {
    pub shard: u16,
    pub slot: usize,
}

/// What a client read, decoded and owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Got {
    Welcome {
        reactor: u16,
        keepalive_ms: u32,
    },
    SubAck {
        sub_id: u32,
        mode: DeliveryMode,
    },
    Data {
        topic: String,
        seq: u64,
        snapshot: bool,
        payload: Vec<u8>,
    },
    Gap {
        topic: String,
        from: u64,
        to: u64,
    },
    Error {
        code: u16,
    },
    Ping,
    Pong {
        nonce: u64,
    },
    Stats,
    /// Publisher acknowledgement: every PUBLISH up to `seq` handled.
    Ack {
        seq: u64,
    },
    /// A multicast frame (`mcast_core.rs`).
    Mcast(McastGot),
}

/// The multicast frames, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum McastGot {
    Channels(Vec<proto::ChannelInfo>),
    StreamPos(proto::StreamPos),
    Repair(Vec<u8>),
    RepairGone(proto::Nak),
}

/// One connection's pretend socket.
#[derive(Default)]
struct Pipe {
    /// Bytes the engine wrote that the client has not read.
    unread: Vec<u8>,
    /// Bytes the socket still accepts before a write would block.
    window: usize,
    /// The window the client restores each time it reads; 0 = stalled.
    capacity: usize,
    write_shut: bool,
    /// The engine dropped the connection.
    closed: bool,
    writes: u64,
    /// The reasons of the ERRORs and the documents of the STATS the client read, in order.
    reasons: Vec<String>,
    stats: Vec<String>,
    /// Bytes the client sent that the engine left unread (pacing paused the connection).
    unread_by_engine: Vec<u8>,
}

struct Pipes<'a> {
    pipes: &'a mut Vec<Pipe>,
    unix_ns: u64,
}

impl Transport for Pipes<'_> {
    fn write(&mut self, slot: usize, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let pipe = &mut self.pipes[slot];
        if pipe.window == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut written = 0;
        for s in slices {
            let take = s.len().min(pipe.window - written);
            pipe.unread.extend_from_slice(&s[..take]);
            written += take;
            if written == pipe.window {
                break;
            }
        }
        pipe.window -= written;
        pipe.writes += 1;
        Ok(written)
    }

    fn shutdown_write(&mut self, slot: usize) {
        self.pipes[slot].write_shut = true;
    }

    fn unix_ns(&mut self) -> u64 {
        self.unix_ns
    }
}

pub(crate) struct Cluster {
    t0: Instant,
    pub now: Instant,
    pub cores: Vec<FanoutCore>,
    pub shared: Arc<EngineShared>,
    pipes: Vec<Vec<Pipe>>,
    next_conn_id: u64,
    max_frame_bytes: usize,
    /// The verifier thread's part (`auth_core.rs`): `run` makes each argon2 run in line unless
    /// the test holds them back to look at a connection waiting for its verdict.
    hold_verifications: bool,
    held: Vec<(usize, super::core::VerifyRequest)>,
}

impl Cluster {
    /// `n` shards on the default config changed by `adjust`.
    pub(crate) fn new(n: u16, adjust: impl FnOnce(&mut Config)) -> Cluster {
        let mut config = Config::default();
        config.server.threads = n as usize;
        adjust(&mut config);
        let config = Arc::new(config);
        let shared = Arc::new(EngineShared::new(n as usize, &config));
        let t0 = Instant::now();
        Cluster {
            t0,
            now: t0,
            cores: (0..n)
                .map(|id| FanoutCore::new(id, n, config.clone(), shared.clone(), t0))
                .collect(),
            shared,
            pipes: (0..n).map(|_| Vec::new()).collect(),
            next_conn_id: 1,
            max_frame_bytes: config.limits.max_frame_bytes,
            hold_verifications: false,
            held: Vec::new(),
        }
    }

    fn unix_ns(&self) -> u64 {
        T0_UNIX_NS + (self.now - self.t0).as_nanos() as u64
    }

    /// A new connection on `shard` whose socket takes `capacity` bytes between two reads.
    pub(crate) fn connect_raw(&mut self, shard: u16, capacity: usize) -> Client {
        self.connect_raw_wire(shard, capacity, WireKind::Native)
    }

    fn connect_raw_wire(&mut self, shard: u16, capacity: usize, wire: WireKind) -> Client {
        let pipes = &mut self.pipes[shard as usize];
        let slot = pipes.iter().position(|p| p.closed).unwrap_or_else(|| {
            pipes.push(Pipe::default());
            pipes.len() - 1
        });
        pipes[slot] = Pipe {
            window: capacity,
            capacity,
            ..Pipe::default()
        };
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let core = &mut self.cores[shard as usize];
        core.open_wire(self.now, slot, id, wire);
        core.handle_writable(slot);
        Client { shard, slot }
    }

    /// A new MQTT connection on `shard`, reading freely; it has sent nothing yet.
    pub(crate) fn connect_mqtt_raw(&mut self, shard: u16) -> Client {
        self.connect_raw_wire(shard, usize::MAX / 2, WireKind::Mqtt)
    }

    /// Everything the client can read now, as raw bytes (an MQTT client decodes them itself).
    pub(crate) fn recv_bytes(&mut self, client: Client) -> Vec<u8> {
        let pipe = &mut self.pipes[client.shard as usize][client.slot];
        let bytes = std::mem::take(&mut pipe.unread);
        let blocked = pipe.window == 0;
        pipe.window = pipe.capacity;
        if blocked && pipe.capacity > 0 && !pipe.closed {
            self.cores[client.shard as usize].handle_writable(client.slot);
        }
        bytes
    }

    /// A connected client past its HELLO/WELCOME, reading freely.
    pub(crate) fn connect(&mut self, shard: u16, client_id: &str) -> Client {
        let client = self.connect_raw(shard, usize::MAX / 2);
        self.send(
            client,
            &Frame::Hello(Hello {
                version: proto::PROTOCOL_VERSION,
                client_id: client_id.into(),
                keepalive_ms: 0,
                token: String::new(),
                features: 0,
            }),
        );
        self.run();
        match self.recv(client).first() {
            Some(Got::Welcome { .. }) => client,
            other => panic!("expected WELCOME, got {other:?}"),
        }
    }

    /// Feeds one encoded frame to the engine (the bytes are all used: a frame is whole).
    pub(crate) fn send(&mut self, client: Client, frame: &Frame<'_>) {
        let mut bytes = Vec::new();
        encode_frame(&mut bytes, frame);
        self.send_bytes(client, &bytes);
    }

    /// Feeds raw bytes; returns how many the core used (the rest would stay in the read buffer).
    /// While pacing pauses the connection, its bytes wait (as in the kernel) until it resumes.
    pub(crate) fn send_bytes(&mut self, client: Client, bytes: &[u8]) -> usize {
        let read_ns = self.unix_ns();
        let (shard, slot) = (client.shard as usize, client.slot);
        let waiting = &mut self.pipes[shard][slot].unread_by_engine;
        if !waiting.is_empty() {
            waiting.extend_from_slice(bytes);
            return 0;
        }
        let used = self.cores[shard].handle_input(self.now, read_ns, slot, bytes);
        if self.cores[shard].is_paused(slot) {
            self.pipes[shard][slot]
                .unread_by_engine
                .extend_from_slice(&bytes[used..]);
        }
        used
    }

    /// Bytes the client sent that the engine has not read yet (pacing).
    pub(crate) fn unread_by_engine(&self, client: Client) -> usize {
        self.pipes[client.shard as usize][client.slot]
            .unread_by_engine
            .len()
    }

    /// The driver's part of pacing: a connection left unread is read again once resumed, a
    /// bounded amount per turn as a reactor reads.
    fn feed_unread(&mut self) -> bool {
        let read_ns = self.unix_ns();
        let mut moved = false;
        for (shard, core) in self.cores.iter_mut().enumerate() {
            while core.poll_resumed().is_some() {}
            for (slot, pipe) in self.pipes[shard].iter_mut().enumerate() {
                if pipe.unread_by_engine.is_empty() || pipe.closed || core.is_paused(slot) {
                    continue;
                }
                moved = true;
                let len = pipe.unread_by_engine.len();
                let mut used = core.handle_input(
                    self.now,
                    read_ns,
                    slot,
                    &pipe.unread_by_engine[..len.min(READ_TURN_BYTES)],
                );
                if used == 0 && !core.is_paused(slot) {
                    // A frame longer than a turn's read: it is all in the buffer by now.
                    used = core.handle_input(self.now, read_ns, slot, &pipe.unread_by_engine);
                }
                pipe.unread_by_engine.drain(..used.min(len));
                if core.session(slot).is_none() {
                    pipe.unread_by_engine.clear();
                }
            }
        }
        moved
    }

    pub(crate) fn publish(&mut self, client: Client, topic: &str, payload: &[u8]) {
        self.send(
            client,
            &Frame::Publish(PublishRef {
                topic,
                source_ts_ns: 0,
                quality: 192,
                payload,
            }),
        );
    }

    pub(crate) fn subscribe(
        &mut self,
        client: Client,
        sub_id: u32,
        pattern: &str,
        mode: DeliveryMode,
    ) {
        self.subscribe_from(client, sub_id, pattern, mode, vec![]);
    }

    pub(crate) fn subscribe_from(
        &mut self,
        client: Client,
        sub_id: u32,
        pattern: &str,
        mode: DeliveryMode,
        resume: Vec<TopicPosition>,
    ) {
        self.send(
            client,
            &Frame::Subscribe(Subscribe {
                sub_id,
                pattern: pattern.into(),
                mode,
                resume,
            }),
        );
    }

    pub(crate) fn unsubscribe(&mut self, client: Client, sub_id: u32) {
        self.send(client, &Frame::Unsubscribe(Unsubscribe { sub_id }));
    }

    /// Plays reactor turns until no core has anything to write or to send (bounded).
    pub(crate) fn run(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            let unix_ns = self.unix_ns();
            for (i, core) in self.cores.iter_mut().enumerate() {
                core.flush(
                    self.now,
                    &mut Pipes {
                        pipes: &mut self.pipes[i],
                        unix_ns,
                    },
                );
                while let Some(slot) = core.poll_closed() {
                    self.pipes[i][slot].closed = true;
                }
            }
            // The stats thread's part, in line.
            let mut stats_requests = Vec::new();
            for (i, core) in self.cores.iter_mut().enumerate() {
                while let Some(conn) = core.poll_stats_request() {
                    stats_requests.push((i, conn));
                }
            }
            if !stats_requests.is_empty() {
                moved = true;
                let connections = self.cores.iter().flat_map(FanoutCore::report).collect();
                let doc = self.shared.stats_document(connections, false);
                let frame = super::stats::stats_frame(doc.clone(), self.max_frame_bytes);
                for (i, conn) in stats_requests {
                    let frame = match self.cores[i].stats_viewer(conn) {
                        None => frame.clone(),
                        Some(viewer) => super::stats::stats_frame(
                            super::stats::scoped(&doc, &viewer, conn.id),
                            self.max_frame_bytes,
                        ),
                    };
                    let msg = super::core::CoreMsg::StatsReply { conn, frame };
                    self.cores[i].handle_msg(self.now, msg);
                }
            }
            // The verifier thread's part: in line, in order, unless held back.
            for (i, core) in self.cores.iter_mut().enumerate() {
                while let Some(request) = core.poll_verification() {
                    self.held.push((i, request));
                }
            }
            if !self.hold_verifications {
                moved |= self.make_verifications();
            }
            moved |= self.feed_unread();
            let n = self.cores.len();
            for from in 0..n {
                for to in 0..n {
                    let msgs = std::mem::take(self.cores[from].outgoing(to));
                    moved |= !msgs.is_empty();
                    for msg in msgs {
                        self.cores[to].handle_msg(self.now, msg);
                    }
                }
            }
            if !moved && !self.cores.iter().any(FanoutCore::wants_flush) {
                return;
            }
        }
        panic!("the cores never settled");
    }

    /// Holds the argon2 runs back (`true`): HELLOs that need one wait for their verdict until
    /// [`Cluster::release_verifications`]. `false` (the default): `run` makes them in line.
    pub(crate) fn hold_verifications(&mut self, hold: bool) {
        self.hold_verifications = hold;
    }

    /// argon2 runs waiting for the verifier.
    pub(crate) fn held_verifications(&self) -> usize {
        self.held.len()
    }

    /// Makes the held runs now and hands their verdicts to the cores, then runs.
    pub(crate) fn release_verifications(&mut self) {
        self.make_verifications();
        self.run();
    }

    fn make_verifications(&mut self) -> bool {
        let held = std::mem::take(&mut self.held);
        let moved = !held.is_empty();
        for (i, request) in held {
            let verdict = super::core::Verdict::of(request.verification.run());
            let conn = request.conn;
            self.cores[i].handle_verified(self.now, conn.slot as usize, conn.id, verdict);
        }
        moved
    }

    /// Advances the virtual clock by `by`, in steps no longer than `step`, handling every
    /// deadline on the way.
    pub(crate) fn advance(&mut self, by: Duration) {
        let end = self.now + by;
        loop {
            let next = self
                .cores
                .iter()
                .map(FanoutCore::poll_timeout)
                .min()
                .unwrap_or(end);
            self.now = next.clamp(self.now, end);
            for core in &mut self.cores {
                if core.poll_timeout() <= self.now {
                    core.handle_timeout(self.now);
                }
            }
            self.run();
            if self.now >= end {
                return;
            }
        }
    }

    /// Everything the client can read now, decoded; the socket's window is restored (a read).
    pub(crate) fn recv(&mut self, client: Client) -> Vec<Got> {
        let pipe = &mut self.pipes[client.shard as usize][client.slot];
        let bytes = std::mem::take(&mut pipe.unread);
        let blocked = pipe.window == 0;
        pipe.window = pipe.capacity;
        if blocked && pipe.capacity > 0 && !pipe.closed {
            self.cores[client.shard as usize].handle_writable(client.slot);
        }
        let mut out = Vec::new();
        let mut at = 0;
        while at < bytes.len() {
            // Frames from the engine obey the frame limit too.
            match decode_frame(&bytes[at..], self.max_frame_bytes)
                .expect("the engine writes well-formed frames within max_frame_bytes")
            {
                Decoded::Frame(frame, used) => {
                    at += used;
                    let pipe = &mut self.pipes[client.shard as usize][client.slot];
                    match &frame {
                        Frame::Error(e) => pipe.reasons.push(e.reason.clone()),
                        Frame::Stats(doc) => pipe.stats.push(doc.clone()),
                        _ => {}
                    }
                    out.push(got(frame));
                }
                Decoded::NeedMore(_) => {
                    // A partial frame: put it back for the next read.
                    self.pipes[client.shard as usize][client.slot].unread = bytes[at..].to_vec();
                    break;
                }
            }
        }
        out
    }

    /// Sets the bytes the client's socket takes between reads (0 stalls it). Opening a
    /// stalled socket lets the engine write at once (a writable event and a reactor turn).
    pub(crate) fn set_capacity(&mut self, client: Client, capacity: usize) {
        let pipe = &mut self.pipes[client.shard as usize][client.slot];
        pipe.capacity = capacity;
        let unblocked = pipe.window == 0 && capacity > 0 && !pipe.closed;
        pipe.window = pipe.window.min(capacity);
        if unblocked {
            pipe.window = capacity;
            self.cores[client.shard as usize].handle_writable(client.slot);
            self.run();
        }
    }

    /// The reasons of the ERRORs the client has read so far.
    pub(crate) fn reasons(&self, client: Client) -> &[String] {
        &self.pipes[client.shard as usize][client.slot].reasons
    }

    /// The last STATS document the client read, parsed.
    pub(crate) fn last_stats(&self, client: Client) -> serde_json::Value {
        let doc = self.pipes[client.shard as usize][client.slot]
            .stats
            .last()
            .expect("the client read a STATS frame");
        serde_json::from_str(doc).expect("STATS is JSON")
    }

    /// A client that says HELLO with `token` (`user:secret`, or empty): what it read back.
    pub(crate) fn hello_as(
        &mut self,
        shard: u16,
        client_id: &str,
        token: &str,
    ) -> (Client, Vec<Got>) {
        let client = self.connect_raw(shard, usize::MAX / 2);
        self.send(
            client,
            &Frame::Hello(Hello {
                version: proto::PROTOCOL_VERSION,
                client_id: client_id.into(),
                keepalive_ms: 0,
                token: token.into(),
                features: 0,
            }),
        );
        self.run();
        let got = self.recv(client);
        (client, got)
    }

    /// A client past its HELLO as `token`.
    pub(crate) fn connect_as(&mut self, shard: u16, client_id: &str, token: &str) -> Client {
        match self.hello_as(shard, client_id, token) {
            (client, got) if matches!(got.first(), Some(Got::Welcome { .. })) => client,
            (_, got) => panic!("expected WELCOME, got {got:?}"),
        }
    }

    pub(crate) fn is_closed(&self, client: Client) -> bool {
        self.pipes[client.shard as usize][client.slot].closed
    }

    pub(crate) fn write_shut(&self, client: Client) -> bool {
        self.pipes[client.shard as usize][client.slot].write_shut
    }

    pub(crate) fn writes(&self, client: Client) -> u64 {
        self.pipes[client.shard as usize][client.slot].writes
    }

    /// The durable session state of a connection (`None`: not durable).
    pub(crate) fn session_durable(&self, client: Client) -> Option<&super::durable::SessionState> {
        self.cores[client.shard as usize]
            .session(client.slot)?
            .durable
            .as_deref()
    }

    /// The peer went away.
    pub(crate) fn hang_up(&mut self, client: Client) {
        self.cores[client.shard as usize].handle_closed(self.now, client.slot);
        self.run();
    }
}

fn got(frame: Frame<'_>) -> Got {
    match frame {
        Frame::Welcome(w) => Got::Welcome {
            reactor: w.reactor,
            keepalive_ms: w.keepalive_ms,
        },
        Frame::SubAck(a) => Got::SubAck {
            sub_id: a.sub_id,
            mode: a.mode,
        },
        Frame::Data {
            header,
            topic,
            payload,
        } => Got::Data {
            topic: topic.into(),
            seq: header.seq,
            snapshot: header.flags & proto::DATA_FLAG_SNAPSHOT != 0,
            payload: payload.into(),
        },
        Frame::Gap(g) => Got::Gap {
            topic: g.topic,
            from: g.from_seq,
            to: g.to_seq,
        },
        Frame::Error(e) => Got::Error { code: e.code },
        Frame::Ping { .. } => Got::Ping,
        Frame::Pong { nonce } => Got::Pong { nonce },
        Frame::Stats(_) => Got::Stats,
        Frame::Ack { seq } => Got::Ack { seq },
        Frame::Multicast(proto::Mcast::Channels(c)) => Got::Mcast(McastGot::Channels(c.channels)),
        Frame::Multicast(proto::Mcast::StreamPos(p)) => Got::Mcast(McastGot::StreamPos(p)),
        Frame::Multicast(proto::Mcast::Repair(d)) => Got::Mcast(McastGot::Repair(d.to_vec())),
        Frame::Multicast(proto::Mcast::RepairGone(g)) => Got::Mcast(McastGot::RepairGone(g)),
        other => panic!("the engine sent a client frame: {other:?}"),
    }
}
