//! The wire protocols a connection can speak. The reactor tags each connection by the listener
//! that accepted it; the core keeps one `Session` per connection whatever its wire, and picks
//! the codec pair by it: `native.rs` (frames ⇄ `Op`/`Reply`) or the MQTT session
//! (`mqtt_session.rs`, `mqtt_core.rs`: packets ⇄ the same `Op`/`Reply`).

/// Which codec a connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireKind {
    /// The lanpush protocol (docs/PROTOCOL.md §1–13).
    Native,
    /// MQTT 3.1.1 (docs/PROTOCOL.md §14).
    Mqtt,
}
