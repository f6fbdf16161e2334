//! One connection's state, as a plain value: handshake phase, keep-alive clock, subscriptions,
//! the outbound queue and the overflow state of its delivery modes.
//!
//! Sans-IO: a `Session` never reads a clock (every method that needs the time takes `now`) and
//! never touches a socket (its output is its [`Outbox`], which the reactor writes). The fan-out
//! core (`core.rs`) owns one `Session` per connection and drives it; the rules that only concern
//! one connection live here:
//! - delivery modes on overflow ([`Session::enqueue`]): `all` lags a topic and is caught up from
//!   the replay ring, `latest` keeps the newest frame per topic, `disconnect` cuts the connection;
//! - keep-alive and handshake deadlines ([`Session::handle_timeout`], [`Session::poll_timeout`]);
//! - the bound on what a client can make the engine queue for it, replies included.

use std::borrow::Borrow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::{HashMap, HashSet};

use super::guard::Guard;
use super::mqtt_session::{self, MqttState};
use super::native::{self, Reply};
use super::outbox::{Outbox, SharedFrame};
use super::pacing::Holds;
use crate::auth::TopicFilter;
use crate::proto::{self, error_code, DeliveryMode};

/// How long a connection being closed with an ERROR may take to read it before it is dropped.
pub(crate) const LINGER: Duration = Duration::from_secs(1);

/// Bytes of replies (WELCOME, SUBACK, PONG, ERROR, STATS) a connection may leave unwritten
/// before the engine gives up on it: a client that sends PINGs or STATS_REQUESTs and never reads
/// the answers is cut instead of growing the engine. One reply may go past it (a STATS document
/// is up to `max_frame_bytes`), so the bound is this plus one frame.
pub(crate) const REPLY_SLACK_BYTES: usize = 64 * 1024;

/// Where a subscription lives on a shard: the connection slot, its position in the connection's
/// subscription table, and a shard-unique key (never reused, so a late snapshot reply cannot land
/// on a newer subscription that took the same position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SubRef {
    pub slot: u32,
    pub pos: u32,
    pub key: u64,
}

#[derive(Debug)]
pub(crate) struct Sub {
    pub sub_id: u32,
    pub key: u64,
    pub pattern: String,
    pub mode: DeliveryMode,
    /// Bit i set: the snapshot from shard i has not arrived; its live frames are skipped.
    pub pending: u64,
    /// A pattern the identity may only partly receive: the topics it may (`guard.rs`).
    pub filter: Option<Arc<TopicFilter>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    AwaitHello {
        deadline: Instant,
    },
    Open,
    /// ERROR queued; input is read and discarded until EOF or the deadline.
    Closing {
        deadline: Instant,
        /// The reactor has shut the write side (FIN after the reason).
        write_shut: bool,
    },
}

/// An `all` subscription's overflow on one topic: the next sequence number it needs from the
/// replay ring. Live frames of a lagged topic are skipped: the replay will carry them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lag {
    pub next_seq: u64,
    /// A replay request is in flight for this topic.
    pub requested: bool,
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
    /// Times pacing stopped reading this connection (as a publisher).
    pub paced: u64,
}

/// A frame kept by its DATA topic: the `latest` overflow holds one per topic and replaces it in
/// place, so a conflated message costs no allocation for its key. `wire` is what goes to the
/// socket when it is not the DATA frame itself (an MQTT connection's shared PUBLISH).
#[derive(Debug, Clone)]
struct ByTopic {
    data: SharedFrame,
    wire: Option<SharedFrame>,
}

impl ByTopic {
    fn topic(&self) -> &str {
        // Only DATA frames are conflated; their topic was decoded when they were matched.
        proto::data_frame_topic(&self.data).unwrap_or("")
    }
}

