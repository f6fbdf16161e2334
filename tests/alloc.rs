//! What the house style promises, counted: at steady state, delivering a message to N
//! subscribers allocates nothing per subscriber. The real delivery path ([`FanoutBench`]:
//! PUBLISH bytes in, the fan-out core, vectored writes out) runs under a counting global
//! allocator; a message to 100 subscribers must cost as many allocations as one to 10.
//!
//! The counter is thread-local: tests run in parallel threads, and each counts only its own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use lanpush::config::Config;
use lanpush::engine::FanoutBench;

/// The system allocator, counting the allocations (reallocations included: a growing `Vec`
/// is a new allocation) made by the current thread.
struct Counting;

thread_local! {
    // `const`-initialised and without a destructor: reading it never allocates and works even
    // while the thread's other locals are being torn down.
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    // `try_with` fails only once the thread is gone; an allocation then is not ours to count.
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

/// Allocations made by this thread so far.
fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so `System`'s
// guarantees are ours; counting touches only a thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract (non-zero size), which is
        // `System::alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        // SAFETY: `ptr` was allocated by this allocator, that is by `System`, with `layout`, and
        // the caller upholds the rest of `realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const TOPIC: &str = "plant/line1/press04/temp";
const PAYLOAD: [u8; 64] = [7; 64];
/// Messages published before counting: enough to fill the replay ring below several times
/// over, so every queue, map and ring on the path has reached its steady capacity.
const WARM_UP: u64 = 5_000;
/// Messages counted.
const K: u64 = 1_000;

/// Allocations made while `K` messages are each published then flushed, for one publisher and
/// `subscribers` subscribers on `shards` shards, after a warm-up.
fn allocations_for(shards: u16, subscribers: usize) -> u64 {
    allocations_with(shards, subscribers, false)
}

/// As [`allocations_for`], the subscribers native (`mqtt` false) or MQTT QoS 0 connections.
fn allocations_with(shards: u16, subscribers: usize, mqtt: bool) -> u64 {
    let mut config = Config::default();
    // A ring that the warm-up fills (about 500 frames per shard): the default 64 MiB would take
    // some 500,000 messages before its `VecDeque`s stop growing.
    config.retained.ring_bytes = 64 * 1024 * shards as usize;
    let mut bench = if mqtt {
        FanoutBench::with_mqtt_subscribers(config, shards, subscribers, TOPIC)
    } else {
        FanoutBench::with_config(config, shards, subscribers, TOPIC)
    };
    for _ in 0..WARM_UP {
        bench.publish(TOPIC, &PAYLOAD);
        bench.flush();
    }
    let (delivered, bytes) = (bench.delivered(), bench.bytes_written());
    let before = allocations();
    for _ in 0..K {
        bench.publish(TOPIC, &PAYLOAD);
        bench.flush();
    }
    let counted = allocations() - before;
    // The path ran: every message reached every subscriber and was written.
    assert_eq!(bench.delivered() - delivered, K * subscribers as u64);
    assert!(bench.bytes_written() - bytes >= K * subscribers as u64 * PAYLOAD.len() as u64);
    counted
}

/// Checks that messages to 10 and to 100 subscribers cost the same allocations, at most
/// `per_message` each; returns the count for `K` messages.
fn assert_flat(shards: u16, per_message: u64) -> u64 {
    let ten = allocations_for(shards, 10);
    let hundred = allocations_for(shards, 100);
    eprintln!(
        "{shards} shard(s): {ten} allocations for {K} messages to 10 subscribers, {hundred} to 100"
    );
    assert_eq!(
        ten, hundred,
        "{shards} shard(s), {K} messages: {ten} allocations with 10 subscribers, {hundred} with \
         100: something on the delivery path allocates per subscriber or per write"
    );
    assert!(
        ten <= per_message * K,
        "{shards} shard(s): {ten} allocations for {K} messages, more than {per_message} each"
    );
    ten
}

/// One allocation per message: the DATA frame, encoded once into the shared buffer that every
/// subscriber's queue holds a handle to.
#[test]
fn delivery_allocates_nothing_per_subscriber_on_one_shard() {
    assert_flat(1, 1);
}

/// Subscribers on another shard than the topic's owner: three allocations per message, none
/// per subscriber. The DATA frame; the owner's outgoing queue for the peer, which the driver
/// takes whole each turn (as the reactor's `send_outgoing` does) so the next turn's first
/// message allocates a new one; and the `CoreMsg::Deliver` batch of frames. The last two are
/// per peer shard and per turn: each turn here carries one message, under load they carry many.
#[test]
fn delivery_allocates_nothing_per_subscriber_across_shards() {
    assert_flat(2, 3);
}

/// MQTT subscribers (QoS 0): two allocations per message on one shard, none per subscriber. The
/// DATA frame, and the QoS 0 PUBLISH made from it once on the shard, whose `Arc` every MQTT
/// subscriber's queue holds (docs/ARCHITECTURE.md, "MQTT listener").
#[test]
fn mqtt_delivery_allocates_nothing_per_subscriber() {
    let ten = allocations_with(1, 10, true);
    let hundred = allocations_with(1, 100, true);
    eprintln!("MQTT: {ten} allocations for {K} messages to 10 subscribers, {hundred} to 100");
    assert_eq!(
        ten, hundred,
        "{K} messages: {ten} allocations with 10 MQTT subscribers, {hundred} with 100: the \
         MQTT encoding is made per subscriber"
    );
    assert!(
        ten <= 2 * K,
        "{ten} allocations for {K} messages, more than 2 each"
    );
}

/// A multicast receiver's borrowing path (`McastReceiver::handle_datagram_into`, what
/// `McastSubscriber::next_batch` and lanpush-bench use): datagrams that come in order are
/// delivered from the caller's buffer, with no allocation at all once every topic was seen.
#[test]
fn an_in_order_multicast_datagram_allocates_nothing() {
    use lanpush::mcast::{ChannelSender, McastReceiver, ReceiverConfig, SenderConfig};
    use lanpush::proto::{encode_data, DataHeader, StreamPos};
    use std::time::{Duration, Instant};

    let now = Instant::now();
    let mut sender = ChannelSender::new(
        SenderConfig {
            channel: 0,
            stream: 0,
            engine_id: 7,
            datagram_bytes: 1472,
            heartbeat: Duration::from_secs(60),
            ring_bytes: 1 << 20,
            max_rate_bytes_per_s: 0,
            unicast_repair_max: 3,
            repair_window: Duration::from_millis(20),
            loss: None,
            linger: Duration::ZERO,
        },
        now,
    );
    let mut frame = Vec::new();
    let mut datagrams = Vec::new();
    for seq in 1..=(WARM_UP + K) {
        for t in 0..8 {
            frame.clear();
            encode_data(
                &mut frame,
                &DataHeader {
                    seq,
                    ..DataHeader::default()
                },
                &format!("plant/line1/tag{t}"),
                &PAYLOAD,
            );
            sender.handle_frame(now, 0, &frame);
        }
        sender.close_datagram(now, 0);
        datagrams.push(sender.poll_transmit(now, 0).expect("a datagram"));
    }
    let mut r = McastReceiver::new(ReceiverConfig {
        engine_id: 7,
        nak_delay: Duration::from_millis(5),
        nak_retry: Duration::from_millis(60),
        repair: true,
        max_buffered: 1024,
        seed: 1,
    });
    r.add_pattern("plant/#");
    let mut messages = 0u64;
    r.handle_stream_pos_into(
        now,
        StreamPos {
            channel: 0,
            stream: 0,
            next_seq: 1,
        },
        &mut |_| {},
    );
    let (warm, counted) = datagrams.split_at(WARM_UP as usize);
    for d in warm {
        r.handle_datagram_into(now, d, false, &mut |_| messages += 1);
    }
    let before = allocations();
    for d in counted {
        r.handle_datagram_into(now, d, false, &mut |_| messages += 1);
    }
    let spent = allocations() - before;
    assert_eq!(messages, (WARM_UP + K) * 8, "every message delivered");
    assert_eq!(
        spent, 0,
        "allocations for {K} in-order datagrams of 8 messages"
    );
}
