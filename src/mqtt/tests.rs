//! Golden bytes (from the OASIS 3.1.1 layouts), the malformed-packet rules, byte-at-a-time
//! feeding and roundtrip properties of the MQTT codec.

use proptest::prelude::*;

use super::*;

const MAX: usize = 1 << 20;

fn decode_whole(bytes: &[u8]) -> Packet<'_> {
    match decode_packet(bytes, MAX) {
        Ok(Decoded::Packet(p, n)) => {
            assert_eq!(n, bytes.len(), "used the whole input");
            p
        }
        other => panic!("{bytes:02x?} decodes as {other:?}"),
    }
}

fn encoded(packet: &Packet<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_packet(&mut out, packet);
    out
}

/// Each golden packet: its value and its bytes; both directions are checked.
fn golden() -> Vec<(Packet<'static>, Vec<u8>)> {
    vec![
        (
            Packet::Connect(Connect {
                client_id: "plc7",
                clean_session: true,
                keep_alive_s: 60,
                username: None,
                password: None,
                will: None,
            }),
            vec![
                0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b10, 0, 60, 0, 4, b'p', b'l', b'c',
                b'7',
            ],
        ),
        (
            Packet::Connect(Connect {
                client_id: "c",
                clean_session: false,
                keep_alive_s: 10,
                username: Some("u"),
                password: Some(b"pw"),
                will: Some(Will {
                    topic: "w/t",
                    message: b"bye",
                    qos: QoS::AtLeastOnce,
                    retain: true,
                }),
            }),
            vec![
                0x10,
                30,
                0,
                4,
                b'M',
                b'Q',
                b'T',
                b'T',
                4,
                0b1110_1100,
                0,
                10,
                0,
                1,
                b'c',
                0,
                3,
                b'w',
                b'/',
                b't',
                0,
                3,
                b'b',
                b'y',
                b'e',
                0,
                1,
                b'u',
                0,
                2,
                b'p',
                b'w',
            ],
        ),
        (
            Packet::ConnAck {
                session_present: false,
                code: CONNACK_ACCEPTED,
            },
            vec![0x20, 2, 0, 0],
        ),
        (
            Packet::Publish(Publish {
                topic: "a/b",
                payload: b"42",
                qos: QoS::AtMostOnce,
                retain: true,
                dup: false,
                pkid: 0,
            }),
            vec![0x31, 7, 0, 3, b'a', b'/', b'b', b'4', b'2'],
        ),
        (
            Packet::Publish(Publish {
                topic: "a/b",
                payload: b"42",
                qos: QoS::AtLeastOnce,
                retain: false,
                dup: true,
                pkid: 0x0102,
            }),
            vec![0x3a, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'4', b'2'],
        ),
        (Packet::PubAck { pkid: 7 }, vec![0x40, 2, 0, 7]),
        (Packet::PubRel { pkid: 7 }, vec![0x62, 2, 0, 7]),
        (
            Packet::Subscribe {
                pkid: 10,
                filters: vec![("plant/#", QoS::AtLeastOnce), ("+/t", QoS::AtMostOnce)],
            },
            vec![
                0x82, 18, 0, 10, 0, 7, b'p', b'l', b'a', b'n', b't', b'/', b'#', 1, 0, 3, b'+',
                b'/', b't', 0,
            ],
        ),
        (
            Packet::SubAck {
                pkid: 10,
                codes: vec![1, SUBACK_FAILURE],
            },
            vec![0x90, 4, 0, 10, 1, 0x80],
        ),
        (
            Packet::Unsubscribe {
                pkid: 11,
                filters: vec!["a/#"],
            },
            vec![0xa2, 7, 0, 11, 0, 3, b'a', b'/', b'#'],
        ),
        (Packet::UnsubAck { pkid: 11 }, vec![0xb0, 2, 0, 11]),
        (Packet::PingReq, vec![0xc0, 0]),
        (Packet::PingResp, vec![0xd0, 0]),
        (Packet::Disconnect, vec![0xe0, 0]),
    ]
}

#[test]
fn golden_packets_encode_and_decode() {
    for (packet, bytes) in golden() {
        assert_eq!(encoded(&packet), bytes, "{packet:?}");
        assert_eq!(decode_whole(&bytes), packet);
    }
}

#[test]
fn every_golden_packet_decodes_when_fed_one_byte_at_a_time() {
    let stream: Vec<u8> = golden().into_iter().flat_map(|(_, b)| b).collect();
    let expected: Vec<Packet<'_>> = golden().into_iter().map(|(p, _)| p).collect();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for &byte in &stream {
        buf.push(byte);
        loop {
            match decode_packet(&buf, MAX).unwrap() {
                Decoded::Packet(p, n) => {
                    got.push(encoded(&p));
                    buf.drain(..n);
                }
                Decoded::NeedMore(n) => {
                    assert!(n >= 1);
                    break;
                }
            }
        }
    }
    assert!(buf.is_empty());
    let expected: Vec<Vec<u8>> = expected.iter().map(encoded).collect();
    assert_eq!(got, expected);
}

