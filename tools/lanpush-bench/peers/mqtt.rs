//! MQTT 3.1.1 at QoS 0, for mosquitto (or any 3.1.1 broker).
//!
//! Connections use a clean session and a keep-alive of [`KEEPALIVE_SECS`]; a connection that
//! has written nothing for half of it sends PINGREQ from `poll` or `flush` (an idle publisher
//! that never calls `flush` for 1.5 keep-alives is dropped by the broker, which the benchmark
//! never does). Topics and patterns are MQTT's own syntax, passed through unchanged.
//! Subscriptions ask for QoS 0, so the broker sends nothing that needs an acknowledgement.
//! Client ids must be unique per broker: MQTT closes the older connection on a duplicate.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{
    confirmation_timeout, connect, poll_deadline, Conn, Stash, WireError, FLUSH_AT_BYTES,
    HANDSHAKE_TIMEOUT, MAX_FRAME_BYTES, MAX_READS_PER_POLL, READ_BUF_BYTES,
};
use crate::driver::{Driver, PubConn, SubConn};

const PROTO: &str = "mqtt";
/// Keep-alive announced in CONNECT.
pub(crate) const KEEPALIVE_SECS: u16 = 60;
/// A connection silent (on its write side) this long sends PINGREQ.
const PING_AFTER: Duration = Duration::from_secs(KEEPALIVE_SECS as u64 / 2);
/// A publisher's read buffer: it only ever receives CONNACK and PINGRESP.
const PUBLISHER_RX_BYTES: usize = 4096;

/// Packet encoding and decoding, without sockets.
pub(crate) mod codec {
    use super::{WireError, MAX_FRAME_BYTES, PROTO};

    pub(crate) const CONNECT: u8 = 0x10;
    pub(crate) const CONNACK: u8 = 0x20;
    pub(crate) const PUBLISH: u8 = 0x30;
    pub(crate) const SUBSCRIBE: u8 = 0x82;
    pub(crate) const SUBACK: u8 = 0x90;
    pub(crate) const PINGREQ: u8 = 0xc0;
    pub(crate) const PINGRESP: u8 = 0xd0;
    pub(crate) const DISCONNECT: u8 = 0xe0;
    /// Largest value the 4-byte remaining-length varint can hold.
    pub(crate) const MAX_REMAINING_LENGTH: usize = 268_435_455;

