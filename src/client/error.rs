//! The client's error type.

use std::io;
use std::time::Duration;

use crate::proto::{error_code, DecodeError, TopicError};

/// Everything a client call can fail with. Each variant carries what a log line needs.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No TCP connection could be made (refused, unreachable, bad address, timeout).
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The engine did not complete HELLO → WELCOME (or SUBSCRIBE → SUBACK) as the protocol says.
    #[error("handshake with the engine failed: {0}")]
    Handshake(String),
    /// The engine sent an ERROR frame; `code` is one of [`crate::proto::error_code`].
    #[error("engine sent ERROR {code} ({}): {reason}", error_code_name(*code))]
    Engine { code: u16, reason: String },
    /// The engine sent bytes this client cannot decode.
    #[error("undecodable frame from the engine: {0}")]
    Protocol(#[from] DecodeError),
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// A topic to publish on was refused before anything was sent.
    #[error("invalid topic {topic:?}: {source}")]
    Topic {
        topic: String,
        #[source]
        source: TopicError,
    },
    /// A subscription pattern was refused before anything was sent.
    #[error("invalid pattern {pattern:?}: {source}")]
    Pattern {
        pattern: String,
        #[source]
        source: TopicError,
    },
    /// The connection broke; `lost_frames` buffered PUBLISH frames were never written. (Frames
    /// already handed to the kernel may be lost too: TCP cannot tell; see `Publisher::confirm`.)
    #[error(
        "connection to the engine lost ({cause}); {lost_frames} buffered frame(s) were not sent"
    )]
    ConnectionLost { lost_frames: u64, cause: String },
    /// The connection is down and the back-off has not yet allowed the next attempt.
    #[error("not connected to the engine; next reconnect attempt in {retry_in:?}")]
    Reconnecting { retry_in: Duration },
    /// The frame would exceed the engine's `max_frame_bytes` (told in WELCOME).
    #[error("message too large: its frame would be {frame_bytes} bytes, the engine accepts at most {max_frame_bytes}")]
    TooLarge {
        frame_bytes: usize,
        max_frame_bytes: usize,
    },
    /// No answer within the time given.
    #[error("no answer from the engine within {0:?}")]
    Timeout(Duration),
    /// The TLS handshake failed: the engine's certificate did not verify (wrong CA, wrong
    /// name), or the engine refused this client's (missing, unknown). Reconnecting would fail
    /// the same way.
    #[error("TLS with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
}

impl ClientError {
    /// Whether reconnecting may cure this error. A refused topic, a version mismatch or a
    /// subscription the engine does not accept would fail again the same way.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Handshake(_)
            | ClientError::Io(_)
            | ClientError::ConnectionLost { .. }
            | ClientError::Reconnecting { .. }
            | ClientError::Timeout(_) => true,
            ClientError::Engine { code, .. } => is_retryable_code(*code),
            ClientError::Protocol(_)
            | ClientError::Topic { .. }
            | ClientError::Pattern { .. }
            | ClientError::TooLarge { .. }
            | ClientError::Tls { .. } => false,
        }
    }
}

/// ERROR codes that end a connection for a reason a new connection does not share.
pub(crate) fn is_retryable_code(code: u16) -> bool {
    matches!(
        code,
        error_code::HANDSHAKE_TIMEOUT
            | error_code::KEEPALIVE_TIMEOUT
            | error_code::TOO_MANY_CONNECTIONS
            | error_code::SLOW_CONSUMER
            | error_code::SHUTTING_DOWN
    )
}

/// The symbolic name of an ERROR code, for messages (one table: `error_code::name`).
pub(crate) fn error_code_name(code: u16) -> &'static str {
    match error_code::name(code) {
        "UNKNOWN" => "unknown code",
        name => name,
    }
}
