//! The multicast datagram: a 32-byte header, then whole DATA frames back to back, exactly as
//! the engine writes them to TCP subscribers (docs/PROTOCOL.md §12).
//!
//! ```text
//! offset size
//!  0     2   magic "LP"
//!  2     1   version (1)
//!  3     1   flags: 1 heartbeat, 2 retransmission, 4 stub (the frame goes by TCP: NAK it)
//!  4     2   channel id (LE)
//!  6     2   stream: the owner reactor whose sequence this is (LE)
//!  8     8   engine id (WELCOME's; LE)
//! 16     8   datagram sequence (LE); a heartbeat carries the next one to be sent
//! 24     8   send timestamp, ns since the UNIX epoch (LE)
//! 32     ..  DATA frames, each with its 4-byte length prefix
//! ```

use crate::proto::{self, Decoded, Frame, KIND_DATA, LEN_PREFIX_BYTES};

pub const MAGIC: [u8; 2] = *b"LP";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 32;
/// A heartbeat: no frames; `seq` is the next datagram the stream will send.
pub const FLAG_HEARTBEAT: u8 = 1;
/// A retransmission answering NAKs.
pub const FLAG_RETRANSMIT: u8 = 2;
/// The datagram's one frame is larger than the channel's datagrams: only the header is
/// multicast, the receiver fetches the whole datagram by NAK over TCP.
pub const FLAG_STUB: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramHeader {
    pub flags: u8,
    pub channel: u16,
    pub stream: u16,
    pub engine_id: u64,
    pub seq: u64,
    pub send_ts_ns: u64,
}

impl DatagramHeader {
    /// Writes the header into the first [`HEADER_BYTES`] of `out`.
    pub fn write(&self, out: &mut [u8]) {
        out[0..2].copy_from_slice(&MAGIC);
        out[2] = VERSION;
        out[3] = self.flags;
        out[4..6].copy_from_slice(&self.channel.to_le_bytes());
        out[6..8].copy_from_slice(&self.stream.to_le_bytes());
        out[8..16].copy_from_slice(&self.engine_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.send_ts_ns.to_le_bytes());
    }
}

/// Why a datagram was ignored (counted by the receiver, never fatal: anyone can send UDP).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("datagram of {0} bytes is shorter than the 32-byte header")]
    Short(usize),
    #[error("bad magic or version")]
    BadMagic,
    #[error("frame {index} of the datagram is not a whole DATA frame")]
    BadFrame { index: usize },
}

/// A parsed datagram borrowing its bytes; `frames` holds whole, valid DATA frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramRef<'a> {
    pub header: DatagramHeader,
    pub frames: &'a [u8],
}

impl<'a> DatagramRef<'a> {
    /// The DATA frames, each with its length prefix (already validated by [`parse_datagram`]).
    pub fn frames(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut rest = self.frames;
        std::iter::from_fn(move || {
            let total = proto::frame_len_hint(rest)?;
            if total > rest.len() {
                return None;
            }
            let (frame, tail) = rest.split_at(total);
            rest = tail;
            Some(frame)
        })
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// Parses a datagram and checks that its body is whole DATA frames.
pub fn parse_datagram(bytes: &[u8]) -> Result<DatagramRef<'_>, DatagramError> {
    if bytes.len() < HEADER_BYTES {
        return Err(DatagramError::Short(bytes.len()));
    }
    if bytes[0..2] != MAGIC || bytes[2] != VERSION {
        return Err(DatagramError::BadMagic);
    }
    let header = DatagramHeader {
        flags: bytes[3],
        channel: u16_at(bytes, 4),
        stream: u16_at(bytes, 6),
        engine_id: u64_at(bytes, 8),
        seq: u64_at(bytes, 16),
        send_ts_ns: u64_at(bytes, 24),
    };
    let frames = &bytes[HEADER_BYTES..];
    let mut rest = frames;
    let mut index = 0;
    while !rest.is_empty() {
        let bad = DatagramError::BadFrame { index };
        if rest.len() <= LEN_PREFIX_BYTES || rest[LEN_PREFIX_BYTES] != KIND_DATA {
            return Err(bad);
        }
        match proto::decode_frame(rest, rest.len()) {
            Ok(Decoded::Frame(Frame::Data { .. }, used)) => rest = &rest[used..],
            _ => return Err(bad),
        }
        index += 1;
    }
    Ok(DatagramRef { header, frames })
}
