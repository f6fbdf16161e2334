//! Reading the timestamps of an encoded DATA frame without decoding it.

use crate::proto::{
    DATA_FIXED_BYTES, DATA_FLAG_SNAPSHOT, FRAME_HEADER_BYTES, KIND_DATA, LEN_PREFIX_BYTES,
};

/// What [`crate::metrics::ShardMetrics::record_delivery`] needs from a DATA frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataStamp<'a> {
    pub topic: &'a str,
    pub ingest_ts_ns: u64,
    /// 0 when the source has no clock.
    pub source_ts_ns: u64,
}

const SOURCE_TS_AT: usize = FRAME_HEADER_BYTES + 8;
const INGEST_TS_AT: usize = SOURCE_TS_AT + 8;
const FLAGS_AT: usize = INGEST_TS_AT + 8 + 1;
const TOPIC_LEN_AT: usize = FRAME_HEADER_BYTES + DATA_FIXED_BYTES - 2;

/// The timestamps and topic of a live DATA frame as the outbox holds it (length prefix first).
///
/// `None` for every other frame (control frames, PING/PONG), for a malformed one, and for DATA
/// flagged snapshot: a retained value carries the ingest time of an older message, so its
/// latency would say how old the value is, not how fast the engine delivers. Frames replayed
/// from the ring to a subscriber that fell behind are the original frames and do count: their
/// latency is what that subscriber experienced.
pub fn data_frame_stamp(frame: &[u8]) -> Option<DataStamp<'_>> {
    if frame.get(LEN_PREFIX_BYTES) != Some(&KIND_DATA) {
        return None;
    }
    let header = frame.get(..TOPIC_LEN_AT + 2)?;
    if header[FLAGS_AT] & DATA_FLAG_SNAPSHOT != 0 {
        return None;
    }
    let u64_at = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    let topic_len = u16::from_le_bytes([header[TOPIC_LEN_AT], header[TOPIC_LEN_AT + 1]]) as usize;
    let topic = frame.get(TOPIC_LEN_AT + 2..TOPIC_LEN_AT + 2 + topic_len)?;
    Some(DataStamp {
        topic: std::str::from_utf8(topic).ok()?,
        ingest_ts_ns: u64_at(INGEST_TS_AT),
        source_ts_ns: u64_at(SOURCE_TS_AT),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{encode_data, encode_ping, DataHeader};

    fn data(flags: u8) -> Vec<u8> {
        let mut out = Vec::new();
        let header = DataHeader {
            seq: 7,
            source_ts_ns: 111,
            ingest_ts_ns: 222,
            quality: 192,
            flags,
        };
        encode_data(&mut out, &header, "plant/line1/temp", b"21.5");
        out
    }

    #[test]
    fn reads_a_live_data_frame() {
        let frame = data(0);
        assert_eq!(
            data_frame_stamp(&frame),
            Some(DataStamp {
                topic: "plant/line1/temp",
                ingest_ts_ns: 222,
                source_ts_ns: 111,
            })
        );
    }

    #[test]
    fn skips_snapshot_other_kinds_and_truncation() {
        assert_eq!(data_frame_stamp(&data(DATA_FLAG_SNAPSHOT)), None);
        let mut ping = Vec::new();
        encode_ping(&mut ping, 5);
        assert_eq!(data_frame_stamp(&ping), None);
        let frame = data(0);
        for cut in 0..FRAME_HEADER_BYTES + DATA_FIXED_BYTES + "plant/line1/temp".len() {
            assert_eq!(data_frame_stamp(&frame[..cut]), None, "cut at {cut}");
        }
    }
}
