//! The bridge without sockets: golden handshake bytes (RFC 6455's own example key), masked
//! frames fed one byte at a time, fragments, the bounds and every close code it sends.

use super::handshake::{handle_request, OriginPolicy, Upgrade};
use super::*;

const RFC_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

fn request(extra: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
         Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {RFC_KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

fn policy() -> OriginPolicy {
    OriginPolicy {
        allowed: vec!["http://hmi.plant:8080".into()],
    }
}

/// A masked client frame (the mask varies, so its phase is exercised).
fn client_frame(first: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

const FIN_BINARY: u8 = 0x82;
const FIN_TEXT: u8 = 0x81;
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn open(proto: &str) -> WsBridge {
    let mut b = WsBridge::new(policy(), 1024);
    b.handle_input(request(&format!("Sec-WebSocket-Protocol: {proto}\r\n")).as_bytes());
    assert!(b.subprotocol().is_some(), "{:?}", b.close_reason());
    let mut t = Vec::new();
    b.take_transmit(&mut t);
    assert!(t.starts_with(b"HTTP/1.1 101 "));
    b
}

fn transmit(b: &mut WsBridge) -> Vec<u8> {
    let mut t = Vec::new();
    b.take_transmit(&mut t);
    t
}

fn events(b: &mut WsBridge) -> Vec<Event> {
    std::iter::from_fn(|| b.poll_event()).collect()
}

/// The close frame the server sent: its code and reason.
fn close_of(bytes: &[u8]) -> (u16, String) {
    assert_eq!(bytes[0], 0x88, "a final close frame: {bytes:?}");
    let len = bytes[1] as usize;
    assert!(len >= 2 && bytes.len() == 2 + len, "{bytes:?}");
    (
        u16::from_be_bytes([bytes[2], bytes[3]]),
        String::from_utf8(bytes[4..].to_vec()).unwrap(),
    )
}

#[test]
fn the_upgrade_answer_is_rfc_6455s_golden_bytes() {
    let req = request("Origin: http://hmi.plant:8080\r\nSec-WebSocket-Protocol: chat, mqtt\r\n");
    let Ok(Upgrade::Accepted {
        used,
        subprotocol,
        response,
    }) = handle_request(req.as_bytes(), &policy())
    else {
        panic!("refused");
    };
    assert_eq!(used, req.len());
    assert_eq!(subprotocol, Subprotocol::Mqtt);
    assert_eq!(
        String::from_utf8(response).unwrap(),
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
    );
}

#[test]
fn the_request_and_frames_fed_one_byte_at_a_time() {
    let mut stream = request("Sec-WebSocket-Protocol: mqtt\r\n").into_bytes();
    let payloads: [&[u8]; 4] = [b"", b"\x10\x0c\x00\x04MQTT", &[7u8; 125], &[9u8; 300]];
    let mut want = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        stream.extend(client_frame(FIN_BINARY, p, [i as u8, 0xa5, 0x5a, 0xff]));
        want.extend_from_slice(p);
    }
    let mut b = WsBridge::new(policy(), 1024);
    for byte in &stream {
        b.handle_input(std::slice::from_ref(byte));
    }
    assert_eq!(events(&mut b), vec![Event::Upgraded(Subprotocol::Mqtt)]);
    assert_eq!(b.inner(), &want[..], "unmasked across every split");
    b.consume_inner(3);
    assert_eq!(b.inner(), &want[3..]);
    assert!(!b.is_closed());
}

#[test]
fn fragments_are_reassembled_with_control_frames_between_them() {
    let mut b = open("lanpush.json.v1");
    let mut input = Vec::new();
    input.extend(client_frame(0x01, br#"{"op":"#, MASK)); // text, not final
    input.extend(client_frame(0x89, b"ka", MASK)); // ping in the middle
    input.extend(client_frame(0x00, br#""stats""#, [1, 2, 3, 4])); // continuation
    input.extend(client_frame(0x80, b"}", MASK)); // final continuation
    b.handle_input(&input);
    assert_eq!(
        events(&mut b),
        vec![
            Event::Upgraded(Subprotocol::Json),
            Event::Message(br#"{"op":"stats"}"#.to_vec())
        ]
    );
    assert_eq!(
        transmit(&mut b),
        b"\x8a\x02ka",
        "the ping answered with its payload"
    );
}

#[test]
fn an_oversized_message_is_closed_with_1009_from_its_header() {
    let mut b = open("lanpush.json.v1");
    events(&mut b);
    b.handle_input(&client_frame(0x01, &[b'a'; 600], MASK));
    assert!(!b.is_closed());
    // 600 + 600 > 1024: refused when the second fragment's header arrives, before its payload.
    let frame = client_frame(0x80, &[b'a'; 600], MASK);
    b.handle_input(&frame[..8]);
    assert!(b.is_closed());
    assert_eq!(close_of(&transmit(&mut b)).0, close_code::TOO_BIG);
    // A 2^63-byte announcement does not overflow anything either.
    let mut b = open("mqtt");
    b.handle_input(&[
        0x82, 0xff, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4,
    ]);
    assert_eq!(close_of(&transmit(&mut b)).0, close_code::TOO_BIG);
}

#[test]
fn the_close_handshake_echoes_the_peers_code() {
    let mut b = open("mqtt");
    let mut payload = 1001u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"tab closed");
    b.handle_input(&client_frame(0x88, &payload, MASK));
    assert!(b.is_closed());
    assert_eq!(close_of(&transmit(&mut b)), (1001, String::new()));
    assert!(b.close_reason().unwrap().contains("tab closed"));
    // Anything after the close is ignored.
    b.handle_input(&client_frame(FIN_BINARY, b"late", MASK));
    assert!(b.inner().is_empty() && transmit(&mut b).is_empty());
}

#[test]
fn protocol_violations_close_with_their_codes() {
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "unmasked",
            vec![0x82, 0x01, 0x00],
            close_code::PROTOCOL_ERROR,
        ),
        (
            "rsv1",
            client_frame(0xc2, b"x", MASK),
            close_code::PROTOCOL_ERROR,
        ),
        (
            "reserved opcode",
            client_frame(0x83, b"x", MASK),
            close_code::PROTOCOL_ERROR,
        ),
        (
            "long ping",
            client_frame(0x89, &[0; 126], MASK),
            close_code::PROTOCOL_ERROR,
        ),
        (
            "fragmented ping",
            client_frame(0x09, b"x", MASK),
            close_code::PROTOCOL_ERROR,
        ),
        (
            "lone continuation",
            client_frame(0x80, b"x", MASK),
            close_code::PROTOCOL_ERROR,
        ),
        (
            "text on mqtt",
            client_frame(FIN_TEXT, b"x", MASK),
            close_code::UNSUPPORTED_DATA,
        ),
        (
            "one-byte close",
            client_frame(0x88, b"x", MASK),
            close_code::PROTOCOL_ERROR,
        ),
    ];
    for (what, input, code) in cases {
        let mut b = open("mqtt");
        b.handle_input(&input);
        assert!(b.is_closed(), "{what}");
        assert_eq!(close_of(&transmit(&mut b)).0, code, "{what}");
    }
    let mut b = open("lanpush.json.v1");
    b.handle_input(&client_frame(FIN_TEXT, &[0xff, 0xfe], MASK));
    assert_eq!(close_of(&transmit(&mut b)).0, close_code::INVALID_PAYLOAD);
    let mut b = open("lanpush.json.v1");
    b.handle_input(&client_frame(FIN_BINARY, b"{}", MASK));
    assert_eq!(close_of(&transmit(&mut b)).0, close_code::UNSUPPORTED_DATA);
    let mut b = open("lanpush.json.v1");
    b.handle_input(&client_frame(0x01, b"{", MASK));
    b.handle_input(&client_frame(FIN_TEXT, b"{}", MASK));
    assert_eq!(
        close_of(&transmit(&mut b)).0,
        close_code::PROTOCOL_ERROR,
        "interleaved"
    );
}

#[test]
fn refused_upgrades_say_why() {
    let refuse = |req: &str| {
        let mut b = WsBridge::new(policy(), 1024);
        b.handle_input(req.as_bytes());
        assert!(b.is_closed());
        String::from_utf8(transmit(&mut b)).unwrap()
    };
    let forbidden = refuse(&request(
        "Origin: http://evil.example\r\nSec-WebSocket-Protocol: mqtt\r\n",
    ));
    assert!(
        forbidden.starts_with("HTTP/1.1 403 Forbidden\r\n"),
        "{forbidden}"
    );
    assert!(
        forbidden.ends_with("\r\n\r\norigin \"http://evil.example\" is not in websocket.origins\n")
    );
    let none = refuse(&request("Sec-WebSocket-Protocol: chat\r\n"));
    assert!(none.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{none}");
    assert!(none.contains("offer `mqtt` or `lanpush.json.v1`"), "{none}");
    let no_proto = refuse(&request(""));
    assert!(no_proto.contains("no supported subprotocol"), "{no_proto}");
    let post = refuse("POST / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(post.contains("a WebSocket upgrade is a GET"), "{post}");
    let plain = refuse("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.contains("no `Upgrade: websocket`"), "{plain}");
    let v8 = refuse(&request("").replace("Version: 13", "Version: 8"));
    assert!(v8.contains("Sec-WebSocket-Version: 13\r\n"), "{v8}");
    let bad_key = refuse(&request("Sec-WebSocket-Protocol: mqtt\r\n").replace(RFC_KEY, "abc"));
    assert!(bad_key.contains("Sec-WebSocket-Key"), "{bad_key}");
    let garbage = refuse("\x16\x03\x01\x02\x00\x01\x00\x01\x7f\x03\x03\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let huge = refuse(&format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000)));
    assert!(huge.starts_with("HTTP/1.1 431 "), "{huge}");
}

#[test]
fn origins_allow_list() {
    let p = policy();
    assert!(p.allows("http://hmi.plant:8080"));
    assert!(p.allows("HTTP://HMI.plant:8080/"));
    assert!(!p.allows("http://hmi.plant:8081"));
    assert!(!p.allows("null"));
    let any = OriginPolicy {
        allowed: vec!["*".into()],
    };
    assert!(any.allows("http://anything"));
    // No Origin header: not a browser, allowed.
    let mut b = WsBridge::new(OriginPolicy::default(), 1024);
    b.handle_input(request("Sec-WebSocket-Protocol: mqtt\r\n").as_bytes());
    assert_eq!(b.subprotocol(), Some(Subprotocol::Mqtt));
}

#[test]
fn frames_pipelined_behind_the_request_are_not_lost() {
    let mut input = request("Sec-WebSocket-Protocol: mqtt\r\n").into_bytes();
    input.extend(client_frame(FIN_BINARY, b"\xc0\x00", MASK));
    let mut b = WsBridge::new(policy(), 1024);
    b.handle_input(&input);
    assert_eq!(b.inner(), b"\xc0\x00");
}

#[test]
fn server_frames_are_unmasked_and_sized_in_all_three_length_forms() {
    for (len, head) in [
        (5usize, vec![0x82, 5]),
        (126, vec![0x82, 126, 0, 126]),
        (70_000, vec![0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]),
    ] {
        let (h, n) = server_header(OpCode::Data(Data::Binary), len);
        assert_eq!(&h[..n], &head[..], "{len}");
    }
    let mut out = Vec::new();
    encode_close(&mut out, 1009, &"é".repeat(100));
    // Code and reason fit a control frame's 125 bytes, cut at a char boundary.
    assert_eq!(out.len(), 2 + 2 + 122);
    assert_eq!(out[1] as usize, out.len() - 2);
    assert!(std::str::from_utf8(&out[4..]).is_ok());
}

mod json {
    use crate::proto::{self, DataHeader, Decoded, Frame, DATA_FLAG_SNAPSHOT};
    use crate::ws::json::{JsonSession, Out};

    fn frames(bytes: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let Ok(Decoded::Frame(f, n)) = proto::decode_frame(rest, 1 << 20) else {
                panic!("not a frame");
            };
            out.push(format!("{f:?}"));
            rest = &rest[n..];
        }
        out
    }

    #[test]
    fn client_messages_become_native_frames_with_a_hello_first() {
        let mut s = JsonSession::new();
        let mut native = Vec::new();
        s.handle_message(
            br#"{"op":"sub","pattern":"plant/#","mode":"latest"}"#,
            &mut native,
        )
        .unwrap();
        s.handle_message(
            br#"{"op":"pub","topic":"a/b","value":"1.5","source_ts_ns":"17"}"#,
            &mut native,
        )
        .unwrap();
        s.handle_message(br#"{"op":"unsub","id":1}"#, &mut native)
            .unwrap();
        s.handle_message(br#"{"op":"stats"}"#, &mut native).unwrap();
        let got = frames(&native);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[0].starts_with("Hello("), "{got:?}");
        assert!(
            got[1].contains("sub_id: 1") && got[1].contains("Latest"),
            "{got:?}"
        );
        assert!(got[2].contains("topic: \"a/b\"") && got[2].contains("source_ts_ns: 17"));
        assert!(got[2].contains("quality: 192"), "{got:?}");
        assert!(got[3].starts_with("Unsubscribe("), "{got:?}");
        assert_eq!(got[4], "StatsRequest");
        for bad in [
            &br#"{"op":"hello"}"#[..],
            br#"{"op":"fly"}"#,
            br#"not json"#,
            br#"{"op":"pub","topic":"a","value":"x","value_b64":"eA=="}"#,
            br#"{"op":"pub","topic":"a","value_b64":"!!"}"#,
        ] {
            assert!(s.handle_message(bad, &mut Vec::new()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn engine_frames_become_json_objects() {
        let mut native = Vec::new();
        let header = DataHeader {
            seq: u64::MAX,
            source_ts_ns: 1_700_000_000_123_456_789,
            ingest_ts_ns: 1_700_000_000_223_456_789,
            quality: 192,
            flags: DATA_FLAG_SNAPSHOT,
        };
        proto::encode_data(&mut native, &header, "plant/t", b"21.5");
        proto::encode_data(&mut native, &DataHeader::default(), "plant/raw", &[0, 255]);
        proto::encode_ping(&mut native, 9);
        proto::encode_control(
            &mut native,
            &Frame::Gap(proto::Gap {
                topic: "plant/t".into(),
                from_seq: 3,
                to_seq: 5,
            }),
        );
        let split = native.len() - 3;
        let mut s = JsonSession::new();
        let mut out = Vec::new();
        let used = s.handle_output(&native[..split], |o| out.push(o));
        assert!(used < split, "the cut GAP is left for later");
        s.handle_output(&native[used..], |o| out.push(o));
        let text = |o: &Out| match o {
            Out::Text(t) => serde_json::from_str::<serde_json::Value>(t).unwrap(),
            Out::Ping(_) => serde_json::Value::Null,
        };
        let data = text(&out[0]);
        assert_eq!(data["seq"], u64::MAX.to_string());
        assert_eq!(data["source_ts_ns"], "1700000000123456789");
        assert_eq!(data["value"], "21.5");
        assert_eq!(
            (data["snapshot"].clone(), data["retained"].clone()),
            (true.into(), true.into())
        );
        let raw = text(&out[1]);
        assert_eq!(raw["value_b64"], "AP8=");
        assert_eq!(raw["snapshot"], false);
        assert_eq!(out[2], Out::Ping(9));
        let gap = text(&out[3]);
        assert_eq!(
            (gap["type"].as_str(), gap["from_seq"].as_str()),
            (Some("gap"), Some("3"))
        );
    }
}
