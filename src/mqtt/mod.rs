//! MQTT 3.1.1 (protocol level 4): the sans-IO codec for the engine's MQTT listener.
//!
//! Like `proto`, nothing here touches a socket or reads a clock: [`decode_packet`] reads a byte
//! slice and returns a packet borrowed from it, `NeedMore(n)` or a [`DecodeError`]; the
//! encoders append to a caller-owned `Vec<u8>`. The remaining length is checked against the
//! caller's limit as soon as its variable-length bytes are in, before the packet is buffered
//! (rumqtt's v4 decoder does the same).
//!
//! Hot-path helpers serve the engine's encode-once fan-out (docs/ARCHITECTURE.md, "MQTT"):
//! [`encode_publish`] makes the QoS 0 packet every subscriber of a message shares, and
//! [`encode_publish_qos1_head`] the per-subscriber head (fixed header, topic, packet id) that
//! goes before the shared payload in the same vectored write.
//!
//! Why our own codec and not a crate: see docs/ARCHITECTURE.md, "MQTT listener".

mod codec;
#[cfg(test)]
mod tests;

pub use codec::{
    decode_packet, encode_connack, encode_packet, encode_publish, encode_publish_qos1_head,
    packet_len_hint, publish_shared, publish_topic, Connect, DecodeError, Decoded, Packet, Publish,
    QoS, Will, CONNACK_ACCEPTED, CONNACK_BAD_USERNAME_OR_PASSWORD, CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED, CONNACK_SERVER_UNAVAILABLE, CONNACK_UNACCEPTABLE_PROTOCOL,
    MAX_REMAINING_LENGTH, PROTOCOL_LEVEL_311, SUBACK_FAILURE,
};
