//! The MQTT 3.1.1 seam of the fan-out core: packets from an MQTT connection become the same
//! engine operations ([`Op`]) a native connection's frames do, handled by the same
//! [`FanoutCore::handle_op`]; what MQTT needs beyond them (SUBACK per SUBSCRIBE, PUBACK, the
//! will, DISCONNECT) is here. A child module of `core.rs`, so it can drive the core's private
//! state without widening it; the per-connection state and the packet encodings are in
//! `mqtt_session.rs`.
//!
//! The mapping, documented for clients in docs/PROTOCOL.md §14:
//! - CONNECT → `Op::Hello` (the client id, the native keep-alive rules, and the admission
//!   checks every listener shares); WELCOME → CONNACK 0; a refusal → CONNACK 1/2/3 and a close.
//!   The MQTT keep-alive is then set as the client asked (0: none), closed after 1.5× silence.
//!   Clean session 0 resumes the id's saved session (`mqtt_sessions.rs`): its filters are
//!   subscribed again, QoS 1 ones from the acknowledged positions (a native resume).
//! - PUBLISH → `Op::Publish` (quality 192 "good", source timestamp 0); QoS 1 → PUBACK once the
//!   core has validated it and taken it (ingested on this shard, or queued in this turn's batch
//!   for the owner shard); refused (bad topic, too large, too many topics) → close, as MQTT 3.1.1
//!   has no negative acknowledgement. QoS 2 → close (not supported).
//! - SUBSCRIBE → one `Op::Subscribe` per filter: mode `all` for QoS 1, `mqtt.qos0_mode` for
//!   QoS 0; the retained snapshot comes as PUBLISH packets with RETAIN set, then SUBACK (QoS 1
//!   granted for 1 and 2, 0 for 0; 0x80 for a filter the engine refuses) once every filter's
//!   snapshot is complete, as the native SUBACK: from then on every publish reaches the client.
//! - UNSUBSCRIBE → `Op::Unsubscribe` per known filter, then UNSUBACK; PINGREQ → `Op::Ping` →
//!   PINGRESP; PUBACK frees a QoS 1 packet id; DISCONNECT drops the will and closes.

use std::time::{Duration, Instant};

use super::FanoutCore;
use crate::engine::mqtt_session::MqttState;
use crate::engine::mqtt_sessions::SavedSession;
use crate::engine::native::Op;
use crate::engine::session::{Fatal, Phase};
use crate::mqtt::{self, Connect, Decoded, Packet, QoS};
use crate::proto::{
    self, error_code, DeliveryMode, PublishRef, Subscribe, TopicPosition, PROTOCOL_VERSION,
};

/// Quality given to messages published over MQTT, which has no such field: OPC "good".
pub(crate) const MQTT_QUALITY: u8 = 192;
/// Keep-alive 0 turns the MQTT keep-alive off; the session still needs a window, so this one,
/// far longer than any connection the engine expects to see silent.
const NO_KEEPALIVE: Duration = Duration::from_secs(10 * 24 * 3600);

/// What an MQTT CONNECT does once admitted; kept with a CONNECT parked for its argon2 run.
#[derive(Debug)]
pub(crate) struct MqttConnectTail {
    will: Option<(String, Vec<u8>)>,
    keep_alive_s: u16,
    saved: Option<SavedSession>,
}

impl FanoutCore {
    /// [`FanoutCore::handle_input`] for an MQTT connection: decodes every whole packet.
    pub(super) fn handle_mqtt_input(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        bytes: &[u8],
    ) -> usize {
        let max_packet = self.config.limits.max_frame_bytes;
        let mut used = 0;
        loop {
            let Some(session) = self.session_mut(slot) else {
                return bytes.len();
            };
            if session.is_closing() {
                return bytes.len();
            }
            // Paced (`pacing.rs`), or CONNECT waits for its argon2 verdict (`auth_core.rs`):
            // the rest waits in the driver's read buffer.
            if session.paused || session.verifying.is_some() {
                return used;
            }
            let result = match mqtt::decode_packet(&bytes[used..], max_packet) {
                Ok(Decoded::Packet(packet, n)) => {
                    used += n;
                    // Keep-alive counts whole control packets (spec 3.1.2.10).
                    session.last_heard = now;
                    if let Some(m) = session.mqtt.as_deref_mut() {
                        m.last_read_ns = read_ns;
                    }
                    self.handle_mqtt_packet(now, read_ns, slot, packet)
                }
                Ok(Decoded::NeedMore(_)) => return used,
                Err(e) => {
                    let code = match e {
                        mqtt::DecodeError::ProtocolLevel { .. } => {
                            if let Some(m) = session.mqtt.as_deref_mut() {
                                m.connect_seen = true;
                            }
                            error_code::VERSION
                        }
                        mqtt::DecodeError::TooLarge { .. } => error_code::FRAME_TOO_LARGE,
                        _ => error_code::MALFORMED,
                    };
                    Err(Fatal::new(code, e.to_string()))
                }
            };
            if let Err(fatal) = result {
                self.fail(now, slot, fatal);
                return bytes.len();
            }
        }
    }

