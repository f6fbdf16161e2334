//! Arbitrary bytes into `decode_frame`, read as a stream of frames the way a connection reads
//! them. Whatever decodes must re-encode to bytes that decode to the same frame; the decoder
//! must never panic, and must ask for more bytes only when it truly needs them.
#![no_main]

use lanpush::proto::{decode_frame, encode_frame, Decoded, FRAME_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the frame size limit, so the TooLarge path is reached too.
    let Some((&limit_byte, mut rest)) = data.split_first() else {
        return;
    };
    let max_frame_bytes = if limit_byte == 0 {
        usize::MAX
    } else {
        usize::from(limit_byte) * 4
    };
    loop {
        match decode_frame(rest, max_frame_bytes) {
            Ok(Decoded::Frame(frame, used)) => {
                assert!(used >= FRAME_HEADER_BYTES && used <= rest.len());
                // One byte short of a whole frame is a valid prefix.
                assert_eq!(
                    decode_frame(&rest[..used - 1], max_frame_bytes),
                    Ok(Decoded::NeedMore(1))
                );
                let mut again = Vec::new();
                encode_frame(&mut again, &frame);
                match decode_frame(&again, usize::MAX) {
                    Ok(Decoded::Frame(same, n)) => {
                        assert_eq!(same, frame);
                        assert_eq!(n, again.len());
                    }
                    other => panic!("re-encoded {frame:?} decodes as {other:?}"),
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