/// How a live DATA frame goes to a connection's socket ([`Session::enqueue_as`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outgoing<'a> {
    /// The DATA frame itself (native connections).
    Data,
    /// An MQTT QoS 0 PUBLISH shared by every MQTT subscriber of the message on this shard.
    MqttQos0(&'a SharedFrame),
    /// MQTT QoS 1: a per-subscriber head (fixed header, topic, packet id), then this payload,
    /// shared by every QoS 1 subscriber of the message on this shard.
    MqttQos1 { payload: &'a SharedFrame },
}

impl PartialEq for ByTopic {
    fn eq(&self, other: &Self) -> bool {
        self.topic() == other.topic()
    }
}
impl Eq for ByTopic {}
impl Hash for ByTopic {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.topic().hash(state)
    }
}
impl Borrow<str> for ByTopic {
    fn borrow(&self) -> &str {
        self.topic()
    }
}

/// What the session asks of the core after a deadline passed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Timeout {
    /// Nothing due.
    None,
    /// Keep-alive: send a PING.
    Ping,
    /// The handshake or keep-alive window ran out: close with this ERROR.
    Expired(Fatal),
    /// The linger after a fatal ERROR ran out: drop the connection.
    Drop,
}

/// A fatal error on a connection: the ERROR frame to send before closing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fatal {
    pub code: u16,
    pub reason: String,
}

impl Fatal {
    pub(crate) fn new(code: u16, reason: impl Into<String>) -> Fatal {
        Fatal {
            code,
            reason: bounded_reason(reason.into()),
        }
    }
}

/// Longest ERROR reason the engine sends: reasons quote client input (topics, patterns, an
/// ERROR the client sent), and an ERROR must stay far below any frame limit.
pub(crate) const MAX_REASON_BYTES: usize = 256;

/// `reason` cut to [`MAX_REASON_BYTES`] on a character boundary, marked with "…" when cut.
pub(crate) fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

#[derive(Debug)]
pub(crate) struct Session {
    /// Engine-wide connection id (slots are reused, ids are not).
    pub id: u64,
    pub phase: Phase,
    pub client_id: String,
    pub outbox: Outbox,
    /// Subscriptions by position ([`SubRef::pos`]); `None` marks a free position.
    subs: Vec<Option<Sub>>,
    sub_count: usize,
    pub keepalive: Duration,
    pub last_heard: Instant,
    pub last_sent: Instant,
    pub ping_outstanding: bool,
    /// The transport can take bytes (cleared when a write would block, set when it is writable).
    pub writable: bool,
    /// Listed in the core's dirty list.
    pub in_dirty: bool,
    /// Last delivery stamp this connection was given a frame for (dedups overlapping subs).
    pub stamp: u64,
    /// `latest` mode overflow: the newest frame per topic, waiting for room.
    conflated: HashSet<ByTopic>,
    /// `delivery.conflate_always`: `latest` subscriptions conflate even when the queue has room.
    conflate_always: bool,
    pub lag: HashMap<String, Lag>,
    pub stats: ConnCounters,
    /// The earliest deadline the core has armed for this session (see `core.rs`).
    pub armed: Option<Instant>,
    /// Replies still in the outbox (a clone of each: a count of 1 means written), oldest first,
    /// and their bytes.
    replies: VecDeque<SharedFrame>,
    reply_bytes: usize,
    /// A STATS request is with the stats thread.
    pub stats_in_flight: bool,
    /// The last STATS reply, to tell whether it is still unwritten.
    last_stats: Option<SharedFrame>,
    /// Identity, source address, publish rate (`guard.rs`).
    pub guard: Guard,
    /// Pacing, as a subscriber: the topics whose publishers this connection holds back.
    pub holds: Holds,
    /// Pacing, as a publisher: the engine does not read this connection (it published to a
    /// topic that a subscriber holds back). Its silence is then the engine's doing.
    pub paused: bool,
    /// Its HELLO waits for an argon2 verdict (`auth_core.rs`): what finishes it. Not read
    /// meanwhile, like a paused publisher.
    pub verifying: Option<Box<super::core::PendingHello>>,
    /// Since when the socket has taken nothing while bytes waited for it (a write would
    /// block); `None` once a write makes progress. Pacing's stall rule counts from here.
    pub blocked_since: Option<Instant>,
    /// The peer's address, for logs (the driver sets it when it knows it).
    pub peer: Option<std::net::SocketAddr>,
    /// The ERROR code the engine closed the connection with, for the disconnect log line.
    pub close_code: Option<u16>,
    /// How its transport failed, for the disconnect log line (neither: the peer closed it).
    pub close_cause: Option<String>,
    /// MQTT connections only (`mqtt_session.rs`): `None` for a native connection.
    pub mqtt: Option<Box<MqttState>>,
    /// A durable session (`durable.rs`): what has been written to this connection, merged into
    /// its client id's session at close. `None`: the connection did not opt in.
    pub durable: Option<Box<super::durable::SessionState>>,
    /// A multicast receiver (it sent CHANNELS_REQUEST): carried topics' live messages go by
    /// the group, not this connection (`mcast_core.rs`).
    pub mcast: bool,
    /// Publisher acknowledgements (`acks.rs`): `None` until the connection sends ACK_REQUEST.
    pub acks: Option<Box<super::acks::PublishAcks>>,
}

