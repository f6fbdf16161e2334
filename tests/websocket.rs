//! The WebSocket listener against the real binary, with tungstenite's blocking client (a
//! WebSocket implementation no one here wrote): the JSON subprotocol (snapshot then live from
//! `lanpush pub`), MQTT over WebSocket both ways with native clients, and the refusals.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Instant;

use serde_json::{json, Value};
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

use lanpush::mqtt::{self, Connect, Decoded, Packet, Publish, QoS};
use util::{run, Cli, Server, STEP};

fn ws_server() -> (Server, SocketAddr) {
    let server = Server::start_with(&["--threads", "2", "--ws-listen", "127.0.0.1:0"]);
    let ws = server.ws_addr.expect("ws listener");
    (server, ws)
}

/// A WebSocket client on `ws` offering `subprotocol`, with a read timeout.
fn connect(ws: SocketAddr, subprotocol: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(ws).expect("connect");
    stream.set_read_timeout(Some(STEP)).unwrap();
    let mut request = format!("ws://{ws}/").into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", subprotocol.parse().unwrap());
    let (socket, response) = tungstenite::client(request, stream).expect("WebSocket upgrade");
    assert_eq!(
        response.headers()["Sec-WebSocket-Protocol"],
        subprotocol,
        "the engine names the subprotocol it took"
    );
    socket
}

fn send_json(ws: &mut WebSocket<TcpStream>, value: Value) {
    ws.send(Message::text(value.to_string())).expect("send");
}