    /// A packet from the broker, borrowing the receive buffer.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Packet<'a> {
        ConnAck {
            session_present: bool,
            return_code: u8,
        },
        Publish {
            topic: &'a [u8],
            payload: &'a [u8],
        },
        SubAck {
            packet_id: u16,
            return_codes: &'a [u8],
        },
        PingResp,
        /// Any other packet type (first header byte): skipped.
        Other(u8),
    }

    fn malformed(what: &'static str) -> WireError {
        WireError::Malformed { proto: PROTO, what }
    }

    pub(crate) fn put_remaining_length(out: &mut Vec<u8>, mut n: usize) {
        debug_assert!(n <= MAX_REMAINING_LENGTH);
        loop {
            let mut byte = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if n == 0 {
                break;
            }
        }
    }

    /// Decodes the remaining-length varint at the start of `buf`: `(value, bytes used)`, or
    /// `None` when `buf` ends inside it.
    pub(crate) fn parse_remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
        let mut value = 0usize;
        for (i, &byte) in buf.iter().enumerate().take(4) {
            value |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(Some((value, i + 1)));
            }
        }
        if buf.len() >= 4 {
            Err(malformed("remaining length (more than 4 bytes)"))
        } else {
            Ok(None)
        }
    }

    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    }

    fn string_too_long(what: &str, len: usize) -> WireError {
        WireError::Unsupported {
            proto: PROTO,
            what: format!("a {what} of {len} bytes (max 65535)"),
        }
    }

    /// CONNECT, protocol level 4, clean session, no will, no credentials.
    pub(crate) fn encode_connect(
        out: &mut Vec<u8>,
        client_id: &str,
        keepalive_secs: u16,
    ) -> Result<(), WireError> {
        if client_id.len() > usize::from(u16::MAX) {
            return Err(string_too_long("client id", client_id.len()));
        }
        out.push(CONNECT);
        put_remaining_length(out, 10 + 2 + client_id.len());
        put_str(out, b"MQTT");
        out.push(4); // protocol level 3.1.1
        out.push(0x02); // clean session
        out.extend_from_slice(&keepalive_secs.to_be_bytes());
        put_str(out, client_id.as_bytes());
        Ok(())
    }

    /// PUBLISH at QoS 0, not retained.
    pub(crate) fn encode_publish(
        out: &mut Vec<u8>,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), WireError> {
        if topic.len() > usize::from(u16::MAX) {
            return Err(string_too_long("topic", topic.len()));
        }
        let remaining = 2 + topic.len() + payload.len();
        if remaining > MAX_REMAINING_LENGTH {
            return Err(WireError::TooLarge {
                proto: PROTO,
                len: remaining,
                max: MAX_REMAINING_LENGTH,
            });
        }
        out.push(PUBLISH);
        put_remaining_length(out, remaining);
        put_str(out, topic.as_bytes());
        out.extend_from_slice(payload);
        Ok(())
    }

    /// SUBSCRIBE to one filter at QoS 0.
    pub(crate) fn encode_subscribe(
        out: &mut Vec<u8>,
        packet_id: u16,
        filter: &str,
    ) -> Result<(), WireError> {
        if filter.len() > usize::from(u16::MAX) {
            return Err(string_too_long("topic filter", filter.len()));
        }
        out.push(SUBSCRIBE);
        put_remaining_length(out, 2 + 2 + filter.len() + 1);
        out.extend_from_slice(&packet_id.to_be_bytes());
        put_str(out, filter.as_bytes());
        out.push(0); // requested QoS
        Ok(())
    }

    pub(crate) fn encode_pingreq(out: &mut Vec<u8>) {
        out.extend_from_slice(&[PINGREQ, 0]);
    }

    pub(crate) fn encode_disconnect(out: &mut Vec<u8>) {
        out.extend_from_slice(&[DISCONNECT, 0]);
    }

    /// Parses one packet from the start of `buf`: the packet and its length on the wire, or
    /// `None` when `buf` holds only a prefix of it. A packet larger than the read limit is an
    /// error as soon as its header is seen, before any of it is buffered.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, WireError> {
        let Some(&header) = buf.first() else {
            return Ok(None);
        };
        let Some((remaining, varint_len)) = parse_remaining_length(&buf[1..])? else {
            return Ok(None);
        };
        if remaining > MAX_FRAME_BYTES {
            return Err(WireError::TooLarge {
                proto: PROTO,
                len: remaining,
                max: MAX_FRAME_BYTES,
            });
        }
        let total = 1 + varint_len + remaining;
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[1 + varint_len..total];
        let packet = match header & 0xf0 {
            PUBLISH => {
                if body.len() < 2 {
                    return Err(malformed("PUBLISH (no topic length)"));
                }
                let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                // QoS 1 and 2 carry a packet id after the topic; this client only asks for 0.
                let id_len = if header & 0x06 != 0 { 2 } else { 0 };
                if body.len() < 2 + topic_len + id_len {
                    return Err(malformed("PUBLISH (topic longer than the packet)"));
                }
                Packet::Publish {
                    topic: &body[2..2 + topic_len],
                    payload: &body[2 + topic_len + id_len..],
                }
            }
            CONNACK => {
                if body.len() != 2 {
                    return Err(malformed("CONNACK (length is not 2)"));
                }
                Packet::ConnAck {
                    session_present: body[0] & 1 != 0,
                    return_code: body[1],
                }
            }
            SUBACK => {
                if body.len() < 3 {
                    return Err(malformed("SUBACK (shorter than 3 bytes)"));
                }
                Packet::SubAck {
                    packet_id: u16::from_be_bytes([body[0], body[1]]),
                    return_codes: &body[2..],
                }
            }
            PINGRESP => Packet::PingResp,
            _ => Packet::Other(header),
        };
        Ok(Some((packet, total)))
    }

    /// The reason for a CONNACK return code, as 3.1.1 section 3.2.2.3 names it.
    pub(crate) fn connack_reason(code: u8) -> &'static str {
        match code {
            1 => "unacceptable protocol version",
            2 => "identifier rejected",
            3 => "server unavailable",
            4 => "bad user name or password",
            5 => "not authorized",
            _ => "unknown return code",
        }
    }
}

