//! Codec tests: golden wire bytes, roundtrips, streaming, prefixes and typed rejections.

use proptest::prelude::*;

use super::*;

/// A generous limit for tests that are not about the limit.
const MAX: usize = 1 << 20;

fn encoded(frame: &Frame<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(&mut out, frame);
    out
}

fn decode_whole(bytes: &[u8]) -> Frame<'_> {
    match decode_frame(bytes, MAX) {
        Ok(Decoded::Frame(frame, used)) => {
            assert_eq!(used, bytes.len(), "the frame uses every byte");
            frame
        }
        other => panic!("expected a whole frame, got {other:?}"),
    }
}

fn hello() -> Hello {
    Hello {
        version: 1,
        client_id: "plc-gw-7".into(),
        keepalive_ms: 10_000,
        token: String::new(),
        features: 0,
    }
}

fn assert_malformed(bytes: &[u8], kind: &str) {
    match decode_frame(bytes, MAX) {
        Err(DecodeError::Malformed { kind: k, .. }) if k == kind => {}
        other => panic!("expected Malformed {kind}, got {other:?}"),
    }
}

/// Wraps a body in a frame header: `len` covers the kind byte and the body.
fn frame_bytes(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

// ---------------------------------------------------------------------------------------------
// Golden wire bytes: written by hand from the layout in docs/PROTOCOL.md. If one of these
// fails, the wire format changed: every client breaks.

#[test]
fn golden_publish() {
    let publish = PublishRef {
        topic: "a/b",
        source_ts_ns: 0x0102_0304_0506_0708,
        quality: 192,
        payload: &[0xde, 0xad],
    };
    #[rustfmt::skip]
    let expected = [
        0x11, 0x00, 0x00, 0x00,                         // len 17 = kind + 16 body bytes
        0x10,                                           // kind PUBLISH
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // source_ts_ns u64 LE
        0xc0,                                           // quality 192
        0x03, 0x00,                                     // topic_len u16 LE
        b'a', b'/', b'b',                               // topic
        0xde, 0xad,                                     // payload: the rest of the frame
    ];
    let bytes = encoded(&Frame::Publish(publish));
    assert_eq!(bytes, expected);
    assert_eq!(decode_whole(&expected), Frame::Publish(publish));
}

#[test]
fn golden_data() {
    let header = DataHeader {
        seq: 1,
        source_ts_ns: 0x0102_0304_0506_0708,
        ingest_ts_ns: 0x1112_1314_1516_1718,
        quality: 192,
        flags: DATA_FLAG_SNAPSHOT,
    };
    let frame = Frame::Data {
        header,
        topic: "a/b",
        payload: &[0x2a],
    };
    #[rustfmt::skip]
    let expected = [
        0x21, 0x00, 0x00, 0x00,                         // len 33 = kind + 32 body bytes
        0x11,                                           // kind DATA
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // seq u64 LE
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // source_ts_ns u64 LE
        0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11, // ingest_ts_ns u64 LE
        0xc0,                                           // quality
        0x01,                                           // flags: SNAPSHOT
        0x03, 0x00,                                     // topic_len u16 LE
        b'a', b'/', b'b',                               // topic
        0x2a,                                           // payload
    ];
    assert_eq!(encoded(&frame), expected);
    assert_eq!(decode_whole(&expected), frame);

    // The engine's PUBLISH → DATA path yields the same bytes.
    let mut from_publish = Vec::new();
    let publish = PublishRef {
        topic: "a/b",
        source_ts_ns: header.source_ts_ns,
        quality: 192,
        payload: &[0x2a],
    };
    encode_data_from_publish(
        &mut from_publish,
        &publish,
        1,
        header.ingest_ts_ns,
        DATA_FLAG_SNAPSHOT,
    );
    assert_eq!(from_publish, expected);
}

#[test]
fn golden_ping_and_pong() {
    #[rustfmt::skip]
    let ping = [
        0x09, 0x00, 0x00, 0x00,                         // len 9
        0x20,                                           // kind PING
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // nonce u64 LE
    ];
    let nonce = 0x1122_3344_5566_7788;
    assert_eq!(encoded(&Frame::Ping { nonce }), ping);
    assert_eq!(decode_whole(&ping), Frame::Ping { nonce });
    let mut pong = ping;
    pong[4] = 0x21;
    assert_eq!(encoded(&Frame::Pong { nonce }), pong);
    assert_eq!(decode_whole(&pong), Frame::Pong { nonce });
}

#[test]
fn golden_hello() {
    #[rustfmt::skip]
    let expected = [
        0x0e, 0x00, 0x00, 0x00,                         // len 14
        0x01,                                           // kind HELLO
        0x01,                                           // version 1: varint, one byte (< 251)
        0x08,                                           // client_id length 8: varint
        b'p', b'l', b'c', b'-', b'g', b'w', b'-', b'7', // client_id UTF-8
        0xfb, 0x10, 0x27,                               // keepalive_ms 10000: 251, then u16 LE
    ];
    let frame = Frame::Hello(hello());
    assert_eq!(encoded(&frame), expected);
    assert_eq!(decode_whole(&expected), frame);
}

#[test]
fn golden_hello_with_token() {
    #[rustfmt::skip]
    let expected = [
        0x17, 0x00, 0x00, 0x00,                         // len 23
        0x01,                                           // kind HELLO
        0x01,                                           // version 1
        0x08,                                           // client_id length 8
        b'p', b'l', b'c', b'-', b'g', b'w', b'-', b'7', // client_id
        0xfb, 0x10, 0x27,                               // keepalive_ms 10000
        0x08,                                           // token length 8: the optional field
        b'o', b'p', b':', b'o', b'p', b'-', b'p', b'w', // token "op:op-pw"
    ];
    let frame = Frame::Hello(Hello {
        token: "op:op-pw".into(),
        ..hello()
    });
    assert_eq!(encoded(&frame), expected);
    assert_eq!(decode_whole(&expected), frame);
    // Fed one byte at a time, a prefix ending after keepalive_ms is only a prefix.
    for cut in 1..expected.len() {
        assert!(matches!(
            decode_frame(&expected[..cut], MAX),
            Ok(Decoded::NeedMore(_))
        ));
    }
    assert!(
        !format!("{frame:?}").contains("op-pw"),
        "Debug hides the token"
    );
}

#[test]
fn golden_hello_with_features() {
    // Features without a token: the token is written empty so that features can follow.
    #[rustfmt::skip]
    let expected = [
        0x10, 0x00, 0x00, 0x00,                         // len 16
        0x01,                                           // kind HELLO
        0x01,                                           // version 1
        0x08,                                           // client_id length 8
        b'p', b'l', b'c', b'-', b'g', b'w', b'-', b'7', // client_id
        0xfb, 0x10, 0x27,                               // keepalive_ms 10000
        0x00,                                           // token length 0: none
        0x01,                                           // features: ENGINE_VERSION
    ];
    let frame = Frame::Hello(Hello {
        features: hello_features::ENGINE_VERSION,
        ..hello()
    });
    assert_eq!(encoded(&frame), expected);
    assert_eq!(decode_whole(&expected), frame);
}

#[test]
fn golden_welcome_with_and_without_the_engine_version() {
    #[rustfmt::skip]
    let plain = [
        0x10, 0x00, 0x00, 0x00,       // len 16
        0x02,                         // kind WELCOME
        0x01,                         // version 1
        0xfb, 0x10, 0x27,             // keepalive_ms 10000
        0xfc, 0x00, 0x00, 0x10, 0x00, // max_frame_bytes 1048576: 252, then u32 LE
        0xfb, 0xe8, 0x03,             // max_subscriptions 1000
        0x01,                         // reactor 1
        0x07,                         // connection_id 7
        0x2a,                         // engine_id 42
    ];
    let welcome = Welcome {
        version: 1,
        keepalive_ms: 10_000,
        max_frame_bytes: 1 << 20,
        max_subscriptions: 1000,
        reactor: 1,
        connection_id: 7,
        engine_id: 42,
        engine_version: String::new(),
    };
    assert_eq!(encoded(&Frame::Welcome(welcome.clone())), plain);
    assert_eq!(decode_whole(&plain), Frame::Welcome(welcome.clone()));
    // Asked for by HELLO: the version follows as one more String.
    let mut with = plain.to_vec();
    with.extend_from_slice(&[0x05, b'0', b'.', b'1', b'.', b'0']);
    with[0] += 6;
    let welcome = Welcome {
        engine_version: "0.1.0".into(),
        ..welcome
    };
    assert_eq!(encoded(&Frame::Welcome(welcome.clone())), with);
    assert_eq!(decode_whole(&with), Frame::Welcome(welcome));
}

#[test]
fn golden_subscribe() {
    let frame = Frame::Subscribe(Subscribe {
        sub_id: 7,
        pattern: "p/#".into(),
        mode: DeliveryMode::Latest,
        resume: vec![TopicPosition {
            topic: "p/t".into(),
            last_seq: 300,
        }],
    });
    #[rustfmt::skip]
    let expected = [
        0x0f, 0x00, 0x00, 0x00,  // len 15
        0x03,                    // kind SUBSCRIBE
        0x07,                    // sub_id 7
        0x03, b'p', b'/', b'#',  // pattern
        0x02,                    // mode: variant index 2 = Latest
        0x01,                    // resume: 1 element
        0x03, b'p', b'/', b't',  //   topic
        0xfb, 0x2c, 0x01,        //   last_seq 300: 251, then u16 LE
    ];
    assert_eq!(encoded(&frame), expected);
    assert_eq!(decode_whole(&expected), frame);
}

#[test]
fn golden_ack_request_and_ack() {
    // docs/PROTOCOL.md §3: publisher 0x0102030405060708, next PUBLISH is message 42.
    let request = Frame::AckRequest {
        publisher_id: 0x0102_0304_0506_0708,
        next_seq: 42,
    };
    #[rustfmt::skip]
    let expected = [
        0x11, 0x00, 0x00, 0x00,                          // len 17
        0x12,                                            // kind ACK_REQUEST
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01,  // publisher_id
        0x2a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,  // next_seq 42
    ];
    assert_eq!(encoded(&request), expected);
    assert_eq!(decode_whole(&expected), request);
    let ack = Frame::Ack { seq: 0x1234 };
    let expected = [0x09, 0x00, 0x00, 0x00, 0x13, 0x34, 0x12, 0, 0, 0, 0, 0, 0];
    assert_eq!(encoded(&ack), expected);
    assert_eq!(decode_whole(&expected), ack);
    // Fixed layouts: a byte short or a byte over is malformed.
    for bad in [
        &[0x08, 0, 0, 0, 0x13, 1, 0, 0, 0, 0, 0, 0][..],
        &[0x0a, 0, 0, 0, 0x13, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert!(matches!(
            decode_frame(bad, 1 << 20),
            Err(DecodeError::Malformed { kind: "ACK", .. })
        ));
    }
}

#[test]
fn golden_stats_request_and_stats() {
    assert_eq!(
        encoded(&Frame::StatsRequest),
        [0x01, 0x00, 0x00, 0x00, 0x40]
    );
    // STATS carries its JSON as a bincode string: varint length, then UTF-8.
    assert_eq!(
        encoded(&Frame::Stats("{}".into())),
        [0x04, 0x00, 0x00, 0x00, 0x41, 0x02, b'{', b'}']
    );
}

#[test]
fn bincode_varint_forms_are_the_documented_ones() {
    // The integer encoding docs/PROTOCOL.md promises to non-Rust clients.
    let cases: [(u64, &[u8]); 7] = [
        (0, &[0x00]),
        (250, &[0xfa]),
        (251, &[0xfb, 0xfb, 0x00]),
        (0xffff, &[0xfb, 0xff, 0xff]),
        (0x1_0000, &[0xfc, 0x00, 0x00, 0x01, 0x00]),
        (0xffff_ffff, &[0xfc, 0xff, 0xff, 0xff, 0xff]),
        (
            0x1_0000_0000,
            &[0xfd, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00],
        ),
    ];
    for (value, bytes) in cases {
        let gap = Frame::Gap(Gap {
            topic: String::new(),
            from_seq: value,
            to_seq: 0,
        });
        let mut expected = vec![0x00]; // empty topic
        expected.extend_from_slice(bytes);
        expected.push(0x00); // to_seq 0
        assert_eq!(encoded(&gap)[FRAME_HEADER_BYTES..], expected, "{value}");
    }
}

// ---------------------------------------------------------------------------------------------
// Typed rejections.

#[test]
fn length_zero_is_empty() {
    assert_eq!(decode_frame(&[0, 0, 0, 0], MAX), Err(DecodeError::Empty));
    assert_eq!(
        decode_frame(&[0, 0, 0, 0, 0x20], MAX),
        Err(DecodeError::Empty)
    );
}

#[test]
fn oversized_length_is_refused_from_the_prefix_alone() {
    let max = 64;
    let prefix = 65u32.to_le_bytes();
    assert_eq!(
        decode_frame(&prefix, max),
        Err(DecodeError::TooLarge { len: 65, max })
    );
    assert_eq!(
        decode_frame(&u32::MAX.to_le_bytes(), max),
        Err(DecodeError::TooLarge {
            len: u32::MAX as usize,
            max
        })
    );
    assert_eq!(
        DecodeError::TooLarge { len: 65, max }.code(),
        error_code::FRAME_TOO_LARGE
    );
    // Exactly the limit is fine: the decoder asks for the rest.
    assert_eq!(
        decode_frame(&64u32.to_le_bytes(), max),
        Ok(Decoded::NeedMore(64))
    );
}

#[test]
fn unknown_kind_is_refused_as_soon_as_the_kind_byte_arrives() {
    for kind in [0x00, 0x06, 0x14, 0x22, 0x32, 0x42, 0xff] {
        let whole = frame_bytes(kind, &[1, 2, 3]);
        assert_eq!(
            decode_frame(&whole[..FRAME_HEADER_BYTES], MAX),
            Err(DecodeError::UnknownKind(kind))
        );
        assert_eq!(
            decode_frame(&whole, MAX),
            Err(DecodeError::UnknownKind(kind))
        );
        assert_eq!(DecodeError::UnknownKind(kind).code(), error_code::MALFORMED);
    }
}

#[test]
fn truncated_publish_body_is_malformed() {
    // Each cut leaves a body shorter than the fixed header, but the length prefix says the
    // frame is complete: the body itself is short, not the buffer.
    let whole = encoded(&Frame::Publish(PublishRef {
        topic: "a/b",
        source_ts_ns: 1,
        quality: 2,
        payload: &[],
    }));
    for body_len in 0..PUBLISH_FIXED_BYTES {
        let body = &whole[FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + body_len];
        assert_malformed(&frame_bytes(KIND_PUBLISH, body), "PUBLISH");
    }
}

#[test]
fn topic_length_past_the_end_is_malformed() {
    let mut body = Vec::new();
    body.extend_from_slice(&7u64.to_le_bytes());
    body.push(192);
    body.extend_from_slice(&10u16.to_le_bytes());
    body.extend_from_slice(b"short");
    assert_malformed(&frame_bytes(KIND_PUBLISH, &body), "PUBLISH");

    let mut data_body = vec![0u8; DATA_FIXED_BYTES - 2];
    data_body.extend_from_slice(&u16::MAX.to_le_bytes());
    data_body.extend_from_slice(b"abc");
    assert_malformed(&frame_bytes(KIND_DATA, &data_body), "DATA");
}

#[test]
fn non_utf8_topic_is_malformed() {
    let mut body = Vec::new();
    body.extend_from_slice(&7u64.to_le_bytes());
    body.push(192);
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(&[0xc3, 0x28]);
    assert_malformed(&frame_bytes(KIND_PUBLISH, &body), "PUBLISH");

    let mut data_body = vec![0u8; DATA_FIXED_BYTES - 2];
    data_body.extend_from_slice(&1u16.to_le_bytes());
    data_body.push(0xff);
    assert_malformed(&frame_bytes(KIND_DATA, &data_body), "DATA");
}

#[test]
fn trailing_bytes_are_malformed() {
    let mut ping = encoded(&Frame::Ping { nonce: 5 });
    ping.push(0);
    ping[0] += 1;
    assert_malformed(&ping, "PING");

    let mut pong = encoded(&Frame::Pong { nonce: 5 });
    pong.truncate(pong.len() - 1);
    pong[0] -= 1;
    assert_malformed(&pong, "PONG");

    // HELLO's optional fields (an empty token, features 0), then one byte too many.
    let mut hello = encoded(&Frame::Hello(hello()));
    hello.extend_from_slice(&[0, 0, 0]);
    hello[0] += 3;
    assert_malformed(&hello, "HELLO");

    assert_malformed(&frame_bytes(KIND_STATS_REQUEST, &[0]), "STATS_REQUEST");
}

#[test]
fn bad_control_bodies_are_malformed() {
    // Unknown DeliveryMode variant.
    assert_malformed(
        &frame_bytes(KIND_SUBSCRIBE, &[1, 1, b'a', 9, 0]),
        "SUBSCRIBE",
    );
    // Non-UTF-8 string.
    assert_malformed(&frame_bytes(KIND_HELLO, &[1, 1, 0xff, 0]), "HELLO");
    // A u16 field given in the u32 varint form.
    assert_malformed(&frame_bytes(KIND_HELLO, &[0xfc, 1, 0, 0, 0, 0, 0]), "HELLO");
    // Truncated.
    assert_malformed(&frame_bytes(KIND_WELCOME, &[1]), "WELCOME");
}

#[test]
fn hostile_lengths_in_control_bodies_are_refused_without_allocating_them() {
    // A HELLO of 14 bytes that claims a client_id of 2^40, 2^62 or 2^64-1 bytes, and a
    // SUBSCRIBE that claims 2^40 resume positions: bincode must refuse the length against the
    // body's size instead of allocating it (which aborts or panics the engine).
    for len in [1u64 << 40, 1 << 62, u64::MAX] {
        let mut body = vec![0x01, 0xfd];
        body.extend_from_slice(&len.to_le_bytes());
        body.push(0);
        assert_malformed(&frame_bytes(KIND_HELLO, &body), "HELLO");
    }
    let mut body = vec![0x01, 0x01, b'a', 0x00, 0xfd];
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    assert_malformed(&frame_bytes(KIND_SUBSCRIBE, &body), "SUBSCRIBE");
    // What `fuzz/` found in under a second before the fix: a SUBSCRIBE whose pattern length
    // reads as 0x7003_0102_232f_707d.
    #[rustfmt::skip]
    let found = [
        0x0f, 0x00, 0x00, 0x00, 0x03, 0x07, 0xfd, 0x7d, 0x70, 0x2f, 0x23, 0x02, 0x01, 0x03,
        0x70, 0x2f, 0x74, 0xfb, 0x2c, 0x01,
    ];
    assert_malformed(&found, "SUBSCRIBE");
}

#[test]
fn large_legitimate_control_frames_still_decode() {
    // The allocation bound must not refuse real frames: many resume positions (the worst
    // claim-to-wire ratio) and a long STATS document.
    let resume = (0..50_000)
        .map(|i| TopicPosition {
            topic: String::new(),
            last_seq: i % 3,
        })
        .collect();
    let subscribe = Frame::Subscribe(Subscribe {
        sub_id: 1,
        pattern: "#".into(),
        mode: DeliveryMode::All,
        resume,
    });
    let bytes = encoded(&subscribe);
    assert_eq!(
        decode_frame(&bytes, MAX),
        Ok(Decoded::Frame(subscribe, bytes.len()))
    );

    let stats = Frame::Stats("x".repeat(300_000));
    let bytes = encoded(&stats);
    assert_eq!(
        decode_frame(&bytes, MAX),
        Ok(Decoded::Frame(stats, bytes.len()))
    );
}

#[test]
fn validate_topic_cases() {
    let max = 16;
    for ok in ["a", "a/b", "a//b", "/", "/a/", "é/ü"] {
        assert_eq!(validate_topic(ok, max), Ok(()), "{ok}");
    }
    assert_eq!(validate_topic("", max), Err(TopicError::Empty));
    assert_eq!(
        validate_topic("a/bcdefghijklmnop", max),
        Err(TopicError::TooLong { len: 17, max })
    );
    assert_eq!(validate_topic("a\0b", max), Err(TopicError::Nul));
    for bad in ["a/+", "#", "a/b#", "+"] {
        assert_eq!(
            validate_topic(bad, max),
            Err(TopicError::WildcardInTopic),
            "{bad}"
        );
    }
}

#[test]
fn validate_pattern_cases() {
    let max = 16;
    for ok in ["a", "#", "+", "a/#", "+/+", "a/+/b", "/#", "+/#", "a//+"] {
        assert_eq!(validate_pattern(ok, max), Ok(()), "{ok}");
    }
    assert_eq!(validate_pattern("", max), Err(TopicError::Empty));
    assert_eq!(
        validate_pattern("a/bcdefghijklmnop", max),
        Err(TopicError::TooLong { len: 17, max })
    );
    assert_eq!(validate_pattern("a/\0", max), Err(TopicError::Nul));
    assert_eq!(
        validate_pattern("a/b+", max),
        Err(TopicError::WildcardNotWholeLevel('+'))
    );
    assert_eq!(
        validate_pattern("a#", max),
        Err(TopicError::WildcardNotWholeLevel('#'))
    );
    assert_eq!(
        validate_pattern("++", max),
        Err(TopicError::WildcardNotWholeLevel('+'))
    );
    assert_eq!(validate_pattern("#/a", max), Err(TopicError::HashNotLast));
    assert_eq!(validate_pattern("a/#/#", max), Err(TopicError::HashNotLast));
}

// ---------------------------------------------------------------------------------------------
// Properties.

/// A frame that owns its bytes, so that a strategy can produce it; [`Owned::frame`] borrows it.
#[derive(Debug, Clone, PartialEq)]
enum Owned {
    /// Every variant without borrowed fields.
    Plain(Frame<'static>),
    /// REPAIR, the one multicast frame that borrows.
    Repair(Vec<u8>),
    Publish {
        topic: String,
        source_ts_ns: u64,
        quality: u8,
        payload: Vec<u8>,
    },
    Data {
        header: DataHeader,
        topic: String,
        payload: Vec<u8>,
    },
}

impl Owned {
    fn frame(&self) -> Frame<'_> {
        match self {
            Owned::Plain(frame) => frame.clone(),
            Owned::Publish {
                topic,
                source_ts_ns,
                quality,
                payload,
            } => Frame::Publish(PublishRef {
                topic,
                source_ts_ns: *source_ts_ns,
                quality: *quality,
                payload,
            }),
            Owned::Data {
                header,
                topic,
                payload,
            } => Frame::Data {
                header: *header,
                topic,
                payload,
            },
            Owned::Repair(d) => Frame::Multicast(Mcast::Repair(d)),
        }
    }

    fn of(frame: &Frame<'_>) -> Owned {
        match frame {
            Frame::Publish(p) => Owned::Publish {
                topic: p.topic.into(),
                source_ts_ns: p.source_ts_ns,
                quality: p.quality,
                payload: p.payload.into(),
            },
            Frame::Data {
                header,
                topic,
                payload,
            } => Owned::Data {
                header: *header,
                topic: (*topic).into(),
                payload: payload.to_vec(),
            },
            Frame::Hello(v) => Owned::Plain(Frame::Hello(v.clone())),
            Frame::Welcome(v) => Owned::Plain(Frame::Welcome(v.clone())),
            Frame::Subscribe(v) => Owned::Plain(Frame::Subscribe(v.clone())),
            Frame::Unsubscribe(v) => Owned::Plain(Frame::Unsubscribe(v.clone())),
            Frame::SubAck(v) => Owned::Plain(Frame::SubAck(v.clone())),
            Frame::Ping { nonce } => Owned::Plain(Frame::Ping { nonce: *nonce }),
            Frame::Pong { nonce } => Owned::Plain(Frame::Pong { nonce: *nonce }),
            Frame::AckRequest {
                publisher_id,
                next_seq,
            } => Owned::Plain(Frame::AckRequest {
                publisher_id: *publisher_id,
                next_seq: *next_seq,
            }),
            Frame::Ack { seq } => Owned::Plain(Frame::Ack { seq: *seq }),
            Frame::Error(v) => Owned::Plain(Frame::Error(v.clone())),
            Frame::Gap(v) => Owned::Plain(Frame::Gap(v.clone())),
            Frame::StatsRequest => Owned::Plain(Frame::StatsRequest),
            Frame::Stats(v) => Owned::Plain(Frame::Stats(v.clone())),
            Frame::Multicast(m) => match m {
                Mcast::Repair(d) => Owned::Repair(d.to_vec()),
                Mcast::ChannelsRequest => Owned::Plain(Frame::Multicast(Mcast::ChannelsRequest)),
                Mcast::Channels(c) => Owned::Plain(Frame::Multicast(Mcast::Channels(c.clone()))),
                Mcast::StreamPos(p) => Owned::Plain(Frame::Multicast(Mcast::StreamPos(*p))),
                Mcast::Nak(n) => Owned::Plain(Frame::Multicast(Mcast::Nak(*n))),
                Mcast::RepairGone(n) => Owned::Plain(Frame::Multicast(Mcast::RepairGone(*n))),
            },
        }
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof!["[a-z/+#]{0,12}", any::<String>(), Just(String::new()),]
}

fn mode() -> impl Strategy<Value = DeliveryMode> {
    prop::sample::select(vec![
        DeliveryMode::Default,
        DeliveryMode::All,
        DeliveryMode::Latest,
        DeliveryMode::Disconnect,
    ])
}

fn data_header() -> impl Strategy<Value = DataHeader> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u8>(),
        any::<u8>(),
    )
        .prop_map(
            |(seq, source_ts_ns, ingest_ts_ns, quality, flags)| DataHeader {
                seq,
                source_ts_ns,
                ingest_ts_ns,
                quality,
                flags,
            },
        )
}

fn payload() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..64)
}