    fn handle_mqtt_packet(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        packet: Packet<'_>,
    ) -> Result<(), Fatal> {
        let session = self.session_mut(slot).expect("the caller looked it up");
        if let Phase::AwaitHello { .. } = session.phase {
            let Packet::Connect(connect) = packet else {
                return Err(Fatal::new(
                    error_code::HANDSHAKE,
                    "the first packet must be CONNECT",
                ));
            };
            return self.handle_mqtt_connect(now, read_ns, slot, connect);
        }
        match packet {
            Packet::Connect(_) => Err(Fatal::new(error_code::HANDSHAKE, "CONNECT sent twice")),
            Packet::Publish(p) => {
                if p.qos == QoS::ExactlyOnce {
                    return Err(Fatal::new(
                        error_code::UNEXPECTED_FRAME,
                        "QoS 2 PUBLISH is not supported",
                    ));
                }
                let publish = PublishRef {
                    topic: p.topic,
                    source_ts_ns: 0,
                    quality: MQTT_QUALITY,
                    payload: p.payload,
                };
                self.handle_op(now, read_ns, slot, Op::Publish(publish))?;
                self.take_mqtt_refusal(slot)?;
                if p.qos == QoS::AtLeastOnce {
                    let mut ack = Vec::with_capacity(4);
                    mqtt::encode_packet(&mut ack, &Packet::PubAck { pkid: p.pkid });
                    self.queue_reply(slot, ack.into())?;
                }
                Ok(())
            }
            Packet::PubAck { pkid } => {
                let Some(m) = session.mqtt.as_deref_mut() else {
                    return Ok(());
                };
                // An unknown id (acknowledged twice, or never sent) is ignored.
                m.handle_puback(pkid);
                // Freed window: topics that lagged behind it are caught up from the ring.
                let topics = session.take_replay_requests();
                if !topics.is_empty() {
                    self.request_replays(slot, topics);
                }
                Ok(())
            }
            Packet::Subscribe { pkid, filters } => {
                self.handle_mqtt_subscribe(now, slot, pkid, filters)
            }
            Packet::Unsubscribe { pkid, filters } => {
                for filter in filters {
                    let sub_id = self
                        .session_mut(slot)
                        .and_then(|s| s.mqtt.as_deref_mut())
                        .and_then(|m| {
                            let sub_id = m.remove_filter(filter)?;
                            // A snapshot that will never complete holds no SUBACK back.
                            m.handle_suback(sub_id);
                            Some(sub_id)
                        });
                    if let Some(sub_id) = sub_id {
                        self.handle_op(now, 0, slot, Op::Unsubscribe { sub_id })?;
                    }
                }
                self.queue_mqtt_subacks(slot)?;
                let mut ack = Vec::with_capacity(4);
                mqtt::encode_packet(&mut ack, &Packet::UnsubAck { pkid });
                self.queue_reply(slot, ack.into())
            }
            Packet::PingReq => self.handle_op(now, 0, slot, Op::Ping { nonce: 0 }),
            Packet::Disconnect => {
                if let Some(m) = session.mqtt.as_deref_mut() {
                    m.will = None;
                }
                self.close(slot);
                Ok(())
            }
            Packet::PubRec { .. } | Packet::PubRel { .. } | Packet::PubComp { .. } => Err(
                Fatal::new(error_code::UNEXPECTED_FRAME, "QoS 2 is not supported"),
            ),
            Packet::ConnAck { .. }
            | Packet::SubAck { .. }
            | Packet::UnsubAck { .. }
            | Packet::PingResp => Err(Fatal::new(
                error_code::UNEXPECTED_FRAME,
                "this packet type is sent only by a server",
            )),
        }
    }

