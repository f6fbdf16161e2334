//! The blocking, resuming subscriber.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::conn::{frame_name, Conn, Fill, MAX_INBOUND_FRAME_BYTES};
use super::error::{error_code_name, is_retryable_code};
use super::options::Reconnect;
use super::{deadline_after, ping_interval, ClientError, ClientOptions};
use crate::proto::{
    decode_frame, encode_control, encode_ping, encode_pong, validate_pattern, DecodeError, Decoded,
    DeliveryMode, Frame, Subscribe, TopicPosition, Welcome, WireError, DATA_FLAG_RESTORED,
    DATA_FLAG_SNAPSHOT, SESSION_MARKER_SEQ,
};

/// One subscription: a pattern (`+` one level, `#` the rest) and its delivery mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSpec {
    pub pattern: String,
    pub mode: DeliveryMode,
}

impl SubscriptionSpec {
    pub fn new(pattern: impl Into<String>, mode: DeliveryMode) -> Self {
        SubscriptionSpec {
            pattern: pattern.into(),
            mode,
        }
    }
}

/// A received message, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    /// Per-topic sequence number assigned by the engine (1 for the topic's first message).
    pub seq: u64,
    pub source_ts_ns: u64,
    pub ingest_ts_ns: u64,
    pub quality: u8,
    /// The retained value sent on subscribe, not a live update.
    pub snapshot: bool,
    /// A retained value from before the engine restarted (loaded from its snapshot file; `seq`
    /// is 0). Always a snapshot too.
    pub restored: bool,
    pub payload: Vec<u8>,
}

/// A received message, borrowed from the subscriber's receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub topic: &'a str,
    pub seq: u64,
    pub source_ts_ns: u64,
    pub ingest_ts_ns: u64,
    pub quality: u8,
    pub snapshot: bool,
    /// See [`Message::restored`].
    pub restored: bool,
    pub payload: &'a [u8],
}

impl MessageRef<'_> {
    pub fn to_message(&self) -> Message {
        Message {
            topic: self.topic.to_string(),
            seq: self.seq,
            source_ts_ns: self.source_ts_ns,
            ingest_ts_ns: self.ingest_ts_ns,
            quality: self.quality,
            snapshot: self.snapshot,
            restored: self.restored,
            payload: self.payload.to_vec(),
        }
    }
}

/// What [`Subscriber::next_event`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    /// Messages `from_seq ..= to_seq` of `topic` are lost for good (the engine's replay ring
    /// had moved on). Reported once; the subscriber's position moves past them.
    Gap {
        topic: String,
        from_seq: u64,
        to_seq: u64,
    },
    /// The connection broke and was re-established on attempt number `attempt` (1-based);
    /// every subscription was resumed from the last positions seen. `engine_restarted`: the
    /// engine is another run than before (WELCOME's `engine_id` changed), so the old positions
    /// meant nothing to it: everything its replay ring holds was requested from the start, and
    /// what was published while it was down is unknown to both sides.
    Reconnected {
        attempt: u32,
        engine_restarted: bool,
    },
}

/// What [`Subscriber::next_batch`] hands its callback: [`Event`] borrowing the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRef<'a> {
    Message(MessageRef<'a>),
    Gap {
        topic: &'a str,
        from_seq: u64,
        to_seq: u64,
    },
    Reconnected {
        attempt: u32,
        engine_restarted: bool,
    },
}

impl EventRef<'_> {
    pub fn to_event(&self) -> Event {
        match *self {
            EventRef::Message(m) => Event::Message(m.to_message()),
            EventRef::Gap {
                topic,
                from_seq,
                to_seq,
            } => Event::Gap {
                topic: topic.to_string(),
                from_seq,
                to_seq,
            },
            EventRef::Reconnected {
                attempt,
                engine_restarted,
            } => Event::Reconnected {
                attempt,
                engine_restarted,
            },
        }
    }
}

impl Event {
    pub fn as_event_ref(&self) -> EventRef<'_> {
        match self {
            Event::Message(m) => EventRef::Message(MessageRef {
                topic: &m.topic,
                seq: m.seq,
                source_ts_ns: m.source_ts_ns,
                ingest_ts_ns: m.ingest_ts_ns,
                quality: m.quality,
                snapshot: m.snapshot,
                restored: m.restored,
                payload: &m.payload,
            }),
            Event::Gap {
                topic,
                from_seq,
                to_seq,
            } => EventRef::Gap {
                topic,
                from_seq: *from_seq,
                to_seq: *to_seq,
            },
            Event::Reconnected {
                attempt,
                engine_restarted,
            } => EventRef::Reconnected {
                attempt: *attempt,
                engine_restarted: *engine_restarted,
            },
        }
    }
}

