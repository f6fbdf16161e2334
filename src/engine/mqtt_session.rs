//! What an MQTT connection holds beyond a native one, as a plain value: its subscriptions by
//! filter with their granted QoS, the will, the QoS 1 packet ids in flight, and how the engine's
//! shared DATA frames and replies become MQTT packets.
//!
//! Sans-IO, like `session.rs`, which owns one `MqttState` per MQTT connection. The packets the
//! connection sends are handled by the core (`mqtt_core.rs`); this file only translates.
//!
//! Encode-once: a live message reaches an MQTT subscriber as one of two shared encodings, made
//! at most once per message per shard by the core's `deliver` and shared like the DATA frame:
//! the whole QoS 0 PUBLISH ([`qos0_packet`]), or, for QoS 1, the payload alone
//! ([`payload_of`]), written after a small per-subscriber head (fixed header, topic, packet id;
//! [`crate::mqtt::encode_publish_qos1_head`]) in the same vectored write. Snapshots and replays
//! are rarer and converted per subscriber ([`replayed_packet`]).

use std::collections::VecDeque;
use std::sync::Arc;

use ahash::{HashMap, HashSet};

use super::mqtt_sessions::SavedSession;
use super::native::Reply;
use super::outbox::SharedFrame;
use super::session::Fatal;
use crate::mqtt::{self, Publish, QoS};
use crate::proto::{self, error_code, Decoded, Frame, DATA_FLAG_SNAPSHOT};

/// The DATA frame behind a PUBLISH queued to an MQTT connection, for the latency histograms:
/// the address of the queued packet (its head for QoS 1) and the DATA frame it was made from.
type Stamp = (usize, SharedFrame);

/// One MQTT connection's protocol state.
#[derive(Debug)]
pub(crate) struct MqttState {
    /// CONNECT has been read: a refusal now is answered with a CONNACK return code.
    pub connect_seen: bool,
    /// The will (topic, message), published if the connection ends without DISCONNECT.
    pub will: Option<(String, Vec<u8>)>,
    /// Wall-clock time of the connection's last read: the ingest time of its will.
    pub last_read_ns: u64,
    /// Engine subscription id of each filter (a SUBSCRIBE to a known filter replaces it).
    pub filters: HashMap<String, u32>,
    /// Subscriptions granted QoS 1.
    qos1_subs: HashSet<u32>,
    next_sub_id: u32,
    /// QoS 1 packet ids sent and not yet acknowledged, with the DATA frame each was made from.
    inflight: HashMap<u16, SharedFrame>,
    /// Per topic, the highest sequence number acknowledged at QoS 1 (persistent sessions).
    acked: HashMap<String, u64>,
    /// CONNECT asked for a clean session (0: the session is saved when the connection closes).
    pub clean_session: bool,
    /// CONNECT found a saved session: CONNACK says so.
    pub session_present: bool,
    max_inflight: usize,
    next_pkid: u16,
    stamps: VecDeque<Stamp>,
    /// SUBSCRIBEs not yet answered, in order: packet id, return codes, and the engine
    /// subscriptions whose snapshot has not completed.
    pending_subacks: VecDeque<(u16, Vec<u8>, Vec<u32>)>,
    /// A non-fatal refusal the core answered while handling this connection's last packet:
    /// MQTT 3.1.1 has no such answer, so the MQTT side decides (`mqtt_core.rs`).
    pub refusal: Option<Fatal>,
}

impl MqttState {
    pub(crate) fn new(max_inflight: usize) -> MqttState {
        MqttState {
            connect_seen: false,
            will: None,
            last_read_ns: 0,
            filters: HashMap::default(),
            qos1_subs: HashSet::default(),
            next_sub_id: 1,
            inflight: HashMap::default(),
            acked: HashMap::default(),
            clean_session: true,
            session_present: false,
            max_inflight: max_inflight.max(1),
            next_pkid: 1,
            stamps: VecDeque::new(),
            pending_subacks: VecDeque::new(),
            refusal: None,
        }
    }