/// The result of [`Session::enqueue`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Enqueued {
    /// Queued for the socket.
    Queued,
    /// Not queued now: conflated (`latest`) or lagged (`all`); the counters say which.
    Deferred,
    /// The queue is full and the subscription's mode is `disconnect`.
    Overflow,
}

impl Session {
    pub(crate) fn new(
        id: u64,
        now: Instant,
        handshake_timeout: Duration,
        keepalive: Duration,
        queue_max_bytes: usize,
        queue_max_messages: usize,
        conflate_always: bool,
    ) -> Session {
        Session {
            id,
            phase: Phase::AwaitHello {
                deadline: now + handshake_timeout,
            },
            client_id: String::new(),
            outbox: Outbox::new(queue_max_bytes, queue_max_messages),
            subs: Vec::new(),
            sub_count: 0,
            keepalive,
            last_heard: now,
            last_sent: now,
            ping_outstanding: false,
            writable: false,
            in_dirty: false,
            stamp: 0,
            conflated: HashSet::default(),
            conflate_always,
            lag: HashMap::default(),
            stats: ConnCounters::default(),
            armed: None,
            replies: VecDeque::new(),
            reply_bytes: 0,
            stats_in_flight: false,
            last_stats: None,
            guard: Guard::default(),
            holds: Holds::default(),
            paused: false,
            verifying: None,
            blocked_since: None,
            peer: None,
            close_code: None,
            close_cause: None,
            mqtt: None,
            durable: None,
            mcast: false,
            acks: None,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open)
    }

    pub(crate) fn is_closing(&self) -> bool {
        matches!(self.phase, Phase::Closing { .. })
    }

    // ----- subscriptions -----

    pub(crate) fn sub_count(&self) -> usize {
        self.sub_count
    }

    pub(crate) fn has_sub_id(&self, sub_id: u32) -> bool {
        self.subs().any(|s| s.sub_id == sub_id)
    }

    pub(crate) fn subs(&self) -> impl Iterator<Item = &Sub> {
        self.subs.iter().flatten()
    }

    /// Stores a subscription and returns its position.
    pub(crate) fn add_sub(&mut self, sub: Sub) -> u32 {
        self.sub_count += 1;
        match self.subs.iter().position(Option::is_none) {
            Some(pos) => {
                self.subs[pos] = Some(sub);
                pos as u32
            }
            None => {
                self.subs.push(Some(sub));
                (self.subs.len() - 1) as u32
            }
        }
    }

    /// The subscription a [`SubRef`] names, if it still exists.
    pub(crate) fn sub(&self, pos: u32, key: u64) -> Option<&Sub> {
        self.subs
            .get(pos as usize)
            .and_then(Option::as_ref)
            .filter(|s| s.key == key)
    }