    fn handle_mqtt_connect(
        &mut self,
        now: Instant,
        read_ns: u64,
        slot: usize,
        connect: Connect<'_>,
    ) -> Result<(), Fatal> {
        if connect.client_id.is_empty() && !connect.clean_session {
            if let Some(m) = self.session_mut(slot).and_then(|s| s.mqtt.as_deref_mut()) {
                m.connect_seen = true;
            }
            return Err(Fatal::new(
                error_code::HANDSHAKE,
                "an empty client id needs clean session (spec 3.1.3.1)",
            ));
        }
        // A persistent session resumes what the id's last connection left (spec 3.1.2.4); a
        // clean one discards it.
        let saved = match (connect.client_id.is_empty(), connect.clean_session) {
            (true, _) => None,
            (false, true) => {
                self.shared.mqtt_sessions.forget(connect.client_id);
                None
            }
            (false, false) => self.shared.mqtt_sessions.take(connect.client_id, now),
        };
        let session = self.session_mut(slot).expect("the caller looked it up");
        let Some(m) = session.mqtt.as_deref_mut() else {
            return Ok(());
        };
        m.connect_seen = true;
        m.clean_session = connect.clean_session;
        m.session_present = saved.is_some();
        let hello = Op::Hello {
            version: PROTOCOL_VERSION,
            client_id: connect.client_id.to_string(),
            keepalive_ms: u32::from(connect.keep_alive_s) * 1000,
            // The same authentication as native clients: CONNECT's user name and password are
            // HELLO's `user:secret` token.
            token: crate::auth::Redacted(match connect.username {
                Some(user) => format!(
                    "{user}:{}",
                    String::from_utf8_lossy(connect.password.unwrap_or_default())
                ),
                None => String::new(),
            }),
            features: 0,
        };
        self.handle_op(now, read_ns, slot, hello)?;
        let tail = MqttConnectTail {
            will: connect
                .will
                .map(|w| (w.topic.to_string(), w.message.to_vec())),
            keep_alive_s: connect.keep_alive_s,
            saved,
        };
        match self
            .session_mut(slot)
            .and_then(|s| s.verifying.as_deref_mut())
        {
            // Parked for its argon2 run: finished with the verdict (`auth_core.rs`).
            Some(pending) => {
                pending.mqtt = Some(tail);
                Ok(())
            }
            None => self.finish_mqtt_connect(now, slot, tail),
        }
    }

    /// An accepted CONNECT's part after the admission: the will, the client's keep-alive, the
    /// saved session restored.
    pub(super) fn finish_mqtt_connect(
        &mut self,
        now: Instant,
        slot: usize,
        tail: MqttConnectTail,
    ) -> Result<(), Fatal> {
        let MqttConnectTail {
            will,
            keep_alive_s,
            saved,
        } = tail;
        // The native rules clamp the keep-alive; MQTT's is the client's to choose (spec 3.1.2.10).
        if let Some(session) = self.session_mut(slot) {
            // Only an accepted connection has a will: a refused CONNECT publishes nothing.
            if let Some(m) = session.mqtt.as_deref_mut() {
                m.will = will;
            }
            session.keepalive = match keep_alive_s {
                0 => NO_KEEPALIVE,
                s => Duration::from_secs(s.into()),
            };
            session.armed = None;
        }
        self.arm(slot);
        match saved {
            Some(saved) => self.restore_mqtt_session(now, slot, saved),
            None => Ok(()),
        }
    }

    /// Subscribes a resumed persistent session's filters again: the QoS 1 ones from the
    /// positions the client acknowledged, as a native resume (what it missed comes from the
    /// replay ring, at QoS 1; topics it had no position for, from the oldest message the ring
    /// holds), the QoS 0 ones with the retained snapshot. No SUBACK: the client asked nothing.
    fn restore_mqtt_session(
        &mut self,
        now: Instant,
        slot: usize,
        saved: SavedSession,
    ) -> Result<(), Fatal> {
        let qos0_mode = self.config.mqtt.qos0_mode;
        let positions: Vec<TopicPosition> = saved
            .positions
            .into_iter()
            .map(|(topic, last_seq)| TopicPosition { topic, last_seq })
            // The empty topic, which no message has: "resuming" even with no position.
            .chain(std::iter::once(TopicPosition {
                topic: String::new(),
                last_seq: 0,
            }))
            .collect();
        for (filter, qos) in saved.filters {
            let Some(m) = self.session_mut(slot).and_then(|s| s.mqtt.as_deref_mut()) else {
                return Ok(());
            };
            let sub_id = m.add_filter(&filter, qos);
            let (mode, resume) = match qos {
                QoS::AtMostOnce => (qos0_mode, Vec::new()),
                _ => (DeliveryMode::All, positions.clone()),
            };
            let subscribe = Subscribe {
                sub_id,
                pattern: filter,
                mode,
                resume,
            };
            self.handle_op(now, 0, slot, Op::Subscribe(subscribe))?;
            self.take_mqtt_refusal(slot)?;
        }
        Ok(())
    }

    /// A persistent session's connection closed: its filters and acknowledged positions are
    /// kept for the client id's next CONNECT (`mqtt_sessions.rs`).
    pub(super) fn save_mqtt_session(&mut self, slot: usize) {
        let Some(session) = self.session(slot) else {
            return;
        };
        let Some(m) = session.mqtt.as_deref() else {
            return;
        };
        // The client id is set once CONNECT is accepted, and only then.
        if m.clean_session || session.client_id.is_empty() {
            return;
        }
        let saved = m.saved_session();
        self.shared
            .mqtt_sessions
            .save(&session.client_id, saved, self.now);
    }

