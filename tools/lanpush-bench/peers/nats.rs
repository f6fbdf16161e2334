//! NATS client protocol (text, nats-server 2.x), without headers, echo on, not verbose.
//!
//! Topic translation: `/` becomes `.`, `+` becomes `*`, a trailing `#` becomes `>`. NATS `>`
//! needs at least one more token while MQTT `a/#` also matches `a` itself, so `a/#` subscribes
//! to both `a` and `a.>` (two subscriptions with disjoint subjects: no duplicates). Subjects
//! cannot hold empty tokens, so topics with `//` or a leading or trailing `/` cannot be used, and
//! a `.` inside a topic level would silently become a level separator: the benchmark's topics
//! have neither. Received subjects are translated back (`.` to `/`) before `on_message`.
//!
//! A subscription is confirmed by a PING after the SUBs: the server answers PONG only after it
//! processed everything before it. Server PINGs are answered with PONG, by subscribers in `poll`
//! and by publishers in `flush` (at most once per [`PUBLISHER_CHECK_INTERVAL`], without
//! blocking).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{
    confirmation_timeout, connect, poll_deadline, Conn, Stash, WireError, FLUSH_AT_BYTES,
    HANDSHAKE_TIMEOUT, MAX_READS_PER_POLL, PUBLISHER_CHECK_INTERVAL, READ_BUF_BYTES,
};
use crate::driver::{Driver, PubConn, SubConn};

const PROTO: &str = "nats";
/// A publisher's read buffer: it only receives INFO, PING, PONG and errors.
const PUBLISHER_RX_BYTES: usize = 16 * 1024;

/// Protocol encoding and decoding, without sockets.
pub(crate) mod codec {
    use super::super::{parse_decimal, push_decimal, MAX_FRAME_BYTES};
    use super::{WireError, PROTO};

    /// Longest control line accepted (INFO is the longest; nats-server's own limit is 4 KiB
    /// for client lines).
    pub(crate) const MAX_CONTROL_LINE: usize = 64 * 1024;