    pub(crate) fn sub_mut(&mut self, pos: u32, key: u64) -> Option<&mut Sub> {
        self.subs
            .get_mut(pos as usize)
            .and_then(Option::as_mut)
            .filter(|s| s.key == key)
    }

    /// Removes the subscription with client id `sub_id`: its position and the subscription.
    pub(crate) fn remove_sub(&mut self, sub_id: u32) -> Option<(u32, Sub)> {
        let pos = self
            .subs
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.sub_id == sub_id))?;
        self.sub_count -= 1;
        self.subs[pos].take().map(|sub| (pos as u32, sub))
    }

    /// Removes every subscription: positions and subscriptions.
    pub(crate) fn drain_subs(&mut self) -> impl Iterator<Item = (u32, Sub)> + '_ {
        self.sub_count = 0;
        self.subs
            .iter_mut()
            .enumerate()
            .filter_map(|(pos, s)| s.take().map(|s| (pos as u32, s)))
    }

    // ----- delivery -----

    /// Puts a DATA frame of `topic` on the queue, applying the subscription's mode on overflow.
    #[cfg(test)]
    pub(crate) fn enqueue(
        &mut self,
        topic: &str,
        frame: &SharedFrame,
        mode: DeliveryMode,
        counters: &mut DeliveryCounters,
    ) -> Enqueued {
        self.enqueue_as(topic, frame, Outgoing::Data, mode, counters)
    }

    /// [`Session::enqueue`], with the frame going to the socket in the form `out` says (an MQTT
    /// connection's packets). Overflow state (lag, conflation) is kept by DATA frame either way.
    pub(crate) fn enqueue_as(
        &mut self,
        topic: &str,
        frame: &SharedFrame,
        out: Outgoing<'_>,
        mode: DeliveryMode,
        counters: &mut DeliveryCounters,
    ) -> Enqueued {
        // A topic with overflow state must not overtake it: newer values go the same way.
        if !self.lag.is_empty() && self.lag.contains_key(topic) {
            self.stats.lagged += 1;
            counters.lagged += 1;
            return Enqueued::Deferred;
        }
        let conflating = mode == DeliveryMode::Latest
            && (self.conflate_always
                || (!self.conflated.is_empty() && self.conflated.contains(topic)));
        if !conflating && self.push_live(topic, frame, out) {
            counters.delivered += 1;
            self.stats.delivered += 1;
            return Enqueued::Queued;
        }
        match mode {
            DeliveryMode::Latest => {
                let wire = match out {
                    Outgoing::MqttQos0(packet) => Some(packet.clone()),
                    Outgoing::Data | Outgoing::MqttQos1 { .. } => None,
                };
                let entry = ByTopic {
                    data: frame.clone(),
                    wire,
                };
                if self.conflated.replace(entry).is_some() {
                    counters.conflated += 1;
                    self.stats.conflated += 1;
                }
                Enqueued::Deferred
            }
            DeliveryMode::All | DeliveryMode::Default => {
                counters.lagged += 1;
                self.stats.lagged += 1;
                self.lag.insert(
                    topic.to_string(),
                    Lag {
                        next_seq: proto::data_frame_seq(frame).unwrap_or(1),
                        requested: false,
                    },
                );
                Enqueued::Deferred
            }
            DeliveryMode::Disconnect => Enqueued::Overflow,
        }
    }

    /// Queues a live frame if the outbox (and, for MQTT QoS 1, the in-flight window) has room.
    fn push_live(&mut self, topic: &str, frame: &SharedFrame, out: Outgoing<'_>) -> bool {
        match (out, self.mqtt.as_deref_mut()) {
            (Outgoing::MqttQos0(packet), Some(mqtt)) => {
                if self.outbox.push(packet.clone()).is_err() {
                    return false;
                }
                mqtt.push_stamp(packet, frame);
                true
            }
            (Outgoing::MqttQos1 { payload }, Some(mqtt)) => {
                let head_bytes = 5 + 2 + topic.len() + 2;
                if mqtt.window_full() || !self.outbox.has_room(head_bytes + payload.len()) {
                    return false;
                }
                let Some(pkid) = mqtt.take_pkid(frame) else {
                    return false;
                };
                let mut head = Vec::with_capacity(head_bytes);
                crate::mqtt::encode_publish_qos1_head(&mut head, topic, payload.len(), false, pkid);
                let head: SharedFrame = head.into();
                mqtt.push_stamp(&head, frame);
                // Checked above: both fit. Head and payload go out in the same vectored write.
                self.outbox.push_unbounded(head);
                self.outbox.push_unbounded(payload.clone());
                true
            }
            _ => self.outbox.push(frame.clone()).is_ok(),
        }
    }

    /// Queues the frames of a snapshot, resume or catch-up reply (bounded by their producer).
    /// An MQTT connection gets each as a QoS 0 PUBLISH of its own (RETAIN set on snapshot
    /// values); a GAP has no MQTT form and is counted but not sent.
    pub(crate) fn queue_replayed(
        &mut self,
        frames: Vec<SharedFrame>,
        counters: &mut DeliveryCounters,
    ) {
        for frame in frames {
            if frame.get(proto::LEN_PREFIX_BYTES) == Some(&proto::KIND_GAP) {
                self.stats.gaps += 1;
                counters.gaps += 1;
            } else {
                self.stats.replayed += 1;
                counters.replayed += 1;
            }
            match self.mqtt.as_deref_mut() {
                None => self.outbox.push_unbounded(frame),
                Some(mqtt) => {
                    if let Some(packet) = mqtt_session::replayed_packet(&frame, mqtt) {
                        mqtt.push_stamp(&packet, &frame);
                        self.outbox.push_unbounded(packet);
                    }
                }
            }
        }
    }

    /// Moves the conflated values (newest per topic) into the outbox once it has drained far
    /// enough: below half its bounds after an overflow, or empty with `conflate_always` (a value
    /// then waits only for the previous write, and newer values of its topic replace it
    /// meanwhile).
    pub(crate) fn move_conflated(&mut self, counters: &mut DeliveryCounters) {
        if self.conflated.is_empty() {
            return;
        }
        let ready = if self.conflate_always {
            self.outbox.is_empty()
        } else {
            self.outbox.is_below_half()
        };
        if ready {
            for ByTopic { data, wire } in self.conflated.drain() {
                let frame = match (wire, self.mqtt.as_deref_mut()) {
                    (Some(packet), Some(mqtt)) => {
                        mqtt.push_stamp(&packet, &data);
                        packet
                    }
                    _ => data,
                };
                self.outbox.push_unbounded(frame);
                counters.delivered += 1;
                self.stats.delivered += 1;
            }
        }
    }

    /// Something waits for the socket: queued frames or conflated values.
    pub(crate) fn has_output(&self) -> bool {
        !self.outbox.is_empty() || !self.conflated.is_empty()
    }

    /// Topics whose catch-up should be requested now: lagging, not yet requested, and the
    /// queue has drained below half. Marks them requested.
    pub(crate) fn take_replay_requests(&mut self) -> Vec<(String, u64)> {
        if !self.outbox.is_below_half()
            || !self.lag.values().any(|l| !l.requested)
            || self.mqtt.as_deref().is_some_and(|m| !m.window_below_half())
        {
            return Vec::new();
        }
        self.lag
            .iter_mut()
            .filter(|(_, lag)| !lag.requested)
            .map(|(topic, lag)| {
                lag.requested = true;
                (topic.clone(), lag.next_seq)
            })
            .collect()
    }

    // ----- replies -----

    /// Queues a reply (WELCOME, SUBACK, PONG, STATS, a non-fatal ERROR). Replies are not subject
    /// to the data bound, but a client that leaves more than [`REPLY_SLACK_BYTES`] of them
    /// unwritten is cut: `Err` names the reason.
    pub(crate) fn queue_reply(&mut self, frame: SharedFrame) -> Result<(), Fatal> {
        // The outbox is FIFO: written replies leave from the front.
        while let Some(front) = self.replies.front() {
            if std::sync::Arc::strong_count(front) > 1 {
                break;
            }
            self.reply_bytes -= front.len();
            self.replies.pop_front();
        }
        if self.reply_bytes > REPLY_SLACK_BYTES {
            return Err(Fatal::new(
                error_code::SLOW_CONSUMER,
                "replies left unread: the outbound queue is full",
            ));
        }
        self.reply_bytes += frame.len();
        self.replies.push_back(frame.clone());
        self.outbox.push_unbounded(frame);
        Ok(())
    }

    /// Whether a STATS request should go to the stats thread: not when one is in flight or the
    /// last answer is still unwritten (that answer serves this request too).
    pub(crate) fn wants_stats(&self) -> bool {
        !self.stats_in_flight
            && self
                .last_stats
                .as_ref()
                .is_none_or(|f| std::sync::Arc::strong_count(f) == 1)
    }

    /// The stats thread's answer arrived. It is bounded on its own (one unwritten answer at a
    /// time, at most one frame), not against the other replies.
    pub(crate) fn queue_stats(&mut self, frame: SharedFrame) {
        self.stats_in_flight = false;
        self.last_stats = Some(frame.clone());
        self.outbox.push_unbounded(frame);
    }

    /// Turns the session towards closing: the ERROR goes right after whatever frame the
    /// transport is in the middle of (queued data behind it would only delay the reason; a slow
    /// consumer's queue is full by definition), overflow state is dropped, input is ignored.
    /// Returns false if the session was already closing.
    pub(crate) fn fail(&mut self, now: Instant, fatal: Fatal) -> bool {
        if self.is_closing() {
            return false;
        }
        // A verdict still to come is moot: the closing connection's input is read and dropped.
        self.verifying = None;
        let mut buf = Vec::new();
        match self.mqtt.as_deref_mut() {
            None => native::encode_reply(
                &mut buf,
                Reply::Error {
                    code: fatal.code,
                    reason: fatal.reason,
                },
            ),
            // MQTT has no ERROR: a refused CONNECT gets its CONNACK code, anything else a close.
            Some(mqtt) => {
                mqtt.clear_stamps();
                if mqtt.connect_seen && matches!(self.phase, Phase::AwaitHello { .. }) {
                    let code = mqtt_session::connack_code(fatal.code);
                    crate::mqtt::encode_connack(&mut buf, false, code);
                }
            }
        }
        self.outbox.discard_unstarted();
        self.replies.clear();
        self.reply_bytes = 0;
        self.conflated.clear();
        self.lag.clear();
        if !buf.is_empty() {
            self.outbox.push_unbounded(buf.into());
        }
        // A closing connection is written at once: the reason must not wait for coalescing.
        self.writable = true;
        self.phase = Phase::Closing {
            deadline: now + LINGER,
            write_shut: false,
        };
        true
    }

    /// A closing session whose ERROR is out: the reactor shuts the write side now.
    pub(crate) fn wants_write_shutdown(&mut self) -> bool {
        if let Phase::Closing {
            write_shut: shut @ false,
            ..
        } = &mut self.phase
        {
            if self.outbox.is_empty() {
                *shut = true;
                return true;
            }
        }
        false
    }

    // ----- time -----

    /// The next moment [`Session::handle_timeout`] has something to do.
    pub(crate) fn poll_timeout(&self) -> Instant {
        match self.phase {
            Phase::AwaitHello { deadline } | Phase::Closing { deadline, .. } => deadline,
            Phase::Open => {
                let expire = self.last_heard + self.keepalive.mul_f32(1.5);
                // An MQTT server never pings (the client's PINGREQ is its heartbeat).
                if self.ping_outstanding || self.mqtt.is_some() {
                    expire
                } else {
                    // PING when nothing was heard, or nothing sent, for one keep-alive.
                    expire.min(self.last_heard.min(self.last_sent) + self.keepalive)
                }
            }
        }
    }

    /// What is due at `now`: a PING to send (marked outstanding), an expiry, or a drop.
    pub(crate) fn handle_timeout(&mut self, now: Instant, handshake_timeout_ms: u64) -> Timeout {
        match self.phase {
            Phase::AwaitHello { deadline } if now >= deadline => Timeout::Expired(Fatal::new(
                error_code::HANDSHAKE_TIMEOUT,
                format!("no HELLO within {handshake_timeout_ms} ms"),
            )),
            Phase::Closing { deadline, .. } if now >= deadline => Timeout::Drop,
            Phase::Open => {
                if self.paused {
                    // Not read by choice: not a silent peer.
                    self.last_heard = now;
                }
                let silent = now.saturating_duration_since(self.last_heard);
                if silent >= self.keepalive.mul_f32(1.5) {
                    Timeout::Expired(Fatal::new(
                        error_code::KEEPALIVE_TIMEOUT,
                        format!(
                            "nothing heard for {} ms (keep-alive {} ms)",
                            silent.as_millis(),
                            self.keepalive.as_millis()
                        ),
                    ))
                } else if !self.ping_outstanding
                    && self.mqtt.is_none()
                    && (silent >= self.keepalive
                        || now.saturating_duration_since(self.last_sent) >= self.keepalive)
                {
                    self.ping_outstanding = true;
                    Timeout::Ping
                } else {
                    Timeout::None
                }
            }
            _ => Timeout::None,
        }
    }
}

