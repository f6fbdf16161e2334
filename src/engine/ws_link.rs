//! A WebSocket connection's transport half, held by the reactor beside the socket: the sans-IO
//! [`WsBridge`] (frames in), the JSON translator, and the framing of what the core writes.
//!
//! Reading: socket bytes → [`WsLink::handle_input`] → the bridge → the core's input
//! ([`WsLink::core_input`]): MQTT bytes as they were inside the binary frames, or the native
//! frames a JSON message stands for.
//!
//! Writing, as the core's `Transport`:
//! - **mqtt**: the core's slices (its shared MQTT packets) go out behind one binary-frame header
//!   in the same vectored write, with no copy: MQTT over WebSocket lets packets span frames
//!   (MQTT 3.1.1 §6), so one frame covers whatever the write holds. The header is written once
//!   per `writev`, not per subscriber and message. A partial write leaves the frame open
//!   (`frame_left`): the next write continues it before anything else.
//! - **lanpush.json.v1**: each native frame is translated into a JSON text frame in `pending`
//!   (one copy per subscriber: JSON cannot share the DATA frame's bytes), at most
//!   [`JSON_PENDING_BYTES`] ahead of the socket; past that the core is told `WouldBlock`, so its
//!   outbox and delivery modes do the buffering and shedding, as for any slow connection.
//!
//! Control frames the bridge queues (the upgrade answer, pong, close) wait for a frame boundary.

use std::io::{self, IoSlice, Write};

use crate::ws::{json, Event, OpCode, Subprotocol, WsBridge};

use super::wire::WireKind;

/// Bytes of JSON text frames a connection may hold ahead of its socket.
pub(crate) const JSON_PENDING_BYTES: usize = 64 * 1024;
/// Largest binary frame written at once (the core writes at most 512 KiB per `writev`).
const MAX_FRAME_PAYLOAD: usize = 1 << 30;
/// The core's slices one binary frame covers (one `writev` of them and the header).
const MAX_SLICES: usize = 64;

/// What the reactor must do after input.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LinkInput {
    /// Nothing special: feed the core [`WsLink::core_input`] if any.
    Continue,
    /// The upgrade is done: the core's session for this connection speaks `WireKind`.
    Upgraded(WireKind),
}

pub(crate) struct WsLink {
    bridge: WsBridge,
    json: Option<json::JsonSession>,
    /// Native frames from JSON messages, for the core.
    native_in: Vec<u8>,
    /// Bytes the socket must take before the next byte of the core's: control frames, JSON
    /// text frames, and the unsent part of an open binary frame's header.
    pending: Vec<u8>,
    /// Payload bytes of the open binary frame the core still owes.
    frame_left: usize,
    /// Native output split across writes (never, as long as only whole frames are reported
    /// written; kept so that the translation cannot lose bytes).
    native_out: Vec<u8>,
    /// Control frames queued while a binary frame is open: they follow its end.
    control_tail: Vec<u8>,
    /// The engine asked for the write side to close once `pending` is out.
    shutdown_after_flush: bool,
    /// Why the bridge closed, once it has.
    pub(crate) closed_reason: Option<String>,
}

impl WsLink {
    pub(crate) fn new(bridge: WsBridge) -> WsLink {
        WsLink {
            bridge,
            json: None,
            native_in: Vec::new(),
            pending: Vec::new(),
            frame_left: 0,
            native_out: Vec::new(),
            control_tail: Vec::new(),
            shutdown_after_flush: false,
            closed_reason: None,
        }
    }

