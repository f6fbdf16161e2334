//! [`LocalSubs`]: a shard's subscription index with a cache of its answers per topic.
//!
//! Every message a shard delivers asks the index which local subscriptions match its topic: a
//! walk of the trie that splits the topic at each `/` and hashes every level (7 % of the
//! engine's time at 1 → 1, `bench/RESULTS.md`). A plant publishes the same few thousand tags
//! over and over while its subscriptions rarely change, so the answer for a topic is kept and
//! reused until the index changes, as NATS's sublist keeps a subject → subscribers cache.
//!
//! The cache is keyed by the topic's id at its owner shard, `(owner, id)` (`store.rs`: ids are
//! dense and never reused while the engine runs), not by its name: a hit then costs no hashing
//! or comparison of topic bytes, and it gives back the topic's name too, so a frame from another
//! shard need not have its topic read (and checked as UTF-8) out of its bytes again.
//!
//! Invalidation: one epoch, bumped by every [`LocalSubs::insert`] and [`LocalSubs::remove`]
//! (subscribe, unsubscribe, disconnect all go through them); an entry of another epoch is a
//! miss. Nothing else changes an answer of the index.
//!
//! Bounds: direct-mapped (each key has one slot, a newcomer replaces the slot's entry), at most
//! [`MAX_SLOTS`] slots, grown from [`MIN_SLOTS`] by doubling once half are taken; an answer over
//! [`MAX_CACHED_MATCHES`] matches or a name over [`MAX_CACHED_TOPIC_BYTES`] is not cached (its
//! delivery costs far more than the walk), and when the bytes held would pass
//! [`MAX_CACHE_BYTES`] the cache is emptied. A flood of unique topics therefore costs a walk per
//! message, as without the cache, plus a copy of the answer into a slot, and never more memory
//! than the bound.

use crate::topic::TopicIndex;

/// Slots a fresh cache starts with.
pub(crate) const MIN_SLOTS: usize = 64;
/// The most slots a cache grows to: a plant's tag set fits on each shard.
pub(crate) const MAX_SLOTS: usize = 8192;
/// Answers with more matches than this are not cached.
pub(crate) const MAX_CACHED_MATCHES: usize = 64;
/// Topics longer than this are not cached.
pub(crate) const MAX_CACHED_TOPIC_BYTES: usize = 256;
/// The bytes a cache may hold (slots, names and answers, by capacity) before it is emptied.
pub(crate) const MAX_CACHE_BYTES: usize = 2 << 20;

/// A topic as its owner shard numbers it: (owner shard, topic id at the owner).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TopicKey {
    pub owner: u16,
    pub id: u32,
}

impl TopicKey {
    fn packed(self) -> u64 {
        (u64::from(self.owner) << 32 | u64::from(self.id)) + 1
    }
}

/// A (pattern, value) index of the local subscriptions, with the match cache.
#[derive(Debug)]
pub(crate) struct LocalSubs<V> {
    index: TopicIndex<V>,
    cache: MatchCache<V>,
}

impl<V: Clone + Eq> Default for LocalSubs<V> {
    fn default() -> Self {
        LocalSubs {
            index: TopicIndex::new(),
            cache: MatchCache::default(),
        }
    }
}

impl<V: Clone + Eq> LocalSubs<V> {
    /// Adds `value` under `pattern` ([`TopicIndex::insert`]); every cached answer is stale.
    pub(crate) fn insert(&mut self, pattern: &str, value: V) -> bool {
        self.cache.epoch += 1;
        self.index.insert(pattern, value)
    }

    /// Removes (`pattern`, `value`) ([`TopicIndex::remove`]); every cached answer is stale.
    pub(crate) fn remove(&mut self, pattern: &str, value: &V) -> bool {
        self.cache.epoch += 1;
        self.index.remove(pattern, value)
    }

    /// Number of stored (pattern, value) pairs.
    pub(crate) fn len(&self) -> usize {
        self.index.len()
    }

    /// The cached answer for topic `key`: its name and the values whose pattern matches it (as
    /// [`TopicIndex::collect_matches`] gave them). `None` if it is not cached or is stale.
    pub(crate) fn cached(&self, key: TopicKey) -> Option<(&str, &[V])> {
        self.cache.get(key)
    }

    /// Appends to `out` the values whose pattern matches `topic`, named `key` by its owner, and
    /// caches the answer (what this call appended) for [`LocalSubs::cached`].
    pub(crate) fn collect_matches(&mut self, key: TopicKey, topic: &str, out: &mut Vec<V>) {
        let from = out.len();
        self.index.collect_matches(topic, out);
        self.cache.put(key, topic, &out[from..]);
    }

