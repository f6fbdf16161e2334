//! The real delivery path without sockets, for benchmarks and the allocation test: not part of
//! the public API (hidden from the docs, may change at any time).
//!
//! [`FanoutBench`] builds the cores of one or two shards, a publisher connection and N
//! subscriber connections, all opened, HELLO'd and subscribed through
//! [`FanoutCore::handle_input`] with native frames, as a socket would feed them. Publishing goes
//! the same way; flushing runs [`FanoutCore::flush`] into a transport that takes every write
//! whole and throws the bytes away, counting them. So what is measured is the engine's own code
//! from PUBLISH bytes to the vectored writes: decode, route, sequence and encode once, retain and
//! ring, match, queue per subscriber, fill the slices, consume, record the latency.
//!
//! Time is virtual: the bench moves its own `Instant` (and the wall clock it derives from it)
//! by [`STEP`] at each call; the cores read no clock. Timers are not driven (no
//! [`FanoutCore::handle_timeout`]): no keep-alive PINGs, no metrics snapshots, and write
//! coalescing stays off, since its interval is only computed on timer ticks.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::{FanoutCore, Transport};
use super::wire::WireKind;
use super::EngineShared;
use crate::config::Config;
use crate::mqtt;
use crate::proto::{self, DeliveryMode, Frame, Hello, PublishRef, Subscribe};

/// How far the virtual clock moves at each publish and each flush.
const STEP: Duration = Duration::from_micros(1);
/// The wall clock (ns since the UNIX epoch) at the bench's virtual time origin.
const T0_UNIX_NS: u64 = 1_700_000_000_000_000_000;
/// The publisher's slot, on shard 0.
const PUBLISHER_SLOT: usize = 0;
/// Rounds of flush-and-hand-over the set-up may take to settle (it needs two or three).
const SETTLE_ROUNDS: usize = 16;

/// One publisher and N subscribers on the real fan-out core, no sockets, a virtual clock.
///
/// The publisher is on shard 0, which therefore owns every topic it publishes; the subscribers
/// are on the last shard. With one shard, delivery is local; with two, every message crosses
/// the shard-to-shard hand-off (`CoreMsg::Deliver`) as the reactors' inboxes carry it.
#[doc(hidden)]
pub struct FanoutBench {
    cores: Vec<FanoutCore>,
    t0: Instant,
    now: Instant,
    subscribers: usize,
    /// The PUBLISH frame being fed; reused, so the bench itself allocates nothing per message.
    frame: Vec<u8>,
    bytes_written: u64,
    writes: u64,
}

impl FanoutBench {
    /// `subscribers` connections subscribed to `pattern` on the default configuration, the
    /// publisher and subscribers on one shard (`shards` = 1) or on two (`shards` = 2).
    pub fn new(shards: u16, subscribers: usize, pattern: &str) -> FanoutBench {
        FanoutBench::with_config(Config::default(), shards, subscribers, pattern)
    }

    /// As [`FanoutBench::new`] with a configuration of the caller's (`server.threads` is set to
    /// `shards`).
    ///
    /// Panics if `shards` is 0 or above [`super::MAX_SHARDS`], or if a subscriber is not open
    /// with its snapshot complete once the set-up has settled (a refused pattern, say).
    pub fn with_config(
        config: Config,
        shards: u16,
        subscribers: usize,
        pattern: &str,
    ) -> FanoutBench {
        FanoutBench::build(config, shards, subscribers, pattern, WireKind::Native)
    }

    /// As [`FanoutBench::with_config`], the subscribers MQTT 3.1.1 connections (CONNECT, then
    /// SUBSCRIBE to `pattern` at QoS 0): what the MQTT listener's fan-out costs.
    pub fn with_mqtt_subscribers(
        config: Config,
        shards: u16,
        subscribers: usize,
        pattern: &str,
    ) -> FanoutBench {
        FanoutBench::build(config, shards, subscribers, pattern, WireKind::Mqtt)
    }