    /// A new engine subscription id for a filter granted `qos`.
    pub(crate) fn add_filter(&mut self, filter: &str, qos: QoS) -> u32 {
        let sub_id = self.next_sub_id;
        self.next_sub_id = self.next_sub_id.wrapping_add(1);
        self.filters.insert(filter.to_string(), sub_id);
        if qos == QoS::AtLeastOnce {
            self.qos1_subs.insert(sub_id);
        }
        sub_id
    }

    /// A SUBSCRIBE to answer once the snapshots of `waiting` (its new engine subscriptions)
    /// are complete: the SUBACK then tells the client that whatever is published from now on
    /// reaches it, on every shard (the engine's own SUBACK rule, docs/PROTOCOL.md §5). Spec
    /// 3.8.4 lets the retained values come before it.
    pub(crate) fn expect_suback(&mut self, pkid: u16, codes: Vec<u8>, waiting: Vec<u32>) {
        self.pending_subacks.push_back((pkid, codes, waiting));
    }

    /// Engine subscription `sub_id` has its snapshot (or is gone).
    pub(crate) fn handle_suback(&mut self, sub_id: u32) {
        for (_, _, waiting) in &mut self.pending_subacks {
            waiting.retain(|&id| id != sub_id);
        }
    }

    /// Appends the SUBACKs now due, in SUBSCRIBE order; false if none is.
    pub(crate) fn poll_subacks(&mut self, out: &mut Vec<u8>) -> bool {
        let mut any = false;
        while self
            .pending_subacks
            .front()
            .is_some_and(|(_, _, waiting)| waiting.is_empty())
        {
            if let Some((pkid, codes, _)) = self.pending_subacks.pop_front() {
                mqtt::encode_packet(out, &mqtt::Packet::SubAck { pkid, codes });
                any = true;
            }
        }
        any
    }

    /// Forgets a filter: its engine subscription id, if it was known.
    pub(crate) fn remove_filter(&mut self, filter: &str) -> Option<u32> {
        let sub_id = self.filters.remove(filter)?;
        self.qos1_subs.remove(&sub_id);
        Some(sub_id)
    }

    /// Whether a QoS 1 subscription of this connection matches `topic`: a caught-up message
    /// goes at QoS 1 then.
    pub(crate) fn has_qos1_match(&self, topic: &str) -> bool {
        !self.qos1_subs.is_empty()
            && self.filters.iter().any(|(filter, sub_id)| {
                self.qos1_subs.contains(sub_id) && crate::topic::pattern_matches(filter, topic)
            })
    }

    pub(crate) fn is_qos1(&self, sub_id: u32) -> bool {
        !self.qos1_subs.is_empty() && self.qos1_subs.contains(&sub_id)
    }

    /// The QoS 1 window is full: live messages for QoS 1 subscriptions wait (their topics lag
    /// and are caught up from the replay ring once acknowledgements free the window).
    pub(crate) fn window_full(&self) -> bool {
        self.inflight.len() >= self.max_inflight
    }

    /// At most half the window in flight: the point where lagging topics are caught up.
    pub(crate) fn window_below_half(&self) -> bool {
        self.inflight.len() * 2 <= self.max_inflight
    }

