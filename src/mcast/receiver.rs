//! A multicast receiver as a value: datagrams (from the group, or REPAIR frames from the TCP
//! session) in, messages in per-stream order out, NAKs to send over TCP.
//!
//! Per stream (channel, owner reactor) it keeps the next datagram sequence to release, the
//! datagrams that came early, and the missing ones with the time their NAK is due: a random
//! delay up to `nak_delay` first (so that of many receivers that lost the same datagram, the
//! repair caused by the first NAKs arrives before most others send theirs, and theirs are
//! suppressed), then every `nak_retry` until the datagram or a REPAIR_GONE arrives.
//!
//! Stitching to the TCP snapshot: a stream releases nothing before its STREAM_POS (which the
//! engine sends after that owner's snapshot frames) and drops what precedes it; every message
//! then passes a per-topic filter: a seq not above the last one delivered (the snapshot value
//! included) is a duplicate. While a subscription waits for its SUBACK, nothing is released
//! (`hold`), so a topic's snapshot value always comes before its live messages.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ahash::HashMap;

use super::datagram::{parse_datagram, FLAG_HEARTBEAT, FLAG_RETRANSMIT, FLAG_STUB};
use super::sender::MAX_NAK_RANGE;
use crate::proto::{self, DataHeader, Decoded, Frame, Nak, StreamPos};

/// Missing datagrams tracked per stream; a sequence jump beyond this (a corrupt or hostile
/// datagram) is tracked up to it, the rest is learnt later.
const MAX_MISSING: u64 = 16_384;
/// Streams a receiver tracks: datagrams naming more (a hostile sender) are ignored.
const MAX_STREAMS: usize = 4096;

#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// Datagrams of other engines (or other runs) are ignored.
    pub engine_id: u64,
    pub nak_delay: Duration,
    pub nak_retry: Duration,
    /// `all`: repair every loss. `latest`: never NAK, skip to what arrives.
    pub repair: bool,
    /// Datagrams held out of order (or before their STREAM_POS), over all streams.
    pub max_buffered: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceiverCounters {
    pub datagrams: u64,
    pub heartbeats: u64,
    /// Datagrams that came twice (a retransmission after a unicast repair, a reordering).
    pub duplicates: u64,
    /// Datagrams received in a REPAIR frame, and multicast retransmissions received.
    pub repairs_received: u64,
    pub retransmits_received: u64,
    pub naks_sent: u64,
    pub nak_datagrams: u64,
    /// Missing datagrams that arrived before their NAK was due: no NAK sent.
    pub naks_suppressed: u64,
    /// Datagrams the engine no longer held (REPAIR_GONE).
    pub gone: u64,
    /// Datagrams skipped by a `latest` receiver.
    pub skipped: u64,
    /// Malformed datagrams, or another engine's.
    pub ignored: u64,
    /// Datagrams dropped because the stream's buffer was full (repaired by NAK later).
    pub buffer_overflow: u64,
    pub messages: u64,
    /// Messages dropped by the per-topic filter (already delivered, e.g. by the snapshot).
    pub stitched: u64,
    pub gaps: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverEvent {
    /// A DATA frame (length prefix included), in per-topic order.
    Data(Vec<u8>),
    /// Messages `from_seq ..= to_seq` of `topic` are lost (their datagrams were gone).
    Gap {
        topic: String,
        from_seq: u64,
        to_seq: u64,
    },
}

/// [`ReceiverEvent`] borrowing the datagram (or the receiver's buffer): what the `*_into`
/// inputs hand their sink, with no allocation per message. A message comes decoded, its
/// `frame` the whole DATA frame (length prefix included) it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverEventRef<'a> {
    Data {
        frame: &'a [u8],
        header: DataHeader,
        topic: &'a str,
        payload: &'a [u8],
    },
    Gap {
        topic: &'a str,
        from_seq: u64,
        to_seq: u64,
    },
}

impl ReceiverEventRef<'_> {
    pub fn to_event(&self) -> ReceiverEvent {
        match *self {
            ReceiverEventRef::Data { frame, .. } => ReceiverEvent::Data(frame.to_vec()),
            ReceiverEventRef::Gap {
                topic,
                from_seq,
                to_seq,
            } => ReceiverEvent::Gap {
                topic: topic.to_string(),
                from_seq,
                to_seq,
            },
        }
    }
}

/// Where the receiver's released events go.
pub type ReceiverSink<'s> = dyn FnMut(ReceiverEventRef<'_>) + 's;

enum Slot {
    Data(Vec<u8>),
    Gone,
}

#[derive(Clone, Copy)]
struct Missing {
    nak_at: Instant,
    naked: bool,
}