    fn build(
        mut config: Config,
        shards: u16,
        subscribers: usize,
        pattern: &str,
        wire: WireKind,
    ) -> FanoutBench {
        assert!(
            (1..=super::MAX_SHARDS as u16).contains(&shards),
            "shards = {shards}: 1 ..= {}",
            super::MAX_SHARDS
        );
        config.server.threads = shards as usize;
        let config = Arc::new(config);
        let shared = Arc::new(EngineShared::new(shards as usize, &config));
        let t0 = Instant::now();
        let mut bench = FanoutBench {
            cores: (0..shards)
                .map(|id| FanoutCore::new(id, shards, config.clone(), shared.clone(), t0))
                .collect(),
            t0,
            now: t0,
            subscribers,
            frame: Vec::new(),
            bytes_written: 0,
            writes: 0,
        };
        let last = shards - 1;
        let mut conn_id = 0;
        let mut open =
            |bench: &mut FanoutBench, shard: u16, slot: usize, name: String, wire: WireKind| {
                conn_id += 1;
                let core = &mut bench.cores[shard as usize];
                core.open_wire(bench.now, slot, conn_id, wire);
                core.handle_writable(slot);
                match wire {
                    WireKind::Native => bench.feed(
                        shard,
                        slot,
                        &Frame::Hello(Hello {
                            version: proto::PROTOCOL_VERSION,
                            client_id: name,
                            keepalive_ms: 0,
                            token: String::new(),
                            features: 0,
                        }),
                    ),
                    WireKind::Mqtt => bench.feed_mqtt(
                        shard,
                        slot,
                        &mqtt::Packet::Connect(mqtt::Connect {
                            client_id: &name,
                            clean_session: true,
                            keep_alive_s: 0,
                            username: None,
                            password: None,
                            will: None,
                        }),
                    ),
                }
            };
        open(
            &mut bench,
            0,
            PUBLISHER_SLOT,
            "bench-publisher".into(),
            WireKind::Native,
        );
        // Subscribers take the slots after the publisher's on its shard, from 0 on another.
        let first = if last == 0 { 1 } else { 0 };
        for i in 0..subscribers {
            open(
                &mut bench,
                last,
                first + i,
                format!("bench-subscriber-{i}"),
                wire,
            );
        }
        bench.settle();
        for i in 0..subscribers {
            match wire {
                WireKind::Native => bench.feed(
                    last,
                    first + i,
                    &Frame::Subscribe(Subscribe {
                        sub_id: 1,
                        pattern: pattern.into(),
                        mode: DeliveryMode::Default,
                        resume: Vec::new(),
                    }),
                ),
                WireKind::Mqtt => bench.feed_mqtt(
                    last,
                    first + i,
                    &mqtt::Packet::Subscribe {
                        pkid: 1,
                        filters: vec![(pattern, mqtt::QoS::AtMostOnce)],
                    },
                ),
            }
        }
        bench.settle();
        let core = &bench.cores[last as usize];
        for slot in first..first + subscribers {
            let ready = core
                .session(slot)
                .is_some_and(|s| s.is_open() && s.subs().all(|sub| sub.pending == 0));
            assert!(
                ready,
                "subscriber in slot {slot} is not subscribed to {pattern:?}"
            );
        }
        bench
    }

    /// Feeds one PUBLISH frame from the publisher to its shard's core: the frame is decoded,
    /// sequenced, encoded once as DATA and queued to every matching subscriber (across the
    /// hand-off with two shards, at the next [`FanoutBench::flush`]).
    pub fn publish(&mut self, topic: &str, payload: &[u8]) {
        self.now += STEP;
        self.frame.clear();
        proto::encode_publish(
            &mut self.frame,
            &PublishRef {
                topic,
                source_ts_ns: 0,
                quality: 192,
                payload,
            },
        );
        let read_ns = self.unix_ns();
        let used = self.cores[0].handle_input(self.now, read_ns, PUBLISHER_SLOT, &self.frame);
        debug_assert_eq!(used, self.frame.len(), "a whole frame is used");
    }

    /// One reactor turn on every shard: hands the messages between shards over (as the inboxes
    /// do), then `FanoutCore::flush`es each core into a transport that takes every write.
    pub fn flush(&mut self) {
        self.now += STEP;
        self.hand_over();
        let unix_ns = self.unix_ns();
        for core in &mut self.cores {
            core.flush(
                self.now,
                &mut Sink {
                    unix_ns,
                    bytes_written: &mut self.bytes_written,
                    writes: &mut self.writes,
                },
            );
            // A subscriber cut (e.g. a `disconnect` subscription overflowing) stays closed: the
            // figures would then no longer be per subscriber, which `delivered` shows.
            while core.poll_closed().is_some() {}
        }
    }