#[test]
fn remaining_length_uses_up_to_four_bytes() {
    let payload = vec![7u8; 200];
    let p = Publish {
        topic: "t",
        payload: &payload,
        qos: QoS::AtMostOnce,
        retain: false,
        dup: false,
        pkid: 0,
    };
    let bytes = encoded(&Packet::Publish(p));
    // 2 + 1 + 200 = 203 = 0x4b + 1 * 128
    assert_eq!(&bytes[..3], &[0x30, 0xcb, 0x01]);
    assert_eq!(packet_len_hint(&bytes), Some(bytes.len()));
    assert_eq!(decode_whole(&bytes), Packet::Publish(p));
    // Largest four-byte length, and a fifth continuation byte.
    assert_eq!(
        packet_len_hint(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
        Some(MAX_REMAINING_LENGTH + 5)
    );
    assert_eq!(
        decode_packet(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], usize::MAX),
        Err(DecodeError::RemainingLength)
    );
}

#[test]
fn an_oversized_packet_is_refused_before_its_body_arrives() {
    // Remaining length 2 MiB announced, nothing of the body sent.
    let header = [0x30, 0x80, 0x80, 0x80, 0x01];
    assert_eq!(
        decode_packet(&header, MAX),
        Err(DecodeError::TooLarge {
            len: 2 << 20,
            max: MAX
        })
    );
    assert_eq!(decode_packet(&header[..2], MAX), Ok(Decoded::NeedMore(1)));
    // Within the limit, it asks for the rest.
    assert_eq!(
        decode_packet(&[0x30, 0x05, 0, 1], MAX),
        Ok(Decoded::NeedMore(3))
    );
}

#[test]
fn malformed_packets_are_refused() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x00, 0], "reserved type 0"),
        (&[0xf0, 0], "reserved type 15"),
        (&[0x36, 5, 0, 1, b'a', 0, 1], "QoS 3"),
        (&[0x38, 3, 0, 1, b'a'], "DUP on QoS 0"),
        (&[0x80, 6, 0, 1, 0, 1, b'a', 0], "SUBSCRIBE flags 0"),
        (&[0x82, 6, 0, 1, 0, 1, b'a', 3], "SUBSCRIBE QoS 3"),
        (
            &[0x82, 6, 0, 1, 0, 1, b'a', 0x40],
            "SUBSCRIBE reserved bits",
        ),
        (&[0x82, 5, 0, 1, 0, 0, 0], "zero-length filter"),
        (&[0x82, 2, 0, 1], "SUBSCRIBE without filters"),
        (&[0xa2, 4, 0, 1, 0, 0], "zero-length UNSUBSCRIBE filter"),
        (&[0xa2, 2, 0, 1], "UNSUBSCRIBE without filters"),
        (&[0x30, 4, 0, 2, 0xc3, 0x28], "invalid UTF-8 topic"),
        (&[0x30, 4, 0, 2, b'a', 0], "U+0000 in a topic"),
        (
            &[0x30, 5, 0, 3, b'a', b'/', b'+'],
            "wildcard + in a topic name",
        ),
        (&[0x30, 3, 0, 1, b'#'], "wildcard # in a topic name"),
        (&[0x30, 2, 0, 0], "zero-length topic name"),
        (&[0x32, 5, 0, 1, b'a', 0, 0], "packet id 0"),
        (&[0x40, 2, 0, 0], "PUBACK id 0"),
        (&[0x41, 2, 0, 1], "PUBACK flags"),
        (&[0x60, 2, 0, 1], "PUBREL flags 0"),
        (&[0xc0, 1, 0], "PINGREQ with a body"),
        (&[0xe1, 0], "DISCONNECT flags"),
        (&[0x40, 3, 0, 1, 9], "trailing bytes"),
        (&[0x30, 3, 0, 5, b'a'], "topic runs past the end"),
        (
            &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1, 0, 0, 0, 0],
            "reserved connect flag",
        ),
        (
            &[
                0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b1000, 0, 0, 0, 0,
            ],
            "will QoS without a will",
        ),
        (
            &[
                0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b11100, 0, 0, 0, 0,
            ],
            "will QoS 3",
        ),
        (
            &[
                0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0b100_0000, 0, 0, 0, 0,
            ],
            "password without user name",
        ),
    ];
    for (bytes, what) in cases {
        assert!(
            decode_packet(bytes, MAX).is_err(),
            "{what}: {bytes:02x?} decodes as {:?}",
            decode_packet(bytes, MAX)
        );
    }
}

