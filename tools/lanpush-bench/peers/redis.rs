//! Redis pub/sub over RESP2 (redis-server 6 and 7).
//!
//! Publishers send `PUBLISH channel payload`, pipelined, after `CLIENT REPLY OFF`: the server
//! sends no `:N` reply per message, which makes a Redis publisher fire-and-forget like an MQTT
//! QoS 0 or NATS one (and means a failed PUBLISH goes unseen; the subscribers' counts show it).
//!
//! Pattern translation is only approximate in Redis's glob, whose `*` also crosses `/`:
//! - a pattern without wildcards is a plain `SUBSCRIBE` to that channel;
//! - `+` becomes `*` in a `PSUBSCRIBE`; the glob also matches deeper topics (`a/*` matches
//!   `a/b/c`), so for these patterns the driver checks each message against the lanpush
//!   pattern and drops what it does not match. The broker still does the work of sending those
//!   messages, which a benchmark with such topics would charge to Redis;
//! - a trailing `#` becomes `prefix/*` (exact: everything under the prefix) plus the prefix
//!   itself, as `SUBSCRIBE` (or a filtered `PSUBSCRIBE` if the prefix has `+`); `#` alone is `*`.
//!
//! Glob metacharacters in literal levels are escaped. A message matching several patterns of one
//! connection arrives once per pattern (Redis semantics; lanpush and mosquitto send it once).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use super::{
    confirmation_timeout, connect, poll_deadline, topic_matches, Conn, Stash, WireError,
    FLUSH_AT_BYTES, HANDSHAKE_TIMEOUT, MAX_READS_PER_POLL, READ_BUF_BYTES,
};
use crate::driver::{Driver, PubConn, SubConn};

const PROTO: &str = "redis";

/// RESP2 encoding and decoding, and pattern translation, without sockets.
pub(crate) mod codec {
    use super::super::{parse_decimal, push_decimal, MAX_FRAME_BYTES};
    use super::{WireError, PROTO};

    /// Longest simple string, error or length line accepted.
    const MAX_LINE: usize = 64 * 1024;
    /// Pub/sub pushes have at most 4 elements (`pmessage pattern channel payload`).
    pub(crate) const MAX_ARRAY_ITEMS: usize = 4;