    /// A free packet id, marked in flight for the message of DATA frame `data`; `None` when
    /// all 65,535 are (a catch-up may go past the window, never past the ids). Below the
    /// window, as [`MqttState::window_full`] checks for live messages, there always is one.
    pub(crate) fn take_pkid(&mut self, data: &SharedFrame) -> Option<u16> {
        if self.inflight.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if let std::collections::hash_map::Entry::Vacant(free) = self.inflight.entry(id) {
                free.insert(data.clone());
                return Some(id);
            }
        }
    }

    /// PUBACK: the packet id is free again, and a persistent session remembers how far the
    /// client got on the topic. False if it was not in flight.
    pub(crate) fn handle_puback(&mut self, pkid: u16) -> bool {
        let Some(data) = self.inflight.remove(&pkid) else {
            return false;
        };
        if !self.clean_session {
            if let (Some(topic), Some(seq)) =
                (proto::data_frame_topic(&data), proto::data_frame_seq(&data))
            {
                match self.acked.get_mut(topic) {
                    Some(acked) => *acked = (*acked).max(seq),
                    None => {
                        self.acked.insert(topic.to_string(), seq);
                    }
                }
            }
        }
        true
    }

    /// What a persistent session saves: its filters with their QoS, and per topic the last
    /// sequence number from which everything before is acknowledged (a message still in flight
    /// is sent again: at least once).
    pub(crate) fn saved_session(&self) -> SavedSession {
        let mut positions: HashMap<&str, u64> = HashMap::default();
        for (topic, &seq) in &self.acked {
            positions.insert(topic, seq);
        }
        for data in self.inflight.values() {
            if let (Some(topic), Some(seq)) =
                (proto::data_frame_topic(data), proto::data_frame_seq(data))
            {
                let before = seq.saturating_sub(1);
                positions
                    .entry(topic)
                    .and_modify(|p| *p = (*p).min(before))
                    .or_insert(before);
            }
        }
        let filters = self
            .filters
            .iter()
            .map(|(filter, sub_id)| {
                let qos = if self.qos1_subs.contains(sub_id) {
                    QoS::AtLeastOnce
                } else {
                    QoS::AtMostOnce
                };
                (filter.clone(), qos)
            })
            .collect();
        SavedSession {
            filters,
            positions: positions
                .into_iter()
                .map(|(topic, seq)| (topic.to_string(), seq))
                .collect(),
        }
    }

    pub(crate) fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Remembers which DATA frame the packet queued at `packet` was made from.
    pub(crate) fn push_stamp(&mut self, packet: &SharedFrame, data: &SharedFrame) {
        self.stamps
            .push_back((packet.as_ptr() as usize, data.clone()));
    }

    /// A queued item was written: its DATA frame, if it was a PUBLISH with a stamp.
    pub(crate) fn take_stamp(&mut self, written: &[u8]) -> Option<SharedFrame> {
        match self.stamps.front() {
            Some((at, _)) if *at == written.as_ptr() as usize => {
                self.stamps.pop_front().map(|(_, data)| data)
            }
            _ => None,
        }
    }

    /// The outbox dropped what was not started (the connection is failing).
    pub(crate) fn clear_stamps(&mut self) {
        self.stamps.clear();
    }
}

/// The MQTT answer to a core reply, appended to `out`; false when there is none. WELCOME is
/// CONNACK (accepted), PONG is PINGRESP, the engine's SUBACK (a subscription's snapshot is
/// complete) the MQTT SUBACK once every filter of its SUBSCRIBE is. The engine's keep-alive
/// PING has no MQTT form; a non-fatal ERROR is kept in `state.refusal` for the MQTT side.
pub(crate) fn encode_reply(out: &mut Vec<u8>, reply: Reply, state: &mut MqttState) -> bool {
    match reply {
        Reply::Welcome(_) => {
            mqtt::encode_connack(out, state.session_present, mqtt::CONNACK_ACCEPTED);
            true
        }
        Reply::Pong { .. } => {
            mqtt::encode_packet(out, &mqtt::Packet::PingResp);
            true
        }
        Reply::SubAck(a) => {
            state.handle_suback(a.sub_id);
            state.poll_subacks(out)
        }
        Reply::Ping { .. } => false,
        Reply::Error { code, reason } => {
            state.refusal = Some(Fatal::new(code, reason));
            false
        }
    }
}

/// The CONNACK return code that answers a refused CONNECT.
pub(crate) fn connack_code(error: u16) -> u8 {
    match error {
        error_code::VERSION => mqtt::CONNACK_UNACCEPTABLE_PROTOCOL,
        error_code::HANDSHAKE => mqtt::CONNACK_IDENTIFIER_REJECTED,
        error_code::UNAUTHENTICATED => mqtt::CONNACK_BAD_USERNAME_OR_PASSWORD,
        error_code::CLIENT_ID_IN_USE | error_code::FORBIDDEN => mqtt::CONNACK_NOT_AUTHORIZED,
        _ => mqtt::CONNACK_SERVER_UNAVAILABLE,
    }
}

/// Topic, payload and SNAPSHOT flag of a DATA frame the engine made (`None` for a GAP).
fn data_parts(data: &[u8]) -> Option<(&str, &[u8], bool)> {
    match proto::decode_frame(data, usize::MAX) {
        Ok(Decoded::Frame(
            Frame::Data {
                header,
                topic,
                payload,
            },
            _,
        )) => Some((topic, payload, header.flags & DATA_FLAG_SNAPSHOT != 0)),
        _ => None,
    }
}

