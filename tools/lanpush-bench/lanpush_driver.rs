//! The lanpush driver: the benchmark's [`Driver`] spoken directly over `std::net::TcpStream` with
//! `lanpush::proto`, not through the client library, so that the tool's own costs stay small and
//! visible: one 256 KiB receive buffer per subscriber decoded in place (no allocation per
//! message), and PUBLISH frames coalesced into one write per flush.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use lanpush::proto::{
    decode_frame, encode_control, encode_ping, encode_pong, encode_publish, frame_len_hint,
    Decoded, DeliveryMode, Frame, Hello, PublishRef, Subscribe, DATA_FLAG_SNAPSHOT,
    PROTOCOL_VERSION,
};

use crate::driver::{Driver, PubConn, SubConn};
use crate::recorder::intended_ns;

/// Receive buffer of a subscriber: large, so one read takes in thousands of small DATA frames.
const SUB_RECV_BUFFER_BYTES: usize = 256 * 1024;
/// Receive buffer of a publisher, which only ever reads PINGs and errors.
const PUB_RECV_BUFFER_BYTES: usize = 16 * 1024;
/// A read is not attempted into less free space than this: the partial frame at the end of the
/// buffer is moved to the front first.
const MIN_READ_BYTES: usize = 64 * 1024;
/// Reads per `poll` call at most (1 MiB with the default buffer): bounded work per connection
/// per turn of the subscriber thread, which comes back while the socket stays readable.
const MAX_READS_PER_POLL: usize = 4;
/// A publisher writes its buffer out once it holds this much, even before `flush`.
const PUB_WRITE_THRESHOLD_BYTES: usize = 64 * 1024;
/// How often a publisher looks for PINGs and errors from the engine.
const PUB_SERVICE_INTERVAL: Duration = Duration::from_millis(200);
/// Connect, HELLO and SUBSCRIBE must each complete within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A publisher blocked this long on a write gives up (the engine is not reading at all).
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive the benchmark asks for; runs are short and connections busy.
const KEEPALIVE_MS: u32 = 30_000;
/// Largest frame accepted before WELCOME told us the engine's limit.
const DEFAULT_MAX_FRAME_BYTES: usize = 1 << 20;
/// PUBLISH quality flag: OPC "good".
const QUALITY_GOOD: u8 = 192;

/// Connects to one lanpush engine.
pub struct LanpushDriver {
    addr: SocketAddr,
    /// Subscribers receive carried topics by UDP multicast (`McastSubscriber`).
    pub multicast: bool,
}

impl LanpushDriver {
    pub fn new(addr: &str) -> io::Result<Self> {
        let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{addr}: no address"))
        })?;
        Ok(Self {
            addr,
            multicast: false,
        })
    }
}

impl Driver for LanpushDriver {
    fn name(&self) -> &str {
        "lanpush"
    }

    fn publisher(&self, client_id: &str) -> io::Result<Box<dyn PubConn>> {
        let wire = Wire::connect(self.addr, client_id, PUB_RECV_BUFFER_BYTES)?;
        wire.stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        Ok(Box::new(LanpushPub {
            wire,
            out: Vec::with_capacity(PUB_WRITE_THRESHOLD_BYTES * 2),
            last_service: Instant::now(),
        }))
    }

    fn subscriber(&self, client_id: &str) -> io::Result<Box<dyn SubConn>> {
        if self.multicast {
            return Ok(Box::new(McastSub {
                opts: lanpush::client::ClientOptions::new(self.addr.to_string())
                    .client_id(client_id)
                    // Connecting a thousand receivers one by one takes longer than the default
                    // keep-alive, and none is polled meanwhile.
                    .keepalive_ms(60_000)
                    // The TCP session carries only control frames and repairs here: 8,000
                    // receivers with the default 64 KiB would hold 512 MiB for little.
                    .read_buffer_bytes(16 * 1024),
                sub: None,
            }));
        }
        let wire = Wire::connect(self.addr, client_id, SUB_RECV_BUFFER_BYTES)?;
        wire.stream.set_nonblocking(true)?;
        Ok(Box::new(LanpushSub {
            wire,
            next_sub_id: 1,
        }))
    }
}

/// A multicast receiver (`--multicast`): the library's `McastSubscriber`, one pattern, read
/// with `next_batch` (`recvmmsg`, messages borrowed from the datagrams).
struct McastSub {
    opts: lanpush::client::ClientOptions,
    sub: Option<lanpush::client::McastSubscriber>,
}