    /// An operation from the server, borrowing the receive buffer.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Op<'a> {
        Info(&'a [u8]),
        Msg {
            subject: &'a [u8],
            sid: &'a [u8],
            payload: &'a [u8],
        },
        Ping,
        Pong,
        Ok,
        Err(&'a [u8]),
    }

    fn malformed(what: &'static str) -> WireError {
        WireError::Malformed { proto: PROTO, what }
    }

    fn unsupported(what: String) -> WireError {
        WireError::Unsupported { proto: PROTO, what }
    }

    /// CONNECT with the options the benchmark relies on: no +OK per command, no headers (so
    /// only MSG, never HMSG), and the client id as the connection name.
    pub(crate) fn encode_connect(out: &mut Vec<u8>, name: &str) {
        out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false");
        out.extend_from_slice(b",\"lang\":\"rust\",\"version\":\"0\",\"name\":\"");
        // Keeps the JSON valid without an escaper: the name is for `nats-top`, nothing else.
        out.extend(name.bytes().map(|b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                b
            } else {
                b'_'
            }
        }));
        out.extend_from_slice(b"\"}\r\n");
    }

    pub(crate) fn encode_ping(out: &mut Vec<u8>) {
        out.extend_from_slice(b"PING\r\n");
    }

    pub(crate) fn encode_pong(out: &mut Vec<u8>) {
        out.extend_from_slice(b"PONG\r\n");
    }

    /// `PUB subject len\r\npayload\r\n`, the topic translated as it is copied.
    pub(crate) fn encode_pub(
        out: &mut Vec<u8>,
        topic: &str,
        payload: &[u8],
    ) -> Result<(), WireError> {
        let start = out.len();
        out.extend_from_slice(b"PUB ");
        for &b in topic.as_bytes() {
            match b {
                b'/' => out.push(b'.'),
                b' ' | b'\t' | b'\r' | b'\n' => {
                    out.truncate(start);
                    return Err(unsupported(format!("whitespace in topic {topic:?}")));
                }
                _ => out.push(b),
            }
        }
        out.push(b' ');
        push_decimal(out, payload.len());
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        Ok(())
    }

    pub(crate) fn encode_sub(out: &mut Vec<u8>, subject: &str, sid: u64) {
        out.extend_from_slice(b"SUB ");
        out.extend_from_slice(subject.as_bytes());
        out.push(b' ');
        push_decimal(out, sid as usize);
        out.extend_from_slice(b"\r\n");
    }

    /// The NATS subjects that together match exactly what the lanpush pattern matches.
    pub(crate) fn subjects_for_pattern(pattern: &str) -> Result<Vec<String>, WireError> {
        let levels: Vec<&str> = pattern.split('/').collect();
        let mut tokens = Vec::with_capacity(levels.len());
        for (i, level) in levels.iter().enumerate() {
            match *level {
                "+" => tokens.push("*"),
                "#" if i + 1 == levels.len() => tokens.push(">"),
                "#" => return Err(unsupported(format!("`#` before the end in {pattern:?}"))),
                "" => return Err(unsupported(format!("an empty level in {pattern:?}"))),
                literal
                    if literal.bytes().any(|b| {
                        matches!(b, b'.' | b'*' | b'>' | b' ' | b'\t' | b'\r' | b'\n')
                    }) =>
                {
                    return Err(unsupported(format!("level {literal:?} of {pattern:?}")))
                }
                literal => tokens.push(literal),
            }
        }
        let mut subjects = vec![tokens.join(".")];
        if tokens.len() > 1 && tokens.last() == Some(&">") {
            // MQTT's `a/#` also matches `a`; NATS's `a.>` does not.
            subjects.push(tokens[..tokens.len() - 1].join("."));
        }
        Ok(subjects)
    }

    /// Parses one operation from the start of `buf`: the operation and its length on the wire,
    /// or `None` when `buf` holds only a prefix of it.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Op<'_>, usize)>, WireError> {
        let Some(nl) = buf.iter().take(MAX_CONTROL_LINE).position(|&b| b == b'\n') else {
            return if buf.len() >= MAX_CONTROL_LINE {
                Err(WireError::TooLarge {
                    proto: PROTO,
                    len: buf.len(),
                    max: MAX_CONTROL_LINE,
                })
            } else {
                Ok(None)
            };
        };
        let line = buf[..nl].strip_suffix(b"\r").unwrap_or(&buf[..nl]);
        let mut args = line
            .split(|&b| b == b' ' || b == b'\t')
            .filter(|a| !a.is_empty());
        let op = args.next().ok_or_else(|| malformed("empty control line"))?;
        let after_line = nl + 1;
        let parsed = if op.eq_ignore_ascii_case(b"MSG") {
            // MSG <subject> <sid> [reply-to] <#bytes>
            let mut fields = [&b""[..]; 4];
            let mut n = 0;
            for arg in args {
                if n == fields.len() {
                    return Err(malformed("MSG (too many arguments)"));
                }
                fields[n] = arg;
                n += 1;
            }
            if n < 3 {
                return Err(malformed("MSG (too few arguments)"));
            }
            let len = parse_decimal(fields[n - 1]).ok_or_else(|| malformed("MSG (length)"))?;
            if len > MAX_FRAME_BYTES {
                return Err(WireError::TooLarge {
                    proto: PROTO,
                    len,
                    max: MAX_FRAME_BYTES,
                });
            }
            let total = after_line + len + 2;
            if buf.len() < total {
                return Ok(None);
            }
            if &buf[after_line + len..total] != b"\r\n" {
                return Err(malformed("MSG (payload not followed by CRLF)"));
            }
            let msg = Op::Msg {
                subject: fields[0],
                sid: fields[1],
                payload: &buf[after_line..after_line + len],
            };
            return Ok(Some((msg, total)));
        } else if op.eq_ignore_ascii_case(b"PING") {
            Op::Ping
        } else if op.eq_ignore_ascii_case(b"PONG") {
            Op::Pong
        } else if op.eq_ignore_ascii_case(b"+OK") {
            Op::Ok
        } else if op.eq_ignore_ascii_case(b"-ERR") {
            Op::Err(line[4..].trim_ascii())
        } else if op.eq_ignore_ascii_case(b"INFO") {
            Op::Info(line[4..].trim_ascii())
        } else {
            return Err(malformed("operation (unknown)"));
        };
        Ok(Some((parsed, after_line)))
    }
}

use codec::Op;

/// Makes NATS connections to one server.
pub(crate) struct NatsDriver {
    addr: SocketAddr,
}