/// The QoS 0 PUBLISH every MQTT subscriber of a live message shares (RETAIN 0: a live message).
pub(crate) fn qos0_packet(data: &[u8]) -> SharedFrame {
    match data_parts(data) {
        Some((topic, payload, _)) => mqtt::publish_shared(topic, payload, false),
        // Only DATA frames are delivered live; nothing else has an MQTT form.
        None => Arc::from(&[][..]),
    }
}

/// The payload of a DATA frame alone, shared by the QoS 1 subscribers of a message.
pub(crate) fn payload_of(data: &[u8]) -> SharedFrame {
    Arc::from(data_parts(data).map_or(&[][..], |(_, payload, _)| payload))
}

/// A snapshot or replayed DATA frame as a PUBLISH for one subscriber. A snapshot value is a
/// retained message (RETAIN set, QoS 0: the engine does not keep the QoS it was published
/// with); a caught-up message goes at QoS 1 when a QoS 1 subscription matches it, with a packet
/// id in flight (the catch-up round is bounded by half the outbox, and the next round waits for
/// half the window; at QoS 0 once all 65,535 ids are in flight). `None` for a GAP, which MQTT
/// cannot express.
pub(crate) fn replayed_packet(data: &SharedFrame, state: &mut MqttState) -> Option<SharedFrame> {
    let (topic, payload, snapshot) = data_parts(data)?;
    let mut packet = publish(topic, payload, snapshot);
    if !snapshot && state.has_qos1_match(topic) {
        // Past 65,535 unacknowledged packets, the rest of a catch-up goes at QoS 0.
        if let Some(pkid) = state.take_pkid(data) {
            packet.qos = QoS::AtLeastOnce;
            packet.pkid = pkid;
        }
    }
    let mut out = Vec::with_capacity(5 + 2 + topic.len() + 2 + payload.len());
    mqtt::encode_publish(&mut out, &packet);
    Some(Arc::from(out))
}