/// The next JSON object whose `type` is `kind` (others skipped), within STEP.
fn next_of(ws: &mut WebSocket<TcpStream>, kind: &str) -> Value {
    let deadline = Instant::now() + STEP;
    while Instant::now() < deadline {
        match ws.read().expect("read") {
            Message::Text(text) => {
                let v: Value = serde_json::from_str(&text).expect("a JSON object");
                if v["type"] == kind {
                    return v;
                }
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    panic!("no {kind} message within {STEP:?}");
}

fn lanpush_pub(server: &Server, topic: &str, value: &str) {
    let out = run(
        &["pub", "--server", &server.addr_string(), topic, value],
        None,
        STEP,
    );
    assert!(out.status.success(), "lanpush pub: {}", out.stderr);
}

#[test]
fn json_subscribe_gets_the_snapshot_then_live_values_from_lanpush_pub() {
    let (server, ws) = ws_server();
    lanpush_pub(&server, "plant/line1/temp", "21.5");
    let mut client = connect(ws, "lanpush.json.v1");
    send_json(
        &mut client,
        json!({"op": "sub", "id": 7, "pattern": "plant/#", "mode": "all"}),
    );
    let welcome = next_of(&mut client, "welcome");
    assert!(welcome["connection_id"].is_string(), "{welcome}");
    let snap = next_of(&mut client, "data");
    assert_eq!(snap["topic"], "plant/line1/temp");
    assert_eq!(snap["value"], "21.5");
    assert_eq!(
        snap["seq"], "1",
        "seq is a string (u64 does not fit a JS number)"
    );
    assert_eq!(snap["snapshot"], true);
    assert_eq!(snap["retained"], true);
    assert_eq!(snap["quality"], 192);
    assert!(
        snap["ingest_ts_ns"]
            .as_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let ack = next_of(&mut client, "suback");
    assert_eq!(ack["id"], 7);
    assert_eq!(ack["mode"], "all");
    lanpush_pub(&server, "plant/line1/temp", "22.0");
    let live = next_of(&mut client, "data");
    assert_eq!(live["value"], "22.0");
    assert_eq!(live["seq"], "2");
    assert_eq!(live["snapshot"], false);
    // A publish from the JSON client reaches it back (and anyone else), binary as base64.
    send_json(
        &mut client,
        json!({"op": "pub", "topic": "plant/raw", "value_b64": "AP8=", "quality": 3}),
    );
    let raw = next_of(&mut client, "data");
    assert_eq!(raw["topic"], "plant/raw");
    assert_eq!(raw["value_b64"], "AP8=");
    assert_eq!(raw["quality"], 3);
    assert!(raw.get("value").is_none());
}

#[test]
fn json_stats_are_the_connections_own_view() {
    let (_server, ws) = ws_server();
    let mut client = connect(ws, "lanpush.json.v1");
    send_json(
        &mut client,
        json!({"op": "sub", "pattern": "a/#", "mode": "latest"}),
    );
    next_of(&mut client, "suback");
    send_json(&mut client, json!({"op": "stats"}));
    let stats = next_of(&mut client, "stats");
    let conns = stats["stats"]["connections"]
        .as_array()
        .unwrap_or_else(|| panic!("stats has connections: {stats}"));
    assert!(
        conns
            .iter()
            .any(|c| c["subscriptions"][0]["pattern"] == "a/#"
                && c.get("queue_bytes").is_some()
                && c.get("conflated").is_some()
                && c.get("lagged").is_some()),
        "{stats}"
    );
}

#[test]
fn a_malformed_json_message_gets_an_error_and_a_close() {
    let (_server, ws) = ws_server();
    let mut client = connect(ws, "lanpush.json.v1");
    client.send(Message::text("{\"op\":\"fly\"}")).unwrap();
    let err = next_of(&mut client, "error");
    assert_eq!(err["name"], "MALFORMED");
    assert!(err["reason"].as_str().unwrap().contains("fly"), "{err}");
    match client.read() {
        Ok(Message::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1008),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

// ----- MQTT over WebSocket -----

fn mqtt_send(ws: &mut WebSocket<TcpStream>, packet: &Packet<'_>) {
    let mut buf = Vec::new();
    mqtt::encode_packet(&mut buf, packet);
    ws.send(Message::binary(buf)).expect("send");
}

/// Reads packets (across WebSocket frames, which need not align with them) until `want`
/// returns a value.
fn mqtt_until<T>(
    ws: &mut WebSocket<TcpStream>,
    buf: &mut Vec<u8>,
    mut want: impl FnMut(&Packet<'_>) -> Option<T>,
) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        assert!(
            Instant::now() < deadline,
            "no such MQTT packet within {STEP:?}"
        );
        while let Decoded::Packet(packet, n) =
            mqtt::decode_packet(buf, 1 << 20).expect("valid MQTT from the engine")
        {
            let got = want(&packet);
            buf.drain(..n);
            if let Some(got) = got {
                return got;
            }
        }
        match ws.read().expect("read") {
            Message::Binary(bytes) => buf.extend_from_slice(&bytes),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn mqtt_ws_client(ws: SocketAddr, client_id: &str) -> (WebSocket<TcpStream>, Vec<u8>) {
    let mut client = connect(ws, "mqtt");
    mqtt_send(
        &mut client,
        &Packet::Connect(Connect {
            client_id,
            clean_session: true,
            keep_alive_s: 30,
            username: None,
            password: None,
            will: None,
        }),
    );
    let mut buf = Vec::new();
    let code = mqtt_until(&mut client, &mut buf, |p| match p {
        Packet::ConnAck { code, .. } => Some(*code),
        _ => None,
    });
    assert_eq!(code, mqtt::CONNACK_ACCEPTED);
    (client, buf)
}

#[test]
fn mqtt_over_websocket_publish_reaches_a_native_sub_and_back() {
    let (server, ws) = ws_server();
    // WebSocket MQTT → native `lanpush sub`.
    let sub = Cli::spawn(&[
        "sub",
        "--server",
        &server.addr_string(),
        "--count",
        "1",
        "hmi/#",
    ]);
    sub.wait_stderr_line("subscribed:", STEP);
    let (mut client, mut buf) = mqtt_ws_client(ws, "browser-1");
    mqtt_send(
        &mut client,
        &Packet::Publish(Publish {
            topic: "hmi/setpoint",
            payload: b"55",
            qos: QoS::AtLeastOnce,
            retain: false,
            dup: false,
            pkid: 1,
        }),
    );
    let acked = mqtt_until(&mut client, &mut buf, |p| match p {
        Packet::PubAck { pkid } => Some(*pkid),
        _ => None,
    });
    assert_eq!(acked, 1);
    let out = sub.finish(STEP);
    assert!(out.status.success(), "lanpush sub: {}", out.stderr);
    assert!(
        out.stdout.contains("hmi/setpoint") && out.stdout.contains("55"),
        "{}",
        out.stdout
    );

    // Native `lanpush pub` → WebSocket MQTT subscriber.
    mqtt_send(
        &mut client,
        &Packet::Subscribe {
            pkid: 2,
            filters: vec![("plant/+/temp", QoS::AtMostOnce)],
        },
    );
    mqtt_until(&mut client, &mut buf, |p| match p {
        Packet::SubAck { pkid: 2, .. } => Some(()),
        _ => None,
    });
    lanpush_pub(&server, "plant/line9/temp", "19.25");
    let (topic, payload) = mqtt_until(&mut client, &mut buf, |p| match p {
        Packet::Publish(p) => Some((p.topic.to_string(), p.payload.to_vec())),
        _ => None,
    });
    assert_eq!(topic, "plant/line9/temp");
    assert_eq!(payload, b"19.25");
    // Keep-alive over the WebSocket: PINGREQ → PINGRESP; a WebSocket ping → pong.
    mqtt_send(&mut client, &Packet::PingReq);
    mqtt_until(&mut client, &mut buf, |p| {
        matches!(p, Packet::PingResp).then_some(())
    });
    client.send(Message::Ping(b"hi".to_vec().into())).unwrap();
    let deadline = Instant::now() + STEP;
    loop {
        assert!(Instant::now() < deadline, "no pong");
        if let Message::Pong(p) = client.read().unwrap() {
            assert_eq!(&p[..], b"hi");
            break;
        }
    }
    // The close handshake: our close is answered with the same code.
    client.close(None).unwrap();
    loop {
        match client.read() {
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(_) => {}
            Err(e) => panic!("close handshake: {e}"),
        }
    }
}

// ----- refusals -----

/// Sends a raw request head and returns the response: up to the close, or the end of a 101's
/// head (the connection then stays open).
fn raw_request(ws: SocketAddr, head: &str) -> String {
    let mut stream = TcpStream::connect(ws).unwrap();
    stream.set_read_timeout(Some(STEP)).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
        if out.starts_with(b"HTTP/1.1 101") && out.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn upgrade_head(extra: &str) -> String {
    format!(
        "GET /live HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

#[test]
fn refusals_are_http_answers_with_a_reason() {
    let (_server, ws) = ws_server();
    let forbidden = raw_request(
        ws,
        &upgrade_head("Origin: http://evil.example\r\nSec-WebSocket-Protocol: mqtt\r\n"),
    );
    assert!(forbidden.starts_with("HTTP/1.1 403 "), "{forbidden}");
    assert!(forbidden.contains("websocket.origins"), "{forbidden}");
    let no_proto = raw_request(ws, &upgrade_head("Sec-WebSocket-Protocol: chat\r\n"));
    assert!(no_proto.starts_with("HTTP/1.1 400 "), "{no_proto}");
    assert!(no_proto.contains("no supported subprotocol"), "{no_proto}");
    let plain = raw_request(ws, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 400 "), "{plain}");
    assert!(plain.contains("Upgrade: websocket"), "{plain}");
    let accepted = raw_request(
        ws,
        &upgrade_head("Sec-WebSocket-Protocol: chat, lanpush.json.v1\r\n"),
    );
    // RFC 6455 §1.3's example key and its accept value.
    assert!(accepted.starts_with("HTTP/1.1 101 "), "{accepted}");
    assert!(
        accepted.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "{accepted}"
    );
}
