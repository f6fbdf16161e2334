//! Codec micro-benchmarks: encoding and decoding the hot-path frames (PUBLISH, DATA) with a
//! 64-byte payload, into a reused buffer as the engine does.
//!
//! `cargo bench --bench codec` (add `-- --quick` for a short run).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use lanpush::proto::{self, DataHeader, Decoded, Frame, PublishRef};

const TOPIC: &str = "plant/line1/press04/temperature";
const PAYLOAD: [u8; 64] = [0x5a; 64];
const MAX_FRAME_BYTES: usize = 1 << 20;

fn publish() -> PublishRef<'static> {
    PublishRef {
        topic: TOPIC,
        source_ts_ns: 1_700_000_000_000_000_000,
        quality: 192,
        payload: &PAYLOAD,
    }
}

fn header() -> DataHeader {
    DataHeader {
        seq: 123_456,
        source_ts_ns: 1_700_000_000_000_000_000,
        ingest_ts_ns: 1_700_000_000_000_050_000,
        quality: 192,
        flags: 0,
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.throughput(Throughput::Elements(1));
    let mut buf = Vec::with_capacity(256);
    group.bench_function("publish_64B", |b| {
        b.iter(|| {
            buf.clear();
            proto::encode_publish(&mut buf, black_box(&publish()));
            black_box(buf.len())
        })
    });
    group.bench_function("data_64B", |b| {
        b.iter(|| {
            buf.clear();
            proto::encode_data(&mut buf, black_box(&header()), black_box(TOPIC), &PAYLOAD);
            black_box(buf.len())
        })
    });
    group.bench_function("data_from_publish_64B", |b| {
        b.iter(|| {
            buf.clear();
            proto::encode_data_from_publish(&mut buf, black_box(&publish()), 7, 42, 0);
            black_box(buf.len())
        })
    });
    group.finish();
}

fn decode(c: &mut Criterion) {
    let mut publish_frame = Vec::new();
    proto::encode_publish(&mut publish_frame, &publish());
    let mut data_frame = Vec::new();
    proto::encode_data(&mut data_frame, &header(), TOPIC, &PAYLOAD);

    let mut group = c.benchmark_group("decode_frame");
    group.throughput(Throughput::Elements(1));
    group.bench_function("publish_64B", |b| {
        b.iter(
            || match proto::decode_frame(black_box(&publish_frame), MAX_FRAME_BYTES) {
                Ok(Decoded::Frame(Frame::Publish(p), used)) => black_box((p.payload.len(), used)),
                other => panic!("unexpected {other:?}"),
            },
        )
    });
    group.bench_function("data_64B", |b| {
        b.iter(
            || match proto::decode_frame(black_box(&data_frame), MAX_FRAME_BYTES) {
                Ok(Decoded::Frame(Frame::Data { header, .. }, used)) => {
                    black_box((header.seq, used))
                }
                other => panic!("unexpected {other:?}"),
            },
        )
    });
    // A read buffer of back-to-back frames, decoded one after the other as a reactor does.
    let mut stream = Vec::new();
    for _ in 0..64 {
        stream.extend_from_slice(&publish_frame);
    }
    group.throughput(Throughput::Elements(64));
    group.bench_function("publish_64B_x64_stream", |b| {
        b.iter(|| {
            let mut at = 0;
            while at < stream.len() {
                match proto::decode_frame(&stream[at..], MAX_FRAME_BYTES) {
                    Ok(Decoded::Frame(_, used)) => at += used,
                    other => panic!("unexpected {other:?}"),
                }
            }
            black_box(at)
        })
    });
    group.finish();
}

criterion_group!(benches, encode, decode);
criterion_main!(benches);