    /// The cache, for tests of its bounds.
    #[cfg(test)]
    pub(crate) fn cache(&self) -> &MatchCache<V> {
        &self.cache
    }
}

#[derive(Debug)]
pub(crate) struct MatchCache<V> {
    /// Direct-mapped; the length is a power of two.
    slots: Vec<Slot<V>>,
    /// Slots holding an entry (of any epoch).
    taken: usize,
    /// Bytes held: the slot array and each slot's name and answer, by capacity.
    bytes: usize,
    /// The index's version: an entry of another epoch is stale.
    epoch: u64,
}

#[derive(Debug)]
struct Slot<V> {
    /// [`TopicKey::packed`]; 0: empty.
    key: u64,
    epoch: u64,
    topic: String,
    matches: Vec<V>,
}

impl<V> Slot<V> {
    fn empty() -> Self {
        Slot {
            key: 0,
            epoch: 0,
            topic: String::new(),
            matches: Vec::new(),
        }
    }

    fn heap_bytes(&self) -> usize {
        self.topic.capacity() + self.matches.capacity() * std::mem::size_of::<V>()
    }
}

impl<V> Default for MatchCache<V> {
    fn default() -> Self {
        MatchCache {
            slots: Vec::new(),
            taken: 0,
            bytes: 0,
            epoch: 1,
        }
    }
}