#[derive(Default)]
struct Stream {
    /// `None` until STREAM_POS.
    next: Option<u64>,
    buffer: BTreeMap<u64, Slot>,
    missing: BTreeMap<u64, Missing>,
}

pub struct McastReceiver {
    cfg: ReceiverConfig,
    streams: HashMap<(u16, u16), Stream>,
    /// Last seq delivered per topic (snapshot values included).
    topics: HashMap<String, u64>,
    patterns: Vec<String>,
    held: u32,
    /// Slots held in the streams' buffers, bounded by `max_buffered`.
    buffered: usize,
    events: VecDeque<ReceiverEvent>,
    rng: u64,
    pub counters: ReceiverCounters,
}

impl McastReceiver {
    pub fn new(cfg: ReceiverConfig) -> McastReceiver {
        McastReceiver {
            rng: cfg.seed ^ 0xA076_1D64_78BD_642F | 1,
            cfg,
            streams: HashMap::default(),
            topics: HashMap::default(),
            patterns: Vec::new(),
            held: 0,
            buffered: 0,
            events: VecDeque::new(),
            counters: ReceiverCounters::default(),
        }
    }

    /// Adds a subscription's pattern: messages of topics no pattern matches are not delivered.
    pub fn add_pattern(&mut self, pattern: &str) {
        self.patterns.push(pattern.to_string());
    }

    /// A subscription waits for its SUBACK: release nothing meanwhile.
    pub fn hold(&mut self) {
        self.held += 1;
    }

    /// One SUBACK arrived. Released events are queued for [`McastReceiver::poll_event`].
    pub fn unhold(&mut self) {
        self.queued(|r, sink| r.unhold_into(sink));
    }

    /// [`McastReceiver::unhold`], handing released events to `sink`.
    pub fn unhold_into(&mut self, sink: &mut ReceiverSink<'_>) {
        self.held = self.held.saturating_sub(1);
        if self.held == 0 {
            let keys: Vec<_> = self.streams.keys().copied().collect();
            for key in keys {
                self.release(key, sink);
            }
        }
    }

    /// Runs an `*_into` input with the event queue as its sink (the owned-event API).
    fn queued(&mut self, input: impl FnOnce(&mut Self, &mut ReceiverSink<'_>)) {
        let mut events = std::mem::take(&mut self.events);
        input(self, &mut |e: ReceiverEventRef<'_>| {
            events.push_back(e.to_event())
        });
        // Nothing else queues while `input` runs: the sink is the only way out.
        debug_assert!(self.events.is_empty());
        self.events = events;
    }

    /// A snapshot (or TCP) message the application got: multicast copies up to `seq` are
    /// duplicates.
    pub fn handle_snapshot(&mut self, topic: &str, seq: u64) {
        let last = self.topics.entry(topic.to_string()).or_insert(0);
        *last = (*last).max(seq);
    }

    /// The last seq delivered on `topic`.
    pub fn last_seq(&self, topic: &str) -> Option<u64> {
        self.topics.get(topic).copied()
    }

    /// The last seq delivered per topic (snapshot values included): the resume positions of a
    /// new session.
    pub fn positions(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.topics.iter().map(|(t, &s)| (t.as_str(), s))
    }

