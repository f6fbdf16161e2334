//! Arbitrary bytes into `lanpush::mqtt::decode_packet`, read as a stream of packets the way the
//! MQTT listener reads a connection. The decoder must never panic, must ask for more bytes only
//! when it truly needs them, and whatever decodes must re-encode to bytes that decode to the
//! same packet.
#![no_main]

use lanpush::mqtt::{decode_packet, encode_packet, Decoded};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the remaining-length limit, so the TooLarge path is reached too.
    let Some((&limit_byte, mut rest)) = data.split_first() else {
        return;
    };
    let max_remaining_bytes = if limit_byte == 0 {
        usize::MAX
    } else {
        usize::from(limit_byte) * 4
    };
    loop {
        match decode_packet(rest, max_remaining_bytes) {
            Ok(Decoded::Packet(packet, used)) => {
                assert!(used >= 2 && used <= rest.len());
                // One byte short of a whole packet is a valid prefix.
                assert_eq!(
                    decode_packet(&rest[..used - 1], max_remaining_bytes),
                    Ok(Decoded::NeedMore(1))
                );
                let mut again = Vec::new();
                encode_packet(&mut again, &packet);
                match decode_packet(&again, usize::MAX) {
                    Ok(Decoded::Packet(same, n)) => {
                        assert_eq!(same, packet);
                        assert_eq!(n, again.len());
                    }
                    other => panic!("re-encoded {packet:?} decodes as {other:?}"),
                }
                rest = &rest[used..];
            }
            Ok(Decoded::NeedMore(n)) => {
                assert!(n > 0);
                break;
            }
            Err(_) => break,
        }
    }
});