    /// Socket bytes, all used.
    pub(crate) fn handle_input(&mut self, raw: &[u8]) -> LinkInput {
        self.bridge.handle_input(raw);
        let mut result = LinkInput::Continue;
        while let Some(event) = self.bridge.poll_event() {
            match event {
                Event::Upgraded(Subprotocol::Mqtt) => result = LinkInput::Upgraded(WireKind::Mqtt),
                Event::Upgraded(Subprotocol::Json) => {
                    self.json = Some(json::JsonSession::new());
                    result = LinkInput::Upgraded(WireKind::Native);
                }
                Event::Message(text) => {
                    let Some(session) = self.json.as_mut() else {
                        continue;
                    };
                    if let Err(reason) = session.handle_message(&text, &mut self.native_in) {
                        let mut frame = Vec::new();
                        crate::ws::encode_frame(
                            &mut frame,
                            OpCode::Data(crate::ws::Data::Text),
                            json::error_json(crate::proto::error_code::MALFORMED, &reason)
                                .as_bytes(),
                        );
                        self.queue_control(&frame);
                        self.bridge
                            .send_close(crate::ws::close_code::POLICY, "malformed message");
                    }
                }
                Event::Pong(_) => {
                    if let Some(session) = self.json.as_ref() {
                        session.handle_pong(&mut self.native_in);
                    }
                }
            }
        }
        self.take_bridge_transmit();
        if self.bridge.is_closed() && self.closed_reason.is_none() {
            self.closed_reason = Some(
                self.bridge
                    .close_reason()
                    .unwrap_or("WebSocket closed")
                    .to_string(),
            );
        }
        result
    }

    /// The bytes the core is to handle: MQTT from binary frames, or native frames from JSON.
    pub(crate) fn core_input(&self) -> &[u8] {
        if self.json.is_some() {
            &self.native_in
        } else {
            self.bridge.inner()
        }
    }

    pub(crate) fn consume_core_input(&mut self, n: usize) {
        if self.json.is_some() {
            self.native_in.drain(..n.min(self.native_in.len()));
        } else {
            self.bridge.consume_inner(n);
        }
    }

    /// The bridge closed (refused upgrade, close handshake, protocol violation): once
    /// [`Self::flush`] has sent what is pending, the reactor closes the connection.
    pub(crate) fn is_closed(&self) -> bool {
        self.bridge.is_closed()
    }

    fn take_bridge_transmit(&mut self) {
        if self.bridge.has_transmit() {
            let mut bytes = Vec::new();
            self.bridge.take_transmit(&mut bytes);
            self.queue_control(&bytes);
        }
    }

    /// Control bytes go to `pending` at once when no binary frame is open, else after it.
    fn queue_control(&mut self, bytes: &[u8]) {
        if self.frame_left == 0 {
            self.pending.extend_from_slice(bytes);
        } else {
            self.control_tail.extend_from_slice(bytes);
        }
    }

    /// At a frame boundary, the control frames that waited for it join `pending`.
    fn release_control_tail(&mut self) {
        if self.frame_left == 0 && !self.control_tail.is_empty() {
            let tail = std::mem::take(&mut self.control_tail);
            self.pending.extend_from_slice(&tail);
        }
    }

    /// Whether bytes wait for the socket.
    pub(crate) fn wants_flush(&self) -> bool {
        !self.pending.is_empty() || !self.control_tail.is_empty()
    }

