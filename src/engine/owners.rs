//! Which shard owns each topic: assigns its sequence numbers, keeps its retained value and its
//! replay ring entries, and fans its frames out.
//!
//! A topic belongs to the first shard that publishes it (the shard holding the first
//! publisher's connection), for the rest of the engine's life. A gateway's tags are then
//! ingested where its connection is read, with no hop to another reactor before the first
//! subscriber can be written: at 10 k msg/s to 10 subscribers that hop was ~40 % of the p50
//! (bench/RESULTS.md). Topics first published by an in-process [`super::LocalPublisher`], which
//! has no shard, go to the FNV hash of the topic ([`owner_of`]).
//!
//! The table is the one authority (a mutex, taken only on a shard's or an in-process
//! publisher's first sight of a topic); each shard and each [`super::LocalPublisher`] keeps an
//! [`OwnerCache`] of the answers, so the data path does one local hash lookup and takes no lock. Ownership never changes, so a cached answer never goes stale, and per-topic order and
//! snapshot-then-live keep holding for the reason they always did: one owner per topic and FIFO
//! channels between shards.

use ahash::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::pacing::Gate;

/// The shard `topic` hashes to: FNV-1a, cheap on short topics and stable, so tests can
/// predict it. The owner of topics no shard has claimed.
pub(crate) fn owner_of(topic: &str, n_shards: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in topic.as_bytes() {
        hash ^= b as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % n_shards as u64) as u16
}

/// The engine-wide topic -> owner table.
///
/// It is also where the engine-wide topic limit (`limits.max_topics`) is kept: a topic exists
/// from its first claim, so refusing the claim refuses the topic everywhere at once, and every
/// per-shard structure keyed by topic (store, owner caches) stays within the same bound.
pub(crate) struct OwnerTable {
    n_shards: u16,
    max_topics: usize,
    owners: Mutex<HashMap<Box<str>, Owned>>,
}

/// What the table knows of a topic: its owner, and its pacing gate (`pacing.rs`), shared by
/// every shard so that a hold takes effect at the publisher's next message.
#[derive(Clone)]
pub(crate) struct Owned {
    pub owner: u16,
    pub gate: Gate,
}

impl OwnerTable {
    pub(crate) fn new(n_shards: u16, max_topics: usize) -> OwnerTable {
        OwnerTable {
            n_shards,
            max_topics,
            owners: Mutex::new(HashMap::default()),
        }
    }

    /// The owner of `topic`, which becomes `claimant` if it has none yet; `None` if it has none
    /// and the engine already holds `max_topics` topics.
    #[cfg(test)]
    pub(crate) fn claim(&self, topic: &str, claimant: u16) -> Option<u16> {
        self.claim_owned(topic, claimant).map(|o| o.owner)
    }

    fn claim_owned(&self, topic: &str, claimant: u16) -> Option<Owned> {
        debug_assert!(claimant < self.n_shards);
        let mut owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(owned) = owners.get(topic) {
            return Some(owned.clone());
        }
        if owners.len() >= self.max_topics {
            return None;
        }
        let owned = Owned {
            owner: claimant,
            gate: Arc::default(),
        };
        owners.insert(topic.into(), owned.clone());
        Some(owned)
    }

    /// The owner of `topic` and its gate, if some shard has claimed it.
    pub(crate) fn get(&self, topic: &str) -> Option<Owned> {
        let owners = self.owners.lock().unwrap_or_else(|e| e.into_inner());
        owners.get(topic).cloned()
    }

    /// The owner for a publish that does not come through a shard: claimed for the hash owner.
    pub(crate) fn claim_for_local(&self, topic: &str) -> Option<Owned> {
        self.claim_owned(topic, owner_of(topic, self.n_shards))
    }