/// Every frame kind, with field values across their whole ranges (varint boundaries included,
/// since `any::<u64>()` favours edge values).
fn any_frame() -> impl Strategy<Value = Owned> {
    let plain = prop_oneof![
        (any::<u16>(), text(), any::<u32>(), text(), any::<u32>()).prop_map(
            |(version, client_id, keepalive_ms, token, features)| {
                Frame::Hello(Hello {
                    version,
                    client_id,
                    keepalive_ms,
                    token,
                    features,
                })
            }
        ),
        (
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            text()
        )
            .prop_map(
                |(
                    version,
                    keepalive_ms,
                    max_frame_bytes,
                    max_subscriptions,
                    reactor,
                    connection_id,
                    engine_id,
                    engine_version,
                )| {
                    Frame::Welcome(Welcome {
                        version,
                        keepalive_ms,
                        max_frame_bytes,
                        max_subscriptions,
                        reactor,
                        connection_id,
                        engine_id,
                        engine_version,
                    })
                }
            ),
        (
            any::<u32>(),
            text(),
            mode(),
            prop::collection::vec((text(), any::<u64>()), 0..4)
        )
            .prop_map(|(sub_id, pattern, mode, resume)| {
                Frame::Subscribe(Subscribe {
                    sub_id,
                    pattern,
                    mode,
                    resume: resume
                        .into_iter()
                        .map(|(topic, last_seq)| TopicPosition { topic, last_seq })
                        .collect(),
                })
            }),
        any::<u32>().prop_map(|sub_id| Frame::Unsubscribe(Unsubscribe { sub_id })),
        (any::<u32>(), mode()).prop_map(|(sub_id, mode)| Frame::SubAck(SubAck { sub_id, mode })),
        any::<u64>().prop_map(|nonce| Frame::Ping { nonce }),
        any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
        (any::<u64>(), any::<u64>()).prop_map(|(publisher_id, next_seq)| Frame::AckRequest {
            publisher_id,
            next_seq
        }),
        any::<u64>().prop_map(|seq| Frame::Ack { seq }),
        (any::<u16>(), text()).prop_map(|(code, reason)| Frame::Error(WireError { code, reason })),
        (text(), any::<u64>(), any::<u64>()).prop_map(|(topic, from_seq, to_seq)| {
            Frame::Gap(Gap {
                topic,
                from_seq,
                to_seq,
            })
        }),
        Just(Frame::StatsRequest),
        text().prop_map(Frame::Stats),
        Just(Frame::Multicast(Mcast::ChannelsRequest)),
        (
            any::<u16>(),
            text(),
            any::<u16>(),
            prop::collection::vec(text(), 0..3),
            any::<u32>()
        )
            .prop_map(|(id, group, port, patterns, datagram_bytes)| {
                Frame::Multicast(Mcast::Channels(Channels {
                    channels: vec![ChannelInfo {
                        id,
                        group,
                        port,
                        patterns,
                        datagram_bytes,
                    }],
                }))
            }),
        (any::<u16>(), any::<u16>(), any::<u64>()).prop_map(|(channel, stream, next_seq)| {
            Frame::Multicast(Mcast::StreamPos(StreamPos {
                channel,
                stream,
                next_seq,
            }))
        }),
        (
            any::<u16>(),
            any::<u16>(),
            any::<u64>(),
            any::<u32>(),
            any::<bool>()
        )
            .prop_map(|(channel, stream, from_seq, count, gone)| {
                let nak = Nak {
                    channel,
                    stream,
                    from_seq,
                    count,
                };
                Frame::Multicast(if gone {
                    Mcast::RepairGone(nak)
                } else {
                    Mcast::Nak(nak)
                })
            }),
    ];
    prop_oneof![
        3 => plain.prop_map(Owned::Plain),
        1 => payload().prop_map(Owned::Repair),
        2 => (text(), any::<u64>(), any::<u8>(), payload()).prop_map(
            |(topic, source_ts_ns, quality, payload)| Owned::Publish {
                topic,
                source_ts_ns,
                quality,
                payload,
            }
        ),
        2 => (data_header(), text(), payload()).prop_map(|(header, topic, payload)| Owned::Data {
            header,
            topic,
            payload,
        }),
    ]
}