#[test]
fn other_protocol_levels_are_named() {
    // MQTT 3.1 ("MQIsdp", level 3) and MQTT 5 (level 5).
    let v31 = [
        0x10, 14, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3, 2, 0, 0, 0, 0,
    ];
    assert!(matches!(
        decode_packet(&v31, MAX),
        Err(DecodeError::ProtocolLevel { level: 3, .. })
    ));
    let v5 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 0, 0, 0];
    assert!(matches!(
        decode_packet(&v5, MAX),
        Err(DecodeError::ProtocolLevel { level: 5, .. })
    ));
}

#[test]
fn the_qos1_head_and_the_shared_payload_make_the_whole_packet() {
    let p = Publish {
        topic: "plant/t",
        payload: b"value",
        qos: QoS::AtLeastOnce,
        retain: false,
        dup: false,
        pkid: 300,
    };
    let mut head = Vec::new();
    encode_publish_qos1_head(&mut head, p.topic, p.payload.len(), false, 300);
    head.extend_from_slice(p.payload);
    assert_eq!(head, encoded(&Packet::Publish(p)));
    assert_eq!(publish_topic(&head), Some("plant/t"));
    assert_eq!(publish_topic(&[0xd0, 0]), None);
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

/// Topic names: non-empty, no wildcards, no NUL.
fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/é ]{1,40}"
}

fn filter() -> impl Strategy<Value = String> {
    "[a-z0-9/+#é]{1,40}"
}

proptest! {
    #[test]
    fn publish_roundtrips(
        topic in topic(),
        payload in prop::collection::vec(any::<u8>(), 0..300),
        qos in qos(),
        retain: bool,
        dup: bool,
        pkid in 1u16..,
    ) {
        let p = Publish {
            topic: &topic,
            payload: &payload,
            qos,
            retain,
            dup: dup && qos != QoS::AtMostOnce,
            pkid: if qos == QoS::AtMostOnce { 0 } else { pkid },
        };
        let bytes = encoded(&Packet::Publish(p));
        prop_assert_eq!(decode_whole(&bytes), Packet::Publish(p));
        if qos == QoS::AtMostOnce {
            prop_assert_eq!(&publish_shared(&topic, &payload, retain)[..], &bytes[..]);
        }
        prop_assert_eq!(decode_packet(&bytes[..bytes.len() - 1], MAX), Ok(Decoded::NeedMore(1)));
    }

    #[test]
    fn connect_roundtrips(
        client_id in "[a-zA-Z0-9-]{0,23}",
        clean_session: bool,
        keep_alive_s: u16,
        username in prop::option::of("[a-z]{0,8}"),
        password in prop::option::of(prop::collection::vec(any::<u8>(), 0..8)),
        will in prop::option::of((topic(), prop::collection::vec(any::<u8>(), 0..20), qos(), any::<bool>())),
    ) {
        let password = username.as_ref().and(password);
        let c = Connect {
            client_id: &client_id,
            clean_session,
            keep_alive_s,
            username: username.as_deref(),
            password: password.as_deref(),
            will: will.as_ref().map(|(topic, message, qos, retain)| Will {
                topic,
                message,
                qos: *qos,
                retain: *retain,
            }),
        };
        let bytes = encoded(&Packet::Connect(c.clone()));
        prop_assert_eq!(decode_whole(&bytes), Packet::Connect(c));
    }

    #[test]
    fn subscribe_and_unsubscribe_roundtrip(
        filters in prop::collection::vec((filter(), qos()), 1..6),
        pkid in 1u16..,
    ) {
        let subscribe = Packet::Subscribe {
            pkid,
            filters: filters.iter().map(|(f, q)| (f.as_str(), *q)).collect(),
        };
        let bytes = encoded(&subscribe);
        prop_assert_eq!(decode_whole(&bytes), subscribe);
        let unsubscribe = Packet::Unsubscribe {
            pkid,
            filters: filters.iter().map(|(f, _)| f.as_str()).collect(),
        };
        let bytes = encoded(&unsubscribe);
        prop_assert_eq!(decode_whole(&bytes), unsubscribe);
    }

    /// Whatever the bytes: no panic, a decoded packet uses at most the input and re-encodes
    /// to bytes that decode to the same packet (as the fuzz target checks, at proptest's pace).
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(Decoded::Packet(p, n)) = decode_packet(&bytes, MAX) {
            prop_assert!(n <= bytes.len());
            let again = encoded(&p);
            let same = decode_whole(&again);
            prop_assert_eq!(same, p);
        }
    }
}
