//! MQTT 3.1.1 packets: decoding from byte slices, encoding into caller-owned buffers.
//!
//! Every packet is a fixed header (packet type in the high nibble of byte 0, flags in the low
//! nibble, then the *remaining length* in 1 to 4 bytes of 7 bits each, least significant
//! first) followed by that many bytes. Integers are big-endian; strings are a u16 length and
//! UTF-8. The spec's rules for malformed packets (OASIS MQTT 3.1.1, sections 2 and 3) are
//! checked here, each failure a [`DecodeError`] the session answers by closing the connection.

/// The largest remaining length four length bytes can say (spec 2.2.3).
pub const MAX_REMAINING_LENGTH: usize = 268_435_455;
/// CONNECT's protocol level for 3.1.1.
pub const PROTOCOL_LEVEL_311: u8 = 4;

/// CONNACK return codes (spec 3.2.2.3).
pub const CONNACK_ACCEPTED: u8 = 0;
pub const CONNACK_UNACCEPTABLE_PROTOCOL: u8 = 1;
pub const CONNACK_IDENTIFIER_REJECTED: u8 = 2;
pub const CONNACK_SERVER_UNAVAILABLE: u8 = 3;
pub const CONNACK_BAD_USERNAME_OR_PASSWORD: u8 = 4;
pub const CONNACK_NOT_AUTHORIZED: u8 = 5;
/// SUBACK return code of a refused filter.
pub const SUBACK_FAILURE: u8 = 0x80;

const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBSCRIBE: u8 = 10;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// Delivery guarantee of a PUBLISH, a subscription or a will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum QoS {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    fn from_bits(bits: u8) -> Option<QoS> {
        match bits {
            0 => Some(QoS::AtMostOnce),
            1 => Some(QoS::AtLeastOnce),
            2 => Some(QoS::ExactlyOnce),
            _ => None,
        }
    }
}

/// The message a server publishes for a client whose connection dies without DISCONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will<'a> {
    pub topic: &'a str,
    pub message: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
}

/// CONNECT, borrowed from the receive buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect<'a> {
    /// Always [`PROTOCOL_LEVEL_311`] once decoded (others are [`DecodeError::ProtocolLevel`]).
    pub client_id: &'a str,
    pub clean_session: bool,
    /// 0: no keep-alive.
    pub keep_alive_s: u16,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub will: Option<Will<'a>>,
}

/// PUBLISH, borrowed from the receive buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Publish<'a> {
    pub topic: &'a str,
    pub payload: &'a [u8],
    pub qos: QoS,
    pub retain: bool,
    pub dup: bool,
    /// Packet identifier; 0 for QoS 0 (which has none on the wire).
    pub pkid: u16,
}

/// One MQTT control packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    ConnAck {
        session_present: bool,
        code: u8,
    },
    Publish(Publish<'a>),
    PubAck {
        pkid: u16,
    },
    PubRec {
        pkid: u16,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<(&'a str, QoS)>,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<&'a str>,
    },
    UnsubAck {
        pkid: u16,
    },
    PingReq,
    PingResp,
    Disconnect,
}

/// Why bytes are not an MQTT packet. Every variant is the peer's fault and closes its
/// connection (spec 4.8: a malformed packet closes the network connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("packet of {len} bytes (remaining length) exceeds the limit of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("remaining length takes more than 4 bytes")]
    RemainingLength,
    #[error("reserved packet type {0}")]
    ReservedType(u8),
    #[error("{kind}: fixed-header flags 0x{flags:x} are reserved")]
    Flags { kind: &'static str, flags: u8 },
    #[error("CONNECT: protocol {name:?} level {level} is not MQTT 3.1.1")]
    ProtocolLevel { name: String, level: u8 },
    #[error("{kind} is malformed: {reason}")]
    Malformed {
        kind: &'static str,
        reason: &'static str,
    },
}

/// Outcome of [`decode_packet`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole packet and how many input bytes it used.
    Packet(Packet<'a>, usize),
    /// The input is a prefix of a packet; at least this many more bytes are needed.
    NeedMore(usize),
}

fn kind_name(kind: u8) -> &'static str {
    match kind {
        CONNECT => "CONNECT",
        CONNACK => "CONNACK",
        PUBLISH => "PUBLISH",
        PUBACK => "PUBACK",
        PUBREC => "PUBREC",
        PUBREL => "PUBREL",
        PUBCOMP => "PUBCOMP",
        SUBSCRIBE => "SUBSCRIBE",
        SUBACK => "SUBACK",
        UNSUBSCRIBE => "UNSUBSCRIBE",
        UNSUBACK => "UNSUBACK",
        PINGREQ => "PINGREQ",
        PINGRESP => "PINGRESP",
        DISCONNECT => "DISCONNECT",
        _ => "reserved",
    }
}

