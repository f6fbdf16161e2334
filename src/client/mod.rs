//! A blocking Rust client for the lanpush engine: [`Publisher`], [`Subscriber`] and [`stats`].
//!
//! Both clients own one TCP connection, speak the protocol in [`crate::proto`], keep it alive
//! with PINGs and reconnect by themselves after it breaks. Neither starts a thread: all work,
//! keep-alives included, happens inside the calls the application makes.
//!
//! **The caller's duties.**
//! - A [`Publisher`] buffers frames and writes them in batches. Buffered frames reach the engine
//!   when the next frame would take the buffer past [`FLUSH_AT_BYTES`], on [`Publisher::flush`], on
//!   [`Publisher::keepalive_tick`] and on drop. A publisher that may stay idle for longer than
//!   half its keep-alive must call `keepalive_tick` (or `flush`) at least that often, or the engine
//!   closes it. Publishing is at-most-once: [`Publisher::confirm`] is the barrier that proves
//!   everything written so far was taken in, and surfaces any ERROR the engine sent.
//! - A [`Subscriber`] must be polled ([`Subscriber::next_event`] or [`Subscriber::next_batch`])
//!   at least every half keep-alive, for the same reason.
//!
//! **Reconnection.** After a broken connection a [`Subscriber`] reconnects inside the next poll,
//! waiting an exponential back-off with full jitter (see [`Backoff`]) so that a thousand
//! clients cut off at once do not reconnect at once, re-sends every SUBSCRIBE with the last
//! sequence number it saw per topic, and drops any DATA it has already delivered (counted in
//! [`SubscriberCounters::duplicates_dropped`]). A [`Publisher`] reports the broken connection
//! once, as [`ClientError::ConnectionLost`] naming how many buffered frames were lost, then
//! reconnects on a later call once its back-off has passed; calls made before then fail with
//! [`ClientError::Reconnecting`]. Nothing is dropped silently.

mod conn;
mod error;
mod mcast;
mod mcast_socket;
mod options;
mod publisher;
mod stream;
mod subscriber;
mod timefmt;
mod unconfirmed;

#[cfg(test)]
mod tests;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use error::ClientError;
pub use mcast::{McastCounters, McastOptions, McastSubscriber, DEFAULT_RECV_BUFFER_BYTES};
pub use mcast_socket::join as join_multicast_group;
pub use options::{Backoff, ClientOptions, Token, DEFAULT_SERVER};
pub use publisher::{Publisher, PublisherCounters, FLUSH_AT_BYTES, QUALITY_GOOD};
pub use subscriber::{
    pattern_matches, Event, EventRef, Message, MessageRef, Subscriber, SubscriberCounters,
    SubscriptionSpec,
};
pub use timefmt::utc_rfc3339;

use crate::proto::{encode_control, encode_pong, Frame};
use conn::{Conn, Fill, MAX_INBOUND_FRAME_BYTES};

/// Asks the engine for its counters: one STATS_REQUEST round trip on a fresh connection.
/// Returns the JSON document as the engine sent it.
pub fn stats(opts: &ClientOptions) -> Result<String, ClientError> {
    stats_with_welcome(opts).map(|(doc, _)| doc)
}

/// [`stats`], with the WELCOME of the connection that asked: its `connection_id` names the
/// asking connection in the document, and `engine_id` the run of the engine that answered.
pub fn stats_with_welcome(
    opts: &ClientOptions,
) -> Result<(String, crate::proto::Welcome), ClientError> {
    let mut conn = Conn::open(opts, STATS_READ_BUFFER_BYTES)?;
    let welcome = conn.welcome.clone();
    let mut out = Vec::new();
    encode_control(&mut out, &Frame::StatsRequest);
    conn.send(&out)?;
    let deadline = Instant::now() + opts.io_timeout;
    loop {
        out.clear();
        let mut used = 0;
        let mut answer = None;
        while answer.is_none() {
            let frame =
                match crate::proto::decode_frame(&conn.pending()[used..], MAX_INBOUND_FRAME_BYTES)?
                {
                    crate::proto::Decoded::Frame(frame, n) => {
                        used += n;
                        frame
                    }
                    crate::proto::Decoded::NeedMore(_) => break,
                };
            match frame {
                Frame::Stats(json) => answer = Some(Ok(json)),
                Frame::Error(e) => {
                    answer = Some(Err(ClientError::Engine {
                        code: e.code,
                        reason: e.reason,
                    }))
                }
                Frame::Ping { nonce } => encode_pong(&mut out, nonce),
                _ => {}
            }
        }
        conn.consume(used);
        if let Some(answer) = answer {
            return answer.map(|doc| (doc, welcome));
        }
        if !out.is_empty() {
            conn.send(&out)?;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(ClientError::Timeout(opts.io_timeout));
        }
        if let Fill::Eof = conn.fill(Some(deadline - now))? {
            return Err(ClientError::Handshake(
                "the engine closed the connection before answering STATS_REQUEST".into(),
            ));
        }
    }
}

const STATS_READ_BUFFER_BYTES: usize = 64 * 1024;

/// Nanoseconds since the UNIX epoch, the clock PUBLISH and DATA timestamps use.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The interval at which a client PINGs when it has sent nothing: half the negotiated
/// keep-alive, well inside the 1.5x window after which the engine closes a silent peer.
fn ping_interval(keepalive_ms: u32) -> Duration {
    Duration::from_millis(u64::from(keepalive_ms.max(2)) / 2)
}

/// `now + d`, saturating far in the future instead of panicking on huge timeouts.
fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}
