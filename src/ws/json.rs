//! The `lanpush.json.v1` subprotocol (docs/PROTOCOL.md §15): JSON text messages in front of the
//! native protocol. The engine serves a JSON connection as a native one: this translator turns
//! each client message into the native frames it stands for (HELLO, SUBSCRIBE, UNSUBSCRIBE,
//! PUBLISH, STATS_REQUEST) and each frame the engine writes (WELCOME, SUBACK, DATA, GAP, ERROR,
//! STATS, PING) into one JSON object. So snapshots, delivery modes, GAPs, ACLs and the STATS
//! scope are exactly a native client's. Sans-IO: bytes and strings in, bytes and strings out.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::proto::{
    self, error_code, hello_features, DeliveryMode, Frame, Hello, PublishRef, Subscribe,
    Unsubscribe, DATA_FLAG_RESTORED, DATA_FLAG_SNAPSHOT, PROTOCOL_VERSION,
};

/// Quality of a `pub` that names none: OPC "good".
pub const DEFAULT_QUALITY: u8 = 192;

/// What the engine's output becomes.
#[derive(Debug, PartialEq, Eq)]
pub enum Out {
    /// One JSON object, for a text frame.
    Text(String),
    /// The engine's keep-alive PING: sent as a WebSocket ping carrying the nonce, which the
    /// browser answers by itself; its pong comes back as a native PONG.
    Ping(u64),
}

/// One JSON connection's translation state.
#[derive(Debug, Default)]
pub struct JsonSession {
    hello_sent: bool,
    /// Ids given to `sub` messages that name none.
    next_sub_id: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Number {
    Int(u64),
    Text(String),
}

impl Number {
    fn value(&self, what: &str) -> Result<u64, String> {
        match self {
            Number::Int(n) => Ok(*n),
            Number::Text(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("{what} must be an unsigned integer, not {s:?}")),
        }
    }
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum ClientMsg {
    Hello {
        #[serde(default)]
        client_id: String,
        #[serde(default)]
        token: String,
        #[serde(default)]
        keepalive_ms: u32,
    },
    Sub {
        id: Option<u32>,
        pattern: String,
        mode: Option<DeliveryMode>,
    },
    Unsub {
        id: u32,
    },
    Pub {
        topic: String,
        value: Option<String>,
        value_b64: Option<String>,
        quality: Option<u8>,
        source_ts_ns: Option<Number>,
    },
    Stats {},
}

#[derive(Serialize)]
struct DataMsg<'a> {
    r#type: &'static str,
    topic: &'a str,
    seq: String,
    source_ts_ns: String,
    ingest_ts_ns: String,
    quality: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    snapshot: bool,
    retained: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    restored: bool,
}

impl JsonSession {
    pub fn new() -> JsonSession {
        JsonSession::default()
    }

