//! Encoding into caller-owned buffers and incremental decoding from byte slices.

use bincode::{Decode, Encode};

use super::frames::{DataHeader, Frame, PublishRef};
use super::*;

/// Why bytes could not be decoded into a frame. Every variant is the peer's fault: the engine
/// answers with an ERROR frame and closes that connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame length 0: a frame has at least a kind byte")]
    Empty,
    #[error("unknown frame kind 0x{0:02x}")]
    UnknownKind(u8),
    #[error("{kind} frame is malformed: {reason}")]
    Malformed { kind: &'static str, reason: String },
}

impl DecodeError {
    /// The ERROR code the engine sends for this decode failure.
    pub fn code(&self) -> u16 {
        match self {
            DecodeError::TooLarge { .. } => error_code::FRAME_TOO_LARGE,
            _ => error_code::MALFORMED,
        }
    }
}

/// Outcome of [`decode_frame`] on a buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A whole frame, and how many bytes of the input it used.
    Frame(Frame<'a>, usize),
    /// The input holds a prefix of a frame; at least this many more bytes are needed.
    NeedMore(usize),
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

fn begin_frame(out: &mut Vec<u8>, kind: u8) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    start
}

fn finish_frame(out: &mut [u8], start: usize) {
    let len = (out.len() - start - LEN_PREFIX_BYTES) as u32;
    out[start..start + LEN_PREFIX_BYTES].copy_from_slice(&len.to_le_bytes());
}

/// Appends a control frame (any variant but PUBLISH, DATA, PING and PONG, which have their own
/// encoders). Panics on those four: that is a programming error, not a peer's.
pub fn encode_control(out: &mut Vec<u8>, frame: &Frame<'_>) {
    fn body<T: Encode>(out: &mut Vec<u8>, kind: u8, value: &T) {
        let start = begin_frame(out, kind);
        // Encoding into a Vec cannot fail for these plain structs (no I/O, no limit).
        bincode::encode_into_std_write(value, out, bincode_config())
            .expect("bincode encode into Vec is infallible");
        finish_frame(out, start);
    }
    match frame {
        Frame::Hello(v) => body(out, KIND_HELLO, v),
        Frame::Welcome(v) => body(out, KIND_WELCOME, v),
        Frame::Subscribe(v) => body(out, KIND_SUBSCRIBE, v),
        Frame::Unsubscribe(v) => body(out, KIND_UNSUBSCRIBE, v),
        Frame::SubAck(v) => body(out, KIND_SUBACK, v),
        Frame::Error(v) => body(out, KIND_ERROR, v),
        Frame::Gap(v) => body(out, KIND_GAP, v),
        Frame::Stats(v) => body(out, KIND_STATS, v),
        Frame::StatsRequest => {
            let start = begin_frame(out, KIND_STATS_REQUEST);
            finish_frame(out, start);
        }
        Frame::Multicast(m) => match m {
            Mcast::ChannelsRequest => {
                let start = begin_frame(out, KIND_CHANNELS_REQUEST);
                finish_frame(out, start);
            }
            Mcast::Channels(v) => body(out, KIND_CHANNELS, v),
            Mcast::StreamPos(v) => body(out, KIND_STREAM_POS, v),
            Mcast::Nak(v) => body(out, KIND_NAK, v),
            Mcast::RepairGone(v) => body(out, KIND_REPAIR_GONE, v),
            Mcast::Repair(datagram) => encode_repair(out, datagram),
        },
        Frame::Publish(_) | Frame::Data { .. } | Frame::Ping { .. } | Frame::Pong { .. } => {
            panic!("encode_control called with a hot-path frame: {frame:?}")
        }
    }
}

/// Appends a REPAIR frame: the datagram's bytes as they were multicast.
pub fn encode_repair(out: &mut Vec<u8>, datagram: &[u8]) {
    let start = begin_frame(out, KIND_REPAIR);
    out.extend_from_slice(datagram);
    finish_frame(out, start);
}

