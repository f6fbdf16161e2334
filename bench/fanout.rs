//! The per-subscriber delivery path without sockets, and the latency recording on it.
//!
//! - `outbox/*`: one shared 100-byte DATA frame queued to 100 subscribers' [`Outbox`]es (an
//!   `Arc` clone and a push each), then each outbox flushed as the reactor does: `fill_slices`
//!   into a stack array of `IoSlice`s, a pretend write of everything, `consume`. Per frame
//!   delivered; with 64 slices and with the engine's 1024 (whose initialisation is part of
//!   every write).
//! - `record_delivery/*`: [`ShardMetrics::record_delivery`] per frame written: consecutive
//!   frames of one connection and one prefix (the common case), four prefixes interleaved (each
//!   hits its way of the prefix cache), eight (the cache misses every frame), connections
//!   alternating (the connection cache misses every frame); and, as the baseline in the same run, `hdrhistogram::Histogram::saturating_record` of the same three
//!   values with no lookup at all.
//! - `delivery_path`: queue, flush, read the frame's timestamps and record it, per frame.
//! - `snapshot`: [`ShardMetrics::snapshot`] as the shard takes it every ~250 ms.
//!
//! `cargo bench --bench fanout` (add `-- --quick` for a short run).

use std::io::IoSlice;
use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lanpush::config::MetricsConfig;
use lanpush::engine::outbox::{Outbox, SharedFrame};
use lanpush::metrics::{data_frame_stamp, ShardMetrics};
use lanpush::proto::{self, DataHeader};

const SUBSCRIBERS: usize = 100;
const FRAME_BYTES: usize = 100;
const T0: u64 = 1_700_000_000_000_000_000;

/// A 100-byte DATA frame on `topic`.
fn frame(topic: &str) -> SharedFrame {
    let header = DataHeader {
        seq: 1,
        source_ts_ns: T0 - 2_000_000,
        ingest_ts_ns: T0,
        quality: 192,
        flags: 0,
    };
    let fixed = proto::FRAME_HEADER_BYTES + proto::DATA_FIXED_BYTES + topic.len();
    let mut buf = Vec::new();
    proto::encode_data(&mut buf, &header, topic, &vec![7u8; FRAME_BYTES - fixed]);
    assert_eq!(buf.len(), FRAME_BYTES);
    Arc::from(buf)
}

fn outboxes() -> Vec<Outbox> {
    (0..SUBSCRIBERS)
        .map(|_| Outbox::new(4 << 20, 65536))
        .collect()
}

/// Flushes one outbox completely, as one vectored write that takes everything.
fn flush<const IOVECS: usize>(outbox: &mut Outbox) -> usize {
    let written = {
        let mut slices = [IoSlice::new(&[]); IOVECS];
        let n = outbox.fill_slices(&mut slices, 512 * 1024);
        slices[..n].iter().map(|s| s.len()).sum::<usize>()
    };
    outbox.consume(written);
    written
}

fn outbox(c: &mut Criterion) {
    let shared = frame("plant/line1/press04/temp");
    let mut boxes = outboxes();
    let mut group = c.benchmark_group("outbox_100_subscribers");
    for batch in [1usize, 16] {
        group.throughput(Throughput::Elements((SUBSCRIBERS * batch) as u64));
        group.bench_function(format!("push_{batch}_then_flush_64_iovecs"), |b| {
            b.iter(|| {
                for ob in boxes.iter_mut() {
                    for _ in 0..batch {
                        ob.push(Arc::clone(&shared)).expect("room");
                    }
                }
                let mut total = 0;
                for ob in boxes.iter_mut() {
                    total += flush::<64>(ob);
                }
                black_box(total)
            })
        });
    }
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    group.bench_function("push_1_then_flush_1024_iovecs", |b| {
        b.iter(|| {
            for ob in boxes.iter_mut() {
                ob.push(Arc::clone(&shared)).expect("room");
            }
            let mut total = 0;
            for ob in boxes.iter_mut() {
                total += flush::<1024>(ob);
            }
            black_box(total)
        })
    });
    group.finish();
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

fn delivery_path(c: &mut Criterion) {
    let config = MetricsConfig::default();
    let frames: Vec<SharedFrame> = (0..16)
        .map(|t| frame(&format!("plant/line1/tag{t:02}")))
        .collect();
    let mut boxes = outboxes();
    let mut metrics = ShardMetrics::new(&config);
    let mut now = T0 + 30_000;
    let mut group = c.benchmark_group("delivery_path_100_subscribers");
    group.throughput(Throughput::Elements((SUBSCRIBERS * frames.len()) as u64));
    group.bench_function("push_16_flush_record", |b| {
        b.iter(|| {
            for ob in boxes.iter_mut() {
                for f in &frames {
                    ob.push(Arc::clone(f)).expect("room");
                }
            }
            now += 1_000;
            for (conn, ob) in boxes.iter_mut().enumerate() {
                // What the flush would record: every frame the write completed.
                let written = {
                    let mut slices = [IoSlice::new(&[]); 64];
                    let n = ob.fill_slices(&mut slices, 512 * 1024);
                    let mut written = 0;
                    for s in &slices[..n] {
                        if let Some(stamp) = data_frame_stamp(s) {
                            metrics.record_delivery(
                                conn as u64,
                                stamp.topic,
                                stamp.ingest_ts_ns,
                                stamp.source_ts_ns,
                                now,
                            );
                        }
                        written += s.len();
                    }
                    written
                };
                ob.consume(written);
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

criterion_group!(benches, outbox, record_delivery, delivery_path, snapshot);
criterion_main!(benches);
