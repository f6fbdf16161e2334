//! [`TopicIndex`]: the subscription trie, matched against every published topic.

use ahash::HashMap;
use std::str::Split;

use super::{levels, split_pattern};

/// A set of (pattern, value) subscriptions, matched against topics.
///
/// A trie with one node per pattern level: literal levels sit in a map, `+` in its own child,
/// and values of patterns ending in `#` on the node of the level before it. Matching a topic
/// follows one literal branch per level plus the `+` branches, so its cost depends on the
/// topic's depth and the number of wildcard branches on its path, not on how many
/// subscriptions are stored.
///
/// Costs: [`collect_matches`](Self::collect_matches) allocates nothing beyond growing `out`;
/// [`insert`](Self::insert) and [`remove`](Self::remove) are linear in the pattern's length and
/// in the number of values stored under that same pattern (set semantics are checked by `==`).
/// Nodes left empty by `remove` are freed, so memory follows the live subscriptions.
#[derive(Debug)]
pub struct TopicIndex<V> {
    root: Node<V>,
    len: usize,
}

#[derive(Debug)]
struct Node<V> {
    /// Literal next levels.
    children: HashMap<Box<str>, Node<V>>,
    /// The `+` next level.
    plus: Option<Box<Node<V>>>,
    /// Values of patterns that end at this node.
    values: Vec<V>,
    /// Values of patterns that end with `#` after this node: they match this node's topic and
    /// everything below it.
    hash_values: Vec<V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            plus: None,
            values: Vec::new(),
            hash_values: Vec::new(),
        }
    }
}

impl<V> Node<V> {
    fn child(&self, level: &str) -> Option<&Node<V>> {
        if level == "+" {
            self.plus.as_deref()
        } else {
            self.children.get(level)
        }
    }

    fn child_mut(&mut self, level: &str) -> Option<&mut Node<V>> {
        if level == "+" {
            self.plus.as_deref_mut()
        } else {
            self.children.get_mut(level)
        }
    }

    fn child_or_insert(&mut self, level: &str) -> &mut Node<V> {
        if level == "+" {
            return self.plus.get_or_insert_with(Box::default);
        }
        // Look up before inserting so an existing level costs no allocation of its key.
        if !self.children.contains_key(level) {
            self.children.insert(level.into(), Node::default());
        }
        self.children
            .get_mut(level)
            .expect("the level was present or has just been inserted")
    }

    fn remove_child(&mut self, level: &str) {
        if level == "+" {
            self.plus = None;
        } else {
            self.children.remove(level);
        }
    }

    fn child_count(&self) -> usize {
        self.children.len() + usize::from(self.plus.is_some())
    }

    fn holds_values(&self) -> bool {
        !self.values.is_empty() || !self.hash_values.is_empty()
    }
}

