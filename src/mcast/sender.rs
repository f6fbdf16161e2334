//! One stream's sender: the DATA frames its owner reactor encodes for a channel, packed into
//! numbered datagrams, kept in a retransmit ring, paced to the channel's rate, and the answer
//! to NAKs (unicast for a few, one multicast retransmission for many).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ahash::HashMap;

use super::datagram::{DatagramHeader, FLAG_HEARTBEAT, FLAG_RETRANSMIT, FLAG_STUB, HEADER_BYTES};
use super::loss::LossGen;

/// Datagrams one NAK may name; a longer range is answered up to this and NAKed again.
pub const MAX_NAK_RANGE: u32 = 256;

#[derive(Debug, Clone)]
pub struct SenderConfig {
    pub channel: u16,
    /// The owner reactor: datagram sequences are per (channel, stream).
    pub stream: u16,
    pub engine_id: u64,
    pub datagram_bytes: usize,
    pub heartbeat: Duration,
    pub ring_bytes: usize,
    /// 0: unlimited.
    pub max_rate_bytes_per_s: u64,
    /// NAKs of one datagram within `repair_window` answered by unicast; one more makes it a
    /// multicast retransmission.
    pub unicast_repair_max: u32,
    pub repair_window: Duration,
    /// Test-only loss injection on first transmissions.
    pub loss: Option<LossGen>,
    /// How long a datagram may stay open for more frames after the turn that started it
    /// (zero: sealed at the end of every turn). Fewer, fuller datagrams: less work per message
    /// at every receiver (the kernel's per-socket copy), for at most this much latency.
    pub linger: Duration,
}

/// Per-stream counters (summed per channel in the engine's stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderCounters {
    /// Datagrams handed to the socket (data, heartbeats and retransmissions) and their bytes.
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub heartbeats: u64,
    /// NAK frames received, and the datagrams they named.
    pub naks_received: u64,
    pub nak_datagrams: u64,
    /// Datagrams repaired by a REPAIR frame over TCP.
    pub unicast_repairs: u64,
    /// Datagrams retransmitted on the group (one for many NAKs).
    pub multicast_repairs: u64,
    /// NAKed datagrams not answered because a multicast retransmission had just gone out.
    pub naks_suppressed: u64,
    /// NAKed datagrams the ring no longer held (REPAIR_GONE).
    pub unrecoverable: u64,
    /// Frames larger than a datagram (sent as a stub, fetched over TCP).
    pub oversized_frames: u64,
    /// Datagrams dropped by the test loss generator.
    pub injected_drops: u64,
    /// Datagrams not multicast because the rate limit's queue was full (receivers NAK them).
    pub rate_dropped: u64,
    /// NAKs ignored because the receiver's connection had too much unread (the engine's
    /// count; it will NAK again).
    pub naks_refused: u64,
}

/// The answer to part of a NAK, to go back over the receiver's TCP session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NakAnswer {
    /// The datagram, for a REPAIR frame.
    Unicast(Arc<[u8]>),
    /// Datagrams the ring no longer holds (or never sent), for a REPAIR_GONE frame.
    Gone { from_seq: u64, count: u32 },
}

#[derive(Debug, Clone, Copy)]
struct NakBook {
    first: Instant,
    count: u32,
    multicast_at: Option<Instant>,
}

/// See the module doc. Contract: `handle_frame` for each DATA frame, `end_turn` at the end of
/// each loop turn (a turn's frames go out together, or with later turns' for up to `linger`),
/// then `poll_transmit` until `None`; wake at `poll_timeout` for heartbeats, the rate limit and
/// a lingering datagram.
pub struct ChannelSender {
    cfg: SenderConfig,
    next_seq: u64,
    /// The datagram being filled: header room, then frames (empty when none).
    building: Vec<u8>,
    /// When the first frame went into `building`.
    building_since: Instant,
    ring: VecDeque<(u64, Arc<[u8]>)>,
    ring_held: usize,
    queue: VecDeque<Arc<[u8]>>,
    queued_bytes: usize,
    tokens: f64,
    refilled: Instant,
    last_send: Instant,
    book: HashMap<u64, NakBook>,
    pub counters: SenderCounters,
}

impl ChannelSender {
    pub fn new(cfg: SenderConfig, now: Instant) -> ChannelSender {
        ChannelSender {
            next_seq: 1,
            building: Vec::with_capacity(cfg.datagram_bytes),
            building_since: now,
            ring: VecDeque::new(),
            ring_held: 0,
            queue: VecDeque::new(),
            queued_bytes: 0,
            tokens: 0.0,
            refilled: now,
            last_send: now,
            book: HashMap::default(),
            counters: SenderCounters::default(),
            cfg,
        }
    }