/// Counters of one [`Subscriber`], cumulative across reconnections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubscriberCounters {
    /// Messages delivered to the application.
    pub messages: u64,
    /// DATA frames dropped because their seq was not above the last one seen on their topic
    /// (a resume overlapping what was already delivered, or a topic matching two patterns).
    pub duplicates_dropped: u64,
    /// GAP reports delivered, and the number of messages they name.
    pub gaps: u64,
    pub gap_messages: u64,
    pub disconnects: u64,
    pub reconnects: u64,
    pub pings_sent: u64,
}

/// Whether `topic` matches `pattern` (`+` one level, `#` the rest, including nothing): the
/// engine's own definition, re-exported for clients.
pub use crate::topic::pattern_matches;

/// Receives the messages of a set of subscriptions over one TCP connection, and resumes them
/// by itself after the connection breaks.
///
/// Contract: poll with [`next_event`] or [`next_batch`] at least every half keep-alive (the
/// polls send the PINGs). A poll returns as soon as something arrives, or `Ok(None)` /
/// `Ok(0)` when its timeout passes. Reconnection happens inside polls; a failure that another
/// connection would not cure (a refused pattern, a version mismatch) is returned as `Err`, and
/// the next poll tries again.
///
/// Positions are per-topic sequence numbers of one engine run: when a reconnect lands on a
/// restarted engine (another `engine_id` in WELCOME), they are dropped and everything the new
/// run holds is asked for from the start; the `Reconnected` event says so.
///
/// [`next_event`]: Subscriber::next_event
/// [`next_batch`]: Subscriber::next_batch
pub struct Subscriber {
    opts: ClientOptions,
    subscriptions: Vec<SubscriptionSpec>,
    conn: Option<Conn>,
    state: State,
    /// Events decoded but not yet returned by `next_event`.
    pending: VecDeque<Event>,
    /// An error found after events were already delivered in the same poll: returned next.
    deferred: Option<ClientError>,
    reconnect: Reconnect,
    last_disconnect: Option<String>,
    nonce: u64,
    /// `engine_id` of the run the positions belong to.
    engine_id: Option<u64>,
    /// The last (re)connection found another engine run than before.
    engine_restarted: bool,
}

/// What the frame handler mutates, apart from the connection it reads from.
#[derive(Default)]
struct State {
    /// Last seq delivered per topic: the resume positions and the duplicate guard.
    positions: HashMap<String, u64>,
    /// Frames to send once the receive buffer is released (PONGs).
    out: Vec<u8>,
    /// SUBACKs still expected.
    awaiting_subacks: Vec<u32>,
    counters: SubscriberCounters,
}

/// Why decoding stopped early.
enum Stop {
    Engine(WireError),
    Protocol(DecodeError),
}

impl Subscriber {
    /// Connects, subscribes, and returns once every SUBACK arrived: from then on every matching
    /// publish is delivered. Retained values that arrived meanwhile wait in the first polls.
    /// Patterns are checked before connecting; a failure here is returned, not retried.
    pub fn connect(
        opts: ClientOptions,
        subscriptions: Vec<SubscriptionSpec>,
    ) -> Result<Subscriber, ClientError> {
        for spec in &subscriptions {
            validate_pattern(&spec.pattern, opts.max_topic_bytes).map_err(|source| {
                ClientError::Pattern {
                    pattern: spec.pattern.clone(),
                    source,
                }
            })?;
        }
        let reconnect = Reconnect::new(opts.reconnect);
        let mut sub = Subscriber {
            opts,
            subscriptions,
            conn: None,
            state: State::default(),
            pending: VecDeque::new(),
            deferred: None,
            reconnect,
            last_disconnect: None,
            nonce: 0,
            engine_id: None,
            engine_restarted: false,
        };
        let events = sub.establish(false)?;
        sub.pending.extend(events);
        Ok(sub)
    }

