//! `WsLink` against a scripted socket: the MQTT path frames the core's slices with one header
//! per write and survives partial writes anywhere (the byte stream a client decodes is exactly
//! the core's bytes); the JSON path translates and holds at most its bound before WouldBlock.

use std::io::{self, IoSlice, Write};

use super::wire::WireKind;
use super::ws_link::{LinkInput, WsLink, JSON_PENDING_BYTES};
use crate::proto::{self, DataHeader};
use crate::ws::{handshake::OriginPolicy, WsBridge};

/// A socket that takes at most `budgets[i]` bytes on its i-th write (0: WouldBlock), then all.
#[derive(Default)]
struct Sock {
    out: Vec<u8>,
    budgets: Vec<usize>,
    calls: usize,
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let budget = self.budgets.get(self.calls).copied().unwrap_or(usize::MAX);
        self.calls += 1;
        if budget == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(budget - n);
            self.out.extend_from_slice(&b[..take]);
            n += take;
            if n == budget {
                break;
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn upgraded(proto: &str) -> (WsLink, Sock) {
    let mut link = WsLink::new(WsBridge::new(OriginPolicy::default(), 1 << 20));
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {proto}\r\n\r\n"
    );
    let wire = link.handle_input(req.as_bytes());
    let want = if proto == "mqtt" {
        WireKind::Mqtt
    } else {
        WireKind::Native
    };
    assert_eq!(wire, LinkInput::Upgraded(want));
    let mut sock = Sock::default();
    assert!(link.flush(&mut sock).unwrap());
    let head_end = sock.out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(head_end, sock.out.len());
    sock.out.clear();
    sock.calls = 0;
    (link, sock)
}

/// Server frames → (opcode, payload) pairs, all final and unmasked.
fn parse_frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut cur = io::Cursor::new(bytes);
        let (h, len) = tungstenite::protocol::frame::FrameHeader::parse(&mut cur)
            .unwrap()
            .expect("a whole header");
        assert!(h.mask.is_none() && h.is_final);
        let start = cur.position() as usize;
        let end = start + len as usize;
        out.push((u8::from(h.opcode), bytes[start..end].to_vec()));
        bytes = &bytes[end..];
    }
    out
}

/// Feeds `frames` to the link as the core's outbox would: slices from the first unwritten
/// byte, resumed after each partial write.
fn drive(link: &mut WsLink, sock: &mut Sock, frames: &[Vec<u8>]) {
    let all: Vec<u8> = frames.concat();
    let mut done = 0;
    let mut spins = 0;
    while done < all.len() {
        spins += 1;
        assert!(spins < 10_000);
        // Slices as the outbox makes them: the rest of the front frame, then whole frames.
        let mut slices = Vec::new();
        let mut offset = 0;
        for f in frames {
            let (start, end) = (offset, offset + f.len());
            offset = end;
            if end <= done {
                continue;
            }
            slices.push(IoSlice::new(&all[start.max(done)..end]));
        }
        match link.write(sock, &slices) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // The writable edge: the link's own bytes first.
                link.flush(sock).unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn mqtt_slices_go_out_behind_one_header_and_survive_partial_writes() {
    let packets: Vec<Vec<u8>> = (0..5u8).map(|i| vec![0x30, 3, 0, 1, b'a' + i]).collect();
    for budgets in [
        vec![],
        vec![1, 0, 1, 1, 3, 0, 2],
        vec![2, 5, 1, 0, 0, 4, 1, 1, 1, 1, 1, 1, 1, 1],
    ] {
        let (mut link, mut sock) = upgraded("mqtt");
        sock.budgets = budgets.clone();
        drive(&mut link, &mut sock, &packets);
        let frames = parse_frames(&sock.out);
        let inner: Vec<u8> = frames.iter().flat_map(|(_, p)| p.clone()).collect();
        assert_eq!(inner, packets.concat(), "budgets {budgets:?}");
        assert!(frames.iter().all(|(op, _)| *op == 2), "binary frames");
        if budgets.is_empty() {
            assert_eq!(frames.len(), 1, "one header for the whole write");
            assert_eq!(
                sock.calls, 1,
                "one writev: header and shared packets together"
            );
        }
    }
}

#[test]
fn a_pong_waits_for_the_open_frame_to_end() {
    let (mut link, mut sock) = upgraded("mqtt");
    let packet = vec![0x30u8, 3, 0, 1, b'x'];
    sock.budgets = vec![3]; // the header and one byte of the packet
    let n = link.write(&mut sock, &[IoSlice::new(&packet)]).unwrap();
    assert_eq!(n, 1);
    // A ping arrives mid-frame: its pong must not land inside the frame.
    link.handle_input(&[0x89, 0x81, 1, 2, 3, 4, b'p' ^ 1]);
    link.flush(&mut sock).unwrap();
    assert_eq!(
        link.write(&mut sock, &[IoSlice::new(&packet[1..])])
            .unwrap(),
        4
    );
    link.flush(&mut sock).unwrap();
    assert_eq!(
        parse_frames(&sock.out),
        vec![(2, packet.clone()), (10, b"p".to_vec())]
    );
}

#[test]
fn json_frames_are_translated_and_bounded() {
    let (mut link, mut sock) = upgraded("lanpush.json.v1");
    let mut data = Vec::new();
    let payload = vec![b'v'; 1000];
    proto::encode_data(&mut data, &DataHeader::default(), "plant/t", &payload);
    let frames: Vec<Vec<u8>> = vec![data.clone(); 200];
    // The socket takes nothing: at most the bound (plus one frame) is held, then WouldBlock.
    sock.budgets = vec![0; 1000];
    let slices: Vec<IoSlice<'_>> = frames.iter().map(|f| IoSlice::new(f)).collect();
    let taken = link.write(&mut sock, &slices).unwrap();
    assert!(taken < data.len() * 200, "stops at its bound");
    assert_eq!(taken % data.len(), 0, "whole native frames only");
    let e = link
        .write(&mut sock, &slices[taken / data.len()..])
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    assert!(taken / data.len() * 1000 >= JSON_PENDING_BYTES / 2);
    // The socket drains: everything arrives as JSON text frames.
    sock.budgets.clear();
    assert!(link.flush(&mut sock).unwrap());
    drive(&mut link, &mut sock, &frames[taken / data.len()..]);
    let out = parse_frames(&sock.out);
    assert_eq!(out.len(), 200);
    let first: serde_json::Value = serde_json::from_slice(&out[0].1).unwrap();
    assert_eq!((out[0].0, first["topic"].as_str()), (1, Some("plant/t")));
}

#[test]
fn nothing_of_the_cores_goes_out_before_the_upgrade() {
    let mut link = WsLink::new(WsBridge::new(OriginPolicy::default(), 1024));
    let mut sock = Sock::default();
    let mut err = Vec::new();
    proto::encode_control(
        &mut err,
        &proto::Frame::Error(proto::WireError {
            code: 5,
            reason: "no HELLO".into(),
        }),
    );
    assert_eq!(
        link.write(&mut sock, &[IoSlice::new(&err)]).unwrap(),
        err.len()
    );
    assert!(sock.out.is_empty());
}