/// The fixed header: `Some((remaining_length, header_bytes))`, `None` while its length bytes are
/// incomplete.
fn fixed_header(buf: &[u8]) -> Result<Option<(usize, usize)>, DecodeError> {
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((len, 2 + i)));
        }
    }
    Err(DecodeError::RemainingLength)
}

/// The whole length of the packet at the front of `buf` (fixed header included), once its
/// fixed header is in: lets a reader size its buffer. `None` before that, or if the header is
/// malformed (the decoder reports it).
pub fn packet_len_hint(buf: &[u8]) -> Option<usize> {
    match fixed_header(buf) {
        Ok(Some((len, header))) => Some(len + header),
        _ => None,
    }
}

/// Decodes the packet at the front of `buf`. A remaining length over `max_remaining_bytes` is
/// refused as soon as its length bytes are in, before the body is buffered.
pub fn decode_packet(buf: &[u8], max_remaining_bytes: usize) -> Result<Decoded<'_>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(Decoded::NeedMore(2));
    };
    let (kind, flags) = (first >> 4, first & 0x0f);
    let name = kind_name(kind);
    let flags_ok = match kind {
        0 | 15 => return Err(DecodeError::ReservedType(kind)),
        PUBLISH => flags & 0b0110 != 0b0110,
        PUBREL | SUBSCRIBE | UNSUBSCRIBE => flags == 0b0010,
        _ => flags == 0,
    };
    if !flags_ok {
        return Err(DecodeError::Flags { kind: name, flags });
    }
    let Some((len, header)) = fixed_header(buf)? else {
        return Ok(Decoded::NeedMore(1));
    };
    if len > max_remaining_bytes {
        return Err(DecodeError::TooLarge {
            len,
            max: max_remaining_bytes,
        });
    }
    let total = header + len;
    if buf.len() < total {
        return Ok(Decoded::NeedMore(total - buf.len()));
    }
    let mut r = Reader {
        buf: &buf[header..total],
        kind: name,
    };
    let packet = match kind {
        CONNECT => Packet::Connect(decode_connect(&mut r)?),
        CONNACK => {
            let ack = r.u8()?;
            let code = r.u8()?;
            if ack & 0xfe != 0 || code > 5 {
                return Err(r.malformed("reserved acknowledge flags or return code"));
            }
            Packet::ConnAck {
                session_present: ack & 1 != 0,
                code,
            }
        }
        PUBLISH => Packet::Publish(decode_publish(&mut r, flags)?),
        PUBACK => Packet::PubAck { pkid: r.pkid()? },
        PUBREC => Packet::PubRec { pkid: r.pkid()? },
        PUBREL => Packet::PubRel { pkid: r.pkid()? },
        PUBCOMP => Packet::PubComp { pkid: r.pkid()? },
        SUBSCRIBE => {
            let pkid = r.pkid()?;
            let mut filters = Vec::new();
            while !r.buf.is_empty() {
                let filter = r.str()?;
                if filter.is_empty() {
                    return Err(r.malformed("zero-length topic filter"));
                }
                let requested = r.u8()?;
                let qos = QoS::from_bits(requested)
                    .ok_or_else(|| r.malformed("requested QoS is 3 or has reserved bits"))?;
                filters.push((filter, qos));
            }
            if filters.is_empty() {
                return Err(r.malformed("no topic filter"));
            }
            Packet::Subscribe { pkid, filters }
        }
        SUBACK => {
            let pkid = r.pkid()?;
            let codes = r.rest().to_vec();
            if codes.iter().any(|&c| c > 2 && c != SUBACK_FAILURE) {
                return Err(r.malformed("reserved return code"));
            }
            Packet::SubAck { pkid, codes }
        }
        UNSUBSCRIBE => {
            let pkid = r.pkid()?;
            let mut filters = Vec::new();
            while !r.buf.is_empty() {
                let filter = r.str()?;
                if filter.is_empty() {
                    return Err(r.malformed("zero-length topic filter"));
                }
                filters.push(filter);
            }
            if filters.is_empty() {
                return Err(r.malformed("no topic filter"));
            }
            Packet::Unsubscribe { pkid, filters }
        }
        UNSUBACK => Packet::UnsubAck { pkid: r.pkid()? },
        PINGREQ => Packet::PingReq,
        PINGRESP => Packet::PingResp,
        DISCONNECT => Packet::Disconnect,
        _ => unreachable!("types 0 and 15 were refused above, 1..=14 are all listed"),
    };
    if !r.buf.is_empty() {
        return Err(r.malformed("bytes after the packet's last field"));
    }
    Ok(Decoded::Packet(packet, total))
}