    /// The next event, waiting up to `timeout`; `Ok(None)` if none came. Copies each message
    /// out of the receive buffer; [`Subscriber::next_batch`] avoids that.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        EventSource::next_event(self, timeout)
    }

    /// Calls `f` for every event decoded from one read (many frames per read), borrowing the
    /// receive buffer: no allocation per message. Waits up to `timeout` for the first; returns
    /// how many were delivered (0 when the timeout passed).
    pub fn next_batch(
        &mut self,
        timeout: Duration,
        mut f: impl FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        EventSource::next_batch(self, timeout, &mut f)
    }

    /// The engine's WELCOME on the current connection; `None` while disconnected.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.conn.as_ref().map(|c| &c.welcome)
    }

    pub fn counters(&self) -> SubscriberCounters {
        self.state.counters
    }

    /// The last sequence number delivered on `topic`.
    pub fn last_seq(&self, topic: &str) -> Option<u64> {
        self.state.positions.get(topic).copied()
    }

    /// Why the connection last broke (or the last reconnect attempt failed).
    pub fn last_disconnect_reason(&self) -> Option<&str> {
        self.last_disconnect.as_deref()
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The poll loop: deliver what is buffered, else keep the connection alive and read, else
    /// reconnect. Returns after delivering at least one event, or at the deadline.
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
            let Some(conn) = self.conn.as_mut() else {
                let Some((attempt, events)) = self.reconnect_until(deadline)? else {
                    return Ok(0);
                };
                sink(EventRef::Reconnected {
                    attempt,
                    engine_restarted: self.engine_restarted,
                });
                for event in &events {
                    sink(event.as_event_ref());
                }
                return Ok(1 + events.len());
            };
            let (delivered, stop) = drain(conn, &mut self.state, sink);
            if !self.state.out.is_empty() {
                let sent = conn.send(&self.state.out);
                self.state.out.clear();
                if let Err(e) = sent {
                    self.lose(format!("write failed: {e}"));
                    if delivered > 0 {
                        return Ok(delivered);
                    }
                    continue;
                }
            }
            if let Some(stop) = stop {
                let fatal = match stop {
                    Stop::Engine(e) if is_retryable_code(e.code) => {
                        self.lose(format!(
                            "engine sent ERROR {} ({}): {}",
                            e.code,
                            error_code_name(e.code),
                            e.reason
                        ));
                        None
                    }
                    Stop::Engine(e) => Some(ClientError::Engine {
                        code: e.code,
                        reason: e.reason,
                    }),
                    Stop::Protocol(e) => Some(ClientError::Protocol(e)),
                };
                if let Some(err) = fatal {
                    self.lose(err.to_string());
                    if delivered == 0 {
                        return Err(err);
                    }
                    self.deferred = Some(err);
                }
            }
            if delivered > 0 {
                return Ok(delivered);
            }
            let Some(conn) = self.conn.as_mut() else {
                continue;
            };
            let now = Instant::now();
            let keepalive = Duration::from_millis(u64::from(conn.welcome.keepalive_ms.max(1)));
            let ping_at = conn.last_send + ping_interval(conn.welcome.keepalive_ms);
            if now >= ping_at {
                self.nonce += 1;
                encode_ping(&mut self.state.out, self.nonce);
                self.state.counters.pings_sent += 1;
                let sent = conn.send(&self.state.out);
                self.state.out.clear();
                if let Err(e) = sent {
                    self.lose(format!("write failed: {e}"));
                }
                continue;
            }
            // The engine answers our PINGs (sent every half keep-alive) at once, so a whole
            // keep-alive of silence is two PINGs unanswered: a dead engine or a dead path,
            // noticed within one keep-alive of its death (`tests/faults.rs`). The kernel alone
            // would take minutes.
            let dead_at = conn.last_recv + keepalive;
            if now >= dead_at {
                let silent_ms = now.duration_since(conn.last_recv).as_millis();
                match conn.fill(None) {
                    Ok(Fill::Data) => {}
                    Ok(Fill::WouldBlock) => {
                        self.lose(format!("nothing heard from the engine for {silent_ms} ms"))
                    }
                    Ok(Fill::Eof) => self.lose("the engine closed the connection".into()),
                    Err(e) => self.lose(format!("read failed: {e}")),
                }
                continue;
            }
            // At the deadline (at once, for a zero timeout) one last non-blocking read.
            let wait = (now < deadline).then(|| deadline.min(ping_at).min(dead_at) - now);
            match conn.fill(wait) {
                Ok(Fill::WouldBlock) if wait.is_none() => return Ok(0),
                Ok(Fill::Data | Fill::WouldBlock) => {}
                Ok(Fill::Eof) => self.lose("the engine closed the connection".into()),
                Err(e) => self.lose(format!("read failed: {e}")),
            }
        }
    }

    fn lose(&mut self, reason: String) {
        self.conn = None;
        self.state.out.clear();
        self.state.counters.disconnects += 1;
        self.last_disconnect = Some(reason);
        self.reconnect.on_lost(Instant::now());
    }

    /// Reconnect attempts, spaced by the back-off, until one succeeds or `deadline` passes.
    fn reconnect_until(
        &mut self,
        deadline: Instant,
    ) -> Result<Option<(u32, Vec<Event>)>, ClientError> {
        loop {
            let now = Instant::now();
            if now < self.reconnect.next_at {
                if self.reconnect.next_at >= deadline {
                    std::thread::sleep(deadline.saturating_duration_since(now));
                    return Ok(None);
                }
                std::thread::sleep(self.reconnect.next_at - now);
            }
            let attempt = self.reconnect.attempt + 1;
            match self.establish(true) {
                Ok(events) => {
                    self.state.counters.reconnects += 1;
                    self.reconnect.attempt = 0;
                    return Ok(Some((attempt, events)));
                }
                Err(e) if e.is_retryable() => {
                    self.last_disconnect = Some(e.to_string());
                    self.reconnect.on_failed(Instant::now());
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                }
                Err(e) => {
                    self.reconnect.on_failed(Instant::now());
                    return Err(e);
                }
            }
        }
    }

    /// Opens a connection and subscribes everything, waiting for every SUBACK; events that
    /// arrive meanwhile are returned. The first time, SUBSCRIBE asks for the retained snapshot;
    /// when `resuming`, it carries the positions seen on the matching topics, so the engine
    /// replays what was missed (or names it in a GAP) instead.
    fn establish(&mut self, resuming: bool) -> Result<Vec<Event>, ClientError> {
        let mut conn = Conn::open(&self.opts, self.opts.read_buffer_bytes)?;
        let engine_id = conn.welcome.engine_id;
        self.engine_restarted = self.engine_id.is_some_and(|previous| previous != engine_id);
        if self.engine_restarted {
            // Sequence numbers restarted with the engine: old positions would make the
            // duplicate guard drop new messages.
            self.state.positions.clear();
        }
        self.engine_id = Some(engine_id);
        let deadline = Instant::now() + self.opts.connect_timeout;
        let mut out = Vec::new();
        self.state.awaiting_subacks.clear();
        for (i, spec) in self.subscriptions.iter().enumerate() {
            let sub_id = i as u32 + 1;
            let resume = resume_list(
                self.state.positions.iter().map(|(t, &s)| (t.as_str(), s)),
                &spec.pattern,
                resuming,
                self.opts.durable_session,
            );
            encode_control(
                &mut out,
                &Frame::Subscribe(Subscribe {
                    sub_id,
                    pattern: spec.pattern.clone(),
                    mode: spec.mode,
                    resume,
                }),
            );
            self.state.awaiting_subacks.push(sub_id);
        }
        conn.send(&out)?;
        let mut events = Vec::new();
        while !self.state.awaiting_subacks.is_empty() {
            let (_, stop) = drain(&mut conn, &mut self.state, &mut |e: EventRef<'_>| {
                events.push(e.to_event())
            });
            if !self.state.out.is_empty() {
                conn.send(&self.state.out)?;
                self.state.out.clear();
            }
            match stop {
                Some(Stop::Engine(e)) => {
                    return Err(ClientError::Engine {
                        code: e.code,
                        reason: e.reason,
                    })
                }
                Some(Stop::Protocol(e)) => return Err(ClientError::Protocol(e)),
                None => {}
            }
            if self.state.awaiting_subacks.is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Handshake(format!(
                    "no SUBACK within {:?}",
                    self.opts.connect_timeout
                )));
            }
            if conn.fill(Some(deadline - now))? == Fill::Eof {
                return Err(ClientError::Handshake(
                    "the engine closed the connection before SUBACK".into(),
                ));
            }
        }
        self.conn = Some(conn);
        Ok(events)
    }
}

