//! `[multicast]`: the channels and their repair settings (configs/default.toml documents
//! every key; configs/multicast.toml is an example for one LAN segment).

use std::net::Ipv4Addr;

use serde::Deserialize;

use super::datagram::HEADER_BYTES;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MulticastConfig {
    /// An idle stream sends a heartbeat this often, so receivers notice a lost tail.
    pub heartbeat_ms: u64,
    /// Bytes of sent datagrams each reactor keeps per channel for repairs.
    pub repair_ring_bytes: usize,
    /// NAKs of one datagram within `repair_window_ms` answered by unicast; the next one makes
    /// the engine multicast the datagram once instead.
    pub unicast_repair_max: u32,
    pub repair_window_ms: u64,
    /// Test only: a seeded loss generator on the send path.
    pub test_loss: LossConfig,
    pub channels: Vec<ChannelConfig>,
}

/// Test-only loss injection on the engine's send path: every receiver loses the same datagrams.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// Datagrams dropped, in percent (0 turns it off).
    pub percent: f64,
    /// Datagrams dropped together in each loss event.
    pub burst: u32,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelConfig {
    /// IPv4 multicast group.
    pub group: Ipv4Addr,
    pub port: u16,
    /// Address of the interface to send on ("0.0.0.0": the kernel's route for the group).
    #[serde(default = "unspecified")]
    pub interface: Ipv4Addr,
    #[serde(default = "one")]
    pub ttl: u32,
    /// Bytes per second this channel may send (datagrams included, 0 = unlimited).
    #[serde(default)]
    pub max_rate_bytes_per_s: u64,
    /// Largest datagram (UDP payload); 1472 fits a 1,500-byte Ethernet MTU.
    #[serde(default = "default_datagram_bytes")]
    pub datagram_bytes: usize,
    /// Microseconds a datagram may wait for more frames after the loop turn that started it
    /// (0: sent at the end of every turn). See [`crate::mcast::SenderConfig::linger`].
    #[serde(default)]
    pub linger_us: u64,
    /// Whether receivers on the engine's own host hear the channel (IP_MULTICAST_LOOP). Off,
    /// the kernel skips the local copy of every datagram: for an engine whose receivers are
    /// all on other hosts.
    #[serde(default = "yes")]
    pub loopback: bool,
    /// Topic patterns whose messages the channel carries.
    pub patterns: Vec<String>,
}

/// A channel's `linger_us` at most: 100 ms.
const MAX_LINGER_US: u64 = 100_000;

fn unspecified() -> Ipv4Addr {
    Ipv4Addr::UNSPECIFIED
}

fn one() -> u32 {
    1
}

fn yes() -> bool {
    true
}

fn default_datagram_bytes() -> usize {
    1472
}

impl MulticastConfig {
    pub fn validate(&self, max_topic_bytes: usize) -> Result<(), String> {
        if self.channels.len() > usize::from(u16::MAX) {
            return Err("multicast.channels: too many channels".into());
        }
        if self.heartbeat_ms == 0 || self.repair_window_ms == 0 {
            return Err("multicast.heartbeat_ms and repair_window_ms must be at least 1".into());
        }
        if self.repair_ring_bytes < 64 * 1024 {
            return Err("multicast.repair_ring_bytes must be at least 65536".into());
        }
        if !(0.0..=100.0).contains(&self.test_loss.percent) || self.test_loss.burst == 0 {
            return Err("multicast.test_loss: percent in 0 ..= 100, burst at least 1".into());
        }
        for (i, c) in self.channels.iter().enumerate() {
            let name = format!("multicast.channels[{i}]");
            if !c.group.is_multicast() {
                return Err(format!(
                    "{name}.group = {} is not a multicast address",
                    c.group
                ));
            }
            if c.port == 0 {
                return Err(format!("{name}.port must not be 0"));
            }
            if !(1..=255).contains(&c.ttl) {
                return Err(format!("{name}.ttl must be in 1 ..= 255"));
            }
            if !(HEADER_BYTES + 64..=65_507).contains(&c.datagram_bytes) {
                return Err(format!("{name}.datagram_bytes must be in 96 ..= 65507"));
            }
            if c.linger_us > MAX_LINGER_US {
                return Err(format!(
                    "{name}.linger_us must be at most {MAX_LINGER_US} (it adds up to that much latency)"
                ));
            }
            if c.patterns.is_empty() {
                return Err(format!(
                    "{name}.patterns is empty: the channel would carry nothing"
                ));
            }
            for p in &c.patterns {
                crate::proto::validate_pattern(p, max_topic_bytes)
                    .map_err(|e| format!("{name}.patterns: {p:?}: {e}"))?;
            }
        }
        Ok(())
    }
}