fn decode_connect<'a>(r: &mut Reader<'a>) -> Result<Connect<'a>, DecodeError> {
    let name = r.str()?;
    let level = r.u8()?;
    if name != "MQTT" || level != PROTOCOL_LEVEL_311 {
        return Err(DecodeError::ProtocolLevel {
            name: name.chars().take(16).collect(),
            level,
        });
    }
    let flags = r.u8()?;
    if flags & 1 != 0 {
        return Err(r.malformed("reserved connect flag is set"));
    }
    let will_flag = flags & 0b100 != 0;
    let will_qos =
        QoS::from_bits((flags >> 3) & 0b11).ok_or_else(|| r.malformed("will QoS is 3"))?;
    let will_retain = flags & 0b10_0000 != 0;
    let has_password = flags & 0b100_0000 != 0;
    let has_username = flags & 0b1000_0000 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(r.malformed("will QoS or retain set without a will"));
    }
    if has_password && !has_username {
        return Err(r.malformed("password without a user name"));
    }
    let keep_alive_s = r.u16()?;
    let client_id = r.str()?;
    let will = if will_flag {
        let topic = r.str()?;
        check_topic_name(r, topic)?;
        let message = r.bin()?;
        Some(Will {
            topic,
            message,
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        None
    };
    let username = has_username.then(|| r.str()).transpose()?;
    let password = has_password.then(|| r.bin()).transpose()?;
    Ok(Connect {
        client_id,
        clean_session: flags & 0b10 != 0,
        keep_alive_s,
        username,
        password,
        will,
    })
}

fn decode_publish<'a>(r: &mut Reader<'a>, flags: u8) -> Result<Publish<'a>, DecodeError> {
    let qos = QoS::from_bits((flags >> 1) & 0b11).ok_or_else(|| r.malformed("QoS 3"))?;
    let dup = flags & 0b1000 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(r.malformed("DUP set on a QoS 0 message"));
    }
    let topic = r.str()?;
    check_topic_name(r, topic)?;
    let pkid = if qos == QoS::AtMostOnce { 0 } else { r.pkid()? };
    Ok(Publish {
        topic,
        payload: r.rest(),
        qos,
        retain: flags & 1 != 0,
        dup,
        pkid,
    })
}

/// A topic name (PUBLISH, will): at least one character and no wildcard (spec 4.7.1, 4.7.3).
fn check_topic_name(r: &Reader<'_>, topic: &str) -> Result<(), DecodeError> {
    if topic.is_empty() {
        return Err(r.malformed("zero-length topic name"));
    }
    if topic.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(r.malformed("wildcard in a topic name"));
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    kind: &'static str,
}