/// The decode loop a reader runs: append what arrived, decode whole frames off the front.
/// Checks every `NeedMore` against the bytes still to come.
fn decode_stream(stream: &[u8], chunk_sizes: impl Iterator<Item = usize>) -> Vec<Owned> {
    let mut pending = Vec::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    for size in chunk_sizes {
        if fed == stream.len() {
            break;
        }
        let end = (fed + size.max(1)).min(stream.len());
        pending.extend_from_slice(&stream[fed..end]);
        fed = end;
        loop {
            match decode_frame(&pending, MAX).expect("a valid stream decodes") {
                Decoded::Frame(frame, used) => {
                    frames.push(Owned::of(&frame));
                    pending.drain(..used);
                }
                Decoded::NeedMore(n) => {
                    assert!(n > 0);
                    // Mid-frame, the decoder never asks for more than the frame still has.
                    if !pending.is_empty() {
                        assert!(
                            n <= stream.len() - fed,
                            "asked for {n} bytes, only {} remain",
                            stream.len() - fed
                        );
                    }
                    break;
                }
            }
        }
    }
    assert_eq!(fed, stream.len(), "the chunk sizes covered the stream");
    assert!(pending.is_empty(), "no bytes left over");
    frames
}

/// Known kinds, and a few unknown ones, to build well-framed garbage with.
fn kind_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![
            KIND_HELLO, KIND_WELCOME, KIND_SUBSCRIBE, KIND_UNSUBSCRIBE, KIND_SUBACK,
            KIND_PUBLISH, KIND_DATA, KIND_PING, KIND_PONG, KIND_ERROR, KIND_GAP,
            KIND_STATS_REQUEST, KIND_STATS,
        ]),
        1 => any::<u8>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn encode_then_decode_is_identity(owned in any_frame()) {
        let frame = owned.frame();
        let bytes = encoded(&frame);
        prop_assert_eq!(frame_len_hint(&bytes), Some(bytes.len()));
        prop_assert_eq!(decode_frame(&bytes, MAX), Ok(Decoded::Frame(frame, bytes.len())));
    }

    #[test]
    fn every_strict_prefix_needs_exactly_the_missing_bytes(owned in any_frame()) {
        let bytes = encoded(&owned.frame());
        for cut in 0..bytes.len() {
            let expected = if cut < LEN_PREFIX_BYTES {
                LEN_PREFIX_BYTES - cut
            } else {
                bytes.len() - cut
            };
            prop_assert_eq!(
                decode_frame(&bytes[..cut], MAX),
                Ok(Decoded::NeedMore(expected)),
                "prefix of {} bytes", cut
            );
        }
    }

    #[test]
    fn a_stream_decodes_the_same_in_any_chunking(
        frames in prop::collection::vec(any_frame(), 1..8),
        chunk_sizes in prop::collection::vec(1..40usize, 1..64),
    ) {
        let mut stream = Vec::new();
        for owned in &frames {
            encode_frame(&mut stream, &owned.frame());
        }
        // Random chunks, cycled until the stream is used up.
        let chunked = decode_stream(&stream, chunk_sizes.iter().copied().cycle());
        prop_assert_eq!(&chunked, &frames);
        let bytewise = decode_stream(&stream, std::iter::repeat(1));
        prop_assert_eq!(&bytewise, &frames);
        let at_once = decode_stream(&stream, std::iter::once(stream.len()));
        prop_assert_eq!(&at_once, &frames);
    }

    #[test]
    fn random_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..128),
        max in 0..256usize,
    ) {
        check_arbitrary_input(&bytes, max)?;
    }

    #[test]
    fn well_framed_garbage_never_panics(
        kind in kind_byte(),
        body in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let bytes = frame_bytes(kind, &body);
        match decode_frame(&bytes, MAX) {
            Ok(Decoded::Frame(_, used)) => prop_assert_eq!(used, bytes.len()),
            Ok(Decoded::NeedMore(n)) => prop_assert!(false, "a whole frame asked for {} more", n),
            Err(_) => {}
        }
        check_arbitrary_input(&bytes, MAX)?;
    }
}