    /// Writes what is pending (without the core's bytes), until done or `WouldBlock`.
    /// `Ok(true)`: nothing is left.
    pub(crate) fn flush<W: Write>(&mut self, sock: &mut W) -> io::Result<bool> {
        self.release_control_tail();
        while !self.pending.is_empty() {
            match sock.write(&self.pending) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.pending.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        if self.pending.capacity() > 2 * JSON_PENDING_BYTES {
            self.pending = Vec::new();
        }
        Ok(self.control_tail.is_empty())
    }

    /// The engine's fatal ERROR went out: end with a close frame, then the write side.
    pub(crate) fn handle_shutdown<W: Write>(&mut self, sock: &mut W) -> bool {
        self.bridge
            .send_close(crate::ws::close_code::POLICY, "closed by the engine");
        self.take_bridge_transmit();
        self.shutdown_after_flush = true;
        matches!(self.flush(sock), Ok(true))
    }

    /// The core's write of `slices` (its transport's `write`): returns how many of the core's
    /// bytes were taken, or `WouldBlock` when none can be now.
    pub(crate) fn write<W: Write>(
        &mut self,
        sock: &mut W,
        slices: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        if self.bridge.subprotocol().is_none() {
            // Before the upgrade (or after the close) the core has nothing to say to this
            // peer: its handshake time-out ERROR is dropped, the close follows.
            return Ok(slices.iter().map(|s| s.len()).sum());
        }
        if self.json.is_some() {
            self.write_json(sock, slices)
        } else {
            self.write_binary(sock, slices)
        }
    }

    fn write_json<W: Write>(&mut self, sock: &mut W, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush(sock)?;
        if self.pending.len() >= JSON_PENDING_BYTES {
            // `flush` stopped on WouldBlock: the socket's writable edge will come.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut taken = 0;
        for slice in slices {
            if self.pending.len() >= JSON_PENDING_BYTES {
                break;
            }
            let session = self
                .json
                .as_mut()
                .expect("write_json is called for JSON links");
            let pending = &mut self.pending;
            let bridge = &mut self.bridge;
            let emit = |out: json::Out| match out {
                json::Out::Text(text) => crate::ws::encode_frame(
                    pending,
                    OpCode::Data(crate::ws::Data::Text),
                    text.as_bytes(),
                ),
                json::Out::Ping(nonce) => {
                    bridge.send_ping(&nonce.to_be_bytes());
                    bridge.take_transmit(pending);
                }
            };
            if self.native_out.is_empty() {
                let used = session.handle_output(slice, emit);
                if used < slice.len() {
                    self.native_out.extend_from_slice(&slice[used..]);
                }
            } else {
                self.native_out.extend_from_slice(slice);
                let used = session.handle_output(&self.native_out, emit);
                self.native_out.drain(..used);
            }
            taken += slice.len();
        }
        self.flush(sock)?;
        Ok(taken)
    }

    fn write_binary<W: Write>(
        &mut self,
        sock: &mut W,
        slices: &[IoSlice<'_>],
    ) -> io::Result<usize> {
        // One frame covers what this writev can carry, so that a frame left open by a partial
        // write holds only bytes the core's outbox keeps in order.
        let total: usize = slices.iter().take(MAX_SLICES).map(|s| s.len()).sum();
        if total == 0 {
            return Ok(0);
        }
        if self.frame_left == 0 {
            self.release_control_tail();
            let len = total.min(MAX_FRAME_PAYLOAD);
            let (head, n) = crate::ws::server_header(OpCode::Data(crate::ws::Data::Binary), len);
            self.pending.extend_from_slice(&head[..n]);
            self.frame_left = len;
        }
        loop {
            // The pending bytes, then the core's, cut at the open frame's end.
            let mut iov: [IoSlice<'_>; MAX_SLICES + 1] = [IoSlice::new(&[]); MAX_SLICES + 1];
            let mut n = 0;
            if !self.pending.is_empty() {
                iov[0] = IoSlice::new(&self.pending);
                n = 1;
            }
            let mut room = self.frame_left;
            for s in slices {
                if room == 0 || n == iov.len() {
                    break;
                }
                let part = &s[..s.len().min(room)];
                iov[n] = IoSlice::new(part);
                n += 1;
                room -= part.len();
            }
            match sock.write_vectored(&iov[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => {
                    let from_pending = k.min(self.pending.len());
                    self.pending.drain(..from_pending);
                    let inner = k - from_pending;
                    self.frame_left -= inner;
                    if inner > 0 {
                        return Ok(inner);
                    }
                    // Only the header (part of it) went: try again, so that a `WouldBlock`
                    // is the socket's own.
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// The write side is to close once everything pending is out.
    pub(crate) fn shutdown_due(&self) -> bool {
        self.shutdown_after_flush && self.pending.is_empty()
    }
}
