//! The fan-out core's multicast side (docs/PROTOCOL.md §12): a [`ChannelSender`] per
//! configured channel beside the sessions, fed the DATA frames this shard owns; the answers to
//! CHANNELS_REQUEST and NAK; STREAM_POS beside each snapshot. A child module of `core.rs`, as
//! the MQTT side is, so it drives the core's private state without widening it. No socket: the
//! driver takes the datagrams with [`FanoutCore::poll_datagram`] and sends them.
//!
//! Streams: each reactor numbers its own datagrams per channel (a stream is `(channel,
//! reactor)`), since a topic's messages all come from its one owner reactor and reactors share
//! nothing on the data path. Receivers order each stream on its own.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{live_session, mark_dirty, ConnRef, CoreMsg, FanoutCore, SubRef};
use crate::config::Config;
use crate::engine::mcast_io::McastChannelStats;
use crate::engine::outbox::SharedFrame;
use crate::mcast::{ChannelSender, LossGen, NakAnswer, SenderConfig};
use crate::proto::{self, ChannelInfo, Channels, Frame, Mcast, Nak, StreamPos};
use crate::topic::TopicIndex;

/// Bytes queued for a connection past which its NAKs are ignored (it is not reading its
/// repairs; it will NAK again).
const MAX_QUEUED_FOR_NAK_BYTES: usize = 4 << 20;

/// One shard's multicast state.
pub(crate) struct McastShard {
    senders: Vec<ChannelSender>,
    /// Channel patterns → channel id.
    carried: TopicIndex<u16>,
    /// The CHANNELS frame, made once.
    channels_frame: SharedFrame,
    /// Datagrams ready for the driver: (channel, bytes).
    transmits: std::collections::VecDeque<(u16, Arc<[u8]>)>,
    answers: Vec<NakAnswer>,
    matches: Vec<u16>,
}

impl McastShard {
    /// `None` when no channel is configured: nothing is ever sent to a group then.
    pub(crate) fn new(config: &Config, shard: u16, engine_id: u64, now: Instant) -> Option<Self> {
        let m = &config.multicast;
        if m.channels.is_empty() {
            return None;
        }
        let mut carried = TopicIndex::new();
        let mut senders = Vec::new();
        let mut infos = Vec::new();
        for (i, c) in m.channels.iter().enumerate() {
            let id = i as u16;
            for p in &c.patterns {
                carried.insert(p, id);
            }
            let loss = (m.test_loss.percent > 0.0).then(|| {
                LossGen::new(
                    m.test_loss.seed ^ (u64::from(shard) << 32) ^ u64::from(id),
                    m.test_loss.percent,
                    m.test_loss.burst,
                )
            });
            senders.push(ChannelSender::new(
                SenderConfig {
                    channel: id,
                    stream: shard,
                    engine_id,
                    datagram_bytes: c.datagram_bytes,
                    heartbeat: Duration::from_millis(m.heartbeat_ms),
                    ring_bytes: m.repair_ring_bytes,
                    max_rate_bytes_per_s: c.max_rate_bytes_per_s,
                    unicast_repair_max: m.unicast_repair_max,
                    repair_window: Duration::from_millis(m.repair_window_ms),
                    loss,
                    linger: Duration::from_micros(c.linger_us),
                },
                now,
            ));
            infos.push(ChannelInfo {
                id,
                group: c.group.to_string(),
                port: c.port,
                patterns: c.patterns.clone(),
                datagram_bytes: c.datagram_bytes as u32,
            });
        }
        let mut buf = Vec::new();
        proto::encode_control(
            &mut buf,
            &Frame::Multicast(Mcast::Channels(Channels { channels: infos })),
        );
        Some(McastShard {
            senders,
            carried,
            channels_frame: buf.into(),
            transmits: Default::default(),
            answers: Vec::new(),
            matches: Vec::new(),
        })
    }

