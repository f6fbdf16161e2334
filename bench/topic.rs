//! Topic matching micro-benchmarks.
//!
//! - `collect_matches/N`: [`TopicIndex::collect_matches`] of a 4-level topic against N
//!   subscriptions (10, 1,000, 100,000) over a plant-like namespace of 100,000 topics: 60 %
//!   exact patterns, 30 % with a `+` (first, second or third level), 10 % ending in `#`; the
//!   topic rotates over 64 published topics (the run prints the average number of matches).
//! - `for_each_matching/*`: [`TopicTree::for_each_matching`] over 10,000 retained topics, for a
//!   subscription snapshot: one exact topic, `+` levels, `#` subtrees.
//!
//! `cargo bench --bench topic` (add `-- --quick` for a short run).

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lanpush::topic::{TopicIndex, TopicTree};

/// A cheap deterministic mixer, so runs compare.
fn mix(i: u64) -> u64 {
    let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

const GATEWAYS: u64 = 100;
const LINES: u64 = 10;
const TAGS: u64 = 100;

fn pattern(i: u64) -> String {
    let r = mix(i);
    let (g, l, t) = (r % GATEWAYS, (r >> 16) % LINES, (r >> 32) % TAGS);
    match i % 10 {
        0..=5 => format!("plant/gw{g}/line{l}/tag{t}"),
        6 => format!("plant/gw{g}/+/tag{t}"),
        7 => format!("plant/+/line{l}/tag{t}"),
        8 => format!("plant/gw{g}/line{l}/#"),
        _ => format!("+/gw{g}/line{l}/tag{t}"),
    }
}

fn topic(i: u64) -> String {
    let r = mix(i ^ 0x5555);
    format!(
        "plant/gw{}/line{}/tag{}",
        r % GATEWAYS,
        (r >> 16) % LINES,
        (r >> 32) % TAGS
    )
}

fn collect_matches(c: &mut Criterion) {
    let topics: Vec<String> = (0..64).map(topic).collect();
    let mut group = c.benchmark_group("collect_matches");
    group.throughput(Throughput::Elements(1));
    for n in [10u64, 1_000, 100_000] {
        let mut index = TopicIndex::new();
        for i in 0..n {
            index.insert(&pattern(i), i as u32);
        }
        let mut out = Vec::with_capacity(1024);
        let matched: usize = topics
            .iter()
            .map(|t| {
                out.clear();
                index.collect_matches(t, &mut out);
                out.len()
            })
            .sum();
        eprintln!(
            "collect_matches/{n}: {:.1} matches per topic on average",
            matched as f64 / topics.len() as f64
        );
        let mut next = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), &index, |b, index| {
            b.iter(|| {
                out.clear();
                index.collect_matches(black_box(&topics[next % topics.len()]), &mut out);
                next += 1;
                black_box(out.len())
            })
        });
    }
    group.finish();
}

fn for_each_matching(c: &mut Criterion) {
    let mut tree = TopicTree::new();
    for g in 0..10 {
        for l in 0..10 {
            for t in 0..100 {
                tree.insert(&format!("plant/gw{g}/line{l}/tag{t}"), 0u64);
            }
        }
    }
    let mut group = c.benchmark_group("for_each_matching_10k");
    for (name, pattern, expect) in [
        ("exact", "plant/gw3/line4/tag55", 1),
        ("plus_1_of_10", "plant/+/line4/tag55", 10),
        ("plus_last_100", "plant/gw3/line4/+", 100),
        ("hash_1000", "plant/gw3/#", 1000),
        ("hash_all", "#", 10_000),
    ] {
        let mut seen = 0;
        tree.for_each_matching(pattern, |_, _| seen += 1);
        assert_eq!(seen, expect, "{pattern}");
        group.throughput(Throughput::Elements(expect));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0u64;
                tree.for_each_matching(black_box(pattern), |topic, v| n += topic.len() as u64 + v);
                black_box(n)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, collect_matches, for_each_matching);
criterion_main!(benches);