impl<V> Default for TopicIndex<V> {
    fn default() -> Self {
        TopicIndex {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V: Clone + Eq> TopicIndex<V> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of stored (pattern, value) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `value` under `pattern`. A pair already present is kept once; returns whether the
    /// pair is new.
    pub fn insert(&mut self, pattern: &str, value: V) -> bool {
        let (path, ends_with_hash) = split_pattern(pattern);
        let mut node = &mut self.root;
        for level in levels(path) {
            node = node.child_or_insert(level);
        }
        let list = if ends_with_hash {
            &mut node.hash_values
        } else {
            &mut node.values
        };
        if list.contains(&value) {
            return false;
        }
        list.push(value);
        self.len += 1;
        true
    }

    /// Removes the pair (`pattern`, `value`); returns whether it was there. Trie nodes left
    /// without values or children are freed.
    pub fn remove(&mut self, pattern: &str, value: &V) -> bool {
        let (path, ends_with_hash) = split_pattern(pattern);
        let mut node = &mut self.root;
        for level in levels(path) {
            match node.child_mut(level) {
                Some(child) => node = child,
                None => return false,
            }
        }
        let list = if ends_with_hash {
            &mut node.hash_values
        } else {
            &mut node.values
        };
        let Some(at) = list.iter().position(|v| v == value) else {
            return false;
        };
        // Order among values of one pattern carries no meaning.
        list.swap_remove(at);
        self.len -= 1;
        self.prune(path);
        true
    }

    /// Frees the longest tail of `path` whose nodes hold nothing but the next node of the path.
    /// Iterative rather than recursive: a pattern may have thousands of levels.
    fn prune(&mut self, path: Option<&str>) {
        let depth = levels(path).count();
        // 1-based depth of the first node of the removable tail, if the tail is removable.
        let mut cut_at = None;
        let mut node = &self.root;
        for (i, level) in levels(path).enumerate() {
            node = node
                .child(level)
                .expect("remove has just walked this path, and nothing was freed yet");
            let is_last = i + 1 == depth;
            let only_path = node.child_count() == usize::from(!is_last);
            if !node.holds_values() && only_path {
                cut_at.get_or_insert(i + 1);
            } else {
                cut_at = None;
            }
        }
        let Some(cut_at) = cut_at else { return };
        let mut parent = &mut self.root;
        let mut path_levels = levels(path);
        for level in path_levels.by_ref().take(cut_at - 1) {
            parent = parent
                .child_mut(level)
                .expect("the path was walked just above");
        }
        let level = path_levels
            .next()
            .expect("cut_at <= depth, so the path has this level");
        parent.remove_child(level);
    }

    /// Appends to `out` the value of every stored pair whose pattern matches `topic`. A value
    /// stored under several matching patterns is appended once per pattern: deduplicate if that
    /// matters. Order is unspecified. Allocates nothing but `out`'s growth.
    pub fn collect_matches(&self, topic: &str, out: &mut Vec<V>) {
        collect(&self.root, topic.split('/'), out, 0);
    }

    /// [`collect_matches`](Self::collect_matches) on the heap-stack walk only, for tests.
    #[cfg(test)]
    pub(crate) fn collect_matches_on_heap(&self, topic: &str, out: &mut Vec<V>) {
        collect_on_heap(&self.root, topic.split('/'), out);
    }

    /// Trie nodes, the root included: tests use it to check pruning.
    #[cfg(test)]
    pub(crate) fn node_count(&self) -> usize {
        fn count<V>(node: &Node<V>) -> usize {
            1 + node.children.values().map(count).sum::<usize>()
                + node.plus.as_deref().map_or(0, count)
        }
        count(&self.root)
    }
}

/// `+` branches followed by recursion before [`collect`] hands over to [`collect_on_heap`]:
/// enough for any realistic pattern, and a small bounded stack.
const MAX_RECURSION_DEPTH: usize = 32;

/// Walks the literal branch in a loop and recurses only into `+` branches, so the stack depth
/// is the number of `+` branches taken on the path; past [`MAX_RECURSION_DEPTH`] the rest of
/// the walk continues on a heap stack (a pattern can have thousands of `+` levels).
fn collect<V: Clone>(
    mut node: &Node<V>,
    mut rest: Split<'_, char>,
    out: &mut Vec<V>,
    depth: usize,
) {
    loop {
        // A `#` after this node matches this level and everything below it.
        out.extend_from_slice(&node.hash_values);
        let Some(level) = rest.next() else {
            out.extend_from_slice(&node.values);
            return;
        };
        if let Some(plus) = node.plus.as_deref() {
            if depth < MAX_RECURSION_DEPTH {
                collect(plus, rest.clone(), out, depth + 1);
            } else {
                collect_on_heap(plus, rest.clone(), out);
            }
        }
        match node.children.get(level) {
            Some(child) => node = child,
            None => return,
        }
    }
}

/// The same walk as [`collect`] with an explicit stack: for pathologically deep patterns only.
fn collect_on_heap<V: Clone>(node: &Node<V>, rest: Split<'_, char>, out: &mut Vec<V>) {
    let mut pending = vec![(node, rest)];
    while let Some((node, mut rest)) = pending.pop() {
        out.extend_from_slice(&node.hash_values);
        let Some(level) = rest.next() else {
            out.extend_from_slice(&node.values);
            continue;
        };
        if let Some(plus) = node.plus.as_deref() {
            pending.push((plus, rest.clone()));
        }
        if let Some(child) = node.children.get(level) {
            pending.push((child, rest));
        }
    }
}

impl<V> Drop for Node<V> {
    /// Frees the subtree with a heap stack instead of the recursive drop glue, which a chain
    /// of thousands of levels would turn into a stack overflow.
    fn drop(&mut self) {
        if self.children.is_empty() && self.plus.is_none() {
            return;
        }
        let mut doomed: Vec<Node<V>> = self.children.drain().map(|(_, node)| node).collect();
        doomed.extend(self.plus.take().map(|node| *node));
        while let Some(mut node) = doomed.pop() {
            doomed.extend(node.children.drain().map(|(_, node)| node));
            doomed.extend(node.plus.take().map(|node| *node));
            // `node` is now childless: dropping it here does not recurse.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(index: &TopicIndex<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        index.collect_matches(topic, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn hash_matches_the_parent_level_and_everything_below() {
        let mut index = TopicIndex::new();
        index.insert("a/#", 1);
        assert_eq!(matches(&index, "a"), [1]);
        assert_eq!(matches(&index, "a/b"), [1]);
        assert_eq!(matches(&index, "a/b/c"), [1]);
        assert_eq!(matches(&index, "a/"), [1]);
        assert_eq!(matches(&index, "b"), [0u32; 0]);
        assert_eq!(matches(&index, "ab"), [0u32; 0]);
    }

    #[test]
    fn hash_alone_matches_every_topic() {
        let mut index = TopicIndex::new();
        index.insert("#", 7);
        for topic in ["a", "a/b/c", "/", "//", "x//y"] {
            assert_eq!(matches(&index, topic), [7], "{topic}");
        }
    }

    #[test]
    fn plus_matches_exactly_one_level_including_an_empty_one() {
        let mut index = TopicIndex::new();
        index.insert("a/+", 1);
        index.insert("+/b", 2);
        index.insert("a/+/c", 3);
        assert_eq!(matches(&index, "a/b"), [1, 2]);
        assert_eq!(matches(&index, "a/"), [1]);
        assert_eq!(matches(&index, "/b"), [2]);
        assert_eq!(matches(&index, "a//c"), [3]);
        assert_eq!(matches(&index, "a/b/c"), [3]);
        assert_eq!(matches(&index, "a"), [0u32; 0]);
        assert_eq!(matches(&index, "a/b/c/d"), [0u32; 0]);
    }

    #[test]
    fn empty_levels_are_levels() {
        let mut index = TopicIndex::new();
        index.insert("a//b", 1);
        index.insert("/", 2);
        index.insert("+/+", 3);
        assert_eq!(matches(&index, "a//b"), [1]);
        assert_eq!(matches(&index, "a/b"), [3]);
        assert_eq!(matches(&index, "/"), [2, 3]);
        assert_eq!(matches(&index, "a/b/"), [0u32; 0]);
    }

    #[test]
    fn a_value_under_two_matching_patterns_comes_back_twice() {
        let mut index = TopicIndex::new();
        index.insert("a/b", 1);
        index.insert("a/+", 1);
        index.insert("a/#", 1);
        index.insert("#", 2);
        assert_eq!(matches(&index, "a/b"), [1, 1, 1, 2]);
        assert_eq!(index.len(), 4);
    }

    #[test]
    fn inserting_a_pair_twice_keeps_one() {
        let mut index = TopicIndex::new();
        assert!(index.insert("a/+", 1));
        assert!(!index.insert("a/+", 1));
        assert!(index.insert("a/+", 2));
        assert_eq!(index.len(), 2);
        assert_eq!(matches(&index, "a/x"), [1, 2]);
        assert!(index.remove("a/+", &1));
        assert!(!index.remove("a/+", &1), "only one copy was stored");
        assert_eq!(matches(&index, "a/x"), [2]);
    }

    #[test]
    fn remove_of_an_absent_pair_changes_nothing() {
        let mut index = TopicIndex::new();
        index.insert("a/b", 1);
        assert!(!index.remove("a/b", &2));
        assert!(!index.remove("a/c", &1));
        assert!(!index.remove("a/b/c", &1));
        assert!(!index.remove("a/#", &1));
        assert!(!index.remove("a/+", &1));
        assert_eq!(index.len(), 1);
        assert_eq!(matches(&index, "a/b"), [1]);
    }

    #[test]
    fn remove_prunes_empty_nodes_and_keeps_shared_ones() {
        let mut index = TopicIndex::new();
        index.insert("a/b/c/d", 1);
        index.insert("a/b", 2);
        index.insert("a/+/x/#", 3);
        index.insert("#", 4);
        assert_eq!(index.node_count(), 1 + 4 + 2);
        assert!(index.remove("a/b/c/d", &1));
        // c and d are gone; a and b stay for "a/b", the + branch for pattern 3.
        assert_eq!(index.node_count(), 1 + 2 + 2);
        assert!(index.remove("a/+/x/#", &3));
        assert_eq!(index.node_count(), 1 + 2);
        assert!(index.remove("a/b", &2));
        assert_eq!(index.node_count(), 1);
        assert!(index.remove("#", &4));
        assert!(index.is_empty());
        assert!(index.root.children.is_empty() && index.root.plus.is_none());
    }

    #[test]
    fn churn_leaves_no_nodes_behind() {
        let mut index = TopicIndex::new();
        let patterns = [
            "a/b/c", "a/+/c", "a/#", "+/+/+", "#", "a//", "/+/#", "x/y/z/w",
        ];
        for round in 0..50u32 {
            for (i, p) in patterns.iter().enumerate() {
                index.insert(p, round * 10 + i as u32);
            }
            for (i, p) in patterns.iter().enumerate() {
                assert!(index.remove(p, &(round * 10 + i as u32)));
            }
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 1);
    }

    #[test]
    fn deep_patterns_neither_overflow_a_thread_stack_nor_lose_matches() {
        // 32768 levels: the deepest pattern a u16 topic length allows. On a thread with a
        // 256 KiB stack, far less than a reactor thread has.
        let handle = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let levels = 32768;
                let plus = vec!["+"; levels].join("/");
                let literal = vec!["x"; levels].join("/");
                let mixed = format!("{}/#", vec!["x"; levels - 1].join("/"));
                let mut index = TopicIndex::new();
                index.insert(&plus, 1u32);
                index.insert(&literal, 2);
                index.insert(&mixed, 3);
                let mut out = Vec::new();
                index.collect_matches(&literal, &mut out);
                out.sort_unstable();
                assert!(index.remove(&plus, &1));
                assert!(index.remove(&literal, &2));
                // Dropped with a deep chain still in it.
                drop(index);
                out
            })
            .unwrap();
        assert_eq!(handle.join().unwrap(), [1, 2, 3]);
    }
}
