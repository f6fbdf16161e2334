//! Arbitrary bytes into `lanpush::ws::WsBridge`, after a valid upgrade request (or as the
//! request itself), fed whole and again in chunks of a size the first byte picks: the bridge
//! must never panic, must give the same inner bytes, events and transmit bytes however the
//! input is split, must hold no more than the message bound, and every whole text message must
//! go through the JSON translator without a panic.
#![no_main]

use lanpush::ws::{handshake::OriginPolicy, json::JsonSession, Event, WsBridge};
use libfuzzer_sys::fuzz_target;

const MAX_MESSAGE_BYTES: usize = 4096;

fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Vec<Event>, Vec<u8>, bool) {
    let mut b = WsBridge::new(
        OriginPolicy {
            allowed: vec!["http://ok".into()],
        },
        MAX_MESSAGE_BYTES,
    );
    let (mut inner, mut events, mut transmit) = (Vec::new(), Vec::new(), Vec::new());
    let mut json = JsonSession::new();
    for piece in input.chunks(chunk.max(1)) {
        b.handle_input(piece);
        inner.extend_from_slice(b.inner());
        let n = b.inner().len();
        b.consume_inner(n);
        while let Some(e) = b.poll_event() {
            if let Event::Message(text) = &e {
                assert!(text.len() <= MAX_MESSAGE_BYTES);
                let _ = json.handle_message(text, &mut Vec::new());
            }
            events.push(e);
        }
        b.take_transmit(&mut transmit);
    }
    (inner, events, transmit, b.is_closed())
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    if first & 0x80 == 0 {
        let proto = if first & 0x40 == 0 { "mqtt" } else { "lanpush.json.v1" };
        input.extend_from_slice(
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                 Origin: http://ok\r\nSec-WebSocket-Protocol: {proto}\r\n\r\n"
            )
            .as_bytes(),
        );
    }
    input.extend_from_slice(rest);
    let whole = run(&input, input.len());
    let chunked = run(&input, usize::from(first & 0x3f) + 1);
    assert_eq!(whole, chunked, "the result depends on how the input is split");
    assert!(whole.0.len() <= rest.len());
});