    /// Holds the table's mutex, so a test can show that a path does not take it.
    #[cfg(test)]
    pub(crate) fn lock_for_test(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Owned>> {
        self.owners.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One shard's copy of the answers it has had from the [`OwnerTable`].
///
/// A shard keeps its own id of each topic it owns here too (its store's, `store.rs`), so that a
/// PUBLISH costs one lookup by topic name however many per-topic tables it touches.
#[derive(Default)]
pub(crate) struct OwnerCache {
    known: HashMap<Box<str>, Known>,
}

struct Known {
    owned: Owned,
    /// The topic's id in this shard's store, set at the first publish while this shard owns it.
    local_id: Option<u32>,
}

impl Known {
    fn route(&self) -> Route {
        Route {
            owner: self.owned.owner,
            held: self.owned.gate.load(Ordering::Relaxed) != 0,
            local_id: self.local_id,
        }
    }
}

/// Where a PUBLISH on a shard goes ([`OwnerCache::route`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Route {
    pub owner: u16,
    /// The topic's pacing gate is closed: a subscriber holds it back (`pacing.rs`).
    pub held: bool,
    /// The topic's id in this shard's store when this shard owns it (`None` otherwise).
    pub local_id: Option<u32>,
}

impl OwnerCache {
    /// Where a topic this shard is about to publish goes: its owner, `me` if nobody owns it
    /// yet; `None` if it is a new topic past the engine's limit. When the owner is `me`, the
    /// topic's id in this shard's store, asked of `store_id` once per topic.
    pub(crate) fn route(
        &mut self,
        table: &OwnerTable,
        topic: &str,
        me: u16,
        store_id: impl FnOnce(&str) -> u32,
    ) -> Option<Route> {
        if let Some(known) = self.known.get_mut(topic) {
            if known.owned.owner == me && known.local_id.is_none() {
                known.local_id = Some(store_id(topic));
            }
            return Some(known.route());
        }
        let owned = table.claim_owned(topic, me)?;
        let local_id = (owned.owner == me).then(|| store_id(topic));
        let known = Known { owned, local_id };
        let route = known.route();
        self.known.insert(topic.into(), known);
        Some(route)
    }

    /// [`OwnerCache::route`]'s owner and gate, for tests.
    #[cfg(test)]
    pub(crate) fn for_publish(
        &mut self,
        table: &OwnerTable,
        topic: &str,
        me: u16,
    ) -> Option<(u16, bool)> {
        self.route(table, topic, me, |_| 0)
            .map(|r| (r.owner, r.held))
    }

    fn remember(&mut self, topic: &str, owned: Owned) {
        let known = Known {
            owned,
            local_id: None,
        };
        self.known.insert(topic.into(), known);
    }

    /// The pacing gate of a topic some shard has claimed (asked of the table once per topic).
    pub(crate) fn gate(&mut self, table: &OwnerTable, topic: &str) -> Option<Gate> {
        if let Some(known) = self.known.get(topic) {
            return Some(known.owned.gate.clone());
        }
        let owned = table.get(topic)?;
        let gate = owned.gate.clone();
        self.remember(topic, owned);
        Some(gate)
    }

    /// The owner of a topic an in-process publisher is about to publish: the hash owner if
    /// nobody owns it yet ([`OwnerTable::claim_for_local`]). Asks the table once per topic.
    pub(crate) fn for_local_publish(&mut self, table: &OwnerTable, topic: &str) -> Option<u16> {
        if let Some(known) = self.known.get(topic) {
            return Some(known.owned.owner);
        }
        let owned = table.claim_for_local(topic)?;
        let owner = owned.owner;
        self.remember(topic, owned);
        Some(owner)
    }

    /// The owner of a topic this shard needs something from (a replay). A topic nobody has
    /// published has no messages to replay; its hash owner answers for it, and is not cached.
    pub(crate) fn lookup(&mut self, table: &OwnerTable, topic: &str) -> u16 {
        if let Some(known) = self.known.get(topic) {
            return known.owned.owner;
        }
        match table.get(topic) {
            Some(owned) => {
                let owner = owned.owner;
                self.remember(topic, owned);
                owner
            }
            None => owner_of(topic, table.n_shards),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_topic_limit_refuses_new_topics_only() {
        let table = OwnerTable::new(2, 2);
        let mut cache = OwnerCache::default();
        assert_eq!(cache.for_publish(&table, "a", 0).map(|(o, _)| o), Some(0));
        assert_eq!(table.claim("b", 1), Some(1));
        assert_eq!(
            cache.for_publish(&table, "c", 0).map(|(o, _)| o),
            None,
            "a third topic"
        );
        assert!(table.claim_for_local("c").is_none());
        assert_eq!(
            cache.for_publish(&table, "b", 0).map(|(o, _)| o),
            Some(1),
            "known topics go on"
        );
        assert_eq!(cache.lookup(&table, "c"), owner_of("c", 2));
    }
    use std::sync::Arc;

    #[test]
    fn fnv_spreads_topics_and_is_stable() {
        let owners: Vec<u16> = (0..64)
            .map(|i| owner_of(&format!("plant/line{i}/temp"), 2))
            .collect();
        assert!(owners.contains(&0) && owners.contains(&1));
        assert_eq!(
            owner_of("plant/line1/temp", 2),
            owner_of("plant/line1/temp", 2)
        );
        assert_eq!(owner_of("anything", 1), 0);
    }

    #[test]
    fn the_first_publisher_shard_owns_a_topic_for_good() {
        let table = OwnerTable::new(4, 1000);
        let (mut a, mut b) = (OwnerCache::default(), OwnerCache::default());
        assert_eq!(
            a.for_publish(&table, "gw1/tag1", 3).map(|(o, _)| o),
            Some(3)
        );
        assert_eq!(
            b.for_publish(&table, "gw1/tag1", 1).map(|(o, _)| o),
            Some(3),
            "claimed already"
        );
        assert_eq!(b.lookup(&table, "gw1/tag1"), 3);
        // A lookup never claims: an unpublished topic answers with its hash owner.
        assert_eq!(a.lookup(&table, "never"), owner_of("never", 4));
        assert_eq!(b.for_publish(&table, "never", 2).map(|(o, _)| o), Some(2));
        assert_eq!(a.lookup(&table, "never"), 2, "not cached before the claim");
        // The in-process publisher claims for the hash owner.
        assert_eq!(
            table.claim_for_local("local/x").map(|o| o.owner),
            Some(owner_of("local/x", 4))
        );
    }

    #[test]
    fn a_local_publisher_cache_claims_for_the_hash_owner_and_defers_to_shards() {
        let table = OwnerTable::new(4, 1000);
        let (mut shard, mut local) = (OwnerCache::default(), OwnerCache::default());
        let hashed = owner_of("local/x", 4);
        assert_eq!(local.for_local_publish(&table, "local/x"), Some(hashed));
        assert_eq!(
            shard
                .for_publish(&table, "local/x", (hashed + 1) % 4)
                .map(|(o, _)| o),
            Some(hashed)
        );
        // A topic a shard claimed first keeps that shard, whatever its hash.
        let other = (owner_of("gw/t", 4) + 1) % 4;
        assert_eq!(
            shard.for_publish(&table, "gw/t", other).map(|(o, _)| o),
            Some(other)
        );
        assert_eq!(local.for_local_publish(&table, "gw/t"), Some(other));
        // Repeats come from the cache (`handle_tests.rs` shows they take no lock).
        assert_eq!(local.for_local_publish(&table, "gw/t"), Some(other));
        assert_eq!(local.for_local_publish(&table, "local/x"), Some(hashed));
    }

    #[test]
    fn a_route_carries_the_store_id_of_owned_topics_asked_once() {
        let table = OwnerTable::new(2, 1000);
        let mut cache = OwnerCache::default();
        let mut asked = 0;
        let route = cache.route(&table, "mine", 0, |t| {
            assert_eq!(t, "mine");
            asked += 1;
            7
        });
        assert_eq!(
            route,
            Some(Route {
                owner: 0,
                held: false,
                local_id: Some(7)
            })
        );
        let again = cache.route(&table, "mine", 0, |_| panic!("asked twice"));
        assert_eq!(again, route);
        // Another shard's topic has no id here, and the store is not asked.
        assert_eq!(table.claim("theirs", 1), Some(1));
        let theirs = cache.route(&table, "theirs", 0, |_| panic!("not owned here"));
        assert_eq!(theirs.map(|r| (r.owner, r.local_id)), Some((1, None)));
        // Known first through a lookup (a replay, a pacing gate), then published: asked then.
        assert_eq!(table.claim("looked-up", 0), Some(0));
        assert_eq!(cache.lookup(&table, "looked-up"), 0);
        let route = cache.route(&table, "looked-up", 0, |t| {
            assert_eq!(t, "looked-up");
            asked += 1;
            9
        });
        assert_eq!(route.and_then(|r| r.local_id), Some(9));
        assert_eq!(asked, 2);
    }

    #[test]
    fn racing_claims_agree_on_one_owner() {
        let table = Arc::new(OwnerTable::new(8, 100_000));
        let answers: Vec<Vec<u16>> = (0..8u16)
            .map(|me| {
                let table = table.clone();
                std::thread::spawn(move || {
                    let mut cache = OwnerCache::default();
                    (0..500)
                        .map(|t| cache.for_publish(&table, &format!("t/{t}"), me).unwrap().0)
                        .collect::<Vec<u16>>()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        for t in 0..500 {
            let first = answers[0][t];
            assert!(answers.iter().all(|a| a[t] == first), "topic t/{t}");
        }
    }
}