impl<V: Clone> MatchCache<V> {
    fn slot_of(&self, key: u64) -> usize {
        // Fibonacci hashing: consecutive ids (a shard numbers its topics 0, 1, 2, ...) land
        // evenly spread, so a tag set smaller than the table hardly ever collides.
        let bits = self.slots.len().trailing_zeros();
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - bits)) as usize
    }

    fn get(&self, key: TopicKey) -> Option<(&str, &[V])> {
        if self.slots.is_empty() {
            return None;
        }
        let key = key.packed();
        let slot = &self.slots[self.slot_of(key)];
        (slot.key == key && slot.epoch == self.epoch).then(|| (&*slot.topic, &*slot.matches))
    }

    fn put(&mut self, key: TopicKey, topic: &str, matches: &[V]) {
        if matches.len() > MAX_CACHED_MATCHES || topic.len() > MAX_CACHED_TOPIC_BYTES {
            return;
        }
        if self.slots.is_empty() {
            self.resize(MIN_SLOTS);
        } else if self.taken * 2 >= self.slots.len() && self.slots.len() < MAX_SLOTS {
            // Rehashing a cache is not worth it: the bigger table starts empty.
            self.resize(self.slots.len() * 2);
        }
        let key = key.packed();
        let at = self.slot_of(key);
        let slot = &mut self.slots[at];
        let before = slot.heap_bytes();
        if slot.key == 0 {
            self.taken += 1;
        }
        slot.key = key;
        slot.epoch = self.epoch;
        // In place: a slot keeps its allocations, so a replaced entry costs no allocation once
        // the slot has held one as large.
        slot.topic.clear();
        slot.topic.push_str(topic);
        slot.matches.clear();
        slot.matches.extend_from_slice(matches);
        self.bytes = self.bytes - before + slot.heap_bytes();
        if self.bytes > MAX_CACHE_BYTES {
            let len = self.slots.len();
            self.resize(len);
        }
    }

    /// Empties the cache into `len` fresh slots, freeing every name and answer.
    fn resize(&mut self, len: usize) {
        debug_assert!(len.is_power_of_two());
        self.slots = std::iter::repeat_with(Slot::empty).take(len).collect();
        self.taken = 0;
        self.bytes = len * std::mem::size_of::<Slot<V>>();
    }

    /// Bytes held now (see [`MAX_CACHE_BYTES`]).
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Slots allocated now (see [`MAX_SLOTS`]).
    #[cfg(test)]
    pub(crate) fn slot_count(&self) -> usize {
        self.slots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(owner: u16, id: u32) -> TopicKey {
        TopicKey { owner, id }
    }

    /// What delivery does: the cached answer, else a walk that caches it.
    fn lookup(subs: &mut LocalSubs<u32>, k: TopicKey, topic: &str) -> (Vec<u32>, bool) {
        if let Some((name, cached)) = subs.cached(k) {
            assert_eq!(name, topic, "a hit gives the topic's name back");
            let mut v = cached.to_vec();
            v.sort_unstable();
            return (v, true);
        }
        let mut out = vec![999]; // what was there before is not part of the answer
        subs.collect_matches(k, topic, &mut out);
        let mut v = out[1..].to_vec();
        v.sort_unstable();
        (v, false)
    }

    #[test]
    fn a_second_lookup_hits_with_the_same_answer() {
        let mut subs = LocalSubs::default();
        subs.insert("plant/+/temp", 1);
        subs.insert("plant/#", 2);
        assert_eq!(
            lookup(&mut subs, key(0, 0), "plant/l1/temp"),
            (vec![1, 2], false)
        );
        assert_eq!(
            lookup(&mut subs, key(0, 0), "plant/l1/temp"),
            (vec![1, 2], true)
        );
        // Another owner's topic 0 is another topic.
        assert_eq!(
            lookup(&mut subs, key(1, 0), "plant/l1/pressure"),
            (vec![2], false)
        );
        assert_eq!(
            lookup(&mut subs, key(0, 0), "plant/l1/temp"),
            (vec![1, 2], true)
        );
        assert_eq!(
            lookup(&mut subs, key(1, 0), "plant/l1/pressure"),
            (vec![2], true)
        );
    }

    #[test]
    fn no_match_is_an_answer_too() {
        let mut subs = LocalSubs::default();
        subs.insert("a/b", 1);
        assert_eq!(lookup(&mut subs, key(0, 3), "x/y"), (vec![], false));
        assert_eq!(lookup(&mut subs, key(0, 3), "x/y"), (vec![], true));
    }

    #[test]
    fn subscribe_and_unsubscribe_invalidate_every_answer() {
        let mut subs = LocalSubs::default();
        subs.insert("a/+", 1);
        lookup(&mut subs, key(0, 0), "a/b");
        lookup(&mut subs, key(0, 1), "c/d");
        assert!(lookup(&mut subs, key(0, 0), "a/b").1);
        // A new subscription matching a cached topic, and one matching none of them.
        subs.insert("#", 2);
        assert_eq!(lookup(&mut subs, key(0, 0), "a/b"), (vec![1, 2], false));
        assert_eq!(lookup(&mut subs, key(0, 1), "c/d"), (vec![2], false));
        assert!(lookup(&mut subs, key(0, 1), "c/d").1);
        // Unsubscribe (a disconnect removes each of its subscriptions the same way).
        subs.remove("#", &2);
        assert_eq!(lookup(&mut subs, key(0, 0), "a/b"), (vec![1], false));
        assert_eq!(lookup(&mut subs, key(0, 1), "c/d"), (vec![], false));
        // Even a remove of something absent: the cache does not reason about it.
        subs.remove("x", &9);
        assert!(!lookup(&mut subs, key(0, 0), "a/b").1);
    }

    #[test]
    fn a_plant_tag_set_stays_cached() {
        let mut subs = LocalSubs::default();
        subs.insert("plant/#", 1);
        let tags = 4000u32;
        for round in 0..3 {
            let mut hits = 0;
            for id in 0..tags {
                let (answer, hit) = lookup(&mut subs, key(0, id), &format!("plant/tag{id}"));
                assert_eq!(answer, [1]);
                hits += usize::from(hit);
            }
            if round == 2 {
                // Direct-mapped: a few ids share a slot; nearly all are hits.
                assert!(hits as u32 > tags * 9 / 10, "{hits} of {tags} hits");
            }
        }
    }

    #[test]
    fn a_flood_of_unique_topics_stays_within_the_bounds() {
        let mut subs = LocalSubs::default();
        for v in 0..MAX_CACHED_MATCHES as u32 {
            subs.insert("flood/#", v);
        }
        let mut peak = 0;
        for id in 0..100_000u32 {
            let topic = format!("flood/{id:0>200}");
            let (answer, hit) = lookup(&mut subs, key((id % 3) as u16, id), &topic);
            assert_eq!(answer.len(), MAX_CACHED_MATCHES);
            assert!(!hit);
            let cache = subs.cache();
            assert!(cache.slot_count() <= MAX_SLOTS);
            assert!(cache.bytes() <= MAX_CACHE_BYTES, "{}", cache.bytes());
            peak = peak.max(cache.bytes());
        }
        // The flood did fill the cache up to its bound (and the bound was what held it).
        assert!(peak > MAX_CACHE_BYTES / 2, "peak {peak}");
    }

    #[test]
    fn oversized_answers_and_names_are_not_cached() {
        let mut subs = LocalSubs::default();
        for v in 0..=MAX_CACHED_MATCHES as u32 {
            subs.insert("big/#", v);
        }
        subs.insert("long/#", 1);
        lookup(&mut subs, key(0, 0), "big/x");
        assert!(!lookup(&mut subs, key(0, 0), "big/x").1);
        let long = format!("long/{}", "x".repeat(MAX_CACHED_TOPIC_BYTES));
        lookup(&mut subs, key(0, 1), &long);
        assert!(!lookup(&mut subs, key(0, 1), &long).1);
        let short = "long/x".to_string();
        lookup(&mut subs, key(0, 2), &short);
        assert!(lookup(&mut subs, key(0, 2), &short).1);
    }
}