    /// One element of an array reply.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Item<'a> {
        Simple(&'a [u8]),
        Int(i64),
        /// `None` is the null bulk string.
        Bulk(Option<&'a [u8]>),
    }

    /// One reply or push from the server, borrowing the receive buffer. Nested arrays do not
    /// occur in pub/sub mode and are rejected.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Reply<'a> {
        Item(Item<'a>),
        Error(&'a [u8]),
        Array {
            items: [Item<'a>; MAX_ARRAY_ITEMS],
            len: usize,
        },
    }

    /// What a subscribed connection receives, classified.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Push<'a> {
        Message {
            channel: &'a [u8],
            payload: &'a [u8],
        },
        PMessage {
            pattern: &'a [u8],
            channel: &'a [u8],
            payload: &'a [u8],
        },
        /// Confirmation of a `SUBSCRIBE` (`pattern == false`) or `PSUBSCRIBE`.
        Subscribed {
            pattern: bool,
            name: &'a [u8],
        },
        Error(&'a [u8]),
        /// Replies this client does not act on (`+PONG`, `pong` pushes, unsubscribe...).
        Other,
    }

    fn malformed(what: &'static str) -> WireError {
        WireError::Malformed { proto: PROTO, what }
    }

    /// Appends a command as an array of bulk strings.
    pub(crate) fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
        out.push(b'*');
        push_decimal(out, args.len());
        out.extend_from_slice(b"\r\n");
        for arg in args {
            out.push(b'$');
            push_decimal(out, arg.len());
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(arg);
            out.extend_from_slice(b"\r\n");
        }
    }

    pub(crate) fn encode_publish(out: &mut Vec<u8>, channel: &str, payload: &[u8]) {
        encode_command(out, &[b"PUBLISH", channel.as_bytes(), payload]);
    }

    /// The line starting at `at` without its CRLF, and where the next one starts.
    fn line(buf: &[u8], at: usize) -> Result<Option<(&[u8], usize)>, WireError> {
        let rest = &buf[at..];
        match rest.iter().take(MAX_LINE).position(|&b| b == b'\n') {
            Some(nl) if nl > 0 && rest[nl - 1] == b'\r' => Ok(Some((&rest[..nl - 1], at + nl + 1))),
            Some(_) => Err(malformed("line (LF without CR)")),
            None if rest.len() >= MAX_LINE => Err(WireError::TooLarge {
                proto: PROTO,
                len: rest.len(),
                max: MAX_LINE,
            }),
            None => Ok(None),
        }
    }

    fn parse_int(digits: &[u8]) -> Option<i64> {
        match digits.strip_prefix(b"-") {
            Some(abs) => parse_decimal(abs)
                .and_then(|n| i64::try_from(n).ok())
                .map(|n| -n),
            None => parse_decimal(digits).and_then(|n| i64::try_from(n).ok()),
        }
    }

    /// One non-array value at `at` (a `Reply::Item` or `Reply::Error`) and where the next
    /// starts.
    fn value(buf: &[u8], at: usize) -> Result<Option<(Reply<'_>, usize)>, WireError> {
        let Some((head, after)) = line(buf, at)? else {
            return Ok(None);
        };
        let (&kind, rest) = head.split_first().ok_or_else(|| malformed("empty line"))?;
        let parsed = match kind {
            b'+' => Reply::Item(Item::Simple(rest)),
            b'-' => Reply::Error(rest),
            b':' => Reply::Item(Item::Int(
                parse_int(rest).ok_or_else(|| malformed("integer"))?,
            )),
            b'$' if rest == b"-1" => Reply::Item(Item::Bulk(None)),
            b'$' => {
                let len = parse_decimal(rest).ok_or_else(|| malformed("bulk length"))?;
                if len > MAX_FRAME_BYTES {
                    return Err(WireError::TooLarge {
                        proto: PROTO,
                        len,
                        max: MAX_FRAME_BYTES,
                    });
                }
                let end = after + len + 2;
                if buf.len() < end {
                    return Ok(None);
                }
                if &buf[after + len..end] != b"\r\n" {
                    return Err(malformed("bulk string (not followed by CRLF)"));
                }
                return Ok(Some((
                    Reply::Item(Item::Bulk(Some(&buf[after..after + len]))),
                    end,
                )));
            }
            b'*' => return Err(malformed("nested array")),
            _ => return Err(malformed("reply type")),
        };
        Ok(Some((parsed, after)))
    }

    /// Parses one reply from the start of `buf`: the reply and its length on the wire, or
    /// `None` when `buf` holds only a prefix of it.
    pub(crate) fn parse(buf: &[u8]) -> Result<Option<(Reply<'_>, usize)>, WireError> {
        if buf.first() != Some(&b'*') {
            return value(buf, 0);
        }
        let Some((head, mut at)) = line(buf, 0)? else {
            return Ok(None);
        };
        let len = parse_decimal(&head[1..]).ok_or_else(|| malformed("array length"))?;
        if len > MAX_ARRAY_ITEMS {
            return Err(malformed("array (more than 4 elements in a pub/sub reply)"));
        }
        let mut items = [Item::Bulk(None); MAX_ARRAY_ITEMS];
        for item in items.iter_mut().take(len) {
            let Some((v, next)) = value(buf, at)? else {
                return Ok(None);
            };
            let Reply::Item(v) = v else {
                return Err(malformed("error inside an array"));
            };
            *item = v;
            at = next;
        }
        Ok(Some((Reply::Array { items, len }, at)))
    }

    /// Sorts a reply into what a subscribed connection acts on.
    pub(crate) fn classify<'a>(reply: &Reply<'a>) -> Result<Push<'a>, WireError> {
        let (items, len) = match reply {
            Reply::Error(message) => return Ok(Push::Error(message)),
            Reply::Item(_) => return Ok(Push::Other),
            Reply::Array { items, len } => (items, *len),
        };
        let bulk = |i: usize| match items[i] {
            Item::Bulk(Some(b)) => Ok(b),
            _ => Err(malformed("pub/sub push (element is not a bulk string)")),
        };
        let Some(Item::Bulk(Some(kind))) = items.first().filter(|_| len > 0).copied() else {
            return Ok(Push::Other);
        };
        Ok(match (kind, len) {
            (b"message", 3) => Push::Message {
                channel: bulk(1)?,
                payload: bulk(2)?,
            },
            (b"pmessage", 4) => Push::PMessage {
                pattern: bulk(1)?,
                channel: bulk(2)?,
                payload: bulk(3)?,
            },
            (b"subscribe", 3) => Push::Subscribed {
                pattern: false,
                name: bulk(1)?,
            },
            (b"psubscribe", 3) => Push::Subscribed {
                pattern: true,
                name: bulk(1)?,
            },
            (b"message" | b"pmessage" | b"subscribe" | b"psubscribe", _) => {
                return Err(malformed("pub/sub push (wrong number of elements)"))
            }
            _ => Push::Other,
        })
    }