fn publish<'a>(topic: &'a str, payload: &'a [u8], retain: bool) -> Publish<'a> {
    Publish {
        topic,
        payload,
        qos: QoS::AtMostOnce,
        retain,
        dup: false,
        pkid: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::DataHeader;

    fn data(topic: &str, payload: &[u8], flags: u8) -> SharedFrame {
        let mut buf = Vec::new();
        proto::encode_data(
            &mut buf,
            &DataHeader {
                seq: 3,
                source_ts_ns: 1,
                ingest_ts_ns: 2,
                quality: 192,
                flags,
            },
            topic,
            payload,
        );
        Arc::from(buf)
    }

    #[test]
    fn a_live_data_frame_becomes_one_qos0_publish_without_retain() {
        let packet = qos0_packet(&data("plant/t", b"21.5", 0));
        assert_eq!(
            &packet[..],
            &[0x30, 13, 0, 7, b'p', b'l', b'a', b'n', b't', b'/', b't', b'2', b'1', b'.', b'5']
        );
        assert_eq!(&payload_of(&data("plant/t", b"21.5", 0))[..], b"21.5");
    }

    #[test]
    fn a_snapshot_value_is_sent_retained_and_a_gap_not_at_all() {
        let mut s = MqttState::new(4);
        let packet = replayed_packet(&data("a", b"v", DATA_FLAG_SNAPSHOT), &mut s).unwrap();
        assert_eq!(&packet[..], &[0x31, 4, 0, 1, b'a', b'v']);
        let replay = replayed_packet(&data("a", b"v", 0), &mut s).unwrap();
        assert_eq!(replay[0], 0x30);
        s.add_filter("+", QoS::AtLeastOnce);
        let replay = replayed_packet(&data("a", b"v", 0), &mut s).unwrap();
        assert_eq!(
            &replay[..],
            &[0x32, 6, 0, 1, b'a', 0, 1, b'v'],
            "QoS 1, packet id 1"
        );
        let snapshot = replayed_packet(&data("a", b"v", DATA_FLAG_SNAPSHOT), &mut s).unwrap();
        assert_eq!(snapshot[0], 0x31, "retained values go at QoS 0");
        let mut gap = Vec::new();
        proto::encode_control(
            &mut gap,
            &Frame::Gap(proto::Gap {
                topic: "a".into(),
                from_seq: 1,
                to_seq: 2,
            }),
        );
        assert_eq!(replayed_packet(&Arc::from(gap), &mut s), None);
    }

    #[test]
    fn packet_ids_skip_those_in_flight_and_zero() {
        let mut s = MqttState::new(3);
        let d = data("a", b"v", 0);
        s.next_pkid = u16::MAX;
        assert_eq!(s.take_pkid(&d), Some(u16::MAX));
        assert_eq!(s.take_pkid(&d), Some(1), "0 is never a packet id");
        assert_eq!(s.take_pkid(&d), Some(2));
        assert!(s.window_full());
        assert!(s.handle_puback(1));
        assert!(!s.handle_puback(1), "acknowledged once");
        s.next_pkid = u16::MAX;
        assert_eq!(
            s.take_pkid(&d),
            Some(1),
            "u16::MAX is still in flight, 1 is free"
        );
        assert_eq!(s.inflight(), 3);
        while s.take_pkid(&d).is_some() {}
        assert_eq!(
            s.inflight(),
            65_535,
            "every id, then None instead of a loop"
        );
    }

    #[test]
    fn stamps_follow_the_queued_packets_by_address() {
        let mut s = MqttState::new(4);
        let d = data("a", b"v", 0);
        let p = qos0_packet(&d);
        let other: SharedFrame = Arc::from(&[0xd0u8, 0][..]);
        s.push_stamp(&p, &d);
        assert!(s.take_stamp(&other).is_none(), "a reply has no stamp");
        assert!(Arc::ptr_eq(&s.take_stamp(&p).unwrap(), &d));
        assert!(s.take_stamp(&p).is_none());
    }

    #[test]
    fn subacks_wait_for_every_filter_and_keep_subscribe_order() {
        let mut s = MqttState::new(4);
        let mut out = Vec::new();
        s.expect_suback(1, vec![0, 1], vec![10, 11]);
        s.expect_suback(2, vec![0x80], vec![]);
        assert!(!s.poll_subacks(&mut out));
        s.handle_suback(11);
        assert!(!s.poll_subacks(&mut out), "10 is still waiting");
        s.handle_suback(10);
        assert!(s.poll_subacks(&mut out));
        assert_eq!(out, [0x90, 4, 0, 1, 0, 1, 0x90, 3, 0, 2, 0x80]);
    }

    #[test]
    fn a_persistent_session_saves_what_is_acknowledged_and_resends_what_is_not() {
        let mut s = MqttState::new(8);
        s.clean_session = false;
        s.add_filter("t/#", QoS::AtLeastOnce);
        s.add_filter("u", QoS::AtMostOnce);
        let seq = |topic: &str, n: u64| {
            let mut buf = Vec::new();
            proto::encode_data(
                &mut buf,
                &DataHeader {
                    seq: n,
                    ..DataHeader::default()
                },
                topic,
                b"v",
            );
            SharedFrame::from(buf)
        };
        let ids: Vec<u16> = (1..=4)
            .map(|n| s.take_pkid(&seq("t/a", n)).unwrap())
            .collect();
        s.take_pkid(&seq("t/b", 7)).unwrap();
        // 1, 2 and 4 acknowledged; 3 is not: the client resumes after 2.
        for &id in &[ids[0], ids[1], ids[3]] {
            assert!(s.handle_puback(id));
        }
        let mut saved = s.saved_session();
        saved.filters.sort();
        saved.positions.sort();
        assert_eq!(
            saved.filters,
            vec![
                ("t/#".into(), QoS::AtLeastOnce),
                ("u".into(), QoS::AtMostOnce)
            ]
        );
        assert_eq!(saved.positions, vec![("t/a".into(), 2), ("t/b".into(), 6)]);
    }

    #[test]
    fn refusals_become_connack_codes() {
        assert_eq!(connack_code(error_code::VERSION), 1);
        assert_eq!(connack_code(error_code::HANDSHAKE), 2);
        assert_eq!(connack_code(error_code::TOO_MANY_CONNECTIONS), 3);
    }
}