impl<'a> Reader<'a> {
    fn malformed(&self, reason: &'static str) -> DecodeError {
        DecodeError::Malformed {
            kind: self.kind,
            reason,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(self.malformed("a field runs past the end of the packet"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A packet identifier: non-zero (spec 2.3.1).
    fn pkid(&mut self) -> Result<u16, DecodeError> {
        match self.u16()? {
            0 => Err(self.malformed("packet identifier 0")),
            id => Ok(id),
        }
    }

    fn bin(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u16()?;
        self.take(len.into())
    }

    /// A UTF-8 string: well-formed and without U+0000 (spec 1.5.3).
    fn str(&mut self) -> Result<&'a str, DecodeError> {
        let bytes = self.bin()?;
        let s = std::str::from_utf8(bytes).map_err(|_| self.malformed("invalid UTF-8"))?;
        if bytes.contains(&0) {
            return Err(self.malformed("U+0000 in a string"));
        }
        Ok(s)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

// ----- encoding -----

fn put_header(out: &mut Vec<u8>, first: u8, mut remaining: usize) {
    debug_assert!(remaining <= MAX_REMAINING_LENGTH);
    out.push(first);
    loop {
        let mut b = (remaining & 0x7f) as u8;
        remaining >>= 7;
        if remaining > 0 {
            b |= 0x80;
        }
        out.push(b);
        if remaining == 0 {
            return;
        }
    }
}

fn put_bin(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn publish_first_byte(qos: QoS, retain: bool, dup: bool) -> u8 {
    (PUBLISH << 4) | (u8::from(dup) << 3) | ((qos as u8) << 1) | u8::from(retain)
}

/// Appends a whole PUBLISH. `pkid` is written only for QoS 1 and 2. The caller keeps the topic
/// within 65,535 bytes and the packet within [`MAX_REMAINING_LENGTH`] (the engine's limits are
/// far below both).
pub fn encode_publish(out: &mut Vec<u8>, publish: &Publish<'_>) {
    let id_bytes = if publish.qos == QoS::AtMostOnce { 0 } else { 2 };
    put_header(
        out,
        publish_first_byte(publish.qos, publish.retain, publish.dup),
        2 + publish.topic.len() + id_bytes + publish.payload.len(),
    );
    put_bin(out, publish.topic.as_bytes());
    if id_bytes > 0 {
        out.extend_from_slice(&publish.pkid.to_be_bytes());
    }
    out.extend_from_slice(publish.payload);
}

/// A whole QoS 0 PUBLISH in one new shared allocation (no `Vec` first): the packet every MQTT
/// subscriber of a message shares. Same bytes as [`encode_publish`].
pub fn publish_shared(topic: &str, payload: &[u8], retain: bool) -> std::sync::Arc<[u8]> {
    let mut head = [0u8; 5 + 2];
    let mut at = 0;
    let mut remaining = 2 + topic.len() + payload.len();
    head[0] = publish_first_byte(QoS::AtMostOnce, retain, false);
    loop {
        at += 1;
        let mut b = (remaining & 0x7f) as u8;
        remaining >>= 7;
        if remaining > 0 {
            b |= 0x80;
        }
        head[at] = b;
        if remaining == 0 {
            break;
        }
    }
    head[at + 1..at + 3].copy_from_slice(&(topic.len() as u16).to_be_bytes());
    // A chain of slice iterators has an exact length (TrustedLen): collected in one allocation.
    head[..at + 3]
        .iter()
        .chain(topic.as_bytes())
        .chain(payload)
        .copied()
        .collect()
}

/// Appends the head of a QoS 1 PUBLISH, everything before its payload (fixed header, topic,
/// packet id): the packet is this head followed by `payload_bytes` of payload, which the
/// engine writes from a buffer shared by every subscriber.
pub fn encode_publish_qos1_head(
    out: &mut Vec<u8>,
    topic: &str,
    payload_bytes: usize,
    dup: bool,
    pkid: u16,
) {
    put_header(
        out,
        publish_first_byte(QoS::AtLeastOnce, false, dup),
        2 + topic.len() + 2 + payload_bytes,
    );
    put_bin(out, topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends CONNACK.
pub fn encode_connack(out: &mut Vec<u8>, session_present: bool, code: u8) {
    out.extend_from_slice(&[CONNACK << 4, 2, u8::from(session_present), code]);
}

/// The topic of an encoded PUBLISH packet (as [`encode_publish`] makes them).
pub fn publish_topic(packet: &[u8]) -> Option<&str> {
    if packet.first()? >> 4 != PUBLISH {
        return None;
    }
    let (_, header) = fixed_header(packet).ok()??;
    let len = u16::from_be_bytes([*packet.get(header)?, *packet.get(header + 1)?]) as usize;
    std::str::from_utf8(packet.get(header + 2..header + 2 + len)?).ok()
}

fn encode_id_only(out: &mut Vec<u8>, first: u8, pkid: u16) {
    out.push(first);
    out.push(2);
    out.extend_from_slice(&pkid.to_be_bytes());
}

/// Appends any packet: both directions, so that tests and tools can play either side.
pub fn encode_packet(out: &mut Vec<u8>, packet: &Packet<'_>) {
    match packet {
        Packet::Connect(c) => {
            let mut flags = 0u8;
            let mut len = 2 + 4 + 1 + 1 + 2 + 2 + c.client_id.len();
            if c.clean_session {
                flags |= 0b10;
            }
            if let Some(w) = &c.will {
                flags |= 0b100 | ((w.qos as u8) << 3) | (u8::from(w.retain) << 5);
                len += 2 + w.topic.len() + 2 + w.message.len();
            }
            if let Some(u) = c.username {
                flags |= 0b1000_0000;
                len += 2 + u.len();
            }
            if let Some(p) = c.password {
                flags |= 0b100_0000;
                len += 2 + p.len();
            }
            put_header(out, CONNECT << 4, len);
            put_bin(out, b"MQTT");
            out.push(PROTOCOL_LEVEL_311);
            out.push(flags);
            out.extend_from_slice(&c.keep_alive_s.to_be_bytes());
            put_bin(out, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                put_bin(out, w.topic.as_bytes());
                put_bin(out, w.message);
            }
            if let Some(u) = c.username {
                put_bin(out, u.as_bytes());
            }
            if let Some(p) = c.password {
                put_bin(out, p);
            }
        }
        Packet::ConnAck {
            session_present,
            code,
        } => encode_connack(out, *session_present, *code),
        Packet::Publish(p) => encode_publish(out, p),
        Packet::PubAck { pkid } => encode_id_only(out, PUBACK << 4, *pkid),
        Packet::PubRec { pkid } => encode_id_only(out, PUBREC << 4, *pkid),
        Packet::PubRel { pkid } => encode_id_only(out, (PUBREL << 4) | 0b10, *pkid),
        Packet::PubComp { pkid } => encode_id_only(out, PUBCOMP << 4, *pkid),
        Packet::Subscribe { pkid, filters } => {
            let len = 2 + filters.iter().map(|(f, _)| 2 + f.len() + 1).sum::<usize>();
            put_header(out, (SUBSCRIBE << 4) | 0b10, len);
            out.extend_from_slice(&pkid.to_be_bytes());
            for (filter, qos) in filters {
                put_bin(out, filter.as_bytes());
                out.push(*qos as u8);
            }
        }
        Packet::SubAck { pkid, codes } => {
            put_header(out, SUBACK << 4, 2 + codes.len());
            out.extend_from_slice(&pkid.to_be_bytes());
            out.extend_from_slice(codes);
        }
        Packet::Unsubscribe { pkid, filters } => {
            let len = 2 + filters.iter().map(|f| 2 + f.len()).sum::<usize>();
            put_header(out, (UNSUBSCRIBE << 4) | 0b10, len);
            out.extend_from_slice(&pkid.to_be_bytes());
            for filter in filters {
                put_bin(out, filter.as_bytes());
            }
        }
        Packet::UnsubAck { pkid } => encode_id_only(out, UNSUBACK << 4, *pkid),
        Packet::PingReq => out.extend_from_slice(&[PINGREQ << 4, 0]),
        Packet::PingResp => out.extend_from_slice(&[PINGRESP << 4, 0]),
        Packet::Disconnect => out.extend_from_slice(&[DISCONNECT << 4, 0]),
    }
}