    /// Subscriber connections.
    pub fn subscribers(&self) -> usize {
        self.subscribers
    }

    /// DATA frames queued to subscribers so far (each is one delivery), the set-up's included.
    pub fn delivered(&self) -> u64 {
        self.cores
            .iter()
            .map(|c| c.counters.delivery.delivered)
            .sum()
    }

    /// Bytes the transport took so far, the set-up's replies included.
    pub fn bytes_written(&self) -> u64 {
        self.bytes_written
    }

    /// Vectored writes made so far.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    fn unix_ns(&self) -> u64 {
        T0_UNIX_NS + (self.now - self.t0).as_nanos() as u64
    }

    /// Encodes `frame` and feeds it to the connection in `slot` of `shard` (set-up only).
    fn feed(&mut self, shard: u16, slot: usize, frame: &Frame<'_>) {
        self.frame.clear();
        proto::encode_frame(&mut self.frame, frame);
        let read_ns = self.unix_ns();
        let core = &mut self.cores[shard as usize];
        core.handle_input(self.now, read_ns, slot, &self.frame);
    }

    /// Encodes an MQTT `packet` and feeds it to the connection in `slot` of `shard` (set-up only).
    fn feed_mqtt(&mut self, shard: u16, slot: usize, packet: &mqtt::Packet<'_>) {
        self.frame.clear();
        mqtt::encode_packet(&mut self.frame, packet);
        let read_ns = self.unix_ns();
        let core = &mut self.cores[shard as usize];
        core.handle_input(self.now, read_ns, slot, &self.frame);
    }

    /// Every message each core queued for a peer, delivered to it in order.
    fn hand_over(&mut self) -> bool {
        let n = self.cores.len();
        let mut moved = false;
        for from in 0..n {
            for to in 0..n {
                if from == to || self.cores[from].outgoing(to).is_empty() {
                    continue;
                }
                // Taken whole, as the reactor's `send_outgoing` does.
                let msgs = std::mem::take(self.cores[from].outgoing(to));
                moved = true;
                for msg in msgs {
                    self.cores[to].handle_msg(self.now, msg);
                }
            }
        }
        moved
    }

    /// Flushes and hands over until nothing moves (the set-up's WELCOMEs, snapshots, SUBACKs).
    fn settle(&mut self) {
        for _ in 0..SETTLE_ROUNDS {
            self.flush();
            if !self.hand_over() && !self.cores.iter().any(FanoutCore::wants_flush) {
                return;
            }
        }
        panic!("the bench's cores did not settle in {SETTLE_ROUNDS} rounds");
    }
}

/// A transport that takes every write whole and drops the bytes.
struct Sink<'a> {
    unix_ns: u64,
    bytes_written: &'a mut u64,
    writes: &'a mut u64,
}

impl Transport for Sink<'_> {
    fn write(&mut self, _slot: usize, slices: &[IoSlice<'_>]) -> io::Result<usize> {
        let len: usize = slices.iter().map(|s| s.len()).sum();
        *self.bytes_written += len as u64;
        *self.writes += 1;
        Ok(len)
    }

    fn shutdown_write(&mut self, _slot: usize) {}

    fn unix_ns(&mut self) -> u64 {
        self.unix_ns
    }
}

/// The multicast sender's syscall (`mcast_io.rs`), for `bench/mcast_send.rs`: sends every
/// datagram of `run` on a connected UDP socket, by `sendmmsg` (up to 64 a call, as the reactor
/// does, with a last lone datagram by `send`) when `batched`, else one `send` each. Returns the syscalls made; a datagram the
/// kernel refused is skipped, as the reactor skips it.
#[doc(hidden)]
pub fn mcast_send(
    socket: &std::net::UdpSocket,
    run: &[(u16, Arc<[u8]>)],
    batched: bool,
) -> io::Result<u64> {
    let mut calls = 0;
    let mut at = 0;
    while at < run.len() {
        calls += 1;
        if batched && run.len() - at > 1 {
            match super::mcast_io::sendmmsg(socket, &run[at..]) {
                Ok(n) if n > 0 => at += n,
                Ok(_) => return Ok(calls),
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Err(e),
                Err(_) => at += 1,
            }
        } else {
            let _ = socket.send(&run[at].1);
            at += 1;
        }
    }
    Ok(calls)
}