impl NatsDriver {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Connects, reads INFO, sends CONNECT and a PING, and waits for the PONG (an `-ERR` such as
    /// an authorization failure arrives before it).
    fn open(&self, name: &str, rx_bytes: usize) -> io::Result<Conn> {
        let mut conn = Conn::new(connect(self.addr)?, rx_bytes);
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut greeted = false;
        loop {
            while let Some((op, len)) = codec::parse(conn.rx.data())? {
                match op {
                    Op::Info(_) if !greeted => {
                        greeted = true;
                        let mut out = Vec::with_capacity(256);
                        codec::encode_connect(&mut out, name);
                        codec::encode_ping(&mut out);
                        conn.rx.consume(len);
                        conn.write_all(&out)?;
                        continue;
                    }
                    Op::Pong if greeted => {
                        conn.rx.consume(len);
                        return Ok(conn);
                    }
                    Op::Ping => {
                        conn.rx.consume(len);
                        conn.write_all(b"PONG\r\n")?;
                        continue;
                    }
                    Op::Err(reason) => {
                        let reason = String::from_utf8_lossy(reason).into_owned();
                        return Err(WireError::Refused {
                            proto: PROTO,
                            reason,
                        }
                        .into());
                    }
                    Op::Info(_) | Op::Ok => {}
                    Op::Msg { .. } | Op::Pong => {
                        return Err(WireError::Malformed {
                            proto: PROTO,
                            what: "handshake",
                        }
                        .into())
                    }
                }
                conn.rx.consume(len);
            }
            if Instant::now() >= deadline {
                return Err(confirmation_timeout(
                    PROTO,
                    if greeted { "PONG" } else { "INFO" },
                ));
            }
            conn.fill_until(deadline)?;
        }
    }
}

impl Driver for NatsDriver {
    fn name(&self) -> &str {
        "nats"
    }

    fn publisher(&self, client_id: &str) -> io::Result<Box<dyn PubConn>> {
        let conn = self.open(client_id, PUBLISHER_RX_BYTES)?;
        Ok(Box::new(NatsPub {
            conn,
            tx: Vec::with_capacity(2 * FLUSH_AT_BYTES),
            last_check: Instant::now(),
        }))
    }