    fn handle_mqtt_subscribe(
        &mut self,
        now: Instant,
        slot: usize,
        pkid: u16,
        filters: Vec<(&str, QoS)>,
    ) -> Result<(), Fatal> {
        let limits = &self.config.limits;
        let (max_topic, max_subs) = (
            limits.max_topic_bytes,
            limits.max_subscriptions_per_connection,
        );
        let qos0_mode = self.config.mqtt.qos0_mode;
        let session = self.session_mut(slot).expect("the caller looked it up");
        let mut subs_after = session.sub_count();
        let Some(m) = session.mqtt.as_deref_mut() else {
            return Ok(());
        };
        let mut codes = Vec::with_capacity(filters.len());
        let mut ops = Vec::new();
        let mut replaced = Vec::new();
        for (filter, requested) in filters {
            let granted = requested.min(QoS::AtLeastOnce);
            if let Some(old) = m.remove_filter(filter) {
                // Spec 3.8.4: a SUBSCRIBE to a known filter replaces it (and resends retained).
                replaced.push(old);
                subs_after -= 1;
            }
            if proto::validate_pattern(filter, max_topic).is_err() || subs_after >= max_subs {
                codes.push(mqtt::SUBACK_FAILURE);
                continue;
            }
            subs_after += 1;
            let sub_id = m.add_filter(filter, granted);
            let mode = match granted {
                QoS::AtMostOnce => qos0_mode,
                _ => DeliveryMode::All,
            };
            codes.push(granted as u8);
            ops.push(Subscribe {
                sub_id,
                pattern: filter.to_string(),
                mode,
                resume: Vec::new(),
            });
        }
        for &sub_id in &replaced {
            m.handle_suback(sub_id);
        }
        m.expect_suback(pkid, codes, ops.iter().map(|s| s.sub_id).collect());
        for sub_id in replaced {
            self.handle_op(now, 0, slot, Op::Unsubscribe { sub_id })?;
        }
        for subscribe in ops {
            self.handle_op(now, 0, slot, Op::Subscribe(subscribe))?;
            // Checked above; a refusal here would be a rule this side does not know yet.
            self.take_mqtt_refusal(slot)?;
        }
        // Due now if every snapshot was local (or every filter refused).
        self.queue_mqtt_subacks(slot)
    }

    /// Queues the SUBACKs that are due (`MqttState::poll_subacks`).
    fn queue_mqtt_subacks(&mut self, slot: usize) -> Result<(), Fatal> {
        let mut acks = Vec::new();
        let due = self
            .session_mut(slot)
            .and_then(|s| s.mqtt.as_deref_mut())
            .is_some_and(|m| m.poll_subacks(&mut acks));
        if due {
            self.queue_reply(slot, acks.into())?;
        }
        Ok(())
    }

    /// A refusal the core answered while handling an MQTT connection's request: MQTT 3.1.1 has
    /// no negative acknowledgement, so the connection is closed with it.
    fn take_mqtt_refusal(&mut self, slot: usize) -> Result<(), Fatal> {
        let refusal = self
            .session_mut(slot)
            .and_then(|s| s.mqtt.as_deref_mut())
            .and_then(|m| m.refusal.take());
        refusal.map_or(Ok(()), Err)
    }

    /// The engine is shutting down: the connection's will is dropped, not published (the
    /// engine, not the client, ends it, and the other reactors are stopping too).
    pub(super) fn drop_will(&mut self, slot: usize) {
        if let Some(m) = self.session_mut(slot).and_then(|s| s.mqtt.as_deref_mut()) {
            m.will = None;
        }
    }

    /// The connection in `slot` ends without DISCONNECT (network failure, keep-alive, a
    /// protocol error): its will is published, once, as any publish from it would be.
    pub(super) fn publish_will(&mut self, slot: usize) {
        let Some(m) = self.session_mut(slot).and_then(|s| s.mqtt.as_deref_mut()) else {
            return;
        };
        let Some((topic, message)) = m.will.take() else {
            return;
        };
        let read_ns = m.last_read_ns;
        let publish = PublishRef {
            topic: &topic,
            source_ts_ns: 0,
            quality: MQTT_QUALITY,
            payload: &message,
        };
        if proto::validate_topic(publish.topic, self.config.limits.max_topic_bytes).is_err()
            || super::data_frame_len(topic.len(), message.len())
                > self.config.limits.max_frame_bytes
        {
            return;
        }
        self.route_publish(&publish, read_ns);
    }

    /// A new MQTT connection's state.
    pub(super) fn new_mqtt_state(&self) -> Box<MqttState> {
        Box::new(MqttState::new(self.config.mqtt.max_inflight as usize))
    }
}
