//! What authentication and authorisation cost (docs/SECURITY.md quotes these figures).
//!
//! - `hello/argon2`: checking a secret the engine has not seen (one argon2id run with the
//!   `lanpush passwd` parameters: 19 MiB, 2 passes) — what the `lanpush-auth` thread spends on a
//!   new client or a password guess, within `auth.max_verifications_per_s` per reactor (the
//!   reactor itself spends what `hello/remembered` does: `Authenticator::begin`);
//! - `hello/remembered`: the same secret again (a keyed BLAKE2b digest and a map look-up);
//! - `hello/anonymous`;
//! - `acl/may_publish_all`, `acl/may_publish_5_patterns`: the check on every PUBLISH, with `#`
//!   allowed and with five patterns of which the last matches;
//! - `acl/filter_allows`: the per-delivery check of a partly allowed subscription.
//!
//! `cargo bench --bench auth` (add `-- --quick` for a short run).

use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use lanpush::auth::{Acl, Authenticator, PatternSet, SubscribeScope};
use lanpush::config::Config;
use lanpush::engine::limits::TokenBucket;

fn authenticator() -> Authenticator {
    let hash = lanpush::auth::hash_password(b"pw").expect("hash");
    let text = format!(
        "[auth]\nanonymous = true\n[[auth.users]]\nname = \"op\"\nsecret_hash = \"{hash}\"\n"
    );
    Authenticator::new(&Config::from_toml_str(&text, "bench").expect("config").auth)
}

fn hello(c: &mut Criterion) {
    let auth = authenticator();
    let now = Instant::now();
    let mut budget = TokenBucket::new(1_000_000_000, 1_000_000_000, now);
    let mut group = c.benchmark_group("hello");
    group.sample_size(10);
    group.bench_function("argon2", |b| {
        b.iter(|| {
            // A wrong secret is never remembered: every iteration runs argon2.
            black_box(auth.authenticate(Some(("op", b"wrong")), now, &mut budget)).ok()
        })
    });
    group.finish();
    auth.authenticate(Some(("op", b"pw")), now, &mut budget)
        .expect("the right secret");
    let mut group = c.benchmark_group("hello");
    group.bench_function("remembered", |b| {
        b.iter(|| black_box(auth.authenticate(Some(("op", b"pw")), now, &mut budget)).ok())
    });
    group.bench_function("anonymous", |b| {
        b.iter(|| black_box(auth.authenticate(None, now, &mut budget)).ok())
    });
    group.finish();
}

fn acl(c: &mut Criterion) {
    let all = Acl::everything();
    let five = Acl {
        publish: PatternSet::new([
            "site/+/alarm",
            "plant/line9/#",
            "plant/+/setpoint",
            "plant/line1/valve/+",
            "plant/line1/#",
        ]),
        subscribe: PatternSet::new(["plant/line1/#", "site/+/alarm"]),
    };
    let topic = "plant/line1/temp/zone4";
    let mut group = c.benchmark_group("acl");
    group.bench_function("may_publish_all", |b| {
        b.iter(|| black_box(&all).may_publish(black_box(topic)))
    });
    group.bench_function("may_publish_5_patterns", |b| {
        b.iter(|| black_box(&five).may_publish(black_box(topic)))
    });
    let SubscribeScope::Partial(filter) = five.subscribe_scope("#") else {
        panic!("# is partly allowed");
    };
    group.bench_function("filter_allows", |b| {
        b.iter(|| black_box(&filter).allows(black_box(topic)))
    });
    group.finish();
}

criterion_group!(benches, hello, acl);
criterion_main!(benches);
