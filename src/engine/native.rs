//! The native protocol in front of the fan-out core: decoded frames become engine operations
//! ([`Op`]), and the core's replies ([`Reply`]) become native frames.
//!
//! This is the seam another wire protocol plugs into: an MQTT or WebSocket session decodes its
//! own packets into the same `Op`s and encodes the same `Reply`s its own way; the core, its
//! delivery modes and its shard exchange stay as they are.

use super::session::Fatal;
use crate::proto::{
    self, error_code, Frame, Mcast, PublishRef, SubAck, Subscribe, Welcome, WireError,
};

/// What a connection asks of the engine, whatever its wire protocol.
#[derive(Debug)]
pub(crate) enum Op<'a> {
    /// Opens the session (must come first).
    Hello {
        version: u16,
        client_id: String,
        keepalive_ms: u32,
        /// Credentials, `user:secret`; empty for anonymous.
        token: crate::auth::Redacted,
        /// `proto::hello_features` bits.
        features: u32,
    },
    Publish(PublishRef<'a>),
    Subscribe(Subscribe),
    Unsubscribe {
        sub_id: u32,
    },
    /// Asks for a PONG with the same nonce.
    Ping {
        nonce: u64,
    },
    /// Answers the engine's PING.
    Pong,
    /// Publisher acknowledgements on: the next PUBLISH is message `next_seq` (at least 1).
    AckRequest {
        publisher_id: u64,
        next_seq: u64,
    },
    StatsRequest,
    /// A multicast receiver asks for the channels (docs/PROTOCOL.md §12).
    ChannelsRequest,
    /// A multicast receiver missed datagrams.
    Nak(proto::Nak),
}

/// What the engine answers a connection (data frames are shared, and not replies; STATS is
/// built by the stats thread, `stats.rs`).
#[derive(Debug)]
pub(crate) enum Reply {
    Welcome(Welcome),
    SubAck(SubAck),
    Pong {
        nonce: u64,
    },
    /// The engine's keep-alive probe.
    Ping {
        nonce: u64,
    },
    /// A refusal: non-fatal from the core, or the last frame before a close
    /// ([`super::session::Session::fail`], the reactor's refusal at accept).
    Error {
        code: u16,
        reason: String,
    },
}

/// The operation a native frame asks for; frames a client may not send are fatal.
pub(crate) fn op(frame: Frame<'_>) -> Result<Op<'_>, Fatal> {
    match frame {
        Frame::Hello(hello) => Ok(Op::Hello {
            version: hello.version,
            client_id: hello.client_id,
            keepalive_ms: hello.keepalive_ms,
            token: crate::auth::Redacted(hello.token),
            features: hello.features,
        }),
        Frame::Publish(publish) => Ok(Op::Publish(publish)),
        Frame::Subscribe(subscribe) => Ok(Op::Subscribe(subscribe)),
        Frame::Unsubscribe(u) => Ok(Op::Unsubscribe { sub_id: u.sub_id }),
        Frame::Ping { nonce } => Ok(Op::Ping { nonce }),
        Frame::Pong { .. } => Ok(Op::Pong),
        Frame::StatsRequest => Ok(Op::StatsRequest),
        Frame::Multicast(Mcast::ChannelsRequest) => Ok(Op::ChannelsRequest),
        Frame::Multicast(Mcast::Nak(nak)) => Ok(Op::Nak(nak)),
        Frame::AckRequest { next_seq: 0, .. } => Err(Fatal::new(
            error_code::MALFORMED,
            "ACK_REQUEST: next_seq must be at least 1",
        )),
        Frame::AckRequest {
            publisher_id,
            next_seq,
        } => Ok(Op::AckRequest {
            publisher_id,
            next_seq,
        }),
        Frame::Error(e) => Err(Fatal::new(
            error_code::UNEXPECTED_FRAME,
            format!(
                "client sent ERROR {}: {}",
                e.code,
                super::guard::quote(&e.reason)
            ),
        )),
        Frame::Welcome(_)
        | Frame::SubAck(_)
        | Frame::Data { .. }
        | Frame::Gap(_)
        | Frame::Ack { .. }
        | Frame::Stats(_)
        | Frame::Multicast(
            Mcast::Channels(_) | Mcast::StreamPos(_) | Mcast::Repair(_) | Mcast::RepairGone(_),
        ) => Err(Fatal::new(
            error_code::UNEXPECTED_FRAME,
            "this frame kind is sent only by the engine",
        )),
    }
}

/// Appends the native encoding of `reply` to `out`.
pub(crate) fn encode_reply(out: &mut Vec<u8>, reply: Reply) {
    match reply {
        Reply::Welcome(w) => proto::encode_control(out, &Frame::Welcome(w)),
        Reply::SubAck(a) => proto::encode_control(out, &Frame::SubAck(a)),
        Reply::Pong { nonce } => proto::encode_pong(out, nonce),
        Reply::Ping { nonce } => proto::encode_ping(out, nonce),
        Reply::Error { code, reason } => {
            proto::encode_control(out, &Frame::Error(WireError { code, reason }))
        }
    }
}
