//! One TCP connection to the engine: connect, handshake, and a growable receive buffer that
//! holds many frames per read.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::stream::{tls_cause, Stream};
use super::{ClientError, ClientOptions};
use crate::proto::{
    decode_frame, encode_control, error_code, frame_len_hint, hello_features, Decoded, Frame,
    Hello, Welcome, LEN_PREFIX_BYTES, PROTOCOL_VERSION,
};

/// Largest frame accepted from the engine. DATA frames are bounded by the engine's
/// `max_frame_bytes`, but a STATS document may be larger; this only stops a corrupt length
/// prefix from making the client allocate without bound.
pub(crate) const MAX_INBOUND_FRAME_BYTES: usize = 64 << 20;

/// What one read did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Bytes were appended to the buffer.
    Data,
    /// The engine closed the connection.
    Eof,
    /// Nothing arrived within the timeout (or at once, for a non-blocking read).
    WouldBlock,
}

pub(crate) struct Conn {
    stream: Stream,
    pub(crate) welcome: Welcome,
    /// Storage; `buf[start..end]` holds received bytes not yet decoded.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pub(crate) last_send: Instant,
    pub(crate) last_recv: Instant,
}

impl Conn {
    /// Connects and completes HELLO → WELCOME within `opts.connect_timeout`, asking for the
    /// engine's version. An engine older than HELLO's features refuses the trailing field as
    /// MALFORMED: then once more without it (WELCOME's `engine_version` stays empty).
    pub(crate) fn open(
        opts: &ClientOptions,
        read_buffer_bytes: usize,
    ) -> Result<Conn, ClientError> {
        match Conn::open_with(opts, read_buffer_bytes, hello_features::ENGINE_VERSION) {
            Err(ClientError::Engine {
                code: error_code::MALFORMED,
                ..
            }) => Conn::open_with(opts, read_buffer_bytes, 0),
            result => result,
        }
    }

