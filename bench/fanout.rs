//! The delivery path without sockets, and the latency recording on it.
//!
//! - `fanout_1_shard/*`, `fanout_2_shards/*`: the engine's real path through
//!   [`FanoutBench`]: a PUBLISH frame of a 64-byte payload fed to the fan-out core as a socket
//!   read would (decode, route, sequence, encode the DATA frame once, retain and ring, match,
//!   queue to each subscriber), then one flush (vectored writes of the shared frames into a
//!   transport that takes everything, latency recorded per frame written). Per message
//!   delivered, to 1, 10 and 100 subscribers; with 16 messages per flush (16 frames per
//!   write), the batching a busy reactor turn gets. With 2 shards the subscribers are on the
//!   shard that does not own the topic: every message also crosses the shard-to-shard hand-off.
//!   Write coalescing and timers are off (see `src/engine/bench_api.rs`).
//! - `record_delivery/*`: [`ShardMetrics::record_delivery`] per frame written: consecutive
//!   frames of one connection and one prefix (the common case), four prefixes interleaved (each
//!   hits its way of the prefix cache), eight (the cache misses every frame), connections
//!   alternating (the connection cache misses every frame); and, as the baseline in the same
//!   run, `hdrhistogram::Histogram::saturating_record` of the same three values with no lookup
//!   at all.
//! - `snapshot`: [`ShardMetrics::snapshot`] as the shard takes it every ~250 ms.
//!
//! `cargo bench --bench fanout` (add `-- --quick` for a short run).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lanpush::config::MetricsConfig;
use lanpush::engine::FanoutBench;
use lanpush::metrics::ShardMetrics;

const SUBSCRIBERS: usize = 100;
const T0: u64 = 1_700_000_000_000_000_000;
const TOPIC: &str = "plant/line1/press04/temp";
const PAYLOAD: [u8; 64] = [7; 64];

/// A bench of `subscribers` on `shards` shards, checked to deliver before it is measured.
fn bench_of(shards: u16, subscribers: usize) -> FanoutBench {
    let mut bench = FanoutBench::new(shards, subscribers, TOPIC);
    let before = bench.delivered();
    bench.publish(TOPIC, &PAYLOAD);
    bench.flush();
    assert_eq!(bench.delivered() - before, subscribers as u64);
    bench
}

fn fanout(c: &mut Criterion) {
    for shards in [1u16, 2] {
        let name = if shards == 1 {
            "fanout_1_shard"
        } else {
            "fanout_2_shards"
        };
        let mut group = c.benchmark_group(name);
        for subscribers in [1usize, 10, 100] {
            let mut bench = bench_of(shards, subscribers);
            group.throughput(Throughput::Elements(subscribers as u64));
            group.bench_function(format!("1_msg_to_{subscribers}_subscribers"), |b| {
                b.iter(|| {
                    bench.publish(TOPIC, black_box(&PAYLOAD));
                    bench.flush();
                })
            });
        }
        let mut bench = bench_of(shards, SUBSCRIBERS);
        group.throughput(Throughput::Elements(16 * SUBSCRIBERS as u64));
        group.bench_function(format!("16_msgs_to_{SUBSCRIBERS}_subscribers"), |b| {
            b.iter(|| {
                for _ in 0..16 {
                    bench.publish(TOPIC, black_box(&PAYLOAD));
                }
                bench.flush();
            })
        });
        group.finish();
    }
}

fn record_delivery(c: &mut Criterion) {
    let config = MetricsConfig::default();
    let same_prefix: Vec<String> = (0..16).map(|t| format!("plant/line1/tag{t}")).collect();
    let four_prefixes: Vec<String> = (0..16)
        .map(|t| format!("plant/line{}/tag{t}", t % 4))
        .collect();
    let eight_prefixes: Vec<String> = (0..16)
        .map(|t| format!("plant/line{}/tag{t}", t % 8))
        .collect();
    let mut group = c.benchmark_group("record_delivery");
    group.throughput(Throughput::Elements((SUBSCRIBERS * 16) as u64));
    for (name, topics, conn_outer) in [
        ("16_frames_per_conn_same_prefix", &same_prefix, true),
        (
            "16_frames_per_conn_4_prefixes_interleaved",
            &four_prefixes,
            true,
        ),
        (
            "16_frames_per_conn_8_prefixes_interleaved",
            &eight_prefixes,
            true,
        ),
        ("alternating_conn_same_prefix", &same_prefix, false),
    ] {
        let mut metrics = ShardMetrics::new(&config);
        let mut now = T0 + 30_000;
        group.bench_function(name, |b| {
            b.iter(|| {
                now += 1_000;
                for i in 0..SUBSCRIBERS * 16 {
                    let (conn, t) = if conn_outer {
                        (i / 16, i % 16)
                    } else {
                        (i % SUBSCRIBERS, i / SUBSCRIBERS)
                    };
                    metrics.record_delivery(
                        conn as u64 + 1,
                        black_box(&topics[t]),
                        black_box(T0 + (i as u64 & 0xfff) * 7),
                        black_box(T0 - 2_000_000),
                        now,
                    );
                }
            })
        });
        black_box(metrics.snapshot());
    }
    // Baseline in the same run: the three values recorded with `hdrhistogram::Histogram::record`
    // into per-prefix and per-connection histograms, without any lookup.
    let mut ingest = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
    let mut source = ingest.clone();
    let mut per_conn: Vec<hdrhistogram::Histogram<u32>> = (0..SUBSCRIBERS)
        .map(|_| hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 2).unwrap())
        .collect();
    let mut now = T0 + 30_000;
    group.bench_function("baseline_hdrhistogram_record_x3_no_lookup", |b| {
        b.iter(|| {
            now += 1_000;
            for i in 0..SUBSCRIBERS * 16 {
                let ingest_us = (now - black_box(T0 + (i as u64 & 0xfff) * 7)) / 1000;
                let source_us = (now - black_box(T0 - 2_000_000)) / 1000;
                ingest.saturating_record(ingest_us);
                source.saturating_record(source_us);
                per_conn[i / 16].saturating_record(ingest_us);
            }
        })
    });
    group.finish();
}

/// What the shard pays every ~250 ms: a snapshot of 10 prefixes and 1,000 connections, all of
/// which received frames since the last one (the worst case: idle ones reuse their summary).
fn snapshot(c: &mut Criterion) {
    let config = MetricsConfig::default();
    let mut metrics = ShardMetrics::new(&config);
    let topics: Vec<String> = (0..10).map(|p| format!("plant/line{p}/tag")).collect();
    // Latencies of 30 .. 285 µs, whatever the number of iterations.
    let now = T0 + 285_000;
    let mut group = c.benchmark_group("snapshot");
    group.bench_function("10_prefixes_1000_busy_conns", |b| {
        b.iter(|| {
            for conn in 0..1000u64 {
                let topic = &topics[conn as usize % topics.len()];
                metrics.record_delivery(conn, topic, T0 + (conn & 0xff) * 1000, T0, now);
            }
            black_box(metrics.snapshot())
        })
    });
    group.finish();
}

criterion_group!(benches, fanout, record_delivery, snapshot);
criterion_main!(benches);