    /// Hands the senders' counters to the stats document.
    fn publish(&self, stats: &std::sync::Mutex<Vec<McastChannelStats>>) {
        let Ok(mut all) = stats.lock() else {
            return;
        };
        all.resize(self.senders.len(), McastChannelStats::default());
        for (slot, s) in all.iter_mut().zip(&self.senders) {
            slot.sender = s.counters;
        }
    }

    /// Whether some channel carries `topic`.
    pub(crate) fn carries(&self, topic: &str) -> bool {
        let mut found = Vec::new();
        self.carried.collect_matches(topic, &mut found);
        !found.is_empty()
    }

    fn positions(&self) -> Vec<(u16, u64)> {
        self.senders
            .iter()
            .map(|s| (s.channel(), s.position()))
            .collect()
    }
}

fn pos_frames(stream: u16, positions: &[(u16, u64)]) -> Vec<SharedFrame> {
    positions
        .iter()
        .map(|&(channel, next_seq)| {
            let mut buf = Vec::new();
            proto::encode_control(
                &mut buf,
                &Frame::Multicast(Mcast::StreamPos(StreamPos {
                    channel,
                    stream,
                    next_seq,
                })),
            );
            buf.into()
        })
        .collect()
}

impl FanoutCore {
    pub(super) fn publish_mcast_stats(&self, s: &super::ShardStats) {
        if let Some(m) = self.mcast.as_deref() {
            m.publish(&s.mcast);
        }
    }

    /// An owned topic's new DATA frame: into the datagram of every channel carrying it.
    pub(super) fn mcast_ingest(&mut self, topic: &str, frame: &SharedFrame, ingest_ns: u64) {
        let Some(m) = self.mcast.as_deref_mut() else {
            return;
        };
        m.matches.clear();
        m.carried.collect_matches(topic, &mut m.matches);
        m.matches.sort_unstable();
        m.matches.dedup();
        for &ch in &m.matches {
            m.senders[ch as usize].handle_frame(self.now, ingest_ns, frame);
        }
    }

    /// End of the turn: seal the datagrams being filled (once they lingered their channel's
    /// `linger_us`), so a turn's frames go out together.
    pub(super) fn mcast_close(&mut self, now: Instant, unix_ns: u64) {
        if let Some(m) = self.mcast.as_deref_mut() {
            for s in &mut m.senders {
                s.end_turn(now, unix_ns);
            }
        }
    }

    /// The next datagram to send now: (channel id, bytes). The driver calls this after
    /// [`FanoutCore::flush`] until `None`.
    pub(crate) fn poll_datagram(&mut self, now: Instant, unix_ns: u64) -> Option<(u16, Arc<[u8]>)> {
        let m = self.mcast.as_deref_mut()?;
        if let Some(t) = m.transmits.pop_front() {
            return Some(t);
        }
        for s in &mut m.senders {
            while let Some(d) = s.poll_transmit(now, unix_ns) {
                m.transmits.push_back((s.channel(), d));
            }
        }
        m.transmits.pop_front()
    }

    /// The multicast side's next deadline (heartbeats, the send rate).
    pub(super) fn mcast_timeout(&self) -> Option<Instant> {
        let m = self.mcast.as_deref()?;
        m.senders.iter().map(ChannelSender::poll_timeout).min()
    }

