//! [`WsBridge`]: one WebSocket connection as a value. Bytes from the socket go in
//! ([`WsBridge::handle_input`]); out come the upgrade answer and control frames for the socket
//! ([`WsBridge::take_transmit`]), the inner protocol's bytes ([`WsBridge::inner`]: MQTT, unmasked
//! and streamed frame by frame, whatever the message boundaries) or whole text messages
//! ([`WsBridge::poll_event`]: the JSON subprotocol), and the peer's pongs. No socket, no clock.
//!
//! What it enforces (RFC 6455 §5): client frames are masked, no extension bits, control frames
//! are final and at most 125 bytes, continuation frames only inside a fragmented message, a
//! message (all its fragments) at most `max_message_bytes` (checked from each frame's header,
//! before its payload is buffered: 1009), the data opcode the subprotocol uses (MQTT binary,
//! JSON text: 1003), text in UTF-8 (1007). A violation queues a close frame with its code and
//! the reason, and the bridge is closed: the caller sends what is queued and drops the socket.

use std::collections::VecDeque;
use std::io::Cursor;

use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::handshake::{self, OriginPolicy, Upgrade};
use super::Subprotocol;

/// Close codes (RFC 6455 §7.4.1).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const UNSUPPORTED_DATA: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
}

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_BYTES: usize = 14;

/// What the bridge hands the caller besides inner bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The upgrade was accepted: from now on the connection speaks this.
    Upgraded(Subprotocol),
    /// A whole text message (JSON subprotocol), UTF-8 checked.
    Message(Vec<u8>),
    /// The peer answered a ping (its payload).
    Pong(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// Buffering the HTTP request head.
    Handshake(Vec<u8>),
    Open(Subprotocol),
    /// Done: a close frame or an HTTP refusal is the last thing queued. `reason` says why.
    Closed,
}

/// The frame whose payload is arriving.
#[derive(Debug)]
struct InFrame {
    opcode: OpCode,
    fin: bool,
    mask: [u8; 4],
    /// Payload bytes still to come.
    left: u64,
    /// Payload bytes seen (the mask's phase).
    seen: u64,
}

/// One WebSocket connection, server side.
#[derive(Debug)]
pub struct WsBridge {
    phase: Phase,
    origins: OriginPolicy,
    max_message_bytes: usize,
    /// A frame header split across reads.
    head: [u8; MAX_HEADER_BYTES],
    head_len: usize,
    frame: Option<InFrame>,
    /// A fragmented data message is in progress (its first frame's opcode).
    message_opcode: Option<Data>,
    /// Bytes of the message in progress so far (all its frames).
    message_bytes: usize,
    /// The text message being assembled (JSON).
    message: Vec<u8>,
    /// A control frame's payload (at most 125 bytes).
    control: Vec<u8>,
    /// Unmasked binary payload for the inner codec (MQTT), consumed by the caller.
    inner: Vec<u8>,
    /// Bytes for the socket, in order: the upgrade answer, pongs, the close frame.
    transmit: Vec<u8>,
    events: VecDeque<Event>,
    /// Why the bridge closed, for the connection's log line.
    close_reason: Option<String>,
}

impl WsBridge {
    /// A connection that has sent nothing yet. `max_message_bytes` bounds one message (all its
    /// fragments) from the peer.
    pub fn new(origins: OriginPolicy, max_message_bytes: usize) -> WsBridge {
        WsBridge {
            phase: Phase::Handshake(Vec::new()),
            origins,
            max_message_bytes,
            head: [0; MAX_HEADER_BYTES],
            head_len: 0,
            frame: None,
            message_opcode: None,
            message_bytes: 0,
            message: Vec::new(),
            control: Vec::new(),
            inner: Vec::new(),
            transmit: Vec::new(),
            events: VecDeque::new(),
            close_reason: None,
        }
    }

    /// Bytes from the socket. Uses them all (what a frame still lacks is kept inside, at most
    /// a header's 14 bytes or the message bound); once closed, input is ignored.
    pub fn handle_input(&mut self, input: &[u8]) {
        match &mut self.phase {
            Phase::Handshake(head) => {
                head.extend_from_slice(input);
                match handshake::handle_request(head, &self.origins) {
                    Ok(Upgrade::NeedMore) => {}
                    Ok(Upgrade::Accepted {
                        used,
                        subprotocol,
                        response,
                    }) => {
                        let rest = head.split_off(used);
                        self.transmit.extend_from_slice(&response);
                        self.phase = Phase::Open(subprotocol);
                        self.events.push_back(Event::Upgraded(subprotocol));
                        self.handle_frames(&rest);
                    }
                    Err(refusal) => {
                        self.transmit.extend_from_slice(&refusal.response());
                        self.close_reason = Some(format!(
                            "WebSocket upgrade refused ({}): {}",
                            refusal.status, refusal.reason
                        ));
                        self.phase = Phase::Closed;
                    }
                }
            }
            Phase::Open(_) => self.handle_frames(input),
            Phase::Closed => {}
        }
    }

