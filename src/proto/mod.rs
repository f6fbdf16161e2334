//! The lanpush wire protocol: frames and the sans-IO codec.
//!
//! Every frame on the wire is
//!
//! ```text
//! u32 LE  len    number of bytes that follow (kind + body), 1 ..= max_frame_bytes
//! u8      kind   one of the `KIND_*` constants
//! ...     body   fixed little-endian header (PUBLISH, DATA, PING, PONG) or bincode 2 (control)
//! ```
//!
//! The hot-path frames (PUBLISH, DATA) have a fixed little-endian header so that the engine can
//! turn a PUBLISH into a DATA frame with one copy of the payload and no parsing library; control
//! frames (HELLO, SUBSCRIBE, ERROR, ...) use bincode 2 with its `standard()` configuration.
//! A DATA frame is self-contained: the same bytes can be written to any number of TCP
//! subscribers or packed into a UDP datagram.
//!
//! Nothing here touches a socket or reads a clock: encoders append to a caller-owned `Vec<u8>`,
//! [`decode_frame`] reads a byte slice and says how much it consumed. See `docs/PROTOCOL.md`.

mod codec;
mod frames;
#[cfg(test)]
mod tests;

pub use codec::{
    data_frame_flags, data_frame_seq, data_frame_shared, data_frame_topic, data_frame_total_len,
    data_frame_with_flags, decode_frame, encode_ack, encode_ack_request, encode_control,
    encode_data, encode_data_from_publish, encode_frame, encode_ping, encode_pong, encode_publish,
    encode_repair, frame_len_hint, DecodeError, Decoded,
};
pub use frames::{
    check_depth, error_code, hello_features, validate_pattern, validate_topic, DataHeader,
    DeliveryMode, Frame, Gap, Hello, PublishRef, SubAck, Subscribe, TopicError, TopicPosition,
    Unsubscribe, Welcome, WireError, DATA_FLAG_RESTORED, DATA_FLAG_SNAPSHOT,
};
pub use frames::{ChannelInfo, Channels, Mcast, Nak, StreamPos};

/// Protocol version spoken by this build; HELLO carries the client's, WELCOME the engine's.
pub const PROTOCOL_VERSION: u16 = 1;

/// `last_seq` of the *session marker*: a resume position with the empty topic and this
/// `last_seq` asks for the durable session of the HELLO's client id (docs/PROTOCOL.md §8).
pub const SESSION_MARKER_SEQ: u64 = u64::MAX;

/// Bytes of the length prefix.
pub const LEN_PREFIX_BYTES: usize = 4;
/// Bytes of the frame header: length prefix and kind.
pub const FRAME_HEADER_BYTES: usize = LEN_PREFIX_BYTES + 1;
/// Fixed part of a PUBLISH body: source_ts_ns u64, quality u8, topic_len u16.
pub const PUBLISH_FIXED_BYTES: usize = 8 + 1 + 2;
/// Fixed part of a DATA body: seq u64, source_ts_ns u64, ingest_ts_ns u64, quality u8, flags u8,
/// topic_len u16.
pub const DATA_FIXED_BYTES: usize = 8 + 8 + 8 + 1 + 1 + 2;
/// Body of ACK_REQUEST: publisher_id u64, next_seq u64.
pub const ACK_REQUEST_BYTES: usize = 8 + 8;
/// The largest topic the wire format can carry (its length is a u16).
pub const MAX_TOPIC_BYTES: usize = u16::MAX as usize;

pub const KIND_HELLO: u8 = 0x01;
pub const KIND_WELCOME: u8 = 0x02;
pub const KIND_SUBSCRIBE: u8 = 0x03;
pub const KIND_UNSUBSCRIBE: u8 = 0x04;
pub const KIND_SUBACK: u8 = 0x05;
pub const KIND_PUBLISH: u8 = 0x10;
pub const KIND_DATA: u8 = 0x11;
pub const KIND_ACK_REQUEST: u8 = 0x12;
pub const KIND_ACK: u8 = 0x13;
pub const KIND_PING: u8 = 0x20;
pub const KIND_PONG: u8 = 0x21;
pub const KIND_ERROR: u8 = 0x30;
pub const KIND_GAP: u8 = 0x31;
pub const KIND_STATS_REQUEST: u8 = 0x40;
pub const KIND_STATS: u8 = 0x41;
/// Multicast frames (docs/PROTOCOL.md §12), all in [`Frame::Multicast`].
pub const KIND_CHANNELS_REQUEST: u8 = 0x60;
pub const KIND_CHANNELS: u8 = 0x61;
pub const KIND_STREAM_POS: u8 = 0x62;
pub const KIND_NAK: u8 = 0x63;
pub const KIND_REPAIR: u8 = 0x64;
pub const KIND_REPAIR_GONE: u8 = 0x65;
