//! The blocking, batching publisher.

use std::time::{Duration, Instant};

use super::conn::{Conn, Fill, MAX_INBOUND_FRAME_BYTES};
use super::error::error_code_name;
use super::options::Reconnect;
use super::unconfirmed::Unconfirmed;
use super::{deadline_after, now_ns, ping_interval, ClientError, ClientOptions};
use crate::proto::{
    decode_frame, encode_ack_request, encode_ping, encode_pong, encode_publish, validate_topic,
    DecodeError, Decoded, Frame, PublishRef, Welcome, WireError, FRAME_HEADER_BYTES,
    LEN_PREFIX_BYTES, PUBLISH_FIXED_BYTES,
};

/// Buffered bytes past which a publish writes the buffer out: many frames per `write`.
pub const FLUSH_AT_BYTES: usize = 16 * 1024;

/// The quality [`Publisher::publish`] sends: "good" on the OPC scale (0 bad .. 192 good).
pub const QUALITY_GOOD: u8 = 192;

/// A publisher receives little (PONG, PING, ERROR): a small buffer that grows if it must.
const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Non-blocking reads per inbound check: enough to drain a few control frames, bounded so a
/// flood from the engine cannot hold up publishing.
const MAX_READS_PER_CHECK: usize = 4;

/// Counters of one [`Publisher`], cumulative across reconnections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublisherCounters {
    /// PUBLISH frames handed to the kernel.
    pub published: u64,
    /// `write` calls that carried them (publishes per write = batching factor).
    pub writes: u64,
    pub bytes_written: u64,
    /// PUBLISH frames dropped from the buffer because the connection broke before they were
    /// written. Each loss was also reported by a `ConnectionLost` error.
    pub lost: u64,
    pub disconnects: u64,
    pub reconnects: u64,
    /// ERROR frames received from the engine.
    pub engine_errors: u64,
    pub pings_sent: u64,
    /// Writes that had to wait for the engine to take their bytes: the engine was pacing this
    /// publisher (its subscribers in mode `all` were behind), or the network was slow.
    pub paced_writes: u64,
    /// Time spent waiting in those writes, in nanoseconds.
    pub paced_ns: u64,
    /// With acknowledgements ([`ClientOptions::publisher_acks`]): messages the engine has
    /// confirmed taking (they are numbered from 1, so this is also the last one confirmed).
    pub confirmed: u64,
    /// With acknowledgements: PUBLISH frames written again after a reconnect because the
    /// engine had not confirmed them.
    pub resent: u64,
}

/// Publishes to the engine over one TCP connection, batching frames into large writes.
///
/// Contract: frames are written when the next one would take the buffer past
/// [`FLUSH_AT_BYTES`] (so up to 16 KiB go out per `write`), on [`flush`],
/// [`keepalive_tick`], [`confirm`] and drop. An application that publishes in bursts calls
/// `flush` at the end of each burst; one that may be idle for more than half the keep-alive
/// must call `keepalive_tick` at least that often. Errors the engine reports (ERROR frames)
/// surface from the next `flush`/`publish` that writes, or from `confirm`.
///
/// **Acknowledgements** ([`ClientOptions::publisher_acks`], off by default): the publisher
/// numbers its messages and keeps each one, up to that many bytes, until the engine confirms
/// it (an ACK frame, cumulative, about once per engine loop turn; docs/PROTOCOL.md §5.8). After
/// a reconnect it writes every unconfirmed message again, first; the engine drops those it had
/// already taken on the earlier connection, so within one run of the engine each message is
/// taken exactly once. An engine that was restarted remembers nothing: what it took but had
/// not confirmed before it died is taken again (at least once). A publish that finds the
/// buffer full waits up to `io_timeout` for ACKs. `ConnectionLost` then reports 0 lost frames.
///
/// [`flush`]: Publisher::flush
/// [`keepalive_tick`]: Publisher::keepalive_tick
/// [`confirm`]: Publisher::confirm
pub struct Publisher {
    opts: ClientOptions,
    conn: Option<Conn>,
    /// Encoded frames not yet written.
    out: Vec<u8>,
    /// PUBLISH frames in `out`.
    out_frames: u64,
    max_frame_bytes: usize,
    nonce: u64,
    /// An ERROR read from the engine and not yet returned to the caller.
    engine_error: Option<WireError>,
    last_pong: u64,
    reconnect: Reconnect,
    counters: PublisherCounters,
    /// With acknowledgements: the frames the engine has not confirmed.
    acks: Option<Unconfirmed>,
}