    /// CHANNELS_REQUEST: the connection becomes a multicast receiver.
    pub(super) fn handle_channels_request(&mut self, slot: usize) -> Result<(), super::Fatal> {
        let frame = match self.mcast.as_deref() {
            Some(m) => m.channels_frame.clone(),
            None => {
                let mut buf = Vec::new();
                proto::encode_control(
                    &mut buf,
                    &Frame::Multicast(Mcast::Channels(Channels {
                        channels: Vec::new(),
                    })),
                );
                buf.into()
            }
        };
        let on = self.mcast.is_some();
        let Some(session) = self.sessions.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(());
        };
        session.mcast = on;
        session.queue_reply(frame)?;
        mark_dirty(session, slot, &mut self.dirty);
        Ok(())
    }

    /// STREAM_POS frames for a multicast receiver's subscription, before this shard's snapshot
    /// reply; taken at the same moment as the snapshot.
    pub(super) fn mcast_positions(&self) -> Vec<(u16, u64)> {
        self.mcast
            .as_deref()
            .map(McastShard::positions)
            .unwrap_or_default()
    }

    pub(super) fn handle_stream_pos(&mut self, sub: SubRef, stream: u16, positions: &[(u16, u64)]) {
        let slot = sub.slot as usize;
        let Some(session) = self
            .sessions
            .get_mut(slot)
            .and_then(Option::as_mut)
            .filter(|s| s.mcast && s.sub(sub.pos, sub.key).is_some())
        else {
            return;
        };
        for frame in pos_frames(stream, positions) {
            session.outbox.push_unbounded(frame);
        }
        mark_dirty(session, slot, &mut self.dirty);
    }

    /// A NAK from connection `slot`: answered here if this shard is the stream's, else passed
    /// to the stream's shard.
    pub(super) fn handle_nak(&mut self, slot: usize, nak: Nak) -> Result<(), super::Fatal> {
        let session = self.session(slot).expect("caller looked it up");
        let conn = ConnRef {
            slot: slot as u32,
            id: session.id,
        };
        let known = self
            .mcast
            .as_deref()
            .is_some_and(|m| usize::from(nak.channel) < m.senders.len())
            && nak.stream < self.n_shards
            && session.mcast;
        if !known {
            let reason = format!(
                "NAK for channel {} stream {}: no such multicast stream for this connection",
                nak.channel, nak.stream
            );
            return self.refuse(slot, proto::error_code::UNEXPECTED_FRAME, reason);
        }
        if session.outbox.queued_bytes() > MAX_QUEUED_FOR_NAK_BYTES {
            if let Some(m) = self.mcast.as_deref_mut() {
                m.senders[nak.channel as usize].counters.naks_refused += 1;
            }
            return Ok(());
        }
        if nak.stream == self.id {
            let frames = self.answer_nak(nak);
            self.handle_repairs(conn, frames);
        } else {
            self.outgoing[nak.stream as usize].push(CoreMsg::Nak {
                from: self.id,
                conn,
                nak,
            });
        }
        Ok(())
    }

    /// The repair service: REPAIR / REPAIR_GONE frames for a NAK of this shard's stream.
    pub(super) fn answer_nak(&mut self, nak: Nak) -> Vec<SharedFrame> {
        let now = self.now;
        let Some(m) = self.mcast.as_deref_mut() else {
            return Vec::new();
        };
        let Some(sender) = m.senders.get_mut(nak.channel as usize) else {
            return Vec::new();
        };
        m.answers.clear();
        sender.handle_nak(now, nak.from_seq, nak.count, &mut m.answers);
        m.answers
            .drain(..)
            .map(|a| {
                let mut buf = Vec::new();
                match a {
                    NakAnswer::Unicast(d) => proto::encode_repair(&mut buf, &d),
                    NakAnswer::Gone { from_seq, count } => proto::encode_control(
                        &mut buf,
                        &Frame::Multicast(Mcast::RepairGone(Nak {
                            channel: nak.channel,
                            stream: nak.stream,
                            from_seq,
                            count,
                        })),
                    ),
                }
                SharedFrame::from(buf)
            })
            .collect()
    }

    /// Repairs for connection `conn` on this shard.
    pub(super) fn handle_repairs(&mut self, conn: ConnRef, frames: Vec<SharedFrame>) {
        let Some(session) = live_session(&mut self.sessions, conn) else {
            return;
        };
        // Bounded by MAX_NAK_RANGE datagrams per NAK, and NAKs are ignored past
        // MAX_QUEUED_FOR_NAK_BYTES queued.
        for frame in frames {
            session.outbox.push_unbounded(frame);
        }
        mark_dirty(session, conn.slot as usize, &mut self.dirty);
    }
}