/// Appends a PUBLISH frame. The caller has validated the topic (see [`validate_topic`]);
/// a topic longer than [`MAX_TOPIC_BYTES`] is truncated by no one: it panics.
pub fn encode_publish(out: &mut Vec<u8>, publish: &PublishRef<'_>) {
    assert!(
        publish.topic.len() <= MAX_TOPIC_BYTES,
        "topic longer than the wire allows"
    );
    let start = begin_frame(out, KIND_PUBLISH);
    out.extend_from_slice(&publish.source_ts_ns.to_le_bytes());
    out.push(publish.quality);
    out.extend_from_slice(&(publish.topic.len() as u16).to_le_bytes());
    out.extend_from_slice(publish.topic.as_bytes());
    out.extend_from_slice(publish.payload);
    finish_frame(out, start);
}

/// Appends a DATA frame.
pub fn encode_data(out: &mut Vec<u8>, header: &DataHeader, topic: &str, payload: &[u8]) {
    assert!(
        topic.len() <= MAX_TOPIC_BYTES,
        "topic longer than the wire allows"
    );
    out.reserve(FRAME_HEADER_BYTES + DATA_FIXED_BYTES + topic.len() + payload.len());
    let start = begin_frame(out, KIND_DATA);
    out.extend_from_slice(&header.seq.to_le_bytes());
    out.extend_from_slice(&header.source_ts_ns.to_le_bytes());
    out.extend_from_slice(&header.ingest_ts_ns.to_le_bytes());
    out.push(header.quality);
    out.push(header.flags);
    out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(payload);
    finish_frame(out, start);
}

/// The total length (prefix included) of the DATA frame for `publish`.
pub fn data_frame_total_len(publish: &PublishRef<'_>) -> usize {
    FRAME_HEADER_BYTES + DATA_FIXED_BYTES + publish.topic.len() + publish.payload.len()
}

/// The DATA frame for a publish, written straight into one new shared allocation: the engine's
/// one copy of the payload, which every subscriber's queue will hold.
pub fn data_frame_shared(
    publish: &PublishRef<'_>,
    seq: u64,
    ingest_ts_ns: u64,
    flags: u8,
) -> std::sync::Arc<[u8]> {
    let len = data_frame_total_len(publish);
    let mut head = [0u8; FRAME_HEADER_BYTES + DATA_FIXED_BYTES];
    head[..4].copy_from_slice(&((len - LEN_PREFIX_BYTES) as u32).to_le_bytes());
    head[4] = KIND_DATA;
    head[5..13].copy_from_slice(&seq.to_le_bytes());
    head[13..21].copy_from_slice(&publish.source_ts_ns.to_le_bytes());
    head[21..29].copy_from_slice(&ingest_ts_ns.to_le_bytes());
    head[29] = publish.quality;
    head[30] = flags;
    head[31..33].copy_from_slice(&(publish.topic.len() as u16).to_le_bytes());
    let mut frame = std::sync::Arc::<[u8]>::new_uninit_slice(len);
    // A freshly made Arc has no other reference, so get_mut always succeeds.
    let buf = std::sync::Arc::get_mut(&mut frame).expect("a new Arc is unique");
    let (h, rest) = buf.split_at_mut(head.len());
    let (topic, payload) = rest.split_at_mut(publish.topic.len());
    h.write_copy_of_slice(&head);
    topic.write_copy_of_slice(publish.topic.as_bytes());
    // The three parts cover the buffer: `len` is their sum (data_frame_total_len), and
    // copy_from_slice-style writes panic unless each part is filled exactly.
    payload.write_copy_of_slice(publish.payload);
    // SAFETY: the three writes above initialised every byte: head, topic and payload are
    // consecutive, start at 0 and end at `len` (each write_copy_of_slice fills its whole part).
    unsafe { frame.assume_init() }
}

/// Builds the DATA frame for a publish.
pub fn encode_data_from_publish(
    out: &mut Vec<u8>,
    publish: &PublishRef<'_>,
    seq: u64,
    ingest_ts_ns: u64,
    flags: u8,
) {
    let header = DataHeader {
        seq,
        source_ts_ns: publish.source_ts_ns,
        ingest_ts_ns,
        quality: publish.quality,
        flags,
    };
    encode_data(out, &header, publish.topic, publish.payload);
}

