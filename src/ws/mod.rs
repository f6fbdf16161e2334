//! WebSocket (RFC 6455) in front of the engine, sans-IO.
//!
//! - [`handshake`]: the HTTP upgrade request (httparse) and its answer;
//! - [`WsBridge`]: one connection's frames: unmasking, fragments reassembled within a bound,
//!   ping/pong/close, out come the inner protocol's bytes or text messages;
//! - [`json`]: the `lanpush.json.v1` subprotocol, translated to and from native frames.
//!
//! The reactor holds one bridge per WebSocket connection (`engine/ws_link.rs`) and feeds the
//! fan-out core what comes out, as MQTT (subprotocol `mqtt`) or native (`lanpush.json.v1`)
//! input: the core does not know WebSocket exists. docs/ARCHITECTURE.md, "WebSocket listener".

mod bridge;
pub mod handshake;
pub mod json;
#[cfg(test)]
mod tests;

pub use bridge::{close_code, encode_close, encode_frame, server_header, Event, WsBridge};
pub use tungstenite::protocol::frame::coding::{Control, Data, OpCode};

/// The subprotocols the listener speaks (`Sec-WebSocket-Protocol`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subprotocol {
    /// MQTT 3.1.1 over WebSocket (binary frames), as browsers' mqtt.js speaks it.
    Mqtt,
    /// JSON objects in text frames (docs/PROTOCOL.md §15).
    Json,
}

impl Subprotocol {
    pub const MQTT_NAME: &'static str = "mqtt";
    pub const JSON_NAME: &'static str = "lanpush.json.v1";

    pub fn name(self) -> &'static str {
        match self {
            Subprotocol::Mqtt => Self::MQTT_NAME,
            Subprotocol::Json => Self::JSON_NAME,
        }
    }

    pub fn from_name(name: &str) -> Option<Subprotocol> {
        match name {
            Self::MQTT_NAME => Some(Subprotocol::Mqtt),
            Self::JSON_NAME => Some(Subprotocol::Json),
            _ => None,
        }
    }
}
