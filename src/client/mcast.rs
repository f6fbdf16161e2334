//! A subscriber that receives carried topics by UDP multicast (docs/PROTOCOL.md §12).
//!
//! Its TCP session brings the channel list, the retained snapshot, STREAM_POS, the REPAIRs of
//! what the group lost, and the live messages of topics no channel carries; the group brings
//! the rest. The ordering, NAK timing and stitching are [`McastReceiver`]'s (sans-IO); this
//! file owns the session and the reconnection, `mcast_socket.rs` the group sockets.
//!
//! Contract: as [`super::Subscriber`], poll with [`McastSubscriber::next_event`] or
//! [`McastSubscriber::next_batch`] at least every half keep-alive (the polls send PINGs and
//! NAKs). A broken session is re-established inside the polls, with the client options'
//! back-off: the channels are learnt and joined again, and every subscription resumes from the
//! last seq delivered per topic, exactly as the TCP subscriber resumes (docs/PROTOCOL.md §8);
//! the new session's STREAM_POS and the per-topic filter stitch the group to the replay. A
//! reconnect that lands on a restarted engine (another `engine_id`) drops the positions and asks
//! for everything the new run holds; the `Reconnected` event says so.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use super::conn::{frame_name, Conn, Fill, MAX_INBOUND_FRAME_BYTES};
use super::error::{error_code_name, is_retryable_code};
use super::mcast_socket::{join, RecvBatch, RECV_BATCH};
use super::options::Reconnect;
use super::subscriber::{resume_list, EventRef, EventSource, MessageRef};
use super::{deadline_after, ping_interval, ClientError, ClientOptions, Event};
use crate::mcast::{
    patterns_overlap, McastReceiver, ReceiverConfig, ReceiverCounters, ReceiverEventRef,
};
use crate::proto::{
    decode_frame, encode_control, encode_ping, encode_pong, validate_pattern, ChannelInfo, Decoded,
    DeliveryMode, Frame, Mcast, Subscribe, DATA_FLAG_RESTORED, DATA_FLAG_SNAPSHOT,
};

/// Default receive buffer per channel socket: 4 MiB holds about 2,800 full datagrams, 280 ms
/// of a 10,000-datagram/s channel.
pub const DEFAULT_RECV_BUFFER_BYTES: usize = 4 << 20;
/// Datagrams read from one channel per poll round at most (bounded work per round; a socket
/// that still holds more is readable again at once).
const MAX_DATAGRAMS_PER_ROUND: usize = 64 * RECV_BATCH;
/// While the groups bring datagrams and no repair is awaited, the TCP session is read at most
/// this often: a read there would mostly find nothing, and at 8,000 receivers on one host that
/// empty `read` per datagram was a third of each receiver's work. Whatever the session brings
/// meanwhile (a topic no channel carries, a PING) waits at most this long.
const TCP_QUIET: Duration = Duration::from_millis(1);

/// Settings of a multicast receiver beyond [`ClientOptions`].
#[derive(Debug, Clone)]
pub struct McastOptions {
    /// Address of the interface to join the groups on (`0.0.0.0`: the route's).
    pub interface: Ipv4Addr,
    pub recv_buffer_bytes: usize,
    /// Random NAK delay ceiling and the retry interval.
    pub nak_delay: Duration,
    pub nak_retry: Duration,
}

impl Default for McastOptions {
    fn default() -> Self {
        McastOptions {
            interface: Ipv4Addr::UNSPECIFIED,
            recv_buffer_bytes: DEFAULT_RECV_BUFFER_BYTES,
            nak_delay: Duration::from_millis(5),
            nak_retry: Duration::from_millis(60),
        }
    }
}

/// Counters of a [`McastSubscriber`], cumulative across reconnections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct McastCounters {
    pub receiver: ReceiverCounters,
    /// Datagrams the kernel dropped because a channel socket's receive buffer was full
    /// (SO_RXQ_OVFL), summed over the channels.
    pub recv_buffer_overflows: u64,
    /// Datagrams longer than the channel announced (cut, ignored, repaired by NAK).
    pub truncated: u64,
    /// `recvmmsg` calls that returned datagrams.
    pub recv_calls: u64,
    /// Messages received over TCP (snapshot values, replays, topics no channel carries).
    pub tcp_messages: u64,
    pub disconnects: u64,
    pub reconnects: u64,
}