pub fn encode_ping(out: &mut Vec<u8>, nonce: u64) {
    let start = begin_frame(out, KIND_PING);
    out.extend_from_slice(&nonce.to_le_bytes());
    finish_frame(out, start);
}

pub fn encode_pong(out: &mut Vec<u8>, nonce: u64) {
    let start = begin_frame(out, KIND_PONG);
    out.extend_from_slice(&nonce.to_le_bytes());
    finish_frame(out, start);
}

/// The total length (prefix included) of the frame starting at `buf`, if its prefix is there.
/// Lets a reader size its buffer before the whole frame has arrived.
pub fn frame_len_hint(buf: &[u8]) -> Option<usize> {
    let prefix: [u8; 4] = buf.get(..LEN_PREFIX_BYTES)?.try_into().ok()?;
    Some(LEN_PREFIX_BYTES + u32::from_le_bytes(prefix) as usize)
}

/// Decodes the first frame in `buf`.
///
/// The length prefix is checked against `max_frame_bytes` before anything else, so an oversized
/// frame is refused without buffering it. `Ok(Decoded::NeedMore(n))` means `buf` is a valid prefix
/// and at least `n` more bytes are needed. Borrowed fields point into `buf`.
pub fn decode_frame(buf: &[u8], max_frame_bytes: usize) -> Result<Decoded<'_>, DecodeError> {
    let Some(total) = frame_len_hint(buf) else {
        return Ok(Decoded::NeedMore(LEN_PREFIX_BYTES - buf.len()));
    };
    let len = total - LEN_PREFIX_BYTES;
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > max_frame_bytes {
        return Err(DecodeError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    if buf.len() < total {
        // Check the kind early so garbage is refused as soon as its second byte group arrives.
        if let Some(&kind) = buf.get(LEN_PREFIX_BYTES) {
            kind_name(kind).ok_or(DecodeError::UnknownKind(kind))?;
        }
        return Ok(Decoded::NeedMore(total - buf.len()));
    }
    let kind = buf[LEN_PREFIX_BYTES];
    let body = &buf[FRAME_HEADER_BYTES..total];
    let frame = decode_body(kind, body)?;
    Ok(Decoded::Frame(frame, total))
}

fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        KIND_HELLO => "HELLO",
        KIND_WELCOME => "WELCOME",
        KIND_SUBSCRIBE => "SUBSCRIBE",
        KIND_UNSUBSCRIBE => "UNSUBSCRIBE",
        KIND_SUBACK => "SUBACK",
        KIND_PUBLISH => "PUBLISH",
        KIND_DATA => "DATA",
        KIND_PING => "PING",
        KIND_PONG => "PONG",
        KIND_ERROR => "ERROR",
        KIND_GAP => "GAP",
        KIND_STATS_REQUEST => "STATS_REQUEST",
        KIND_STATS => "STATS",
        KIND_CHANNELS_REQUEST => "CHANNELS_REQUEST",
        KIND_CHANNELS => "CHANNELS",
        KIND_STREAM_POS => "STREAM_POS",
        KIND_NAK => "NAK",
        KIND_REPAIR => "REPAIR",
        KIND_REPAIR_GONE => "REPAIR_GONE",
        _ => return None,
    })
}

fn malformed(kind: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError::Malformed {
        kind,
        reason: reason.into(),
    }
}

/// A little-endian reader over a body that turns running out of bytes into `Malformed`.
struct Body<'a> {
    kind: &'static str,
    rest: &'a [u8],
}

impl<'a> Body<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(malformed(
                self.kind,
                format!("truncated {what}: need {n} bytes, have {}", self.rest.len()),
            ));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }
    fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let bytes = self.take(8, what)?;
        Ok(u64::from_le_bytes(
            bytes.try_into().expect("take returned 8 bytes"),
        ))
    }
    fn u16(&mut self, what: &str) -> Result<u16, DecodeError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_le_bytes(
            bytes.try_into().expect("take returned 2 bytes"),
        ))
    }
    fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn topic(&mut self) -> Result<&'a str, DecodeError> {
        let len = self.u16("topic length")? as usize;
        let bytes = self.take(len, "topic")?;
        std::str::from_utf8(bytes).map_err(|_| malformed(self.kind, "topic is not UTF-8"))
    }
    fn finish(self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(malformed(
                self.kind,
                format!("{} trailing bytes", self.rest.len()),
            ))
        }
    }
}