use codec::Packet;

/// Makes MQTT connections to one broker.
pub(crate) struct MqttDriver {
    addr: SocketAddr,
}

impl MqttDriver {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Connects, sends CONNECT and waits for a successful CONNACK.
    fn open(&self, client_id: &str, rx_bytes: usize) -> io::Result<Conn> {
        let mut conn = Conn::new(connect(self.addr)?, rx_bytes);
        let mut out = Vec::with_capacity(64);
        codec::encode_connect(&mut out, client_id, KEEPALIVE_SECS)?;
        conn.write_all(&out)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            if let Some((packet, len)) = codec::parse(conn.rx.data())? {
                let Packet::ConnAck { return_code, .. } = packet else {
                    return Err(WireError::Malformed {
                        proto: PROTO,
                        what: "reply to CONNECT",
                    }
                    .into());
                };
                if return_code != 0 {
                    return Err(WireError::Refused {
                        proto: PROTO,
                        reason: format!(
                            "CONNACK {return_code} ({})",
                            codec::connack_reason(return_code)
                        ),
                    }
                    .into());
                }
                conn.rx.consume(len);
                return Ok(conn);
            }
            if Instant::now() >= deadline {
                return Err(confirmation_timeout(PROTO, "CONNACK"));
            }
            conn.fill_until(deadline)?;
        }
    }
}

impl Driver for MqttDriver {
    fn name(&self) -> &str {
        "mqtt"
    }

    fn publisher(&self, client_id: &str) -> io::Result<Box<dyn PubConn>> {
        let conn = self.open(client_id, PUBLISHER_RX_BYTES)?;
        Ok(Box::new(MqttPub {
            conn,
            tx: Vec::with_capacity(2 * FLUSH_AT_BYTES),
            last_write: Instant::now(),
        }))
    }

    fn subscriber(&self, client_id: &str) -> io::Result<Box<dyn SubConn>> {
        let conn = self.open(client_id, READ_BUF_BYTES)?;
        Ok(Box::new(MqttSub {
            conn,
            tx: Vec::with_capacity(64),
            next_packet_id: 1,
            last_write: Instant::now(),
            stash: Stash::default(),
        }))
    }
}

/// A publishing connection: PUBLISH packets appended to `tx`, written per flush.
struct MqttPub {
    conn: Conn,
    tx: Vec<u8>,
    last_write: Instant,
}

impl MqttPub {
    fn write_out(&mut self) -> io::Result<()> {
        if !self.tx.is_empty() {
            self.conn.write_all(&self.tx)?;
            self.tx.clear();
            self.last_write = Instant::now();
        }
        Ok(())
    }
}

impl PubConn for MqttPub {
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        codec::encode_publish(&mut self.tx, topic, payload)?;
        if self.tx.len() >= FLUSH_AT_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.tx.is_empty() && self.last_write.elapsed() >= PING_AFTER {
            codec::encode_pingreq(&mut self.tx);
            // PINGRESPs are the only thing the broker sends a publisher; drop them so they never
            // fill the socket.
            while self.conn.fill_now()? {
                let len = self.conn.rx.data().len();
                self.conn.rx.consume(len);
            }
        }
        self.write_out()
    }
}