    pub fn channel(&self) -> u16 {
        self.cfg.channel
    }

    /// The sequence the next datagram will carry: a snapshot taken now is continued by the
    /// datagrams from this one on (STREAM_POS).
    pub fn position(&self) -> u64 {
        self.next_seq
    }

    /// Adds one encoded DATA frame (its bytes are copied once into the datagram, whatever the
    /// number of receivers).
    pub fn handle_frame(&mut self, now: Instant, unix_ns: u64, frame: &[u8]) {
        let room = self.cfg.datagram_bytes - HEADER_BYTES;
        if frame.len() > room {
            // Never split silently: the whole frame is kept for repair, a stub is multicast.
            self.close_datagram(now, unix_ns);
            self.counters.oversized_frames += 1;
            let mut d = vec![0; HEADER_BYTES];
            d.extend_from_slice(frame);
            self.seal(now, unix_ns, d, FLAG_STUB);
            return;
        }
        if !self.building.is_empty() && self.building.len() + frame.len() > self.cfg.datagram_bytes
        {
            self.close_datagram(now, unix_ns);
        }
        if self.building.is_empty() {
            self.building.resize(HEADER_BYTES, 0);
            self.building_since = now;
        }
        self.building.extend_from_slice(frame);
    }

    /// End of a loop turn: seals the datagram being filled once it has lingered long enough
    /// (at once with no `linger`).
    pub fn end_turn(&mut self, now: Instant, unix_ns: u64) {
        if now >= self.building_since + self.cfg.linger {
            self.close_datagram(now, unix_ns);
        }
    }

    /// Seals the datagram being filled, if any.
    pub fn close_datagram(&mut self, now: Instant, unix_ns: u64) {
        if self.building.len() > HEADER_BYTES {
            let d = std::mem::replace(
                &mut self.building,
                Vec::with_capacity(self.cfg.datagram_bytes),
            );
            self.seal(now, unix_ns, d, 0);
        }
    }