/// Before it allocates a string or a vector, bincode claims `length * size_of::<element>()`
/// bytes against its configured limit (and every integer at its in-memory size). With no limit,
/// a 14-byte HELLO whose client_id length says 2^40 makes it allocate that much: the process
/// aborts. An honest body claims at most 16 bytes per body byte (a `TopicPosition` is 32 bytes
/// in memory and at least 2 on the wire), so this many per body byte, plus the slack, never
/// refuses a valid frame.
const CLAIM_BYTES_PER_BODY_BYTE: usize = 32;
const CLAIM_SLACK_BYTES: usize = 256;

/// Decodes a bincode control body. Its length fields cannot make bincode allocate more than the
/// limit tier holding the body's budget (`CLAIM_BYTES_PER_BODY_BYTE` per byte plus the slack),
/// which is less than 64 times that budget.
fn control<T: Decode<()>>(kind: &'static str, body: &[u8]) -> Result<T, DecodeError> {
    let budget = body
        .len()
        .saturating_mul(CLAIM_BYTES_PER_BODY_BYTE)
        .saturating_add(CLAIM_SLACK_BYTES);
    // bincode takes its limit as a const generic: use the smallest tier that holds the budget.
    // The limit only affects decoding; the wire format is `bincode_config()`'s.
    let config = bincode::config::standard();
    let decoded = if budget <= 1 << 12 {
        bincode::decode_from_slice(body, config.with_limit::<{ 1 << 12 }>())
    } else if budget <= 1 << 18 {
        bincode::decode_from_slice(body, config.with_limit::<{ 1 << 18 }>())
    } else if budget <= 1 << 24 {
        bincode::decode_from_slice(body, config.with_limit::<{ 1 << 24 }>())
    } else if budget <= 1 << 30 {
        bincode::decode_from_slice(body, config.with_limit::<{ 1 << 30 }>())
    } else {
        // A body is at most u32::MAX bytes, so its budget is below 2^38.
        bincode::decode_from_slice(body, config.with_limit::<{ 1 << 38 }>())
    };
    let (value, used) = decoded.map_err(|e| malformed(kind, e.to_string()))?;
    if used != body.len() {
        return Err(malformed(
            kind,
            format!("{} trailing bytes", body.len() - used),
        ));
    }
    Ok(value)
}

fn decode_body(kind: u8, body: &[u8]) -> Result<Frame<'_>, DecodeError> {
    let name = kind_name(kind).ok_or(DecodeError::UnknownKind(kind))?;
    Ok(match kind {
        KIND_HELLO => Frame::Hello(control(name, body)?),
        KIND_WELCOME => Frame::Welcome(control(name, body)?),
        KIND_SUBSCRIBE => Frame::Subscribe(control(name, body)?),
        KIND_UNSUBSCRIBE => Frame::Unsubscribe(control(name, body)?),
        KIND_SUBACK => Frame::SubAck(control(name, body)?),
        KIND_ERROR => Frame::Error(control(name, body)?),
        KIND_GAP => Frame::Gap(control(name, body)?),
        KIND_STATS => Frame::Stats(control(name, body)?),
        KIND_STATS_REQUEST => {
            Body {
                kind: name,
                rest: body,
            }
            .finish()?;
            Frame::StatsRequest
        }
        KIND_CHANNELS_REQUEST => {
            Body {
                kind: name,
                rest: body,
            }
            .finish()?;
            Frame::Multicast(Mcast::ChannelsRequest)
        }
        KIND_CHANNELS => Frame::Multicast(Mcast::Channels(control(name, body)?)),
        KIND_STREAM_POS => Frame::Multicast(Mcast::StreamPos(control(name, body)?)),
        KIND_NAK => Frame::Multicast(Mcast::Nak(control(name, body)?)),
        KIND_REPAIR_GONE => Frame::Multicast(Mcast::RepairGone(control(name, body)?)),
        KIND_REPAIR => Frame::Multicast(Mcast::Repair(body)),
        KIND_PUBLISH => {
            let mut b = Body {
                kind: name,
                rest: body,
            };
            let source_ts_ns = b.u64("source timestamp")?;
            let quality = b.u8("quality")?;
            let topic = b.topic()?;
            Frame::Publish(PublishRef {
                topic,
                source_ts_ns,
                quality,
                payload: b.rest,
            })
        }
        KIND_DATA => {
            let mut b = Body {
                kind: name,
                rest: body,
            };
            let header = DataHeader {
                seq: b.u64("seq")?,
                source_ts_ns: b.u64("source timestamp")?,
                ingest_ts_ns: b.u64("ingest timestamp")?,
                quality: b.u8("quality")?,
                flags: b.u8("flags")?,
            };
            let topic = b.topic()?;
            Frame::Data {
                header,
                topic,
                payload: b.rest,
            }
        }
        KIND_PING | KIND_PONG => {
            let mut b = Body {
                kind: name,
                rest: body,
            };
            let nonce = b.u64("nonce")?;
            b.finish()?;
            if kind == KIND_PING {
                Frame::Ping { nonce }
            } else {
                Frame::Pong { nonce }
            }
        }
        _ => unreachable!("kind_name accepted 0x{kind:02x} but decode_body has no arm"),
    })
}