/// What must hold for any input: no panic; a frame uses no more than the input; re-encoding a
/// decoded frame decodes to the same frame; `NeedMore` asks for at least one byte.
fn check_arbitrary_input(bytes: &[u8], max: usize) -> Result<(), TestCaseError> {
    match decode_frame(bytes, max) {
        Ok(Decoded::Frame(frame, used)) => {
            prop_assert!(used >= FRAME_HEADER_BYTES && used <= bytes.len());
            let again = encoded(&frame);
            prop_assert_eq!(
                decode_frame(&again, usize::MAX),
                Ok(Decoded::Frame(frame, again.len()))
            );
        }
        Ok(Decoded::NeedMore(n)) => prop_assert!(n > 0),
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(
                e.code() == error_code::MALFORMED || e.code() == error_code::FRAME_TOO_LARGE
            );
        }
    }
    Ok(())
}

#[test]
fn longer_varint_forms_decode_if_the_value_fits_the_field() {
    // UNSUBSCRIBE sub_id 5 (a u32) written as 251 + u16 and as 252 + u32: both decode, so a
    // client's encoder need not be minimal (the engine's always is).
    for body in [&[0xfb, 0x05, 0x00][..], &[0xfc, 0x05, 0x00, 0x00, 0x00]] {
        assert_eq!(
            decode_whole(&frame_bytes(KIND_UNSUBSCRIBE, body)),
            Frame::Unsubscribe(Unsubscribe { sub_id: 5 })
        );
    }
    // A form wider than the field is refused: 253 + u64 for a u32.
    assert_malformed(
        &frame_bytes(KIND_UNSUBSCRIBE, &[0xfd, 5, 0, 0, 0, 0, 0, 0, 0]),
        "UNSUBSCRIBE",
    );
}

#[test]
fn data_written_in_place_is_byte_identical_to_the_appended_encoding() {
    let publish = PublishRef {
        topic: "plant/line1/temp",
        source_ts_ns: 0x0102_0304_0506_0708,
        quality: 192,
        payload: b"21.5",
    };
    let mut appended = Vec::new();
    encode_data_from_publish(&mut appended, &publish, 42, 77, DATA_FLAG_SNAPSHOT);
    let shared = data_frame_shared(&publish, 42, 77, DATA_FLAG_SNAPSHOT);
    assert_eq!(shared.len(), data_frame_total_len(&publish));
    assert_eq!(&shared[..], &appended[..]);
}