    fn seal(&mut self, _now: Instant, unix_ns: u64, mut d: Vec<u8>, flags: u8) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.header(flags, seq, unix_ns).write(&mut d);
        let d: Arc<[u8]> = d.into();
        self.ring_held += d.len();
        self.ring.push_back((seq, d.clone()));
        while self.ring_held > self.cfg.ring_bytes && self.ring.len() > 1 {
            if let Some((old, bytes)) = self.ring.pop_front() {
                self.ring_held -= bytes.len();
                self.book.remove(&old);
            }
        }
        if self.cfg.loss.as_mut().is_some_and(LossGen::drop_next) {
            self.counters.injected_drops += 1;
            return;
        }
        let wire = if flags & FLAG_STUB != 0 {
            Arc::from(&d[..HEADER_BYTES])
        } else {
            d
        };
        self.enqueue(wire, false);
    }

    fn header(&self, flags: u8, seq: u64, unix_ns: u64) -> DatagramHeader {
        DatagramHeader {
            flags,
            channel: self.cfg.channel,
            stream: self.cfg.stream,
            engine_id: self.cfg.engine_id,
            seq,
            send_ts_ns: unix_ns,
        }
    }

    fn enqueue(&mut self, d: Arc<[u8]>, front: bool) {
        // What the rate cannot pass is bounded: past half the ring, the oldest waiting datagram
        // is not multicast (it stays in the ring; receivers NAK it).
        while self.queued_bytes + d.len() > self.cfg.ring_bytes / 2 {
            let Some(old) = self.queue.pop_front() else {
                break;
            };
            self.queued_bytes -= old.len();
            self.counters.rate_dropped += 1;
        }
        self.queued_bytes += d.len();
        if front {
            self.queue.push_front(d);
        } else {
            self.queue.push_back(d);
        }
    }

    fn bucket_bytes(&self) -> f64 {
        (self.cfg.max_rate_bytes_per_s as f64 / 100.0).max(2.0 * self.cfg.datagram_bytes as f64)
    }

    fn refill(&mut self, now: Instant) {
        let rate = self.cfg.max_rate_bytes_per_s as f64;
        let dt = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + dt * rate).min(self.bucket_bytes());
    }

    /// The next datagram to multicast now, if any: queued ones as the rate allows, else a
    /// heartbeat when the stream was idle for `heartbeat`.
    pub fn poll_transmit(&mut self, now: Instant, unix_ns: u64) -> Option<Arc<[u8]>> {
        if let Some(front) = self.queue.front() {
            let len = front.len();
            let limited = self.cfg.max_rate_bytes_per_s > 0;
            if limited {
                self.refill(now);
                if self.tokens < len as f64 {
                    return None;
                }
                self.tokens -= len as f64;
            }
            let d = self.queue.pop_front()?;
            self.queued_bytes -= len;
            self.sent(now, &d);
            return Some(d);
        }
        if now >= self.last_send + self.cfg.heartbeat {
            let mut d = vec![0; HEADER_BYTES];
            self.header(FLAG_HEARTBEAT, self.next_seq, unix_ns)
                .write(&mut d);
            let d: Arc<[u8]> = d.into();
            self.counters.heartbeats += 1;
            self.sent(now, &d);
            return Some(d);
        }
        None
    }

    fn sent(&mut self, now: Instant, d: &[u8]) {
        self.last_send = now;
        self.counters.datagrams_sent += 1;
        self.counters.bytes_sent += d.len() as u64;
    }

    /// When `poll_transmit` has something next: the rate limit's refill or the heartbeat.
    pub fn poll_timeout(&self) -> Instant {
        if self.building.len() > HEADER_BYTES && !self.cfg.linger.is_zero() {
            let due = self.building_since + self.cfg.linger;
            return due.min(self.poll_timeout_sending());
        }
        self.poll_timeout_sending()
    }

    /// The next deadline of the send queue (rate limit) or of the heartbeat.
    fn poll_timeout_sending(&self) -> Instant {
        if let Some(front) = self.queue.front() {
            if self.cfg.max_rate_bytes_per_s == 0 {
                return self.refilled;
            }
            let missing = (front.len() as f64 - self.tokens).max(0.0);
            return self.refilled
                + Duration::from_secs_f64(missing / self.cfg.max_rate_bytes_per_s as f64);
        }
        self.last_send + self.cfg.heartbeat
    }

    /// A receiver's NAK of `count` datagrams from `from_seq`: appends what to send back to it.
    pub fn handle_nak(
        &mut self,
        now: Instant,
        from_seq: u64,
        count: u32,
        out: &mut Vec<NakAnswer>,
    ) {
        self.counters.naks_received += 1;
        let count = count.min(MAX_NAK_RANGE);
        let oldest = self.ring.front().map_or(self.next_seq, |(s, _)| *s);
        let mut gone: Option<(u64, u32)> = None;
        for seq in from_seq..from_seq.saturating_add(u64::from(count)) {
            self.counters.nak_datagrams += 1;
            if seq < oldest || seq >= self.next_seq {
                // Older than the ring (lost for good), or never sent: nothing to wait for.
                self.counters.unrecoverable += 1;
                match &mut gone {
                    Some((_, n)) => *n += 1,
                    None => gone = Some((seq, 1)),
                }
                continue;
            }
            if let Some((s, n)) = gone.take() {
                out.push(NakAnswer::Gone {
                    from_seq: s,
                    count: n,
                });
            }
            let d = self.ring[(seq - oldest) as usize].1.clone();
            let window = self.cfg.repair_window;
            let book = self.book.entry(seq).or_insert(NakBook {
                first: now,
                count: 0,
                multicast_at: None,
            });
            if book.multicast_at.is_some_and(|at| now < at + window) {
                // The retransmission is on its way to this receiver too.
                self.counters.naks_suppressed += 1;
                continue;
            }
            if now >= book.first + window {
                *book = NakBook {
                    first: now,
                    count: 0,
                    multicast_at: None,
                };
            }
            book.count += 1;
            let stub = d[3] & FLAG_STUB != 0;
            if book.count > self.cfg.unicast_repair_max && !stub {
                // Many receivers lost it (a switch dropped it for all): one multicast.
                book.multicast_at = Some(now);
                let mut copy = d.to_vec();
                copy[3] |= FLAG_RETRANSMIT;
                self.counters.multicast_repairs += 1;
                self.enqueue(copy.into(), true);
            } else {
                self.counters.unicast_repairs += 1;
                out.push(NakAnswer::Unicast(d));
            }
        }
        if let Some((s, n)) = gone {
            out.push(NakAnswer::Gone {
                from_seq: s,
                count: n,
            });
        }
        // The book only holds datagrams in the ring; bound it anyway.
        if self.book.len() > 4 * self.ring.len() + 64 {
            self.book.retain(|s, _| *s >= oldest);
        }
    }
}