    /// One Redis subscription implementing (part of) a lanpush pattern.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Subscription {
        /// `PSUBSCRIBE` (a glob) rather than `SUBSCRIBE` (a channel).
        pub(crate) is_pattern: bool,
        pub(crate) name: String,
        /// The lanpush pattern a message must also match, where the glob matches more.
        pub(crate) filter: Option<String>,
    }

    fn glob_escape(out: &mut String, literal: &str) {
        for c in literal.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }

    /// The glob for `levels` (`+` as `*`) and whether it contains a `+`.
    fn glob(levels: &[&str]) -> (String, bool) {
        let mut out = String::new();
        let mut has_plus = false;
        for (i, level) in levels.iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            if *level == "+" {
                out.push('*');
                has_plus = true;
            } else {
                glob_escape(&mut out, level);
            }
        }
        (out, has_plus)
    }

    /// The subscriptions that together deliver what the lanpush pattern matches (filters
    /// included); see the module docs for the translation.
    pub(crate) fn subscriptions_for_pattern(pattern: &str) -> Result<Vec<Subscription>, WireError> {
        let levels: Vec<&str> = pattern.split('/').collect();
        if levels[..levels.len() - 1].contains(&"#") {
            return Err(WireError::Unsupported {
                proto: PROTO,
                what: format!("`#` before the end in {pattern:?}"),
            });
        }
        let exact = |levels: &[&str], lanpush: String| {
            let (glob, has_plus) = glob(levels);
            if has_plus {
                Subscription {
                    is_pattern: true,
                    name: glob,
                    filter: Some(lanpush),
                }
            } else {
                Subscription {
                    is_pattern: false,
                    name: levels.join("/"),
                    filter: None,
                }
            }
        };
        let Some((&"#", prefix)) = levels.split_last() else {
            return Ok(vec![exact(&levels, pattern.to_string())]);
        };
        if prefix.is_empty() {
            return Ok(vec![Subscription {
                is_pattern: true,
                name: "*".into(),
                filter: None,
            }]);
        }
        let (prefix_glob, has_plus) = glob(prefix);
        let below = Subscription {
            is_pattern: true,
            name: format!("{prefix_glob}/*"),
            filter: has_plus.then(|| pattern.to_string()),
        };
        Ok(vec![below, exact(prefix, prefix.join("/"))])
    }
}

use codec::{Push, Subscription};

/// Makes Redis connections to one server.
pub(crate) struct RedisDriver {
    addr: SocketAddr,
}