/// Delivery counters a shard keeps per cause (each counts what its name says, per message and
/// connection): see docs/PROTOCOL.md §11.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DeliveryCounters {
    /// DATA frames queued to a connection's outbox (live, or conflated values moved in).
    pub delivered: u64,
    /// `latest` values replaced by a newer one before they were queued.
    pub conflated: u64,
    /// `all` frames not queued live because their topic was lagging (they come by replay, or
    /// are named by a GAP).
    pub lagged: u64,
    /// Frames queued from the ring or the retained store (snapshot, resume, catch-up).
    pub replayed: u64,
    /// GAP frames queued.
    pub gaps: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(topic: &str, seq: u64) -> SharedFrame {
        let mut buf = Vec::new();
        proto::encode_data(
            &mut buf,
            &proto::DataHeader {
                seq,
                source_ts_ns: 0,
                ingest_ts_ns: 0,
                quality: 0,
                flags: 0,
            },
            topic,
            b"v",
        );
        Arc::from(buf)
    }

    fn session(now: Instant, max_frames: usize, conflate_always: bool) -> Session {
        Session::new(
            1,
            now,
            Duration::from_secs(5),
            Duration::from_secs(1),
            1 << 20,
            max_frames,
            conflate_always,
        )
    }

    #[test]
    fn latest_overflow_keeps_the_newest_per_topic_without_reordering() {
        let now = Instant::now();
        let mut s = session(now, 2, false);
        let mut c = DeliveryCounters::default();
        for seq in 1..=5 {
            s.enqueue("a", &data("a", seq), DeliveryMode::Latest, &mut c);
        }
        assert_eq!(s.outbox.queued_frames(), 2);
        assert_eq!((c.delivered, c.conflated), (2, 2), "3, 4 replaced; 5 waits");
        s.outbox.consume(s.outbox.queued_bytes());
        s.move_conflated(&mut c);
        assert_eq!(s.outbox.queued_frames(), 1);
        assert_eq!(c.delivered, 3);
    }

    #[test]
    fn all_overflow_lags_the_topic_and_asks_for_the_ring_once_drained() {
        let now = Instant::now();
        let mut s = session(now, 1, false);
        let mut c = DeliveryCounters::default();
        assert_eq!(
            s.enqueue("a", &data("a", 1), DeliveryMode::All, &mut c),
            Enqueued::Queued
        );
        assert_eq!(
            s.enqueue("a", &data("a", 2), DeliveryMode::All, &mut c),
            Enqueued::Deferred
        );
        assert_eq!(
            s.enqueue("a", &data("a", 3), DeliveryMode::All, &mut c),
            Enqueued::Deferred,
            "a lagging topic is not overtaken"
        );
        assert_eq!(c.lagged, 2);
        assert!(s.take_replay_requests().is_empty(), "queue still full");
        s.outbox.consume(s.outbox.queued_bytes());
        assert_eq!(s.take_replay_requests(), vec![("a".to_string(), 2)]);
        assert!(s.take_replay_requests().is_empty(), "asked once");
    }

    #[test]
    fn disconnect_overflow_is_reported() {
        let now = Instant::now();
        let mut s = session(now, 1, false);
        let mut c = DeliveryCounters::default();
        s.enqueue("a", &data("a", 1), DeliveryMode::Disconnect, &mut c);
        assert_eq!(
            s.enqueue("a", &data("a", 2), DeliveryMode::Disconnect, &mut c),
            Enqueued::Overflow
        );
    }

    #[test]
    fn unread_replies_are_bounded_whatever_the_data_bound() {
        let now = Instant::now();
        let mut s = Session::new(1, now, Duration::ZERO, Duration::ZERO, 4 << 20, 10, false);
        let mut queued = 0;
        while s.queue_reply(Arc::from(vec![0u8; 1000])).is_ok() {
            queued += 1;
            assert!(queued < 1000, "never refused");
        }
        assert!(s.outbox.queued_bytes() <= REPLY_SLACK_BYTES + 1000);
    }

    #[test]
    fn written_replies_no_longer_count() {
        let now = Instant::now();
        let mut s = Session::new(1, now, Duration::ZERO, Duration::ZERO, 4 << 20, 10, false);
        for _ in 0..1000 {
            s.queue_reply(Arc::from(vec![0u8; 1000])).unwrap();
            s.outbox.consume(s.outbox.queued_bytes());
        }
    }

    #[test]
    fn stats_requests_coalesce_while_one_is_in_flight_or_unwritten() {
        let now = Instant::now();
        let mut s = session(now, 10, false);
        assert!(s.wants_stats());
        s.stats_in_flight = true;
        assert!(!s.wants_stats());
        s.queue_stats(Arc::from(vec![1u8; 10]));
        assert!(!s.wants_stats(), "the answer is still queued");
        s.outbox.consume(10);
        assert!(s.wants_stats());
    }

    #[test]
    fn reasons_are_cut_on_a_character_boundary() {
        let long = "é".repeat(300);
        let cut = bounded_reason(long);
        assert!(cut.len() <= MAX_REASON_BYTES && cut.ends_with('…'));
        assert_eq!(bounded_reason("short".into()), "short");
    }

    #[test]
    fn a_receive_only_client_is_pinged_one_keepalive_after_it_last_spoke() {
        let t0 = Instant::now();
        let mut s = session(t0, 10, false);
        s.phase = Phase::Open;
        s.last_heard = t0 + Duration::from_millis(400);
        s.last_sent = t0 + Duration::from_millis(900);
        assert_eq!(s.poll_timeout(), t0 + Duration::from_millis(1400));
    }

    #[test]
    fn keepalive_pings_then_expires_on_the_virtual_clock() {
        let t0 = Instant::now();
        let mut s = session(t0, 10, false);
        s.phase = Phase::Open;
        assert_eq!(s.poll_timeout(), t0 + Duration::from_secs(1));
        assert_eq!(
            s.handle_timeout(t0 + Duration::from_millis(999), 0),
            Timeout::None
        );
        assert_eq!(
            s.handle_timeout(t0 + Duration::from_secs(1), 0),
            Timeout::Ping
        );
        assert_eq!(s.poll_timeout(), t0 + Duration::from_millis(1500));
        assert!(matches!(
            s.handle_timeout(t0 + Duration::from_millis(1500), 0),
            Timeout::Expired(Fatal {
                code: error_code::KEEPALIVE_TIMEOUT,
                ..
            })
        ));
    }
}