    /// The subprotocol, once the upgrade is done.
    pub fn subprotocol(&self) -> Option<Subprotocol> {
        match self.phase {
            Phase::Open(p) => Some(p),
            _ => None,
        }
    }

    /// True once the upgrade was refused or a close frame was sent or answered: after
    /// sending [`Self::take_transmit`]'s bytes the caller closes the socket.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// Why the bridge closed (refusal, peer's close, protocol violation).
    pub fn close_reason(&self) -> Option<&str> {
        self.close_reason.as_deref()
    }

    /// Unmasked payload of the binary frames so far (the inner codec's input).
    pub fn inner(&self) -> &[u8] {
        &self.inner
    }

    /// The inner codec used `n` bytes of [`Self::inner`].
    pub fn consume_inner(&mut self, n: usize) {
        self.inner.drain(..n.min(self.inner.len()));
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Appends the bytes queued for the socket to `out`.
    pub fn take_transmit(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.transmit);
    }

    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Queues a ping (the engine's keep-alive probe); nothing once closed.
    pub fn send_ping(&mut self, payload: &[u8]) {
        if matches!(self.phase, Phase::Open(_)) {
            encode_frame(
                &mut self.transmit,
                OpCode::Control(Control::Ping),
                &payload[..payload.len().min(125)],
            );
        }
    }

    /// Queues a close frame and closes (the engine ends the connection).
    pub fn send_close(&mut self, code: u16, reason: &str) {
        if matches!(self.phase, Phase::Open(_)) {
            encode_close(&mut self.transmit, code, reason);
            self.close_reason
                .get_or_insert_with(|| format!("closed by the engine ({code}): {reason}"));
            self.phase = Phase::Closed;
        }
    }

    fn fail(&mut self, code: u16, reason: impl Into<String>) {
        let reason = reason.into();
        encode_close(&mut self.transmit, code, &reason);
        self.close_reason = Some(format!("WebSocket close {code}: {reason}"));
        self.phase = Phase::Closed;
    }

    fn handle_frames(&mut self, input: &[u8]) {
        let mut pos = 0;
        while pos < input.len() && !self.is_closed() {
            if self.frame.is_none() {
                let take = (MAX_HEADER_BYTES - self.head_len).min(input.len() - pos);
                self.head[self.head_len..self.head_len + take]
                    .copy_from_slice(&input[pos..pos + take]);
                let mut cursor = Cursor::new(&self.head[..self.head_len + take]);
                match FrameHeader::parse(&mut cursor) {
                    Ok(None) => {
                        self.head_len += take;
                        pos += take;
                    }
                    Ok(Some((header, len))) => {
                        // The cursor stopped at the header's end; of the bytes just copied,
                        // only those up to there belong to it.
                        let header_len = cursor.position() as usize;
                        pos += header_len - self.head_len;
                        self.head_len = 0;
                        self.start_frame(header, len);
                    }
                    Err(e) => self.fail(close_code::PROTOCOL_ERROR, format!("bad frame: {e}")),
                }
                continue;
            }
            let Some(frame) = self.frame.as_mut() else {
                continue;
            };
            let n = usize::try_from(frame.left)
                .unwrap_or(usize::MAX)
                .min(input.len() - pos);
            let payload = &input[pos..pos + n];
            let dest = match frame.opcode {
                OpCode::Control(_) => &mut self.control,
                OpCode::Data(_) if self.message_opcode == Some(Data::Binary) => &mut self.inner,
                OpCode::Data(_) => &mut self.message,
            };
            unmask_into(dest, payload, frame.mask, frame.seen);
            frame.seen += n as u64;
            frame.left -= n as u64;
            pos += n;
            if frame.left == 0 {
                self.finish_frame();
            }
        }
    }

    fn start_frame(&mut self, header: FrameHeader, len: u64) {
        let Some(mask) = header.mask else {
            return self.fail(close_code::PROTOCOL_ERROR, "client frames must be masked");
        };
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return self.fail(
                close_code::PROTOCOL_ERROR,
                "reserved bits set (no extension was negotiated)",
            );
        }
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final || len > 125 {
                    return self.fail(
                        close_code::PROTOCOL_ERROR,
                        "a control frame must be final and at most 125 bytes",
                    );
                }
                self.control.clear();
            }
            OpCode::Data(data) => {
                match (data, self.message_opcode) {
                    (Data::Continue, None) => {
                        return self.fail(
                            close_code::PROTOCOL_ERROR,
                            "continuation frame outside a fragmented message",
                        )
                    }
                    (Data::Continue, Some(_)) => {}
                    (_, Some(_)) => {
                        return self.fail(
                            close_code::PROTOCOL_ERROR,
                            "new message before the fragmented one ended",
                        )
                    }
                    (data, None) => {
                        let expected = match self.subprotocol() {
                            Some(Subprotocol::Mqtt) => Data::Binary,
                            _ => Data::Text,
                        };
                        if data != expected {
                            return self.fail(
                                close_code::UNSUPPORTED_DATA,
                                match expected {
                                    Data::Binary => "mqtt is carried in binary frames",
                                    _ => "lanpush.json.v1 is carried in text frames",
                                },
                            );
                        }
                        self.message_opcode = Some(data);
                        self.message_bytes = 0;
                        self.message.clear();
                    }
                }
                let total = (self.message_bytes as u64).saturating_add(len);
                if total > self.max_message_bytes as u64 {
                    return self.fail(
                        close_code::TOO_BIG,
                        format!(
                            "message of more than {} bytes (at least {total})",
                            self.max_message_bytes
                        ),
                    );
                }
                self.message_bytes = total as usize;
            }
        }
        self.frame = Some(InFrame {
            opcode: header.opcode,
            fin: header.is_final,
            mask,
            left: len,
            seen: 0,
        });
        if len == 0 {
            self.finish_frame();
        }
    }

    fn finish_frame(&mut self) {
        let Some(frame) = self.frame.take() else {
            return;
        };
        match frame.opcode {
            OpCode::Control(Control::Ping) => {
                let payload = std::mem::take(&mut self.control);
                encode_frame(&mut self.transmit, OpCode::Control(Control::Pong), &payload);
            }
            OpCode::Control(Control::Pong) => {
                self.events
                    .push_back(Event::Pong(std::mem::take(&mut self.control)));
            }
            OpCode::Control(Control::Close) => self.handle_close(),
            OpCode::Control(Control::Reserved(_)) => {}
            OpCode::Data(_) => {
                if !frame.fin {
                    return;
                }
                if self.message_opcode.take() == Some(Data::Text) {
                    let text = std::mem::take(&mut self.message);
                    if std::str::from_utf8(&text).is_err() {
                        return self.fail(close_code::INVALID_PAYLOAD, "text is not UTF-8");
                    }
                    self.events.push_back(Event::Message(text));
                }
                self.message_bytes = 0;
            }
        }
    }

    /// The peer's close: answered with the same code (RFC 6455 §5.5.1), or 1002 if its payload
    /// is malformed.
    fn handle_close(&mut self) {
        let payload = std::mem::take(&mut self.control);
        let (code, reason) = match payload.len() {
            0 => (close_code::NORMAL, String::new()),
            1 => return self.fail(close_code::PROTOCOL_ERROR, "close payload of one byte"),
            _ => {
                let code = u16::from_be_bytes([payload[0], payload[1]]);
                let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                    return self.fail(close_code::INVALID_PAYLOAD, "close reason is not UTF-8");
                };
                if !valid_close_code(code) {
                    return self.fail(close_code::PROTOCOL_ERROR, format!("close code {code}"));
                }
                (code, reason.to_string())
            }
        };
        encode_close(&mut self.transmit, code, "");
        self.close_reason = Some(format!("closed by the peer ({code}) {reason}"));
        self.phase = Phase::Closed;
    }
}