    fn subscriber(&self, client_id: &str) -> io::Result<Box<dyn SubConn>> {
        let conn = self.open(client_id, READ_BUF_BYTES)?;
        Ok(Box::new(NatsSub {
            conn,
            tx: Vec::with_capacity(256),
            next_sid: 1,
            topic: Vec::with_capacity(256),
            stash: Stash::default(),
        }))
    }
}

/// A publishing connection: PUBs appended to `tx`, written per flush.
struct NatsPub {
    conn: Conn,
    tx: Vec<u8>,
    last_check: Instant,
}

impl NatsPub {
    /// Answers the server's PINGs (it closes a client that misses two) and surfaces its errors.
    fn check_inbound(&mut self) -> io::Result<()> {
        while self.conn.fill_now()? {
            while let Some((op, len)) = codec::parse(self.conn.rx.data())? {
                match op {
                    Op::Ping => codec::encode_pong(&mut self.tx),
                    Op::Err(reason) => {
                        let reason = String::from_utf8_lossy(reason).into_owned();
                        return Err(WireError::Refused {
                            proto: PROTO,
                            reason,
                        }
                        .into());
                    }
                    _ => {}
                }
                self.conn.rx.consume(len);
            }
        }
        Ok(())
    }
}

impl PubConn for NatsPub {
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        codec::encode_pub(&mut self.tx, topic, payload)?;
        if self.tx.len() >= FLUSH_AT_BYTES {
            self.conn.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.last_check.elapsed() >= PUBLISHER_CHECK_INTERVAL {
            self.last_check = Instant::now();
            self.check_inbound()?;
        }
        if !self.tx.is_empty() {
            self.conn.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok(())
    }
}

impl Drop for NatsPub {
    fn drop(&mut self) {
        self.conn.write_goodbye(&self.tx);
    }
}

/// A subscribing connection.
struct NatsSub {
    conn: Conn,
    tx: Vec<u8>,
    next_sid: u64,
    /// The current message's topic, translated back to `/` (reused, never reallocated for the
    /// benchmark's topics).
    topic: Vec<u8>,
    stash: Stash,
}

impl NatsSub {
    /// Parses every complete operation in the buffer: messages go to `on_message`, PINGs are
    /// answered. With `until_pong`, stops after the first PONG and returns `true`.
    fn drain(
        &mut self,
        until_pong: bool,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<(usize, bool)> {
        let mut delivered = 0;
        let mut ponged = false;
        let mut used = 0;
        let data = self.conn.rx.data();
        let result = loop {
            let (op, len) = match codec::parse(&data[used..]) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            used += len;
            match op {
                Op::Msg {
                    subject, payload, ..
                } => {
                    self.topic.clear();
                    self.topic
                        .extend(subject.iter().map(|&b| if b == b'.' { b'/' } else { b }));
                    let Ok(topic) = std::str::from_utf8(&self.topic) else {
                        break Err(WireError::Malformed {
                            proto: PROTO,
                            what: "MSG (subject is not UTF-8)",
                        });
                    };
                    on_message(topic, payload);
                    delivered += 1;
                }
                Op::Ping => codec::encode_pong(&mut self.tx),
                Op::Pong if until_pong => {
                    ponged = true;
                    break Ok(());
                }
                Op::Err(reason) => {
                    let reason = String::from_utf8_lossy(reason).into_owned();
                    break Err(WireError::Refused {
                        proto: PROTO,
                        reason,
                    });
                }
                Op::Pong | Op::Ok | Op::Info(_) => {}
            }
        };
        self.conn.rx.consume(used);
        result?;
        if !self.tx.is_empty() {
            self.conn.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok((delivered, ponged))
    }
}

impl SubConn for NatsSub {
    fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        for subject in codec::subjects_for_pattern(pattern)? {
            codec::encode_sub(&mut self.tx, &subject, self.next_sid);
            self.next_sid += 1;
        }
        codec::encode_ping(&mut self.tx);
        self.conn.write_all(&self.tx)?;
        self.tx.clear();
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut stash = std::mem::take(&mut self.stash);
        let result = loop {
            match self.drain(true, &mut |t, p| stash.push(t, p)) {
                Ok((_, true)) => break Ok(()),
                Ok((_, false)) => {}
                Err(e) => break Err(e),
            }
            if Instant::now() >= deadline {
                break Err(confirmation_timeout(PROTO, "PONG after SUB"));
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
        let deadline = poll_deadline(timeout);
        let mut reads = 0;
        loop {
            let (delivered, _) = self.drain(false, on_message)?;
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

#[cfg(test)]
mod tests {
    use super::codec::*;
    use super::*;

    fn subjects(p: &str) -> Vec<String> {
        subjects_for_pattern(p).unwrap()
    }

    #[test]
    fn pattern_translation() {
        assert_eq!(subjects("a/b/c"), ["a.b.c"]);
        assert_eq!(subjects("a/+/c"), ["a.*.c"]);
        assert_eq!(subjects("+"), ["*"]);
        assert_eq!(subjects("#"), [">"]);
        assert_eq!(subjects("a/#"), ["a.>", "a"]);
        assert_eq!(subjects("a/+/#"), ["a.*.>", "a.*"]);
        for bad in ["a/#/b", "a//b", "/a", "a.b/c", "a/*", "a/>", "a b"] {
            assert!(subjects_for_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn client_ops_golden() {
        let mut out = Vec::new();
        encode_pub(&mut out, "plant/line1/t7", b"hello").unwrap();
        assert_eq!(out, b"PUB plant.line1.t7 5\r\nhello\r\n");
        assert!(encode_pub(&mut out, "a b", b"").is_err());
        assert_eq!(
            out, b"PUB plant.line1.t7 5\r\nhello\r\n",
            "a failed encode leaves nothing"
        );
        out.clear();
        encode_sub(&mut out, "a.*", 12);
        encode_ping(&mut out);
        encode_pong(&mut out);
        assert_eq!(out, b"SUB a.* 12\r\nPING\r\nPONG\r\n");
        out.clear();
        encode_connect(&mut out, "sub 1\"");
        assert_eq!(
            out,
            &b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":false,\"lang\":\"rust\",\"version\":\"0\",\"name\":\"sub_1_\"}\r\n"[..]
        );
    }

    #[test]
    fn server_ops_parse() {
        let info = b"INFO {\"server_id\":\"x\",\"max_payload\":1048576}\r\n";
        assert_eq!(
            parse(info),
            Ok(Some((
                Op::Info(b"{\"server_id\":\"x\",\"max_payload\":1048576}"),
                info.len()
            )))
        );
        assert_eq!(parse(b"PING\r\n"), Ok(Some((Op::Ping, 6))));
        assert_eq!(parse(b"pong\r\n"), Ok(Some((Op::Pong, 6))));
        assert_eq!(parse(b"+OK\r\n"), Ok(Some((Op::Ok, 5))));
        assert_eq!(
            parse(b"-ERR 'Unknown Protocol Operation'\r\n"),
            Ok(Some((Op::Err(b"'Unknown Protocol Operation'"), 35)))
        );
        let msg = b"MSG a.b 7 3\r\nxyz\r\n";
        assert_eq!(
            parse(msg),
            Ok(Some((
                Op::Msg {
                    subject: b"a.b",
                    sid: b"7",
                    payload: b"xyz"
                },
                msg.len()
            )))
        );
        let reply = b"MSG a.b 7 _INBOX.1  0\r\n\r\n";
        assert_eq!(
            parse(reply),
            Ok(Some((
                Op::Msg {
                    subject: b"a.b",
                    sid: b"7",
                    payload: b""
                },
                reply.len()
            )))
        );
        // A payload may hold CR LF: the length, not a delimiter, ends it.
        let binary = b"MSG t 1 4\r\n\r\n\r\n\r\n";
        assert_eq!(
            parse(binary),
            Ok(Some((
                Op::Msg {
                    subject: b"t",
                    sid: b"1",
                    payload: b"\r\n\r\n"
                },
                binary.len()
            )))
        );
    }

    #[test]
    fn malformed_ops_are_errors() {
        assert!(parse(b"HELLO\r\n").is_err());
        assert!(parse(b"\r\n").is_err());
        assert!(parse(b"MSG a 1\r\n").is_err());
        assert!(parse(b"MSG a 1 x\r\n").is_err());
        assert!(parse(b"MSG a 1 r 3 9\r\n").is_err());
        assert!(parse(b"MSG a 1 3\r\nxyzXX").is_err());
        assert!(matches!(
            parse(b"MSG a 1 99999999999\r\n"),
            Err(WireError::TooLarge { .. })
        ));
        let endless = vec![b'A'; MAX_CONTROL_LINE];
        assert!(matches!(parse(&endless), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn stream_split_at_every_byte() {
        let wire: &[u8] =
            b"INFO {}\r\nMSG a.b 1 5\r\nhello\r\nPING\r\nMSG a.c 2 _R 0\r\n\r\nPONG\r\n";
        let mut at = 0;
        let mut ops = 0;
        while let Some((_, len)) = parse(&wire[at..]).unwrap() {
            at += len;
            ops += 1;
        }
        assert_eq!((at, ops), (wire.len(), 5));
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
            wire.extend_from_slice(b"MSG bench.fanin.p7 1 64\r\n");
            wire.extend_from_slice(&[0u8; 64]);
            wire.extend_from_slice(b"\r\n");
        }
        let mut topic = Vec::with_capacity(64);
        let started = Instant::now();
        let mut n = 0u64;
        for _ in 0..250 {
            let mut at = 0;
            while let Some((
                Op::Msg {
                    subject, payload, ..
                },
                len,
            )) = parse(&wire[at..]).unwrap()
            {
                topic.clear();
                topic.extend(subject.iter().map(|&b| if b == b'.' { b'/' } else { b }));
                n += (std::str::from_utf8(&topic).unwrap().len() + payload.len()) as u64 / 78;
                at += len;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(n, 4096 * 250);
        println!("nats: {:.1} M MSG/s parsed", n as f64 / secs / 1e6);
    }

    /// A scripted server on loopback: handshake, SUBs and PING checked, a message and a server
    /// PING sent ahead of the PONG, then a burst.
    #[test]
    fn subscriber_against_scripted_server() {
        use std::io::{BufRead, BufReader, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            let mut next_line = |line: &mut String| {
                line.clear();
                lines.read_line(line).unwrap();
            };
            s.write_all(b"INFO {\"server_id\":\"t\"}\r\n").unwrap();
            next_line(&mut line);
            assert!(line.starts_with("CONNECT {"), "{line}");
            next_line(&mut line);
            assert_eq!(line, "PING\r\n");
            s.write_all(b"PONG\r\n").unwrap();
            for want in ["SUB a.> 1\r\n", "SUB a 2\r\n", "PING\r\n"] {
                next_line(&mut line);
                assert_eq!(line, want);
            }
            let mut out = b"MSG a 2 1\r\n0\r\nPING\r\nPONG\r\n".to_vec();
            for i in 1..=100u8 {
                out.extend_from_slice(b"MSG a.b.c 1 1\r\n");
                out.push(i);
                out.extend_from_slice(b"\r\n");
            }
            s.write_all(&out).unwrap();
            next_line(&mut line);
            assert_eq!(line, "PONG\r\n", "the server's PING is answered");
        });
        let driver = NatsDriver::new(addr);
        let mut sub = driver.subscriber("sub").unwrap();
        sub.subscribe("a/#").unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 101 && Instant::now() < deadline {
            sub.poll(Duration::from_millis(100), &mut |t, p| {
                seen.push((t.to_string(), p[0]))
            })
            .unwrap();
        }
        assert_eq!(seen[0], ("a".to_string(), b'0'));
        assert_eq!(seen.len(), 101);
        assert!(seen[1..]
            .iter()
            .enumerate()
            .all(|(i, (t, p))| t == "a/b/c" && *p == i as u8 + 1));
        server.join().unwrap();
    }
}