struct Channel {
    socket: UdpSocket,
    /// The kernel's cumulative drop count for this socket, last seen.
    drops: u32,
}

/// One session: the TCP connection and the groups joined with it.
struct Session {
    conn: Conn,
    channels: Vec<Channel>,
    batch: RecvBatch,
    keepalive: Duration,
    /// When the TCP session was last read.
    tcp_read_at: Instant,
    /// `wait` saw the TCP session readable: the next round reads it.
    tcp_readable: bool,
}

/// Why a poll round stopped.
enum Stop {
    /// The session broke: reconnect.
    Lost(String),
    /// Another session would fail the same way: returned to the caller.
    Fatal(ClientError),
}

/// See the module doc.
pub struct McastSubscriber {
    opts: ClientOptions,
    mcast: McastOptions,
    patterns: Vec<String>,
    mode: DeliveryMode,
    session: Option<Session>,
    receiver: McastReceiver,
    /// Events that came while (re)connecting, returned by the next polls.
    pending: VecDeque<Event>,
    /// An error found after events were already delivered in the same poll: returned next.
    deferred: Option<ClientError>,
    awaiting_subacks: usize,
    out: Vec<u8>,
    naks: Vec<crate::proto::Nak>,
    nonce: u64,
    counters: McastCounters,
    reconnect: Reconnect,
    last_disconnect: Option<String>,
    /// The engine run the positions belong to.
    engine_id: u64,
    engine_restarted: bool,
}