impl RedisDriver {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Self { addr }
    }

    /// Connects and proves the server answers: sends `PING`, waits for `+PONG`.
    fn open(&self, rx_bytes: usize) -> io::Result<Conn> {
        let mut conn = Conn::new(connect(self.addr)?, rx_bytes);
        let mut out = Vec::with_capacity(32);
        codec::encode_command(&mut out, &[b"PING"]);
        conn.write_all(&out)?;
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            if let Some((reply, len)) = codec::parse(conn.rx.data())? {
                return match reply {
                    codec::Reply::Item(codec::Item::Simple(b"PONG")) => {
                        conn.rx.consume(len);
                        Ok(conn)
                    }
                    codec::Reply::Error(message) => Err(WireError::Refused {
                        proto: PROTO,
                        reason: String::from_utf8_lossy(message).into_owned(),
                    }
                    .into()),
                    _ => Err(WireError::Malformed {
                        proto: PROTO,
                        what: "reply to PING",
                    }
                    .into()),
                };
            }
            if Instant::now() >= deadline {
                return Err(confirmation_timeout(PROTO, "PONG"));
            }
            conn.fill_until(deadline)?;
        }
    }
}

impl Driver for RedisDriver {
    fn name(&self) -> &str {
        "redis"
    }

    /// The client id is not sent: Redis needs none.
    fn publisher(&self, _client_id: &str) -> io::Result<Box<dyn PubConn>> {
        let mut conn = self.open(64)?;
        let mut tx = Vec::with_capacity(2 * FLUSH_AT_BYTES);
        codec::encode_command(&mut tx, &[b"CLIENT", b"REPLY", b"OFF"]);
        conn.write_all(&tx)?;
        tx.clear();
        Ok(Box::new(RedisPub { conn, tx }))
    }

    fn subscriber(&self, _client_id: &str) -> io::Result<Box<dyn SubConn>> {
        let conn = self.open(READ_BUF_BYTES)?;
        Ok(Box::new(RedisSub {
            conn,
            tx: Vec::with_capacity(256),
            subscriptions: Vec::new(),
            stash: Stash::default(),
        }))
    }
}

/// A publishing connection: PUBLISH commands appended to `tx`, written per flush; the server
/// sends nothing back (`CLIENT REPLY OFF`).
struct RedisPub {
    conn: Conn,
    tx: Vec<u8>,
}

impl PubConn for RedisPub {
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        codec::encode_publish(&mut self.tx, topic, payload);
        if self.tx.len() >= FLUSH_AT_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.tx.is_empty() {
            self.conn.write_all(&self.tx)?;
            self.tx.clear();
        }
        Ok(())
    }
}

impl Drop for RedisPub {
    fn drop(&mut self) {
        self.conn.write_goodbye(&self.tx);
    }
}

/// A subscribing connection.
struct RedisSub {
    conn: Conn,
    tx: Vec<u8>,
    /// Every subscription made, for the filters of approximate globs.
    subscriptions: Vec<Subscription>,
    stash: Stash,
}

/// Whether a `pmessage` for glob `pattern` on `topic` is one the lanpush patterns behind that
/// glob match (at least one of them: several lanpush patterns may share a glob).
fn glob_delivers(subscriptions: &[Subscription], pattern: &[u8], topic: &str) -> bool {
    subscriptions.iter().any(|s| {
        s.is_pattern
            && s.name.as_bytes() == pattern
            && s.filter.as_deref().is_none_or(|f| topic_matches(f, topic))
    })
}

