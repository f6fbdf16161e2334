//! What the benchmark needs from a broker client, so one scenario runs against lanpush, MQTT,
//! NATS and Redis alike.
//!
//! Latency is measured from the payload: the first 8 bytes of every benchmark payload are the
//! *intended* send time (ns since the UNIX epoch, little-endian), so the same measurement works
//! through any broker and is free of coordinated omission. Topics and patterns are given in
//! lanpush syntax (`a/b/c`, `+`, `#`); each driver translates them to its broker's syntax.

use std::io;
use std::time::Duration;

/// One publishing connection.
pub trait PubConn: Send {
    /// Queues one message; may buffer. The driver must not block for long on a slow broker
    /// beyond what its socket does.
    fn publish(&mut self, topic: &str, payload: &[u8]) -> io::Result<()>;
    /// Writes everything buffered.
    fn flush(&mut self) -> io::Result<()>;
}

/// One subscribing connection.
pub trait SubConn: Send {
    /// Subscribes to a lanpush-syntax pattern and waits until the broker confirmed it (or, for a
    /// protocol without confirmation, until a round trip proves it was processed).
    fn subscribe(&mut self, pattern: &str) -> io::Result<()>;
    /// Waits up to `timeout` for data and calls `on_message(topic, payload)` for every message
    /// read; returns how many it delivered (0 on timeout).
    ///
    /// With `timeout == Duration::ZERO` it must not block. The benchmark calls it that way when
    /// `raw_fd` is readable (level-triggered: again on the next turn while unread bytes remain,
    /// so a driver may stop reading early), and every half second regardless. Before returning
    /// it must deliver every complete message already in its own buffer: nothing else would ask
    /// for them. A closed connection is an error (e.g. `UnexpectedEof`), not `Ok(0)`.
    fn poll(
        &mut self,
        timeout: Duration,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> io::Result<usize>;
    /// The socket to wait on for readability (level-triggered), if the driver has one. With it,
    /// one benchmark thread waits on hundreds of subscribers in one epoll set; without it (the
    /// default) they are polled round-robin with a short nap when idle, which adds latency.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A broker target: makes connections.
pub trait Driver: Send + Sync {
    /// Short name for tables: "lanpush", "mqtt", "nats", "redis".
    fn name(&self) -> &str;
    fn publisher(&self, client_id: &str) -> io::Result<Box<dyn PubConn>>;
    fn subscriber(&self, client_id: &str) -> io::Result<Box<dyn SubConn>>;
}
