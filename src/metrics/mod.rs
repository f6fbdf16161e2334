//! Latency histograms, their snapshots, the Prometheus text format and the HTTP endpoint.
//!
//! ```text
//!  shard thread (hot path)                     on request (STATS, /metrics), via the stats
//!  ─────────────────────────                   collector asking each reactor for its report
//!  flush: frame fully written ─▶ ShardMetrics ──snapshot()──▶ MetricsBoard::publish(shard)
//!         record_delivery(conn, topic,                              │
//!                         ingest, source, now)           MetricsBoard::merged()
//!                                                                   ▼
//!                      MetricsSnapshot::to_json  (`lanpush stats`, GET /stats)
//!                      prometheus_text           (GET /metrics, served by MetricsServer)
//! ```
//!
//! Sans-IO except [`MetricsServer`]: [`ShardMetrics`] is a plain struct owned by one shard
//! thread, fed timestamps (it never reads a clock), and [`MetricsSnapshot`] is a value that can
//! be merged, rendered as JSON or as Prometheus text.
//!
//! ## What is measured
//! For every DATA frame fully written to a subscriber socket, two latencies, in microseconds:
//! - **ingest → write**: from the owner shard taking the message in (`ingest_ts_ns` in the DATA
//!   header) to the write; the engine's own delay, on one clock;
//! - **source → write**: from the publisher's `source_ts_ns` to the write; end to end, meaningful
//!   when the source's clock agrees with the engine's. Frames with no source timestamp (0) are
//!   not recorded here; one stamped later than the write (clock skew) is counted in
//!   `source_ahead` and not recorded.
//!
//! Each is kept per topic prefix (the first `metrics.prefix_levels` levels) and in total (the
//! merge of the prefixes); ingest → write also per subscriber connection. Histograms are
//! cumulative since the engine started.
//!
//! ## Precision and memory
//! Values are microseconds, from 1 µs to `metrics.histogram_max_ms`; a larger value is recorded
//! as the maximum and counted in `saturated`. The shard records into bare bucket counts in
//! HdrHistogram's layout (`buckets.rs`: an index and an increment, no min/max/total upkeep);
//! a snapshot turns them into `hdrhistogram::Histogram`s losslessly.
//! - totals and prefixes: 3 significant digits (±0.05 %), `u64` counts: 134 KiB per histogram
//!   at the default 60 s range, two per prefix; at most [`MAX_PREFIXES`] prefixes per shard
//!   (then [`OTHER_PREFIX`]); the totals are the merge of the prefixes, not recorded apart;
//! - per connection: 2 significant digits (±0.5 %), `u32` counts (saturating): 10 KiB per
//!   connection at the default range, allocated on its first recorded frame and freed by
//!   [`ShardMetrics::remove_conn`].

mod board;
mod buckets;
#[doc(hidden)]
pub mod exposition;
mod process;
mod prometheus;
mod recorder;
mod server;
mod snapshot;
mod stamp;
mod window;

pub use board::MetricsBoard;
pub use prometheus::prometheus_text;
pub use recorder::{ShardMetrics, MAX_PREFIXES, OTHER_PREFIX};
pub use server::{basic_credentials, HttpAuth, MetricsServer, Viewer};
pub use snapshot::{render_latency_table, LatencySummary, MetricsSnapshot, PrefixLatency};
pub use stamp::{data_frame_stamp, DataStamp};
pub use window::{WindowMax, WINDOW_NS};

/// Significant digits of the total and per-prefix histograms.
pub const TOTAL_SIGFIG: u8 = 3;
/// Significant digits of the per-connection histograms.
pub const CONN_SIGFIG: u8 = 2;

/// The highest value the histograms track, in microseconds, for a configured maximum in ms.
pub(crate) fn max_us(histogram_max_ms: u64) -> u64 {
    // Validation keeps histogram_max_ms in 1 ..= one day; the floor of 2 µs satisfies the
    // histogram's `high >= 2 * low` even for a hand-built config.
    histogram_max_ms.saturating_mul(1000).max(2)
}

/// A histogram of microseconds from 1 to `max_us` with `sigfig` significant digits.
pub(crate) fn new_histogram<T: hdrhistogram::Counter>(
    max_us: u64,
    sigfig: u8,
) -> hdrhistogram::Histogram<T> {
    // Bounds are checked above (low 1, high >= 2) and sigfig is one of our constants (<= 5),
    // the only ways creation can fail.
    hdrhistogram::Histogram::new_with_bounds(1, max_us.max(2), sigfig)
        .expect("histogram bounds are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shard's recorder moves into its thread; snapshots, the board and the server are
    /// shared across threads.
    #[test]
    fn thread_bounds() {
        fn send<T: Send>() {}
        fn shared<T: Send + Sync>() {}
        send::<ShardMetrics>();
        shared::<MetricsSnapshot>();
        shared::<MetricsBoard>();
        shared::<MetricsServer>();
    }
}
