//! UDP multicast delivery, sans-IO (docs/PROTOCOL.md §12, docs/ARCHITECTURE.md "Multicast").
//!
//! The owner reactor of a topic packs the DATA frames it already encoded into datagrams, one
//! stream per (channel, owner reactor), each datagram numbered in its stream. Receivers join
//! the group, put the datagrams of each stream in order, and ask for the missing ones by NAK
//! over their TCP session; the owner answers from its retransmit ring, by unicast over TCP for
//! a few NAKs of a datagram, by one multicast retransmission for many.
//!
//! Everything here is a plain value fed `now` and bytes: [`ChannelSender`] (batching, the
//! retransmit ring, heartbeats, the send rate, the repair decision), [`McastReceiver`] (order,
//! duplicates, NAK timing and suppression, stitching to the TCP snapshot), [`LossGen`] (the
//! seeded loss injector of the tests). Sockets live in `engine/mcast_io.rs` (the engine's
//! send side) and `client/mcast.rs` (a receiver).

mod config;
mod datagram;
mod loss;
mod receiver;
mod sender;
#[cfg(test)]
mod tests;

pub use config::{ChannelConfig, LossConfig, MulticastConfig};
pub use datagram::{
    parse_datagram, DatagramError, DatagramHeader, DatagramRef, FLAG_HEARTBEAT, FLAG_RETRANSMIT,
    FLAG_STUB, HEADER_BYTES, MAGIC, VERSION,
};
pub use loss::LossGen;
pub use receiver::{
    McastReceiver, ReceiverConfig, ReceiverCounters, ReceiverEvent, ReceiverEventRef, ReceiverSink,
};
pub use sender::{ChannelSender, NakAnswer, SenderConfig, SenderCounters};

/// Whether some topic can match both patterns (`+` one level, `#` the rest): the engine
/// announces to a receiver only the channels that can carry its subscriptions.
pub fn patterns_overlap(a: &str, b: &str) -> bool {
    let mut la = a.split('/');
    let mut lb = b.split('/');
    loop {
        match (la.next(), lb.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, Some(_)) | (Some(_), None) => return false,
            (Some(x), Some(y)) => {
                if x != "+" && y != "+" && x != y {
                    return false;
                }
            }
        }
    }
}
