//! [`MetricsBoard`]: where shards post their snapshots and readers merge them.

use std::sync::{Arc, Mutex};

use super::snapshot::MetricsSnapshot;
use crate::config::MetricsConfig;

/// One slot per shard holding its latest [`MetricsSnapshot`].
///
/// A shard posts with [`publish`](Self::publish) when a reader asks for its report (a pointer
/// swap under a mutex no reader holds for longer than an `Arc` clone; `engine/stats.rs`); the
/// reader (`/metrics`, STATS) then calls [`merged`](Self::merged), which merges outside the
/// locks.
#[derive(Debug)]
pub struct MetricsBoard {
    max_us: u64,
    slots: Vec<Mutex<Option<Arc<MetricsSnapshot>>>>,
}

impl MetricsBoard {
    pub fn new(shards: usize, config: &MetricsConfig) -> MetricsBoard {
        MetricsBoard {
            max_us: super::max_us(config.histogram_max_ms),
            slots: (0..shards).map(|_| Mutex::new(None)).collect(),
        }
    }

    /// Replaces shard `shard`'s snapshot. An out-of-range shard is ignored.
    pub fn publish(&self, shard: usize, snapshot: MetricsSnapshot) {
        let Some(slot) = self.slots.get(shard) else {
            return;
        };
        let new = Some(Arc::new(snapshot));
        // A poisoned slot only means a reader panicked mid-clone; the value is still whole.
        let old = std::mem::replace(&mut *slot.lock().unwrap_or_else(|e| e.into_inner()), new);
        drop(old);
    }

    /// Every shard's latest snapshot merged into one (empty histograms before any posted).
    pub fn merged(&self) -> MetricsSnapshot {
        let posted: Vec<Arc<MetricsSnapshot>> = self
            .slots
            .iter()
            .filter_map(|slot| slot.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let mut merged = MetricsSnapshot::empty(self.max_us);
        for snapshot in &posted {
            merged.merge(snapshot);
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ShardMetrics;

    #[test]
    fn merges_the_latest_post_of_each_shard() {
        let config = MetricsConfig::default();
        let board = MetricsBoard::new(2, &config);
        assert_eq!(board.merged().ingest_to_write.len(), 0);
        let mut shards = [ShardMetrics::new(&config), ShardMetrics::new(&config)];
        for (i, shard) in shards.iter_mut().enumerate() {
            shard.record_delivery(i as u64, "a/b", 1_000, 0, 2_000_000);
            board.publish(i, shard.snapshot());
        }
        shards[0].record_delivery(0, "a/b", 1_000, 0, 2_000_000);
        board.publish(0, shards[0].snapshot());
        board.publish(7, shards[0].snapshot());
        let merged = board.merged();
        assert_eq!(merged.ingest_to_write.len(), 3);
        assert_eq!(merged.connections.len(), 2);
    }
}