impl Drop for MqttPub {
    fn drop(&mut self) {
        // A clean DISCONNECT keeps the broker's log free of "connection lost"; whatever was
        // published and not flushed goes out with it.
        codec::encode_disconnect(&mut self.tx);
        self.conn.write_goodbye(&self.tx);
    }
}

/// A subscribing connection.
struct MqttSub {
    conn: Conn,
    tx: Vec<u8>,
    next_packet_id: u16,
    last_write: Instant,
    stash: Stash,
}

impl MqttSub {
    fn write_out(&mut self) -> io::Result<()> {
        self.conn.write_all(&self.tx)?;
        self.tx.clear();
        self.last_write = Instant::now();
        Ok(())
    }

    fn ping_if_idle(&mut self) -> io::Result<()> {
        if self.last_write.elapsed() >= PING_AFTER {
            codec::encode_pingreq(&mut self.tx);
            self.write_out()?;
        }
        Ok(())
    }

    /// Parses every complete packet in the buffer; messages go to `on_message`, and the SUBACK
    /// for `awaiting` (if any) is returned with its first return code.
    fn drain(
        &mut self,
        awaiting: Option<u16>,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<(usize, Option<u8>)> {
        let mut delivered = 0;
        let mut acked = None;
        let mut used = 0;
        let data = self.conn.rx.data();
        let result = loop {
            match codec::parse(&data[used..]) {
                Ok(Some((packet, len))) => {
                    used += len;
                    match packet {
                        Packet::Publish { topic, payload } => match std::str::from_utf8(topic) {
                            Ok(topic) => {
                                on_message(topic, payload);
                                delivered += 1;
                            }
                            Err(_) => {
                                break Err(WireError::Malformed {
                                    proto: PROTO,
                                    what: "PUBLISH (topic is not UTF-8)",
                                })
                            }
                        },
                        Packet::SubAck {
                            packet_id,
                            return_codes,
                        } if Some(packet_id) == awaiting => {
                            acked = Some(return_codes[0]);
                            break Ok(());
                        }
                        _ => {}
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        self.conn.rx.consume(used);
        result?;
        Ok((delivered, acked))
    }
}

impl SubConn for MqttSub {
    fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        let packet_id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
        codec::encode_subscribe(&mut self.tx, packet_id, pattern)?;
        self.write_out()?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut stash = std::mem::take(&mut self.stash);
        let result = loop {
            match self.drain(Some(packet_id), &mut |t, p| stash.push(t, p)) {
                Ok((_, Some(0x80))) => {
                    break Err(WireError::Refused {
                        proto: PROTO,
                        reason: format!("SUBACK failure for {pattern:?}"),
                    }
                    .into())
                }
                Ok((_, Some(_))) => break Ok(()),
                Ok((_, None)) => {}
                Err(e) => break Err(e),
            }
            if Instant::now() >= deadline {
                break Err(confirmation_timeout(PROTO, "SUBACK"));
            }
            if let Err(e) = self.conn.fill_until(deadline) {
                break Err(e);
            }
        };
        self.stash = stash;
        result
    }

    fn poll(
        &mut self,
        timeout: Duration,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize> {
        let stashed = self.stash.deliver(on_message);
        if stashed > 0 {
            return Ok(stashed);
        }
        self.ping_if_idle()?;
        // Never block past the keep-alive: a long poll still gets its PINGREQ out.
        let deadline = poll_deadline(timeout.min(PING_AFTER));
        let mut reads = 0;
        loop {
            let (delivered, _) = self.drain(None, on_message)?;
            if delivered > 0 || reads == MAX_READS_PER_POLL {
                return Ok(delivered);
            }
            if !self.conn.fill_by(deadline)? {
                return Ok(0);
            }
            reads += 1;
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.conn.stream.as_raw_fd())
    }
}

impl Drop for MqttSub {
    fn drop(&mut self) {
        self.tx.clear();
        codec::encode_disconnect(&mut self.tx);
        self.conn.write_goodbye(&self.tx);
    }
}

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;

    #[test]
    fn remaining_length_boundaries() {
        for (n, wire) in [
            (0usize, &[0x00][..]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (16_383, &[0xff, 0x7f]),
            (16_384, &[0x80, 0x80, 0x01]),
            (2_097_152, &[0x80, 0x80, 0x80, 0x01]),
            (MAX_REMAINING_LENGTH, &[0xff, 0xff, 0xff, 0x7f]),
        ] {
            let mut out = Vec::new();
            put_remaining_length(&mut out, n);
            assert_eq!(out, wire, "{n}");
            assert_eq!(parse_remaining_length(wire), Ok(Some((n, wire.len()))));
            for cut in 0..wire.len() {
                assert_eq!(parse_remaining_length(&wire[..cut]), Ok(None));
            }
        }
        assert!(parse_remaining_length(&[0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn connect_golden() {
        let mut out = Vec::new();
        encode_connect(&mut out, "p1", 60).unwrap();
        assert_eq!(
            out,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'p', b'1']
        );
    }

    #[test]
    fn publish_golden_and_roundtrip() {
        let mut out = Vec::new();
        encode_publish(&mut out, "a/b", b"xyz").unwrap();
        assert_eq!(out, [0x30, 8, 0, 3, b'a', b'/', b'b', b'x', b'y', b'z']);
        assert_eq!(
            parse(&out),
            Ok(Some((
                Packet::Publish {
                    topic: b"a/b",
                    payload: b"xyz"
                },
                out.len()
            )))
        );
        // A payload that needs a 2-byte remaining length.
        let payload = vec![7u8; 300];
        out.clear();
        encode_publish(&mut out, "t", &payload).unwrap();
        assert_eq!(&out[..3], [0x30, 0xaf, 0x02]);
        assert_eq!(
            parse(&out),
            Ok(Some((
                Packet::Publish {
                    topic: b"t",
                    payload: &payload
                },
                out.len()
            )))
        );
        assert!(encode_publish(&mut out, &"x".repeat(70_000), b"").is_err());
    }

    #[test]
    fn publish_qos1_skips_packet_id() {
        let wire = [0x32, 7, 0, 1, b't', 0, 9, b'h', b'i'];
        assert_eq!(
            parse(&wire),
            Ok(Some((
                Packet::Publish {
                    topic: b"t",
                    payload: b"hi"
                },
                wire.len()
            )))
        );
    }

    #[test]
    fn subscribe_golden() {
        let mut out = Vec::new();
        encode_subscribe(&mut out, 0x0102, "a/#").unwrap();
        assert_eq!(out, [0x82, 8, 1, 2, 0, 3, b'a', b'/', b'#', 0]);
    }

    #[test]
    fn control_packets_parse() {
        assert_eq!(
            parse(&[0x20, 2, 0, 0]),
            Ok(Some((
                Packet::ConnAck {
                    session_present: false,
                    return_code: 0
                },
                4
            )))
        );
        assert_eq!(
            parse(&[0x20, 2, 1, 5]),
            Ok(Some((
                Packet::ConnAck {
                    session_present: true,
                    return_code: 5
                },
                4
            )))
        );
        assert_eq!(
            parse(&[0x90, 3, 0, 7, 0x80]),
            Ok(Some((
                Packet::SubAck {
                    packet_id: 7,
                    return_codes: &[0x80]
                },
                5
            )))
        );
        assert_eq!(parse(&[0xd0, 0]), Ok(Some((Packet::PingResp, 2))));
        assert_eq!(parse(&[0xb0, 2, 0, 1]), Ok(Some((Packet::Other(0xb0), 4))));
        let mut out = Vec::new();
        encode_pingreq(&mut out);
        encode_disconnect(&mut out);
        assert_eq!(out, [0xc0, 0, 0xe0, 0]);
    }

    #[test]
    fn malformed_packets_are_errors() {
        assert!(parse(&[0x20, 3, 0, 0, 0]).is_err());
        assert!(parse(&[0x90, 2, 0, 1]).is_err());
        assert!(parse(&[0x30, 1, 0]).is_err());
        assert!(parse(&[0x30, 3, 0, 9, b'x']).is_err());
        // Oversized: refused from the header alone.
        assert!(matches!(
            parse(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn stream_split_at_every_byte() {
        let mut wire = Vec::new();
        for i in 0..3u8 {
            encode_publish(&mut wire, "plant/line1/t", &[i; 200]).unwrap();
        }
        wire.extend_from_slice(&[0x90, 3, 0, 1, 0, 0xd0, 0]);
        let whole = {
            let mut n = 0;
            let mut at = 0;
            while let Some((_, len)) = parse(&wire[at..]).unwrap() {
                at += len;
                n += 1;
            }
            assert_eq!(at, wire.len());
            n
        };
        assert_eq!(whole, 5);
        // Every prefix parses to whole packets and then stops cleanly.
        for cut in 0..wire.len() {
            let mut at = 0;
            while let Some((_, len)) = parse(&wire[at..cut]).unwrap() {
                at += len;
            }
            assert!(at <= cut);
        }
    }

    #[test]
    #[ignore = "timing: run with --release --nocapture"]
    fn parse_throughput() {
        let mut wire = Vec::new();
        for _ in 0..4096 {
            encode_publish(&mut wire, "bench/fanin/p7", &[0u8; 64]).unwrap();
        }
        let started = Instant::now();
        let mut n = 0u64;
        for _ in 0..250 {
            let mut at = 0;
            while let Some((Packet::Publish { topic, payload }, len)) = parse(&wire[at..]).unwrap()
            {
                n += (std::str::from_utf8(topic).unwrap().len() + payload.len()) as u64 / 78;
                at += len;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(n, 4096 * 250);
        println!("mqtt: {:.1} M PUBLISH/s parsed", n as f64 / secs / 1e6);
    }

    /// A scripted broker on loopback: checks CONNECT and SUBSCRIBE, sends a message for an
    /// earlier subscription before the SUBACK, then a burst the client must read in one go.
    #[test]
    fn subscriber_against_scripted_broker() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut connect = [0u8; 2 + 10 + 2 + 3];
            s.read_exact(&mut connect).unwrap();
            assert_eq!(&connect[14..], b"sub");
            s.write_all(&[0x20, 2, 0, 0]).unwrap();
            let mut subscribe = [0u8; 10];
            s.read_exact(&mut subscribe).unwrap();
            assert_eq!(subscribe, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'+', 0]);
            let mut out = Vec::new();
            encode_publish(&mut out, "early/x", b"0").unwrap();
            out.extend_from_slice(&[0x90, 3, 0, 1, 0]);
            for i in 1..=100u8 {
                encode_publish(&mut out, "a/b", &[i]).unwrap();
            }
            s.write_all(&out).unwrap();
            let mut disconnect = [0u8; 2];
            s.read_exact(&mut disconnect).unwrap();
            assert_eq!(disconnect, [0xe0, 0]);
        });
        let driver = MqttDriver::new(addr);
        let mut sub = driver.subscriber("sub").unwrap();
        sub.subscribe("a/+").unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 101 && Instant::now() < deadline {
            sub.poll(Duration::from_millis(100), &mut |t, p| {
                seen.push((t.to_string(), p[0]))
            })
            .unwrap();
        }
        assert_eq!(seen[0], ("early/x".to_string(), b'0'));
        assert_eq!(seen.len(), 101);
        assert!(seen[1..]
            .iter()
            .enumerate()
            .all(|(i, (t, p))| t == "a/b" && *p == i as u8 + 1));
        drop(sub);
        broker.join().unwrap();
    }
}