/// Decodes every complete frame in the receive buffer, delivering DATA and GAP through `sink`
/// (after the duplicate guard) and queueing PONGs in `state.out`. Stops at an ERROR frame or an
/// undecodable one. Returns the number of events delivered.
fn drain(
    conn: &mut Conn,
    state: &mut State,
    sink: &mut dyn FnMut(EventRef<'_>),
) -> (usize, Option<Stop>) {
    let mut delivered = 0;
    let mut used = 0;
    let mut stop = None;
    let buf = conn.pending();
    while stop.is_none() {
        let (frame, n) = match decode_frame(&buf[used..], MAX_INBOUND_FRAME_BYTES) {
            Ok(Decoded::Frame(frame, n)) => (frame, n),
            Ok(Decoded::NeedMore(_)) => break,
            Err(e) => {
                stop = Some(Stop::Protocol(e));
                break;
            }
        };
        used += n;
        match frame {
            Frame::Data {
                header,
                topic,
                payload,
            } => {
                match state.positions.get_mut(topic) {
                    Some(last) if header.seq <= *last => {
                        state.counters.duplicates_dropped += 1;
                        continue;
                    }
                    Some(last) => *last = header.seq,
                    None => {
                        state.positions.insert(topic.to_string(), header.seq);
                    }
                }
                state.counters.messages += 1;
                delivered += 1;
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
            Frame::Gap(gap) => {
                let last = state.positions.get(&gap.topic).copied();
                if last.is_some_and(|last| gap.to_seq <= last) {
                    // Already past it (a resume overlapping an earlier report).
                    continue;
                }
                state.positions.insert(gap.topic.clone(), gap.to_seq);
                state.counters.gaps += 1;
                state.counters.gap_messages += gap.to_seq.saturating_sub(gap.from_seq) + 1;
                delivered += 1;
                sink(EventRef::Gap {
                    topic: &gap.topic,
                    from_seq: gap.from_seq,
                    to_seq: gap.to_seq,
                });
            }
            Frame::SubAck(ack) => state.awaiting_subacks.retain(|&id| id != ack.sub_id),
            Frame::Ping { nonce } => encode_pong(&mut state.out, nonce),
            Frame::Pong { .. } => {}
            Frame::Error(e) => stop = Some(Stop::Engine(e)),
            other => {
                stop = Some(Stop::Protocol(DecodeError::Malformed {
                    kind: frame_name(&other),
                    reason: "the engine may not send this frame to a subscriber".into(),
                }))
            }
        }
    }
    conn.consume(used);
    (delivered, stop)
}

/// SUBSCRIBE's resume list for `pattern` (docs/PROTOCOL.md §8): the positions of the topics it
/// matches, sorted; when resuming with none of them, the "resuming, nothing seen yet" marker
/// (the engine then replays topics that appeared while we were away from their first message
/// instead of sending only their last value); and with a durable session, the marker that lets
/// the positions the engine kept for our id fill in what this process never saw.
pub(crate) fn resume_list<'a>(
    positions: impl Iterator<Item = (&'a str, u64)>,
    pattern: &str,
    resuming: bool,
    durable_session: bool,
) -> Vec<TopicPosition> {
    let mut resume: Vec<TopicPosition> = positions
        .filter(|(topic, _)| pattern_matches(pattern, topic))
        .map(|(topic, last_seq)| TopicPosition {
            topic: topic.to_string(),
            last_seq,
        })
        .collect();
    resume.sort_by(|a, b| a.topic.cmp(&b.topic));
    if resuming && resume.is_empty() {
        resume.push(TopicPosition {
            topic: String::new(),
            last_seq: 0,
        });
    }
    if durable_session {
        resume.push(TopicPosition {
            topic: String::new(),
            last_seq: SESSION_MARKER_SEQ,
        });
    }
    resume
}

/// What [`Subscriber`] and [`super::McastSubscriber`] share: a `pump` that hands one poll round's
/// events to a sink, and a queue for the events of a round that `next_event` returns one at a
/// time. Their public `next_event` and `next_batch` are these.
pub(crate) trait EventSource {
    fn pending(&mut self) -> &mut VecDeque<Event>;

    fn pump(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError>;

    fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        if let Some(event) = self.pending().pop_front() {
            return Ok(Some(event));
        }
        let mut batch = std::mem::take(self.pending());
        let result = self.pump(timeout, &mut |e: EventRef<'_>| {
            batch.push_back(e.to_event())
        });
        *self.pending() = batch;
        result?;
        Ok(self.pending().pop_front())
    }

    fn next_batch(
        &mut self,
        timeout: Duration,
        f: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        let pending = self.pending();
        if !pending.is_empty() {
            let n = pending.len();
            for event in pending.drain(..) {
                f(event.as_event_ref());
            }
            return Ok(n);
        }
        self.pump(timeout, f)
    }
}

impl EventSource for Subscriber {
    fn pending(&mut self) -> &mut VecDeque<Event> {
        &mut self.pending
    }

    fn pump(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(EventRef<'_>),
    ) -> Result<usize, ClientError> {
        Subscriber::pump(self, timeout, sink)
    }
}