impl Publisher {
    /// Connects and completes the handshake. A failure here is returned, not retried.
    pub fn connect(opts: ClientOptions) -> Result<Publisher, ClientError> {
        let conn = Conn::open(&opts, READ_BUFFER_BYTES)?;
        let reconnect = Reconnect::new(opts.reconnect);
        let acks = opts.publisher_acks.map(Unconfirmed::new);
        let mut publisher = Publisher {
            max_frame_bytes: conn.welcome.max_frame_bytes as usize,
            conn: Some(conn),
            opts,
            out: Vec::with_capacity(2 * FLUSH_AT_BYTES),
            out_frames: 0,
            nonce: 0,
            engine_error: None,
            last_pong: 0,
            reconnect,
            counters: PublisherCounters::default(),
            acks,
        };
        publisher.start_acks()?;
        Ok(publisher)
    }

    /// Publishes `payload` on `topic` with quality [`QUALITY_GOOD`] and the current time as the
    /// source timestamp. See [`Publisher::publish_with`].
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), ClientError> {
        self.publish_with(topic, payload, QUALITY_GOOD, now_ns())
    }

    /// Encodes one PUBLISH into the buffer. First writes out what is buffered if this frame
    /// would take the buffer past [`FLUSH_AT_BYTES`] or a keep-alive PING is due, so `Ok` means
    /// the message is buffered (or written) and any `Err` means *this* message was not taken:
    /// `ConnectionLost` counts only frames buffered before it, and `Engine` is about an earlier
    /// frame.
    pub fn publish_with(
        &mut self,
        topic: &str,
        payload: &[u8],
        quality: u8,
        source_ts_ns: u64,
    ) -> Result<(), ClientError> {
        validate_topic(topic, self.opts.max_topic_bytes).map_err(|source| ClientError::Topic {
            topic: topic.to_string(),
            source,
        })?;
        self.ensure_connected()?;
        let frame_bytes = FRAME_HEADER_BYTES - LEN_PREFIX_BYTES
            + PUBLISH_FIXED_BYTES
            + topic.len()
            + payload.len();
        if frame_bytes > self.max_frame_bytes {
            return Err(ClientError::TooLarge {
                frame_bytes,
                max_frame_bytes: self.max_frame_bytes,
            });
        }
        let passes_threshold = !self.out.is_empty()
            && self.out.len() + LEN_PREFIX_BYTES + frame_bytes > FLUSH_AT_BYTES;
        if passes_threshold || self.ping_due(Instant::now()) {
            self.flush()?;
        }
        if self
            .acks
            .as_ref()
            .is_some_and(|a| !a.has_room(LEN_PREFIX_BYTES + frame_bytes))
        {
            self.flush()?;
            self.wait_for_room(LEN_PREFIX_BYTES + frame_bytes)?;
        }
        let start = self.out.len();
        encode_publish(
            &mut self.out,
            &PublishRef {
                topic,
                source_ts_ns,
                quality,
                payload,
            },
        );
        self.out_frames += 1;
        if let Some(acks) = self.acks.as_mut() {
            acks.push(&self.out[start..]);
        }
        Ok(())
    }

    /// With acknowledgements, a full unconfirmed buffer: waits (up to `io_timeout`) for ACKs
    /// that make room for `len` bytes.
    fn wait_for_room(&mut self, len: usize) -> Result<(), ClientError> {
        let timeout = self.opts.io_timeout;
        let deadline = deadline_after(Instant::now(), timeout);
        loop {
            if let Err(e) = self.handle_inbound() {
                return Err(self.lose(format!("undecodable frame from the engine: {e}")));
            }
            if !self.out.is_empty() {
                // PONGs to the engine's PINGs: nothing publishes meanwhile.
                let conn = self.conn.as_mut().expect("connected while waiting");
                if let Err(e) = conn.send(&self.out) {
                    return Err(self.lose(format!("write failed: {e}")));
                }
                self.out.clear();
            }
            if self.acks.as_ref().is_none_or(|a| a.has_room(len)) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(timeout));
            }
            let Some(conn) = self.conn.as_mut() else {
                self.ensure_connected()?;
                continue;
            };
            match conn.fill(Some(deadline - now)) {
                Ok(Fill::Data | Fill::WouldBlock) => {}
                Ok(Fill::Eof) => return Err(self.lose("the engine closed the connection".into())),
                Err(e) => return Err(self.lose(format!("read failed: {e}"))),
            }
        }
    }

    /// With acknowledgements, on a new connection: ACK_REQUEST numbering from the oldest
    /// unconfirmed message, then every unconfirmed frame again, in one write.
    fn start_acks(&mut self) -> Result<(), ClientError> {
        let (Some(acks), Some(conn)) = (self.acks.as_ref(), self.conn.as_mut()) else {
            return Ok(());
        };
        let mut bytes = Vec::with_capacity(32 + acks.bytes());
        encode_ack_request(&mut bytes, acks.publisher_id, acks.first_seq());
        bytes.extend_from_slice(acks.pending());
        let resent = acks.frames() as u64;
        if let Err(e) = conn.send(&bytes) {
            return Err(self.lose(format!("write failed: {e}")));
        }
        self.counters.resent += resent;
        self.counters.bytes_written += bytes.len() as u64;
        self.counters.writes += 1;
        Ok(())
    }

    /// Writes everything buffered (with a PING if one is due), after a non-blocking check for
    /// frames from the engine: a PING is answered, an ERROR is returned, a closed connection is
    /// reported as `ConnectionLost` with the number of buffered frames lost. When disconnected,
    /// tries to reconnect if the back-off allows.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.ensure_connected()?;
        if let Err(cause) = self.check_inbound() {
            return Err(self.lose(cause));
        }
        let now = Instant::now();
        if self.ping_due(now) {
            self.nonce += 1;
            encode_ping(&mut self.out, self.nonce);
            self.counters.pings_sent += 1;
        }
        if !self.out.is_empty() {
            let conn = self.conn.as_mut().expect("ensure_connected returned Ok");
            match conn.send(&self.out) {
                Ok(None) => {}
                Ok(Some(waited)) => {
                    self.counters.paced_writes += 1;
                    self.counters.paced_ns += waited.as_nanos() as u64;
                }
                Err(e) => return Err(self.lose(format!("write failed: {e}"))),
            }
            self.counters.published += self.out_frames;
            self.counters.writes += 1;
            self.counters.bytes_written += self.out.len() as u64;
            self.out.clear();
            self.out_frames = 0;
        }
        match self.engine_error.take() {
            Some(e) => Err(ClientError::Engine {
                code: e.code,
                reason: e.reason,
            }),
            None => Ok(()),
        }
    }

    /// Keeps an idle connection alive: writes anything buffered, PINGs if half the keep-alive
    /// passed without a write, answers the engine's PINGs, and reconnects if the connection
    /// broke and the back-off allows. Cheap when there is nothing to do (one non-blocking read).
    /// Call it at least every half keep-alive while not publishing.
    pub fn keepalive_tick(&mut self) -> Result<(), ClientError> {
        self.flush()
    }

    /// Flushes, then waits (up to `timeout`) for the engine to answer a PING. The engine handles
    /// a connection's frames in order, so once this returns `Ok` every PUBLISH written before it
    /// was taken in; an ERROR the engine sent about any of them is returned instead.
    pub fn confirm(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.flush()?;
        let deadline = deadline_after(Instant::now(), timeout);
        self.nonce += 1;
        let nonce = self.nonce;
        encode_ping(&mut self.out, nonce);
        self.counters.pings_sent += 1;
        let conn = self.conn.as_mut().expect("flush returned Ok, so connected");
        if let Err(e) = conn.send(&self.out) {
            return Err(self.lose(format!("write failed: {e}")));
        }
        self.out.clear();
        loop {
            if let Err(e) = self.handle_inbound() {
                return Err(self.lose(format!("undecodable frame from the engine: {e}")));
            }
            if !self.out.is_empty() {
                // Only PONGs can be here: flush emptied the buffer and nothing publishes meanwhile.
                let conn = self.conn.as_mut().expect("connected during confirm");
                if let Err(e) = conn.send(&self.out) {
                    return Err(self.lose(format!("write failed: {e}")));
                }
                self.out.clear();
            }
            if let Some(e) = self.engine_error.take() {
                return Err(ClientError::Engine {
                    code: e.code,
                    reason: e.reason,
                });
            }
            if self.last_pong == nonce {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::Timeout(timeout));
            }
            let conn = self.conn.as_mut().expect("connected during confirm");
            match conn.fill(Some(deadline - now)) {
                Ok(Fill::Data | Fill::WouldBlock) => {}
                Ok(Fill::Eof) => {
                    return Err(self.lose("the engine closed the connection".into()));
                }
                Err(e) => return Err(self.lose(format!("read failed: {e}"))),
            }
        }
    }

    /// The engine's WELCOME on the current connection; `None` while disconnected.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.conn.as_ref().map(|c| &c.welcome)
    }

    pub fn counters(&self) -> PublisherCounters {
        self.counters
    }

    /// PUBLISH frames buffered and not yet written.
    pub fn buffered_frames(&self) -> u64 {
        self.out_frames
    }

    /// With acknowledgements: messages written (or buffered) that the engine has not confirmed
    /// yet, and their bytes; they are resent after a reconnect. `(0, 0)` without.
    pub fn unconfirmed(&self) -> (u64, usize) {
        self.acks
            .as_ref()
            .map_or((0, 0), |a| (a.frames() as u64, a.bytes()))
    }

    fn ping_due(&self, now: Instant) -> bool {
        self.conn.as_ref().is_some_and(|c| {
            now.duration_since(c.last_send) >= ping_interval(c.welcome.keepalive_ms)
        })
    }

    fn ensure_connected(&mut self) -> Result<(), ClientError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if now < self.reconnect.next_at {
            return Err(ClientError::Reconnecting {
                retry_in: self.reconnect.next_at - now,
            });
        }
        match Conn::open(&self.opts, READ_BUFFER_BYTES) {
            Ok(conn) => {
                self.max_frame_bytes = conn.welcome.max_frame_bytes as usize;
                self.conn = Some(conn);
                self.counters.reconnects += 1;
                self.start_acks()
            }
            Err(e) => {
                self.reconnect.on_failed(Instant::now());
                Err(e)
            }
        }
    }

    /// Non-blocking reads of whatever the engine sent. `Err` means the connection is gone.
    fn check_inbound(&mut self) -> Result<(), String> {
        for _ in 0..MAX_READS_PER_CHECK {
            let Some(conn) = self.conn.as_mut() else {
                return Ok(());
            };
            match conn.fill(None) {
                Ok(Fill::Data) => {
                    self.handle_inbound()
                        .map_err(|e| format!("undecodable frame from the engine: {e}"))?;
                }
                Ok(Fill::WouldBlock) => return Ok(()),
                Ok(Fill::Eof) => return Err("the engine closed the connection".into()),
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
        Ok(())
    }

    /// Decodes the frames in the receive buffer: answers PING, records PONG and ERROR.
    fn handle_inbound(&mut self) -> Result<(), DecodeError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(());
        };
        let mut used = 0;
        while let Decoded::Frame(frame, n) =
            decode_frame(&conn.pending()[used..], MAX_INBOUND_FRAME_BYTES)?
        {
            used += n;
            match frame {
                Frame::Ping { nonce } => encode_pong(&mut self.out, nonce),
                Frame::Pong { nonce } => self.last_pong = nonce,
                Frame::Ack { seq } => {
                    if let Some(acks) = self.acks.as_mut() {
                        acks.confirm(seq);
                        self.counters.confirmed = acks.confirmed;
                    }
                }
                Frame::Error(e) => {
                    self.counters.engine_errors += 1;
                    // Keep the first: later ones are usually consequences of it.
                    self.engine_error.get_or_insert(e);
                }
                _ => {}
            }
        }
        conn.consume(used);
        Ok(())
    }

    /// Drops the broken connection, counts the buffered frames as lost and builds the error
    /// that reports them.
    fn lose(&mut self, cause: String) -> ClientError {
        // With acknowledgements nothing is lost: the unconfirmed frames go again.
        let lost_frames = if self.acks.is_some() {
            0
        } else {
            self.out_frames
        };
        self.out.clear();
        self.out_frames = 0;
        self.conn = None;
        self.counters.lost += lost_frames;
        self.counters.disconnects += 1;
        self.reconnect.on_lost(Instant::now());
        match self.engine_error.take() {
            Some(e) if lost_frames == 0 => ClientError::Engine {
                code: e.code,
                reason: e.reason,
            },
            Some(e) => ClientError::ConnectionLost {
                lost_frames,
                cause: format!(
                    "engine sent ERROR {} ({}): {}",
                    e.code,
                    error_code_name(e.code),
                    e.reason
                ),
            },
            None => ClientError::ConnectionLost { lost_frames, cause },
        }
    }
}

impl Drop for Publisher {
    /// Best effort: buffered frames are written; errors cannot be reported from here, so call
    /// [`Publisher::confirm`] first when they matter.
    fn drop(&mut self) {
        if self.out_frames > 0 {
            if let Some(conn) = self.conn.as_mut() {
                let _ = conn.send(&self.out);
            }
        }
    }
}