    /// One text message from the client: the native frames it stands for are appended to
    /// `native` (a HELLO first, if the client sent none). `Err` is a message this subprotocol
    /// does not have, with the reason; the caller answers it with [`error_json`] and closes,
    /// as the engine closes a native client that sends a malformed frame.
    pub fn handle_message(&mut self, text: &[u8], native: &mut Vec<u8>) -> Result<(), String> {
        let msg: ClientMsg = serde_json::from_slice(text).map_err(|e| {
            format!("not a lanpush.json.v1 message ({e}); see docs/PROTOCOL.md §15")
        })?;
        if let ClientMsg::Hello {
            client_id,
            token,
            keepalive_ms,
        } = msg
        {
            if self.hello_sent {
                return Err("hello must be the first message, and only once".into());
            }
            self.hello_sent = true;
            proto::encode_control(
                native,
                &Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    client_id,
                    keepalive_ms,
                    token,
                    features: hello_features::ENGINE_VERSION,
                }),
            );
            return Ok(());
        }
        if !self.hello_sent {
            self.hello_sent = true;
            proto::encode_control(
                native,
                &Frame::Hello(Hello {
                    version: PROTOCOL_VERSION,
                    features: hello_features::ENGINE_VERSION,
                    ..Hello::default()
                }),
            );
        }
        match msg {
            ClientMsg::Hello { .. } => {}
            ClientMsg::Sub { id, pattern, mode } => {
                let sub_id = match id {
                    Some(id) => id,
                    None => {
                        self.next_sub_id += 1;
                        self.next_sub_id
                    }
                };
                proto::encode_control(
                    native,
                    &Frame::Subscribe(Subscribe {
                        sub_id,
                        pattern,
                        mode: mode.unwrap_or(DeliveryMode::Default),
                        resume: Vec::new(),
                    }),
                );
            }
            ClientMsg::Unsub { id } => {
                proto::encode_control(native, &Frame::Unsubscribe(Unsubscribe { sub_id: id }))
            }
            ClientMsg::Pub {
                topic,
                value,
                value_b64,
                quality,
                source_ts_ns,
            } => {
                let payload = match (value, value_b64) {
                    (Some(v), None) => v.into_bytes(),
                    (None, Some(b)) => base64::engine::general_purpose::STANDARD
                        .decode(b.trim())
                        .map_err(|e| format!("value_b64 is not base64: {e}"))?,
                    (None, None) => Vec::new(),
                    (Some(_), Some(_)) => {
                        return Err("pub takes value or value_b64, not both".into())
                    }
                };
                let source_ts_ns = match source_ts_ns {
                    Some(n) => n.value("source_ts_ns")?,
                    None => 0,
                };
                proto::encode_publish(
                    native,
                    &PublishRef {
                        topic: &topic,
                        source_ts_ns,
                        quality: quality.unwrap_or(DEFAULT_QUALITY),
                        payload: &payload,
                    },
                );
            }
            ClientMsg::Stats {} => proto::encode_control(native, &Frame::StatsRequest),
        }
        Ok(())
    }

    /// The pong that answers an engine PING: a native PONG for the core.
    pub fn handle_pong(&self, native: &mut Vec<u8>) {
        proto::encode_pong(native, 0);
    }

    /// Native frames the engine wrote, from the start of a frame: each whole frame becomes an
    /// [`Out`] handed to `emit`. Returns the bytes used (whole frames only; the caller keeps
    /// the rest for later). Frames a client never gets (PUBLISH, HELLO...) are skipped.
    pub fn handle_output(&mut self, bytes: &[u8], mut emit: impl FnMut(Out)) -> usize {
        let mut used = 0;
        while used < bytes.len() {
            match proto::decode_frame(&bytes[used..], u32::MAX as usize) {
                Ok(proto::Decoded::Frame(frame, n)) => {
                    used += n;
                    if let Some(out) = frame_json(frame) {
                        emit(out);
                    }
                }
                Ok(proto::Decoded::NeedMore(_)) => break,
                // The engine's own frames always decode; skip the rest if one does not.
                Err(_) => return bytes.len(),
            }
        }
        used
    }
}

/// The JSON for one native frame the engine sent.
fn frame_json(frame: Frame<'_>) -> Option<Out> {
    let json = match frame {
        Frame::Welcome(w) => serde_json::json!({
            "type": "welcome",
            "connection_id": w.connection_id.to_string(),
            "engine_id": w.engine_id.to_string(),
            "engine_version": w.engine_version,
            "keepalive_ms": w.keepalive_ms,
            "max_frame_bytes": w.max_frame_bytes,
            "reactor": w.reactor,
        })
        .to_string(),
        Frame::SubAck(a) => {
            serde_json::json!({"type": "suback", "id": a.sub_id, "mode": a.mode}).to_string()
        }
        Frame::Data {
            header,
            topic,
            payload,
        } => {
            let text = std::str::from_utf8(payload).ok();
            let snapshot = header.flags & DATA_FLAG_SNAPSHOT != 0;
            serde_json::to_string(&DataMsg {
                r#type: "data",
                topic,
                seq: header.seq.to_string(),
                source_ts_ns: header.source_ts_ns.to_string(),
                ingest_ts_ns: header.ingest_ts_ns.to_string(),
                quality: header.quality,
                value: text,
                value_b64: text
                    .is_none()
                    .then(|| base64::engine::general_purpose::STANDARD.encode(payload)),
                snapshot,
                retained: snapshot,
                restored: header.flags & DATA_FLAG_RESTORED != 0,
            })
            .ok()?
        }
        Frame::Gap(g) => serde_json::json!({
            "type": "gap",
            "topic": g.topic,
            "from_seq": g.from_seq.to_string(),
            "to_seq": g.to_seq.to_string(),
        })
        .to_string(),
        Frame::Error(e) => error_json(e.code, &e.reason),
        Frame::Stats(doc) => {
            let stats: serde_json::Value =
                serde_json::from_str(&doc).unwrap_or(serde_json::Value::String(doc));
            serde_json::json!({"type": "stats", "stats": stats}).to_string()
        }
        Frame::Ping { nonce } => return Some(Out::Ping(nonce)),
        _ => return None,
    };
    Some(Out::Text(json))
}

/// An `error` object: the native ERROR code, its name and the reason.
pub fn error_json(code: u16, reason: &str) -> String {
    serde_json::json!({
        "type": "error",
        "code": code,
        "name": error_code::name(code),
        "reason": reason,
    })
    .to_string()
}