    fn random_delay(&mut self) -> Duration {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        self.cfg
            .nak_delay
            .mul_f64((x >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// STREAM_POS: where the stream starts for this receiver. Released events are queued.
    pub fn handle_stream_pos(&mut self, now: Instant, pos: StreamPos) {
        self.queued(|r, sink| r.handle_stream_pos_into(now, pos, sink));
    }

    /// [`McastReceiver::handle_stream_pos`], handing released events to `sink`.
    pub fn handle_stream_pos_into(
        &mut self,
        now: Instant,
        pos: StreamPos,
        sink: &mut ReceiverSink<'_>,
    ) {
        let key = (pos.channel, pos.stream);
        let st = self.streams.entry(key).or_default();
        if st.next.is_some() {
            return;
        }
        st.next = Some(pos.next_seq);
        let before = st.buffer.len();
        st.buffer = st.buffer.split_off(&pos.next_seq);
        self.buffered -= before - st.buffer.len();
        if let Some(&last) = st.buffer.keys().next_back() {
            self.mark_missing(key, pos.next_seq, last, now);
        }
        self.release(key, sink);
    }

    /// A datagram from the group (`via_tcp` false) or from a REPAIR frame. Released events
    /// are queued for [`McastReceiver::poll_event`] (one copy per message).
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8], via_tcp: bool) {
        self.queued(|r, sink| r.handle_datagram_into(now, bytes, via_tcp, sink));
    }

    /// [`McastReceiver::handle_datagram`], handing released events to `sink`. The common case,
    /// the stream's next datagram with nothing held, is delivered straight from `bytes`: no
    /// copy and no allocation per datagram or message. Only a datagram that must wait (early,
    /// or before STREAM_POS or a SUBACK) is copied into the receiver.
    ///
    /// The caller must hand the sink's events on before any queued by the owned-event inputs
    /// that came earlier (drain [`McastReceiver::poll_event`] first), or mix only `*_into`
    /// inputs, so that per-topic order holds.
    pub fn handle_datagram_into(
        &mut self,
        now: Instant,
        bytes: &[u8],
        via_tcp: bool,
        sink: &mut ReceiverSink<'_>,
    ) {
        let d = match parse_datagram(bytes) {
            Ok(d) if d.header.engine_id == self.cfg.engine_id => d,
            _ => {
                self.counters.ignored += 1;
                return;
            }
        };
        let h = d.header;
        let key = (h.channel, h.stream);
        if !self.streams.contains_key(&key) && self.streams.len() >= MAX_STREAMS {
            self.counters.ignored += 1;
            return;
        }
        self.counters.datagrams += 1;
        let next = self.streams.entry(key).or_default().next;
        if h.flags & FLAG_HEARTBEAT != 0 {
            self.counters.heartbeats += 1;
            if let Some(next) = next {
                self.mark_missing(key, next, h.seq, now);
            }
            return;
        }
        let st = self.streams.get_mut(&key).expect("entry made above");
        if next.is_some_and(|n| h.seq < n) || st.buffer.contains_key(&h.seq) {
            self.counters.duplicates += 1;
            return;
        }
        if h.flags & FLAG_STUB != 0 && !via_tcp {
            // The frame goes by TCP: ask at once (a multicast retransmission cannot carry it).
            if let Some(next) = next {
                self.mark_missing(key, next, h.seq, now);
                let st = self.streams.get_mut(&key).expect("entry made above");
                st.missing.insert(
                    h.seq,
                    Missing {
                        nak_at: now,
                        naked: false,
                    },
                );
            }
            return;
        }
        let in_order = self.held == 0 && next == Some(h.seq);
        if !in_order && self.buffered >= self.cfg.max_buffered {
            self.counters.buffer_overflow += 1;
            if let Some(next) = next {
                self.mark_missing(key, next, h.seq.saturating_add(1), now);
            }
            return;
        }
        if via_tcp {
            self.counters.repairs_received += 1;
        } else if h.flags & FLAG_RETRANSMIT != 0 {
            self.counters.retransmits_received += 1;
        }
        let st = self.streams.get_mut(&key).expect("entry made above");
        if let Some(m) = st.missing.remove(&h.seq) {
            if !m.naked {
                self.counters.naks_suppressed += 1;
            }
        }
        if in_order {
            // Straight from the caller's buffer, then whatever it unblocked.
            st.next = Some(h.seq + 1);
            self.deliver(d.frames, sink);
            self.release(key, sink);
            return;
        }
        st.buffer.insert(h.seq, Slot::Data(d.frames.to_vec()));
        self.buffered += 1;
        if let Some(next) = next {
            if self.cfg.repair {
                self.mark_missing(key, next, h.seq, now);
            }
        }
        self.release(key, sink);
    }

    /// REPAIR_GONE: the engine no longer holds these datagrams. Released events are queued.
    pub fn handle_gone(&mut self, gone: Nak) {
        self.queued(|r, sink| r.handle_gone_into(gone, sink));
    }

    /// [`McastReceiver::handle_gone`], handing released events to `sink`.
    pub fn handle_gone_into(&mut self, gone: Nak, sink: &mut ReceiverSink<'_>) {
        let key = (gone.channel, gone.stream);
        let Some(st) = self.streams.get_mut(&key) else {
            return;
        };
        let Some(next) = st.next else {
            return;
        };
        let (start, end) = (
            gone.from_seq.max(next),
            gone.from_seq.saturating_add(u64::from(gone.count)),
        );
        if start >= end {
            return;
        }
        // Only what this receiver asked for (bounded by the missing set).
        let asked: Vec<u64> = st.missing.range(start..end).map(|(&seq, _)| seq).collect();
        for seq in asked {
            st.missing.remove(&seq);
            if let std::collections::btree_map::Entry::Vacant(e) = st.buffer.entry(seq) {
                e.insert(Slot::Gone);
                self.buffered += 1;
                self.counters.gone += 1;
            }
        }
        self.release(key, sink);
    }

    /// Marks `from .. to` missing where nothing is held, each NAK due after a random delay.
    fn mark_missing(&mut self, key: (u16, u16), from: u64, to: u64, now: Instant) {
        if !self.cfg.repair || to <= from {
            return;
        }
        let to = to.min(from.saturating_add(MAX_MISSING));
        for seq in from..to {
            let st = self.streams.get(&key).expect("caller made the stream");
            if st.buffer.contains_key(&seq) || st.missing.contains_key(&seq) {
                continue;
            }
            let nak_at = now + self.random_delay();
            let st = self.streams.get_mut(&key).expect("caller made the stream");
            st.missing.insert(
                seq,
                Missing {
                    nak_at,
                    naked: false,
                },
            );
        }
    }

    /// Delivers what is in order on stream `key`.
    fn release(&mut self, key: (u16, u16), sink: &mut ReceiverSink<'_>) {
        if self.held > 0 {
            return;
        }
        loop {
            let Some(st) = self.streams.get_mut(&key) else {
                return;
            };
            let Some(next) = st.next else {
                return;
            };
            let slot = match st.buffer.remove(&next) {
                Some(slot) => {
                    self.buffered -= 1;
                    slot
                }
                None if !self.cfg.repair && !st.buffer.is_empty() => {
                    // `latest`: skip to the next datagram that came.
                    let first = *st.buffer.keys().next().expect("not empty");
                    self.counters.skipped += first - next;
                    st.next = Some(first);
                    continue;
                }
                None => return,
            };
            st.next = Some(next + 1);
            st.missing.remove(&next);
            if let Slot::Data(frames) = slot {
                self.deliver(&frames, sink);
            }
        }
    }

    /// Hands the datagram body's messages to `sink`, those of subscribed topics whose seq is
    /// above the topic's last, with a GAP first where a topic skipped.
    fn deliver(&mut self, frames: &[u8], sink: &mut ReceiverSink<'_>) {
        let mut rest = frames;
        while let Ok(Decoded::Frame(frame, used)) = proto::decode_frame(rest, rest.len()) {
            let bytes = &rest[..used];
            rest = &rest[used..];
            let Frame::Data {
                header,
                topic,
                payload,
            } = frame
            else {
                continue;
            };
            let seq = header.seq;
            // A topic is in the map only once it matched (or came by TCP, which carries only
            // subscribed topics): the patterns are matched once per topic, not per message.
            match self.topics.get_mut(topic) {
                Some(last) if seq <= *last => {
                    self.counters.stitched += 1;
                    continue;
                }
                Some(last) => {
                    let before = *last;
                    *last = seq;
                    if before > 0 && seq > before + 1 && self.cfg.repair {
                        self.counters.gaps += 1;
                        sink(ReceiverEventRef::Gap {
                            topic,
                            from_seq: before + 1,
                            to_seq: seq - 1,
                        });
                    }
                }
                None => {
                    if !self
                        .patterns
                        .iter()
                        .any(|p| crate::topic::pattern_matches(p, topic))
                    {
                        continue;
                    }
                    self.topics.insert(topic.to_string(), seq);
                }
            }
            self.counters.messages += 1;
            sink(ReceiverEventRef::Data {
                frame: bytes,
                header,
                topic,
                payload,
            });
        }
    }

    pub fn poll_event(&mut self) -> Option<ReceiverEvent> {
        self.events.pop_front()
    }

    /// NAKs due now (contiguous ranges per stream); each named datagram is asked again after
    /// `nak_retry` if it has not come by then.
    pub fn poll_naks(&mut self, now: Instant, out: &mut Vec<Nak>) {
        let retry = self.cfg.nak_retry;
        for (&(channel, stream), st) in self.streams.iter_mut() {
            let mut range: Option<Nak> = None;
            for (&seq, m) in st.missing.iter_mut() {
                if m.nak_at > now {
                    continue;
                }
                m.nak_at = now + retry;
                m.naked = true;
                self.counters.nak_datagrams += 1;
                match &mut range {
                    Some(r)
                        if r.from_seq + u64::from(r.count) == seq && r.count < MAX_NAK_RANGE =>
                    {
                        r.count += 1
                    }
                    _ => {
                        if let Some(r) = range.take() {
                            out.push(r);
                            self.counters.naks_sent += 1;
                        }
                        range = Some(Nak {
                            channel,
                            stream,
                            from_seq: seq,
                            count: 1,
                        });
                    }
                }
            }
            if let Some(r) = range {
                out.push(r);
                self.counters.naks_sent += 1;
            }
        }
    }

    /// The earliest NAK due, if any is.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.streams
            .values()
            .flat_map(|st| st.missing.values().map(|m| m.nak_at))
            .min()
    }

    /// Datagrams missing now, over all streams.
    pub fn missing(&self) -> usize {
        self.streams.values().map(|st| st.missing.len()).sum()
    }
}