    fn open_with(
        opts: &ClientOptions,
        read_buffer_bytes: usize,
        features: u32,
    ) -> Result<Conn, ClientError> {
        let deadline = Instant::now() + opts.connect_timeout;
        let socket = connect_stream(&opts.server, opts.connect_timeout)?;
        socket.set_nodelay(true)?;
        let stream = Stream::open(socket, opts.tls.as_ref(), &opts.server, deadline)?;
        stream
            .socket()
            .set_write_timeout(Some(opts.io_timeout.max(Duration::from_millis(1))))?;
        let now = Instant::now();
        let mut conn = Conn {
            stream,
            welcome: Welcome::default(),
            buf: vec![0; read_buffer_bytes.max(LEN_PREFIX_BYTES * 64)],
            start: 0,
            end: 0,
            last_send: now,
            last_recv: now,
        };
        let mut hello = Vec::new();
        encode_control(
            &mut hello,
            &Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                client_id: opts.client_id.clone(),
                keepalive_ms: opts.keepalive_ms,
                token: opts
                    .token
                    .as_ref()
                    .map_or_else(String::new, |t| t.as_str().to_string()),
                features,
            }),
        );
        // With TLS 1.3 the engine checks a client certificate after the client's side of the
        // handshake is done: its refusal arrives as an alert here, and is told as such.
        let tls_refusal = |e: ClientError| match &e {
            ClientError::Io(io) if opts.tls.is_some() => match tls_cause(io) {
                Some(cause) => ClientError::Tls {
                    addr: opts.server.clone(),
                    reason: format!("the engine refused the connection: {cause}"),
                },
                None => e,
            },
            _ => e,
        };
        conn.send(&hello).map_err(|e| tls_refusal(e.into()))?;
        conn.welcome = conn
            .await_welcome(deadline, opts.connect_timeout)
            .map_err(tls_refusal)?;
        Ok(conn)
    }

    fn await_welcome(
        &mut self,
        deadline: Instant,
        budget: Duration,
    ) -> Result<Welcome, ClientError> {
        loop {
            // Decide inside a block so the borrow of the buffer ends before we read again.
            let step = match decode_frame(self.pending(), MAX_INBOUND_FRAME_BYTES)? {
                Decoded::Frame(frame, used) => Some((
                    match frame {
                        Frame::Welcome(w) if w.version == PROTOCOL_VERSION => Ok(w),
                        Frame::Welcome(w) => Err(ClientError::Handshake(format!(
                            "engine speaks protocol version {}, this client {PROTOCOL_VERSION}",
                            w.version
                        ))),
                        Frame::Error(e) => Err(ClientError::Engine {
                            code: e.code,
                            reason: e.reason,
                        }),
                        other => Err(ClientError::Handshake(format!(
                            "expected WELCOME, got {}",
                            frame_name(&other)
                        ))),
                    },
                    used,
                )),
                Decoded::NeedMore(_) => None,
            };
            if let Some((result, used)) = step {
                self.consume(used);
                return result;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Handshake(format!(
                    "no WELCOME within {budget:?}"
                )));
            }
            if self.fill(Some(deadline - now))? == Fill::Eof {
                return Err(ClientError::Handshake(
                    "the engine closed the connection before WELCOME".into(),
                ));
            }
        }
    }

    /// Writes all of `bytes` (blocking, bounded by `io_timeout`). A short write followed by an
    /// error leaves the stream mid-frame: the caller must drop the connection.
    ///
    /// Returns how long the write had to wait for the kernel to take the bytes: `None` when it
    /// took them at once. A wait means the engine is not reading this connection fast enough:
    /// it is pacing this publisher (docs/ARCHITECTURE.md, "Pacing").
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<Option<Duration>> {
        // One non-blocking attempt first (a flag on the call, not on the socket), so that a
        // wait is seen rather than guessed from timings.
        let waited = self.stream.send(bytes)?;
        self.last_send = Instant::now();
        Ok(waited)
    }

    /// The socket's descriptor, for a caller that waits on several sockets (with TLS, bytes
    /// rustls already decrypted do not show on it: not for TLS connections).
    pub(crate) fn raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(self.stream.socket())
    }

    /// Received bytes not yet consumed.
    pub(crate) fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.end - self.start);
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// One read into the buffer: blocking up to `timeout`, or non-blocking when it is `None`.
    /// The caller must have decoded every complete frame first (the buffer grows to fit the
    /// frame in progress, not to hold an unbounded backlog).
    pub(crate) fn fill(&mut self, timeout: Option<Duration>) -> io::Result<Fill> {
        self.make_room();
        let result = self.stream.read(&mut self.buf[self.end..], timeout);
        match result {
            Ok(0) => Ok(Fill::Eof),
            Ok(n) => {
                self.end += n;
                self.last_recv = Instant::now();
                Ok(Fill::Data)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(Fill::WouldBlock)
            }
            Err(e) => Err(e),
        }
    }

    fn make_room(&mut self) {
        let pending = self.end - self.start;
        let needed = frame_len_hint(self.pending())
            .unwrap_or(LEN_PREFIX_BYTES)
            .min(MAX_INBOUND_FRAME_BYTES + LEN_PREFIX_BYTES);
        if self.start > 0 && (self.end == self.buf.len() || self.buf.len() - self.start < needed) {
            self.buf.copy_within(self.start..self.end, 0);
            self.start = 0;
            self.end = pending;
        }
        if self.buf.len() < needed {
            self.buf.resize(needed, 0);
        }
        if self.end == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
    }
}

fn connect_stream(server: &str, timeout: Duration) -> Result<TcpStream, ClientError> {
    let connect_err = |source| ClientError::Connect {
        addr: server.to_string(),
        source,
    };
    let mut last_err = io::Error::new(io::ErrorKind::InvalidInput, "address resolves to nothing");
    for addr in server.to_socket_addrs().map_err(connect_err)? {
        match TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1))) {
            Ok(stream) => return Ok(stream),
            Err(e) => last_err = e,
        }
    }
    Err(connect_err(last_err))
}

/// The protocol name of a frame, for messages.
pub(crate) fn frame_name(frame: &Frame<'_>) -> &'static str {
    match frame {
        Frame::Hello(_) => "HELLO",
        Frame::Welcome(_) => "WELCOME",
        Frame::Subscribe(_) => "SUBSCRIBE",
        Frame::Unsubscribe(_) => "UNSUBSCRIBE",
        Frame::SubAck(_) => "SUBACK",
        Frame::Publish(_) => "PUBLISH",
        Frame::Data { .. } => "DATA",
        Frame::Ping { .. } => "PING",
        Frame::Pong { .. } => "PONG",
        Frame::AckRequest { .. } => "ACK_REQUEST",
        Frame::Ack { .. } => "ACK",
        Frame::Error(_) => "ERROR",
        Frame::Gap(_) => "GAP",
        Frame::StatsRequest => "STATS_REQUEST",
        Frame::Stats(_) => "STATS",
        Frame::Multicast(_) => "MULTICAST",
    }
}
