//! Arbitrary datagrams (anyone on the segment can send UDP to a group) into a multicast
//! receiver, interleaved with stream positions, REPAIR_GONE ranges and NAK polls: it must
//! never panic, and what it holds must stay bounded.
#![no_main]

use std::time::{Duration, Instant};

use lanpush::mcast::{McastReceiver, ReceiverConfig, HEADER_BYTES};
use lanpush::proto::{Nak, StreamPos};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let mut r = McastReceiver::new(ReceiverConfig {
        // The engine id the fuzzer's headers most easily hit: bytes 8..16 all zero.
        engine_id: 0,
        nak_delay: Duration::from_millis(5),
        nak_retry: Duration::from_millis(60),
        repair: data.first().is_some_and(|b| b & 1 == 0),
        max_buffered: 64,
        seed: 1,
    });
    r.add_pattern("#");
    r.hold();
    let mut naks = Vec::new();
    // Records: a 2-byte length, then that many bytes; the first byte of each picks an action.
    let mut rest = data.get(1..).unwrap_or_default();
    let mut t = now;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % 2048;
        rest = &rest[2..];
        let take = len.min(rest.len());
        let (record, tail) = rest.split_at(take);
        rest = tail;
        let Some((&op, body)) = record.split_first() else {
            continue;
        };
        let num = |at: usize| -> u64 {
            let mut v = [0u8; 8];
            for (i, b) in body.iter().skip(at).take(8).enumerate() {
                v[i] = *b;
            }
            u64::from_le_bytes(v)
        };
        match op % 6 {
            0 | 1 => r.handle_datagram(t, body, op % 6 == 1),
            2 => r.handle_stream_pos(
                t,
                StreamPos {
                    channel: (num(0) & 3) as u16,
                    stream: (num(2) & 3) as u16,
                    next_seq: num(4),
                },
            ),
            3 => r.handle_gone(Nak {
                channel: (num(0) & 3) as u16,
                stream: (num(2) & 3) as u16,
                from_seq: num(4),
                count: (num(12) & 0xFFFF) as u32,
            }),
            4 => r.unhold(),
            _ => {
                t += Duration::from_millis(num(0) & 255);
                naks.clear();
                r.poll_naks(t, &mut naks);
            }
        }
        while r.poll_event().is_some() {}
        // Four streams at most (channel, stream & 3), each bounded.
        assert!(r.missing() <= 4 * 16_384 + 64, "missing {}", r.missing());
    }
    let _ = HEADER_BYTES;
});