impl McastSubscriber {
    /// Connects, learns the channels, joins those that can carry `patterns`, subscribes, and
    /// returns once every SUBACK arrived. A failure here is returned, not retried.
    pub fn connect(
        opts: ClientOptions,
        mcast: McastOptions,
        patterns: Vec<String>,
        mode: DeliveryMode,
    ) -> Result<McastSubscriber, ClientError> {
        for p in &patterns {
            validate_pattern(p, opts.max_topic_bytes).map_err(|source| ClientError::Pattern {
                pattern: p.clone(),
                source,
            })?;
        }
        let reconnect = Reconnect::new(opts.reconnect);
        let mut sub = McastSubscriber {
            receiver: McastReceiver::new(receiver_config(&mcast, mode, 0)),
            opts,
            mcast,
            patterns,
            mode,
            session: None,
            pending: VecDeque::new(),
            deferred: None,
            awaiting_subacks: 0,
            out: Vec::new(),
            naks: Vec::new(),
            nonce: 0,
            counters: McastCounters::default(),
            reconnect,
            last_disconnect: None,
            engine_id: 0,
            engine_restarted: false,
        };
        let mut early = VecDeque::new();
        sub.establish(false, &mut |e: EventRef<'_>| early.push_back(e.to_event()))?;
        sub.pending = early;
        Ok(sub)
    }

    /// The engine's WELCOME on the current session; `None` while disconnected.
    pub fn welcome(&self) -> Option<&crate::proto::Welcome> {
        self.session.as_ref().map(|s| &s.conn.welcome)
    }

    /// The channels joined (their group sockets) by the current session.
    pub fn channels_joined(&self) -> usize {
        self.session.as_ref().map_or(0, |s| s.channels.len())
    }

    pub fn counters(&self) -> McastCounters {
        McastCounters {
            receiver: self.receiver.counters,
            ..self.counters
        }
    }

    /// The last seq delivered on `topic` (by the group or by TCP).
    pub fn last_seq(&self, topic: &str) -> Option<u64> {
        self.receiver.last_seq(topic)
    }

    /// Why the session last broke (or the last reconnect attempt failed).
    pub fn last_disconnect_reason(&self) -> Option<&str> {
        self.last_disconnect.as_deref()
    }

    pub fn is_connected(&self) -> bool {
        self.session.is_some()
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` if none came. Copies each message
    /// out of the datagram; [`McastSubscriber::next_batch`] avoids that.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        EventSource::next_event(self, timeout)
    }

    /// Calls `f` for every event of one poll round (a `recvmmsg` batch per channel, what the
    /// TCP session holds), borrowing the datagrams and the receive buffer: no allocation or
    /// copy per message when datagrams come in order. Waits up to `timeout` for the first;
    /// returns how many were delivered (0 when the timeout passed).
    pub fn next_batch(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        EventSource::next_batch(self, timeout, &mut f)
    }

    /// The first joined group's socket, for a caller that waits on many receivers with its own
    /// epoll (readable: a datagram waits; poll [`McastSubscriber::next_batch`] with a zero
    /// timeout then, and at least every few milliseconds for NAKs and the TCP session). It
    /// changes when the session is re-established. A poll that takes datagrams reads the TCP
    /// session too when a repair is awaited, and otherwise at most once a millisecond; one that
    /// takes none always reads it.
    pub fn group_fd(&self) -> Option<std::os::fd::RawFd> {
        self.session
            .as_ref()
            .and_then(|s| s.channels.first())
            .map(|c| c.socket.as_raw_fd())
    }

    /// The poll loop: read and answer, else wait, else reconnect. Returns after delivering at
    /// least one event, or at the deadline.
    fn pump(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let deadline = deadline_after(Instant::now(), timeout);
        loop {
            if self.session.is_none() {
                return self.reconnect_until(deadline, sink);
            }
            let mut delivered = 0;
            let round = self.round(&mut |e: EventRef<'_>| {
                delivered += 1;
                sink(e)
            });
            match round {
                Ok(()) => {}
                Err(Stop::Lost(reason)) => {
                    self.lose(reason);
                    if delivered > 0 {
                        return Ok(delivered);
                    }
                    continue;
                }
                Err(Stop::Fatal(err)) => {
                    self.lose(err.to_string());
                    if delivered == 0 {
                        return Err(err);
                    }
                    self.deferred = Some(err);
                    return Ok(delivered);
                }
            }
            if delivered > 0 {
                return Ok(delivered);
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(0);
            }
            let Some(session) = self.session.as_mut() else {
                continue;
            };
            // Two PINGs unanswered (a whole keep-alive of silence): a dead engine or path.
            let keepalive =
                Duration::from_millis(u64::from(session.conn.welcome.keepalive_ms.max(1)));
            let dead_at = session.conn.last_recv + keepalive;
            if now >= dead_at {
                let silent_ms = now.duration_since(session.conn.last_recv).as_millis();
                self.lose(format!("nothing heard from the engine for {silent_ms} ms"));
                continue;
            }
            let mut wake = deadline
                .min(session.conn.last_send + session.keepalive)
                .min(dead_at);
            if let Some(at) = self.receiver.poll_timeout() {
                wake = wake.min(at);
            }
            if let Err(e) = wait(session, wake.saturating_duration_since(now)) {
                self.lose(format!("poll failed: {e}"));
            }
        }
    }

    /// One round without waiting: the groups, the TCP session when it is due, then NAKs and
    /// a PING.
    fn round(&mut self, sink: &mut dyn FnMut(EventRef<'_>)) -> Result<(), Stop> {
        let took = self.read_groups(sink)?;
        let now = Instant::now();
        let due = self.session.as_ref().is_some_and(|s| {
            tcp_due(
                took,
                s.tcp_readable,
                now.saturating_duration_since(s.tcp_read_at),
                self.receiver.missing() > 0,
            )
        });
        if due {
            self.read_tcp(now, sink)?;
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        self.naks.clear();
        self.receiver.poll_naks(now, &mut self.naks);
        for nak in self.naks.drain(..) {
            encode_control(&mut self.out, &Frame::Multicast(Mcast::Nak(nak)));
        }
        if now >= session.conn.last_send + session.keepalive {
            self.nonce += 1;
            encode_ping(&mut self.out, self.nonce);
        }
        if !self.out.is_empty() {
            let sent = session.conn.send(&self.out);
            self.out.clear();
            if let Err(e) = sent {
                return Err(Stop::Lost(format!("write failed: {e}")));
            }
        }
        Ok(())
    }

    /// Reads the group sockets; returns how many datagrams came.
    fn read_groups(&mut self, sink: &mut dyn FnMut(EventRef<'_>)) -> Result<usize, Stop> {
        let Some(session) = self.session.as_mut() else {
            return Ok(0);
        };
        let mut took = 0;
        let receiver = &mut self.receiver;
        let counters = &mut self.counters;
        let mut sink = |e: ReceiverEventRef<'_>| sink(as_event_ref(e));
        for ch in session.channels.iter_mut() {
            let mut taken = 0;
            while taken < MAX_DATAGRAMS_PER_ROUND {
                let n = match session.batch.recv(&ch.socket) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Stop::Lost(format!("group socket: {e}"))),
                };
                counters.recv_calls += 1;
                taken += n;
                let now = Instant::now();
                for i in 0..n {
                    let (bytes, got) = session.batch.datagram(i);
                    if let Some(d) = got.drops {
                        counters.recv_buffer_overflows += u64::from(d.wrapping_sub(ch.drops));
                        ch.drops = d;
                    }
                    if got.truncated {
                        counters.truncated += 1;
                        continue;
                    }
                    receiver.handle_datagram_into(now, bytes, false, &mut sink);
                }
                if n < RECV_BATCH {
                    break;
                }
            }
            took += taken;
        }
        Ok(took)
    }

    fn read_tcp(&mut self, now: Instant, sink: &mut dyn FnMut(EventRef<'_>)) -> Result<(), Stop> {
        if let Some(session) = self.session.as_mut() {
            session.tcp_read_at = now;
            session.tcp_readable = false;
        }
        loop {
            let Some(session) = self.session.as_mut() else {
                return Ok(());
            };
            match session.conn.fill(None) {
                Ok(Fill::Eof) => return Err(Stop::Lost("the engine closed the connection".into())),
                Ok(Fill::WouldBlock) => return Ok(()),
                Ok(Fill::Data) => self.decode_tcp(sink)?,
                Err(e) => return Err(Stop::Lost(format!("read failed: {e}"))),
            }
        }
    }

    /// Decodes every whole frame the TCP session holds, handing messages to `sink` borrowed
    /// from the receive buffer.
    fn decode_tcp(&mut self, sink: &mut dyn FnMut(EventRef<'_>)) -> Result<(), Stop> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let receiver = &mut self.receiver;
        let mut used = 0;
        let mut stop = None;
        let buf = session.conn.pending();
        while stop.is_none() {
            let (frame, n) = match decode_frame(&buf[used..], MAX_INBOUND_FRAME_BYTES) {
                Ok(Decoded::Frame(frame, n)) => (frame, n),
                Ok(Decoded::NeedMore(_)) => break,
                Err(e) => {
                    stop = Some(Stop::Fatal(ClientError::Protocol(e)));
                    break;
                }
            };
            used += n;
            let now = Instant::now();
            match frame {
                Frame::Data {
                    header,
                    topic,
                    payload,
                } => {
                    // Replays and snapshots of a topic the group also carries may overlap
                    // what the group delivered: the receiver's per-topic filter decides.
                    if receiver
                        .last_seq(topic)
                        .is_some_and(|last| header.seq <= last)
                    {
                        receiver.counters.stitched += 1;
                        continue;
                    }
                    receiver.handle_snapshot(topic, header.seq);
                    self.counters.tcp_messages += 1;
                    sink(EventRef::Message(MessageRef {
                        topic,
                        seq: header.seq,
                        source_ts_ns: header.source_ts_ns,
                        ingest_ts_ns: header.ingest_ts_ns,
                        quality: header.quality,
                        snapshot: header.flags & DATA_FLAG_SNAPSHOT != 0,
                        restored: header.flags & DATA_FLAG_RESTORED != 0,
                        payload,
                    }));
                }
                Frame::SubAck(_) => {
                    self.awaiting_subacks = self.awaiting_subacks.saturating_sub(1);
                    receiver.unhold_into(&mut |e: ReceiverEventRef<'_>| sink(as_event_ref(e)));
                }
                Frame::Gap(g) => {
                    if receiver
                        .last_seq(&g.topic)
                        .is_some_and(|last| g.to_seq <= last)
                    {
                        // Already past it (a resume overlapping an earlier report).
                        continue;
                    }
                    // What the ring no longer holds is lost for the topic: positions move past.
                    receiver.handle_snapshot(&g.topic, g.to_seq);
                    sink(EventRef::Gap {
                        topic: &g.topic,
                        from_seq: g.from_seq,
                        to_seq: g.to_seq,
                    })
                }
                Frame::Ping { nonce } => encode_pong(&mut self.out, nonce),
                Frame::Pong { .. } => {}
                Frame::Multicast(Mcast::StreamPos(pos)) => {
                    receiver.handle_stream_pos_into(now, pos, &mut |e: ReceiverEventRef<'_>| {
                        sink(as_event_ref(e))
                    })
                }
                Frame::Multicast(Mcast::Repair(d)) => {
                    receiver.handle_datagram_into(now, d, true, &mut |e: ReceiverEventRef<'_>| {
                        sink(as_event_ref(e))
                    })
                }
                Frame::Multicast(Mcast::RepairGone(g)) => receiver
                    .handle_gone_into(g, &mut |e: ReceiverEventRef<'_>| sink(as_event_ref(e))),
                Frame::Error(e) if is_retryable_code(e.code) => {
                    stop = Some(Stop::Lost(format!(
                        "engine sent ERROR {} ({}): {}",
                        e.code,
                        error_code_name(e.code),
                        e.reason
                    )));
                }
                Frame::Error(e) => {
                    stop = Some(Stop::Fatal(ClientError::Engine {
                        code: e.code,
                        reason: e.reason,
                    }));
                }
                other => {
                    stop = Some(Stop::Fatal(ClientError::Handshake(format!(
                        "unexpected {} frame",
                        frame_name(&other)
                    ))));
                }
            }
        }
        session.conn.consume(used);
        stop.map_or(Ok(()), Err)
    }

    fn lose(&mut self, reason: String) {
        self.session = None;
        self.out.clear();
        self.counters.disconnects += 1;
        self.last_disconnect = Some(reason);
        self.reconnect.on_lost(Instant::now());
    }

    /// Reconnect attempts, spaced by the back-off, until one succeeds or `deadline` passes:
    /// `Reconnected` and what came while subscribing go to `sink`.
    fn reconnect_until(
        &mut self,
        deadline: Instant,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        loop {
            let now = Instant::now();
            if now < self.reconnect.next_at {
                if self.reconnect.next_at >= deadline {
                    std::thread::sleep(deadline.saturating_duration_since(now));
                    return Ok(0);
                }
                std::thread::sleep(self.reconnect.next_at - now);
            }
            let attempt = self.reconnect.attempt + 1;
            let mut early = Vec::new();
            match self.establish(true, &mut |e: EventRef<'_>| early.push(e.to_event())) {
                Ok(()) => {
                    self.counters.reconnects += 1;
                    self.reconnect.attempt = 0;
                    sink(EventRef::Reconnected {
                        attempt,
                        engine_restarted: self.engine_restarted,
                    });
                    for e in &early {
                        sink(e.as_event_ref());
                    }
                    return Ok(1 + early.len());
                }
                Err(e) if e.is_retryable() => {
                    self.session = None;
                    self.last_disconnect = Some(e.to_string());
                    self.reconnect.on_failed(Instant::now());
                    if Instant::now() >= deadline {
                        return Ok(0);
                    }
                }
                Err(e) => {
                    self.session = None;
                    self.reconnect.on_failed(Instant::now());
                    return Err(e);
                }
            }
        }
    }

    /// Opens a session: CHANNELS, joins, a fresh receiver (the per-topic positions carried
    /// over unless the engine restarted), SUBSCRIBE with resume positions when `resuming`,
    /// and every SUBACK. Events that arrive meanwhile go to `sink`.
    fn establish(
        &mut self,
        resuming: bool,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<(), ClientError> {
        let mut conn = Conn::open(&self.opts, self.opts.read_buffer_bytes)?;
        let engine_id = conn.welcome.engine_id;
        let keepalive = ping_interval(conn.welcome.keepalive_ms);
        self.engine_restarted = resuming && engine_id != self.engine_id;
        self.engine_id = engine_id;
        let mut out = Vec::new();
        encode_control(&mut out, &Frame::Multicast(Mcast::ChannelsRequest));
        conn.send(&out)?;
        out.clear();
        let infos = await_channels(&mut conn, self.opts.connect_timeout)?;
        let mut channels = Vec::new();
        let mut datagram_bytes = 0;
        for info in infos.iter().filter(|c| {
            self.patterns
                .iter()
                .any(|p| c.patterns.iter().any(|q| patterns_overlap(p, q)))
        }) {
            channels.push(join_channel(info, &self.mcast)?);
            datagram_bytes = datagram_bytes.max(info.datagram_bytes as usize);
        }
        // The positions: last seq delivered per topic, meaningless to another engine run.
        let positions: Vec<(String, u64)> = if self.engine_restarted {
            Vec::new()
        } else {
            self.receiver
                .positions()
                .map(|(t, s)| (t.to_string(), s))
                .collect()
        };
        let mut receiver = McastReceiver::new(receiver_config(&self.mcast, self.mode, engine_id));
        receiver.counters = self.receiver.counters;
        for (topic, seq) in &positions {
            receiver.handle_snapshot(topic, *seq);
        }
        for (i, p) in self.patterns.iter().enumerate() {
            receiver.add_pattern(p);
            receiver.hold();
            // Positions only when resuming (a first connection sends none).
            let seen: &[(String, u64)] = if resuming { &positions } else { &[] };
            let resume = resume_list(
                seen.iter().map(|(t, s)| (t.as_str(), *s)),
                p,
                resuming,
                self.opts.durable_session,
            );
            encode_control(
                &mut out,
                &Frame::Subscribe(Subscribe {
                    sub_id: i as u32 + 1,
                    pattern: p.clone(),
                    mode: self.mode,
                    resume,
                }),
            );
        }
        conn.send(&out)?;
        self.receiver = receiver;
        self.awaiting_subacks = self.patterns.len();
        self.session = Some(Session {
            conn,
            channels,
            batch: RecvBatch::new(datagram_bytes.max(1)),
            keepalive,
            tcp_read_at: Instant::now(),
            tcp_readable: false,
        });
        let deadline = Instant::now() + self.opts.connect_timeout;
        while self.awaiting_subacks > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Handshake(format!(
                    "no SUBACK within {:?}",
                    self.opts.connect_timeout
                )));
            }
            match self.round(sink) {
                Ok(()) => {}
                Err(Stop::Lost(reason)) => return Err(ClientError::Handshake(reason)),
                Err(Stop::Fatal(e)) => return Err(e),
            }
            if self.awaiting_subacks == 0 {
                break;
            }
            let Some(session) = self.session.as_mut() else {
                return Err(ClientError::Handshake(
                    "session lost while subscribing".into(),
                ));
            };
            let wake = deadline.min(now + Duration::from_millis(50));
            wait(session, wake.saturating_duration_since(Instant::now()))?;
        }
        Ok(())
    }
}

/// Whether a round reads the TCP session after the groups brought `took` datagrams: always
/// when they brought none (the caller may have been woken by the session), when `wait` saw it
/// readable, when a repair is awaited (repairs come that way), and otherwise once
/// [`TCP_QUIET`] has passed since the last read.
fn tcp_due(took: usize, readable: bool, since_read: Duration, repair_awaited: bool) -> bool {
    took == 0 || readable || repair_awaited || since_read >= TCP_QUIET
}

fn receiver_config(mcast: &McastOptions, mode: DeliveryMode, engine_id: u64) -> ReceiverConfig {
    ReceiverConfig {
        engine_id,
        nak_delay: mcast.nak_delay,
        nak_retry: mcast.nak_retry,
        repair: !matches!(mode, DeliveryMode::Latest),
        max_buffered: 65_536,
        seed: super::now_ns() ^ u64::from(std::process::id()),
    }
}

fn as_event_ref(e: ReceiverEventRef<'_>) -> EventRef<'_> {
    match e {
        ReceiverEventRef::Data {
            header,
            topic,
            payload,
            ..
        } => EventRef::Message(MessageRef {
            topic,
            seq: header.seq,
            source_ts_ns: header.source_ts_ns,
            ingest_ts_ns: header.ingest_ts_ns,
            quality: header.quality,
            snapshot: false,
            restored: false,
            payload,
        }),
        ReceiverEventRef::Gap {
            topic,
            from_seq,
            to_seq,
        } => EventRef::Gap {
            topic,
            from_seq,
            to_seq,
        },
    }
}

/// Waits until a group socket or the TCP session is readable, or `timeout` passes; notes a
/// readable TCP session for the next round.
fn wait(session: &mut Session, timeout: Duration) -> io::Result<()> {
    let mut fds: Vec<libc::pollfd> = session
        .channels
        .iter()
        .map(|c| c.socket.as_raw_fd())
        .chain(std::iter::once(session.conn.raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the duration of the
    // call; poll only writes their `revents`.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        return Ok(());
    }
    // The TCP session is the last entry.
    session.tcp_readable |= fds.last().is_some_and(|f| f.revents != 0);
    Ok(())
}

fn await_channels(conn: &mut Conn, budget: Duration) -> Result<Vec<ChannelInfo>, ClientError> {
    let deadline = Instant::now() + budget;
    loop {
        let step = match decode_frame(conn.pending(), MAX_INBOUND_FRAME_BYTES)? {
            Decoded::Frame(Frame::Multicast(Mcast::Channels(c)), n) => Some((Ok(c.channels), n)),
            Decoded::Frame(Frame::Ping { .. }, n) => {
                conn.consume(n);
                continue;
            }
            Decoded::Frame(Frame::Error(e), n) => Some((
                Err(ClientError::Engine {
                    code: e.code,
                    reason: e.reason,
                }),
                n,
            )),
            Decoded::Frame(other, n) => Some((
                Err(ClientError::Handshake(format!(
                    "expected CHANNELS, got {}",
                    frame_name(&other)
                ))),
                n,
            )),
            Decoded::NeedMore(_) => None,
        };
        if let Some((result, n)) = step {
            conn.consume(n);
            return result;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Handshake(format!(
                "no CHANNELS within {budget:?}"
            )));
        }
        if conn.fill(Some(deadline - now))? == Fill::Eof {
            return Err(ClientError::Handshake(
                "the engine closed the connection before CHANNELS (an engine without multicast?)"
                    .into(),
            ));
        }
    }
}

/// Joins the group `info` names, on the configured interface.
fn join_channel(info: &ChannelInfo, opts: &McastOptions) -> Result<Channel, ClientError> {
    let group: Ipv4Addr = info
        .group
        .parse()
        .map_err(|_| ClientError::Handshake(format!("CHANNELS named group {:?}", info.group)))?;
    if !group.is_multicast() {
        return Err(ClientError::Handshake(format!(
            "CHANNELS named {group}, not a multicast group"
        )));
    }
    let socket = join(group, info.port, opts.interface, opts.recv_buffer_bytes)?;
    Ok(Channel { socket, drops: 0 })
}

impl EventSource for McastSubscriber {
    fn pending(&mut self) -> &mut VecDeque<Event> {
        &mut self.pending
    }

    fn pump(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        McastSubscriber::pump(self, timeout, sink)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_session_is_read_when_the_groups_are_quiet_a_repair_is_due_or_time_has_passed() {
        let soon = TCP_QUIET / 2;
        // The groups brought datagrams, nothing else calls for the session: skipped.
        assert!(!tcp_due(3, false, soon, false));
        // Each reason alone makes the round read it.
        assert!(
            tcp_due(0, false, soon, false),
            "no datagram: maybe woken by TCP"
        );
        assert!(tcp_due(3, true, soon, false), "poll saw it readable");
        assert!(tcp_due(3, false, soon, true), "a repair is awaited");
        assert!(tcp_due(3, false, TCP_QUIET, false), "quiet long enough");
    }
}