impl RedisSub {
    /// Parses every complete push in the buffer: messages go to `on_message`; confirmations
    /// whose names are in `awaiting` are removed from it.
    fn drain(
        &mut self,
        awaiting: &mut Vec<(bool, String)>,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize> {
        let mut delivered = 0;
        let mut used = 0;
        let data = self.conn.rx.data();
        let result = loop {
            let push = match codec::parse(&data[used..]) {
                Ok(Some((reply, len))) => {
                    used += len;
                    codec::classify(&reply)
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let (channel, payload) = match push {
                Ok(Push::Message { channel, payload }) => (channel, payload),
                Ok(Push::PMessage {
                    pattern,
                    channel,
                    payload,
                }) => {
                    let Ok(topic) = std::str::from_utf8(channel) else {
                        break Err(WireError::Malformed {
                            proto: PROTO,
                            what: "channel (not UTF-8)",
                        });
                    };
                    if !glob_delivers(&self.subscriptions, pattern, topic) {
                        continue;
                    }
                    (channel, payload)
                }
                Ok(Push::Subscribed { pattern, name }) => {
                    if let Some(i) = awaiting
                        .iter()
                        .position(|(p, n)| *p == pattern && n.as_bytes() == name)
                    {
                        awaiting.swap_remove(i);
                    }
                    continue;
                }
                Ok(Push::Error(message)) => {
                    let reason = String::from_utf8_lossy(message).into_owned();
                    break Err(WireError::Refused {
                        proto: PROTO,
                        reason,
                    });
                }
                Ok(Push::Other) => continue,
                Err(e) => break Err(e),
            };
            let Ok(topic) = std::str::from_utf8(channel) else {
                break Err(WireError::Malformed {
                    proto: PROTO,
                    what: "channel (not UTF-8)",
                });
            };
            on_message(topic, payload);
            delivered += 1;
        };
        self.conn.rx.consume(used);
        result?;
        Ok(delivered)
    }
}

impl SubConn for RedisSub {
    fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        let added = codec::subscriptions_for_pattern(pattern)?;
        let mut awaiting = Vec::with_capacity(added.len());
        for s in &added {
            let command: &[u8] = if s.is_pattern {
                b"PSUBSCRIBE"
            } else {
                b"SUBSCRIBE"
            };
            codec::encode_command(&mut self.tx, &[command, s.name.as_bytes()]);
            awaiting.push((s.is_pattern, s.name.clone()));
        }
        // Filters apply from the first message on, so they go in before the commands.
        self.subscriptions.extend(added);
        self.conn.write_all(&self.tx)?;
        self.tx.clear();
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut stash = std::mem::take(&mut self.stash);
        let result = loop {
            if let Err(e) = self.drain(&mut awaiting, &mut |t, p| stash.push(t, p)) {
                break Err(e);
            }
            if awaiting.is_empty() {
                break Ok(());
            }
            if Instant::now() >= deadline {
                break Err(confirmation_timeout(PROTO, "subscribe confirmation"));
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
        let mut none_awaited = Vec::new();
        let mut reads = 0;
        loop {
            let delivered = self.drain(&mut none_awaited, on_message)?;
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

    fn sub(is_pattern: bool, name: &str, filter: Option<&str>) -> Subscription {
        Subscription {
            is_pattern,
            name: name.into(),
            filter: filter.map(Into::into),
        }
    }

    #[test]
    fn pattern_translation() {
        let t = |p| subscriptions_for_pattern(p).unwrap();
        assert_eq!(t("a/b"), [sub(false, "a/b", None)]);
        assert_eq!(t("a/+/c"), [sub(true, "a/*/c", Some("a/+/c"))]);
        assert_eq!(t("#"), [sub(true, "*", None)]);
        assert_eq!(t("a/#"), [sub(true, "a/*", None), sub(false, "a", None)]);
        assert_eq!(
            t("a/+/#"),
            [
                sub(true, "a/*/*", Some("a/+/#")),
                sub(true, "a/*", Some("a/+"))
            ]
        );
        assert_eq!(
            t("+/#"),
            [sub(true, "*/*", Some("+/#")), sub(true, "*", Some("+"))]
        );
        assert_eq!(t("a*/+"), [sub(true, "a\\*/*", Some("a*/+"))]);
        assert!(subscriptions_for_pattern("a/#/b").is_err());
    }

    #[test]
    fn filters_make_globs_exact() {
        let mut subs = subscriptions_for_pattern("a/+/#").unwrap();
        // `a/x/y` reaches both globs; only `a/*/*` (for `a/+/#`) may deliver it.
        assert!(!glob_delivers(&subs, b"a/*", "a/x/y"));
        assert!(glob_delivers(&subs, b"a/*/*", "a/x/y"));
        assert!(glob_delivers(&subs, b"a/*", "a/x"));
        // Another lanpush pattern with the same glob and no filter lets it through.
        subs.extend(subscriptions_for_pattern("a/#").unwrap());
        assert!(glob_delivers(&subs, b"a/*", "a/x/y"));
        assert!(!glob_delivers(&subs, b"other", "a/x"));
    }

    #[test]
    fn commands_golden() {
        let mut out = Vec::new();
        encode_publish(&mut out, "a/b", b"xy");
        assert_eq!(out, b"*3\r\n$7\r\nPUBLISH\r\n$3\r\na/b\r\n$2\r\nxy\r\n");
        out.clear();
        encode_command(&mut out, &[b"PSUBSCRIBE", b"a/*"]);
        assert_eq!(out, b"*2\r\n$10\r\nPSUBSCRIBE\r\n$3\r\na/*\r\n");
    }

    #[test]
    fn replies_parse() {
        assert_eq!(
            parse(b"+PONG\r\n"),
            Ok(Some((Reply::Item(Item::Simple(b"PONG")), 7)))
        );
        assert_eq!(
            parse(b"-ERR no\r\n"),
            Ok(Some((Reply::Error(b"ERR no"), 9)))
        );
        assert_eq!(
            parse(b":-12\r\n"),
            Ok(Some((Reply::Item(Item::Int(-12)), 6)))
        );
        assert_eq!(
            parse(b"$-1\r\n"),
            Ok(Some((Reply::Item(Item::Bulk(None)), 5)))
        );
        assert_eq!(
            parse(b"$0\r\n\r\n"),
            Ok(Some((Reply::Item(Item::Bulk(Some(b""))), 6)))
        );
        let message = b"*3\r\n$7\r\nmessage\r\n$3\r\na/b\r\n$4\r\n\r\n\r\n\r\n";
        let (reply, len) = parse(message).unwrap().unwrap();
        assert_eq!(len, message.len());
        assert_eq!(
            classify(&reply),
            Ok(Push::Message {
                channel: b"a/b",
                payload: b"\r\n\r\n"
            })
        );
        let pmessage = b"*4\r\n$8\r\npmessage\r\n$3\r\na/*\r\n$3\r\na/b\r\n$1\r\nz\r\n";
        let (reply, len) = parse(pmessage).unwrap().unwrap();
        assert_eq!(len, pmessage.len());
        assert_eq!(
            classify(&reply),
            Ok(Push::PMessage {
                pattern: b"a/*",
                channel: b"a/b",
                payload: b"z"
            })
        );
        let confirm = b"*3\r\n$10\r\npsubscribe\r\n$3\r\na/*\r\n:1\r\n";
        let (reply, _) = parse(confirm).unwrap().unwrap();
        assert_eq!(
            classify(&reply),
            Ok(Push::Subscribed {
                pattern: true,
                name: b"a/*"
            })
        );
        let pong = b"*2\r\n$4\r\npong\r\n$0\r\n\r\n";
        let (reply, _) = parse(pong).unwrap().unwrap();
        assert_eq!(classify(&reply), Ok(Push::Other));
        let (reply, _) = parse(b"-ERR x\r\n").unwrap().unwrap();
        assert_eq!(classify(&reply), Ok(Push::Error(b"ERR x")));
    }

    #[test]
    fn malformed_replies_are_errors() {
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(b"+x\n").is_err());
        assert!(parse(b":1x\r\n").is_err());
        assert!(parse(b"$3\r\nabcXY").is_err());
        assert!(parse(b"*5\r\n").is_err());
        assert!(parse(b"*1\r\n*0\r\n").is_err());
        assert!(parse(b"*1\r\n-ERR\r\n").is_err());
        assert!(matches!(
            parse(b"$999999999999\r\n"),
            Err(WireError::TooLarge { .. })
        ));
        let (reply, _) = parse(b"*3\r\n$7\r\nmessage\r\n:1\r\n$1\r\nz\r\n")
            .unwrap()
            .unwrap();
        assert!(classify(&reply).is_err());
        let (reply, _) = parse(b"*2\r\n$7\r\nmessage\r\n$1\r\nz\r\n")
            .unwrap()
            .unwrap();
        assert!(classify(&reply).is_err());
    }

    #[test]
    fn stream_split_at_every_byte() {
        let wire: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n\
            *3\r\n$7\r\nmessage\r\n$1\r\na\r\n$5\r\nhello\r\n\
            *4\r\n$8\r\npmessage\r\n$1\r\n*\r\n$1\r\nb\r\n$0\r\n\r\n+PONG\r\n";
        let mut at = 0;
        let mut replies = 0;
        while let Some((_, len)) = parse(&wire[at..]).unwrap() {
            at += len;
            replies += 1;
        }
        assert_eq!((at, replies), (wire.len(), 4));
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
            wire.extend_from_slice(b"*4\r\n$8\r\npmessage\r\n$13\r\nbench/fanin/*\r\n");
            wire.extend_from_slice(b"$14\r\nbench/fanin/p7\r\n$64\r\n");
            wire.extend_from_slice(&[0u8; 64]);
            wire.extend_from_slice(b"\r\n");
        }
        let subs = subscriptions_for_pattern("bench/fanin/+").unwrap();
        let started = Instant::now();
        let mut n = 0u64;
        for _ in 0..250 {
            let mut at = 0;
            while let Some((reply, len)) = parse(&wire[at..]).unwrap() {
                let Push::PMessage {
                    pattern,
                    channel,
                    payload,
                } = classify(&reply).unwrap()
                else {
                    panic!("not a pmessage");
                };
                let topic = std::str::from_utf8(channel).unwrap();
                assert!(glob_delivers(&subs, pattern, topic));
                n += (topic.len() + payload.len()) as u64 / 78;
                at += len;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(n, 4096 * 250);
        println!(
            "redis: {:.1} M pmessage/s parsed and filtered",
            n as f64 / secs / 1e6
        );
    }

    /// A scripted server on loopback: PING, then the two subscriptions of `a/+/#`, a message
    /// for the glob's over-match (to be dropped) and one before the last confirmation.
    #[test]
    fn subscriber_against_scripted_server() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let expect = |s: &mut std::net::TcpStream, want: &[u8]| {
                let mut got = vec![0; want.len()];
                s.read_exact(&mut got).unwrap();
                assert_eq!(String::from_utf8_lossy(&got), String::from_utf8_lossy(want));
            };
            expect(&mut s, b"*1\r\n$4\r\nPING\r\n");
            s.write_all(b"+PONG\r\n").unwrap();
            expect(&mut s, b"*2\r\n$10\r\nPSUBSCRIBE\r\n$5\r\na/*/*\r\n*2\r\n$10\r\nPSUBSCRIBE\r\n$3\r\na/*\r\n");
            let mut out = Vec::new();
            out.extend_from_slice(b"*3\r\n$10\r\npsubscribe\r\n$5\r\na/*/*\r\n:1\r\n");
            out.extend_from_slice(
                b"*4\r\n$8\r\npmessage\r\n$3\r\na/*\r\n$5\r\na/x/y\r\n$4\r\ndrop\r\n",
            );
            out.extend_from_slice(
                b"*4\r\n$8\r\npmessage\r\n$3\r\na/*\r\n$3\r\na/x\r\n$4\r\nkeep\r\n",
            );
            out.extend_from_slice(b"*3\r\n$10\r\npsubscribe\r\n$3\r\na/*\r\n:2\r\n");
            for i in 1..=100u8 {
                out.extend_from_slice(
                    b"*4\r\n$8\r\npmessage\r\n$5\r\na/*/*\r\n$5\r\na/x/y\r\n$1\r\n",
                );
                out.push(i);
                out.extend_from_slice(b"\r\n");
            }
            s.write_all(&out).unwrap();
        });
        let driver = RedisDriver::new(addr);
        let mut sub = driver.subscriber("sub").unwrap();
        sub.subscribe("a/+/#").unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.len() < 101 && Instant::now() < deadline {
            sub.poll(Duration::from_millis(100), &mut |t, p| {
                seen.push((t.to_string(), p.to_vec()))
            })
            .unwrap();
        }
        assert_eq!(seen[0], ("a/x".to_string(), b"keep".to_vec()));
        assert_eq!(seen.len(), 101);
        assert!(seen[1..]
            .iter()
            .enumerate()
            .all(|(i, (t, p))| t == "a/x/y" && p[..] == [i as u8 + 1]));
        server.join().unwrap();
    }
}