/// Appends any frame, dispatching to the right encoder. Convenient for tests and clients.
pub fn encode_frame(out: &mut Vec<u8>, frame: &Frame<'_>) {
    match frame {
        Frame::Publish(p) => encode_publish(out, p),
        Frame::Data {
            header,
            topic,
            payload,
        } => encode_data(out, header, topic, payload),
        Frame::Ping { nonce } => encode_ping(out, *nonce),
        Frame::Pong { nonce } => encode_pong(out, *nonce),
        other => encode_control(out, other),
    }
}

/// The topic of an encoded DATA frame (as built by [`encode_data`]), without decoding the rest.
/// `None` if `frame` is not a well-formed DATA frame.
pub fn data_frame_topic(frame: &[u8]) -> Option<&str> {
    const TOPIC_LEN_AT: usize = FRAME_HEADER_BYTES + DATA_FIXED_BYTES - 2;
    if frame.get(LEN_PREFIX_BYTES) != Some(&KIND_DATA) {
        return None;
    }
    let len_bytes: [u8; 2] = frame.get(TOPIC_LEN_AT..TOPIC_LEN_AT + 2)?.try_into().ok()?;
    let start = TOPIC_LEN_AT + 2;
    let topic = frame.get(start..start + u16::from_le_bytes(len_bytes) as usize)?;
    std::str::from_utf8(topic).ok()
}

/// The sequence number of an encoded DATA frame, without decoding the rest. `None` if `frame`
/// is not a DATA frame.
pub fn data_frame_seq(frame: &[u8]) -> Option<u64> {
    if frame.get(LEN_PREFIX_BYTES) != Some(&KIND_DATA) {
        return None;
    }
    let seq = frame.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + 8)?;
    Some(u64::from_le_bytes(seq.try_into().ok()?))
}

/// Offset of the flags byte in an encoded DATA frame (length prefix included).
const DATA_FLAGS_AT: usize = FRAME_HEADER_BYTES + 8 + 8 + 8 + 1;

/// The flags of an encoded DATA frame. `None` if `frame` is not a DATA frame.
pub fn data_frame_flags(frame: &[u8]) -> Option<u8> {
    if frame.get(LEN_PREFIX_BYTES) != Some(&KIND_DATA) {
        return None;
    }
    frame.get(DATA_FLAGS_AT).copied()
}

/// A copy of an encoded DATA frame with `flags` replaced (e.g. to mark a retained value as
/// snapshot). `frame` must be a DATA frame.
pub fn data_frame_with_flags(frame: &[u8], flags: u8) -> Vec<u8> {
    let mut copy = frame.to_vec();
    copy[DATA_FLAGS_AT] = flags;
    copy
}