impl SubConn for McastSub {
    fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        let sub = lanpush::client::McastSubscriber::connect(
            self.opts.clone(),
            lanpush::client::McastOptions::default(),
            vec![pattern.to_string()],
            lanpush::proto::DeliveryMode::All,
        )
        .map_err(io::Error::other)?;
        self.sub = Some(sub);
        Ok(())
    }

    fn poll(
        &mut self,
        timeout: Duration,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize> {
        let Some(sub) = self.sub.as_mut() else {
            return Err(io::Error::other("poll before subscribe"));
        };
        // Borrowed from the datagrams (`next_batch`): no allocation per message. One batch
        // per call: the tool calls again while the group socket stays readable.
        let mut n = 0;
        sub.next_batch(timeout, |event| {
            if let lanpush::client::EventRef::Message(m) = event {
                on_message(m.topic, m.payload);
                n += 1;
            }
        })
        .map_err(io::Error::other)?;
        Ok(n)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.sub.as_ref().and_then(|s| s.group_fd())
    }
}

fn invalid_data(error: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error.to_string())
}

fn engine_error(code: u16, reason: &str) -> io::Error {
    io::Error::other(format!("engine sent ERROR {code}: {reason}"))
}

/// A byte buffer that frames are read into and decoded from in place.
struct RecvBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RecvBuf {
    fn new(capacity: usize) -> Self {
        Self {
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    fn filled(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Free space a read can use without compacting (approximately: `read_from` may compact).
    fn room(&self) -> usize {
        self.buf.len() - self.end
    }

    /// One `read` into the free space; `Ok(0)` never happens (end of stream is an error).
    fn read_from(&mut self, stream: &mut TcpStream) -> io::Result<usize> {
        if self.buf.len() - self.end < MIN_READ_BYTES.min(self.buf.len() / 2) && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        // A frame larger than the whole buffer: grow to hold it (bounded by max_frame_bytes,
        // which the decoder enforced on the length prefix before we get here).
        if let Some(total) = frame_len_hint(self.filled()) {
            if total > self.buf.len() - self.start {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.buf.resize(total.max(self.buf.len()), 0);
            }
        }
        if self.end == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = stream.read(&mut self.buf[self.end..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the engine closed the connection",
            ));
        }
        self.end += n;
        Ok(n)
    }
}

/// A connection after HELLO/WELCOME.
struct Wire {
    stream: TcpStream,
    rx: RecvBuf,
    max_frame_bytes: usize,
    keepalive: Duration,
    last_sent: Instant,
}

impl Wire {
    fn connect(addr: SocketAddr, client_id: &str, recv_buffer_bytes: usize) -> io::Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut wire = Wire {
            stream,
            rx: RecvBuf::new(recv_buffer_bytes),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            keepalive: Duration::from_millis(KEEPALIVE_MS as u64),
            last_sent: Instant::now(),
        };
        let mut hello = Vec::new();
        encode_control(
            &mut hello,
            &Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                client_id: client_id.to_string(),
                keepalive_ms: KEEPALIVE_MS,
                token: String::new(),
                features: 0,
            }),
        );
        wire.send_blocking(&hello)?;
        let welcome = wire.await_frame("WELCOME", |frame| match frame {
            Frame::Welcome(welcome) => Ok(Some(welcome)),
            _ => Ok(None),
        })?;
        wire.max_frame_bytes = (welcome.max_frame_bytes as usize).max(64);
        if welcome.keepalive_ms > 0 {
            wire.keepalive = Duration::from_millis(welcome.keepalive_ms as u64);
        }
        Ok(wire)
    }

    /// Writes all of `bytes`, waiting for the socket if it is non-blocking.
    fn send_blocking(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        while !bytes.is_empty() {
            match self.stream.write(bytes) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(e) => return Err(e),
            }
        }
        self.last_sent = Instant::now();
        Ok(())
    }

    /// Reads frames until `pick` returns a value, answering PINGs and failing on ERROR. Frames
    /// `pick` does not want (DATA of the retained snapshot, for example) are dropped.
    fn await_frame<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(Frame<'_>) -> io::Result<Option<T>>,
    ) -> io::Result<T> {
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let mut pong = Vec::new();
        loop {
            while let Decoded::Frame(frame, used) =
                decode_frame(self.rx.filled(), self.max_frame_bytes).map_err(invalid_data)?
            {
                let picked = match frame {
                    Frame::Ping { nonce } => {
                        encode_pong(&mut pong, nonce);
                        None
                    }
                    Frame::Error(error) => return Err(engine_error(error.code, &error.reason)),
                    other => pick(other)?,
                };
                self.rx.consume(used);
                if !pong.is_empty() {
                    let bytes = std::mem::take(&mut pong);
                    self.send_blocking(&bytes)?;
                }
                if let Some(value) = picked {
                    return Ok(value);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no {what} from the engine within {HANDSHAKE_TIMEOUT:?}"),
                ));
            }
            match self.rx.read_from(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::TimedOut =>
                {
                    crate::sys::wait_readable(self.stream.as_raw_fd(), left)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// A publishing connection: PUBLISH frames accumulate in `out` and go out in one write.
struct LanpushPub {
    wire: Wire,
    out: Vec<u8>,
    last_service: Instant,
}

impl LanpushPub {
    fn write_out(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.wire.stream.write_all(&self.out)?;
            self.out.clear();
            self.wire.last_sent = Instant::now();
        }
        Ok(())
    }

    /// Reads whatever the engine sent without blocking: answers PINGs, surfaces ERRORs, and
    /// sends a PING of our own when we have been quiet for a third of the keep-alive.
    fn service(&mut self) -> io::Result<()> {
        self.last_service = Instant::now();
        self.wire.stream.set_nonblocking(true)?;
        let read = self.drain_incoming();
        self.wire.stream.set_nonblocking(false)?;
        read?;
        if self.wire.last_sent.elapsed() >= self.wire.keepalive / 3 {
            encode_ping(&mut self.out, 0);
        }
        Ok(())
    }

    fn drain_incoming(&mut self) -> io::Result<()> {
        loop {
            match self.wire.rx.read_from(&mut self.wire.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            while let Decoded::Frame(frame, used) =
                decode_frame(self.wire.rx.filled(), self.wire.max_frame_bytes)
                    .map_err(invalid_data)?
            {
                match frame {
                    Frame::Ping { nonce } => encode_pong(&mut self.out, nonce),
                    Frame::Error(error) => return Err(engine_error(error.code, &error.reason)),
                    _ => {}
                }
                self.wire.rx.consume(used);
            }
        }
    }
}

impl PubConn for LanpushPub {
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()> {
        encode_publish(
            &mut self.out,
            &PublishRef {
                topic,
                // The intended send time doubles as the source timestamp, so the engine's own
                // source-to-write histograms line up with the benchmark's.
                source_ts_ns: intended_ns(payload).unwrap_or(0),
                quality: QUALITY_GOOD,
                payload,
            },
        );
        if self.out.len() >= PUB_WRITE_THRESHOLD_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.last_service.elapsed() >= PUB_SERVICE_INTERVAL {
            self.service()?;
        }
        self.write_out()
    }
}

/// A subscribing connection, non-blocking once connected.
struct LanpushSub {
    wire: Wire,
    next_sub_id: u32,
}

impl LanpushSub {
    /// Decodes every complete frame in the buffer; returns the DATA messages delivered.
    fn decode_buffered(
        &mut self,
        pong: &mut Vec<u8>,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize> {
        let mut delivered = 0;
        while let Decoded::Frame(frame, used) =
            decode_frame(self.wire.rx.filled(), self.wire.max_frame_bytes).map_err(invalid_data)?
        {
            match frame {
                // Retained values sent on subscribe are not part of the measurement.
                Frame::Data {
                    header,
                    topic,
                    payload,
                } if header.flags & DATA_FLAG_SNAPSHOT == 0 => {
                    on_message(topic, payload);
                    delivered += 1;
                }
                Frame::Ping { nonce } => encode_pong(pong, nonce),
                Frame::Error(error) => return Err(engine_error(error.code, &error.reason)),
                // Snapshots; GAP (the loss shows in the counts); SUBACK, PONG: nothing to do.
                _ => {}
            }
            self.wire.rx.consume(used);
        }
        Ok(delivered)
    }
}

impl SubConn for LanpushSub {
    fn subscribe(&mut self, pattern: &str) -> io::Result<()> {
        let sub_id = self.next_sub_id;
        self.next_sub_id += 1;
        let mut frame = Vec::new();
        encode_control(
            &mut frame,
            &Frame::Subscribe(Subscribe {
                sub_id,
                pattern: pattern.to_string(),
                mode: DeliveryMode::Default,
                resume: vec![],
            }),
        );
        self.wire.send_blocking(&frame)?;
        self.wire.await_frame("SUBACK", |frame| match frame {
            Frame::SubAck(ack) if ack.sub_id == sub_id => Ok(Some(())),
            _ => Ok(None),
        })
    }

    fn poll(
        &mut self,
        timeout: Duration,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize> {
        let mut pong = Vec::new();
        let mut delivered = self.decode_buffered(&mut pong, on_message)?;
        let mut waited = timeout.is_zero();
        let mut reads = 0;
        while reads < MAX_READS_PER_POLL {
            let room = self.wire.rx.room();
            match self.wire.rx.read_from(&mut self.wire.stream) {
                Ok(n) => {
                    reads += 1;
                    delivered += self.decode_buffered(&mut pong, on_message)?;
                    // A read that did not fill the buffer almost surely drained the socket: skip
                    // the read that would only say WouldBlock (the caller's epoll is
                    // level-triggered and reports any bytes that arrived since).
                    if n < room && (delivered > 0 || timeout.is_zero()) {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if delivered > 0 || waited {
                        break;
                    }
                    waited = true;
                    crate::sys::wait_readable(self.wire.stream.as_raw_fd(), timeout)?;
                }
                Err(e) => return Err(e),
            }
        }
        if self.wire.last_sent.elapsed() >= self.wire.keepalive / 3 {
            encode_ping(&mut pong, 0);
        }
        if !pong.is_empty() {
            // A few bytes on a socket that never sends much: the send buffer has room.
            self.wire.send_blocking(&pong)?;
        }
        Ok(delivered)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.wire.stream.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lanpush::proto::{encode_data, DataHeader, SubAck, Welcome};
    use std::net::TcpListener;

    /// A scripted engine writes 20,000 DATA frames in odd-sized pieces (frames split across reads,
    /// thousands per read); the subscriber delivers each once, in order, and skips the snapshot.
    #[test]
    fn subscriber_decodes_frames_split_and_batched_across_reads() {
        const MESSAGES: u64 = 20_000;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut buf = vec![0u8; 4096];
            let mut filled = 0;
            let mut frames_seen = 0;
            while frames_seen < 2 {
                filled += stream.read(&mut buf[filled..]).unwrap();
                while let Ok(Decoded::Frame(frame, used)) = decode_frame(&buf[..filled], 1 << 20) {
                    let mut out = Vec::new();
                    match frame {
                        Frame::Hello(_) => encode_control(
                            &mut out,
                            &Frame::Welcome(Welcome {
                                version: PROTOCOL_VERSION,
                                keepalive_ms: 30_000,
                                max_frame_bytes: 1 << 20,
                                max_subscriptions: 4,
                                reactor: 0,
                                connection_id: 9,
                                engine_id: 9,
                                engine_version: String::new(),
                            }),
                        ),
                        Frame::Subscribe(s) => encode_control(
                            &mut out,
                            &Frame::SubAck(SubAck {
                                sub_id: s.sub_id,
                                mode: s.mode,
                            }),
                        ),
                        other => panic!("unexpected {other:?}"),
                    }
                    stream.write_all(&out).unwrap();
                    buf.copy_within(used..filled, 0);
                    filled -= used;
                    frames_seen += 1;
                }
            }
            let mut all = Vec::new();
            let snapshot = DataHeader {
                flags: DATA_FLAG_SNAPSHOT,
                ..Default::default()
            };
            encode_data(&mut all, &snapshot, "t/x", &[0u8; 8]);
            for i in 0..MESSAGES {
                let header = DataHeader {
                    seq: i + 1,
                    ..Default::default()
                };
                encode_data(&mut all, &header, "t/x", &i.to_le_bytes());
            }
            let mut at = 0;
            let mut piece = 1;
            while at < all.len() {
                let end = (at + piece).min(all.len());
                stream.write_all(&all[at..end]).unwrap();
                at = end;
                piece = (piece * 7 + 13) % 70_000 + 1;
            }
            stream
        });
        let driver = LanpushDriver::new(&addr).unwrap();
        let mut sub = driver.subscriber("t").unwrap();
        sub.subscribe("t/#").unwrap();
        let mut next = 0u64;
        let deadline = Instant::now() + Duration::from_secs(20);
        while next < MESSAGES && Instant::now() < deadline {
            sub.poll(Duration::from_millis(100), &mut |topic, payload| {
                assert_eq!(topic, "t/x");
                assert_eq!(u64::from_le_bytes(payload.try_into().unwrap()), next);
                next += 1;
            })
            .unwrap();
        }
        assert_eq!(next, MESSAGES);
        let _stream = server.join().unwrap();
    }
}