/// RFC 6455 §7.4: codes a peer may send.
fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
}

/// XORs `payload` with `mask`, starting at mask phase `seen`, onto the end of `dest`.
fn unmask_into(dest: &mut Vec<u8>, payload: &[u8], mask: [u8; 4], seen: u64) {
    let phase = (seen % 4) as usize;
    dest.extend(
        payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[(phase + i) % 4]),
    );
}

/// The header of an unmasked server frame: `(bytes, len)`.
pub fn server_header(opcode: OpCode, payload_len: usize) -> ([u8; MAX_HEADER_BYTES], usize) {
    let header = FrameHeader {
        is_final: true,
        opcode,
        ..FrameHeader::default()
    };
    let mut buf = [0u8; MAX_HEADER_BYTES];
    let len = header.len(payload_len as u64);
    // Writing into a slice of the right length cannot fail.
    let _ = header.format(payload_len as u64, &mut &mut buf[..len]);
    (buf, len)
}

/// Appends one unmasked, final server frame.
pub fn encode_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    let (head, len) = server_header(opcode, payload.len());
    out.extend_from_slice(&head[..len]);
    out.extend_from_slice(payload);
}

/// Appends a close frame: code, then the reason cut to fit 125 bytes at a char boundary.
pub fn encode_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_frame(out, OpCode::Control(Control::Close), &payload);
}
