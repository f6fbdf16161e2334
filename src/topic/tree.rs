//! [`TopicTree`]: values keyed by topic, walked by pattern (the retained values).

use ahash::HashMap;
use std::str::Split;

/// A map from topic to `T`, stored as a trie of levels so that the topics matching a pattern
/// can be visited without looking at unrelated branches.
///
/// Each stored entry keeps its topic as one string beside the value, so a visit hands out
/// `&str` topics without building them from levels.
#[derive(Debug)]
pub struct TopicTree<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    children: HashMap<Box<str>, Node<T>>,
    entry: Option<(Box<str>, T)>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            children: HashMap::default(),
            entry: None,
        }
    }
}

impl<T> Drop for Node<T> {
    /// Frees the subtree with a heap stack instead of the recursive drop glue, which a chain
    /// of thousands of levels would turn into a stack overflow.
    fn drop(&mut self) {
        if self.children.is_empty() {
            return;
        }
        let mut doomed: Vec<Node<T>> = self.children.drain().map(|(_, node)| node).collect();
        while let Some(mut node) = doomed.pop() {
            doomed.extend(node.children.drain().map(|(_, node)| node));
            // `node` is now childless: dropping it here does not recurse.
        }
    }
}

impl<T> Default for TopicTree<T> {
    fn default() -> Self {
        TopicTree {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T> TopicTree<T> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of stored topics.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Stores `value` under `topic`, returning the value it replaces.
    pub fn insert(&mut self, topic: &str, value: T) -> Option<T> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            // Look up before inserting so an existing level costs no allocation of its key.
            if !node.children.contains_key(level) {
                node.children.insert(level.into(), Node::default());
            }
            node = node
                .children
                .get_mut(level)
                .expect("the level was present or has just been inserted");
        }
        match &mut node.entry {
            Some((_, old)) => Some(std::mem::replace(old, value)),
            empty => {
                *empty = Some((topic.into(), value));
                self.len += 1;
                None
            }
        }
    }

    pub fn get(&self, topic: &str) -> Option<&T> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.entry.as_ref().map(|(_, value)| value)
    }

    pub fn get_mut(&mut self, topic: &str) -> Option<&mut T> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        node.entry.as_mut().map(|(_, value)| value)
    }

    /// Removes and returns the value under `topic`. Nodes left without an entry or children
    /// are freed.
    pub fn remove(&mut self, topic: &str) -> Option<T> {
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.get_mut(level)?;
        }
        let (_, value) = node.entry.take()?;
        self.len -= 1;
        self.prune(topic);
        Some(value)
    }

    /// Frees the longest tail of `topic`'s path whose nodes hold nothing but the next node of
    /// the path. Iterative rather than recursive: a topic may have thousands of levels.
    fn prune(&mut self, topic: &str) {
        let depth = topic.split('/').count();
        // 1-based depth of the first node of the removable tail, if the tail is removable.
        let mut cut_at = None;
        let mut node = &self.root;
        for (i, level) in topic.split('/').enumerate() {
            node = node
                .children
                .get(level)
                .expect("remove has just walked this path, and nothing was freed yet");
            let is_last = i + 1 == depth;
            let only_path = node.children.len() == usize::from(!is_last);
            if node.entry.is_none() && only_path {
                cut_at.get_or_insert(i + 1);
            } else {
                cut_at = None;
            }
        }
        let Some(cut_at) = cut_at else { return };
        let mut parent = &mut self.root;
        let mut levels = topic.split('/');
        for level in levels.by_ref().take(cut_at - 1) {
            parent = parent
                .children
                .get_mut(level)
                .expect("the path was walked just above");
        }
        let level = levels
            .next()
            .expect("cut_at <= depth, so the topic has this level");
        parent.children.remove(level);
    }

    /// Calls `f(topic, value)` once for every stored topic that `pattern` matches, in no
    /// particular order. Only the branches the pattern can reach are walked: a literal level
    /// follows one child, `+` every child of that level, `#` the whole subtree (the node it
    /// follows included, since `a/#` matches `a`).
    ///
    /// Allocates a small work stack per call; it never recurses, so depth is not a concern.
    pub fn for_each_matching(&self, pattern: &str, mut f: impl FnMut(&str, &T)) {
        let mut pending: Vec<(&Node<T>, Split<'_, char>)> = vec![(&self.root, pattern.split('/'))];
        let mut subtree: Vec<&Node<T>> = Vec::new();
        while let Some((node, mut rest)) = pending.pop() {
            match rest.next() {
                None => {
                    if let Some((topic, value)) = &node.entry {
                        f(topic, value);
                    }
                }
                Some("#") => {
                    subtree.push(node);
                    while let Some(node) = subtree.pop() {
                        if let Some((topic, value)) = &node.entry {
                            f(topic, value);
                        }
                        subtree.extend(node.children.values());
                    }
                }
                Some("+") => {
                    pending.extend(node.children.values().map(|child| (child, rest.clone())));
                }
                Some(level) => {
                    if let Some(child) = node.children.get(level) {
                        pending.push((child, rest));
                    }
                }
            }
        }
    }

    /// Trie nodes, the root included: tests use it to check pruning.
    #[cfg(test)]
    pub(crate) fn node_count(&self) -> usize {
        fn count<T>(node: &Node<T>) -> usize {
            1 + node.children.values().map(count).sum::<usize>()
        }
        count(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matching(tree: &TopicTree<u32>, pattern: &str) -> Vec<(String, u32)> {
        let mut seen = Vec::new();
        tree.for_each_matching(pattern, |topic, value| {
            seen.push((topic.to_string(), *value))
        });
        seen.sort();
        seen
    }

    fn tree_of(topics: &[&str]) -> TopicTree<u32> {
        let mut tree = TopicTree::new();
        for (i, topic) in topics.iter().enumerate() {
            assert_eq!(tree.insert(topic, i as u32), None);
        }
        tree
    }

    fn owned(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
        pairs.iter().map(|(t, v)| (t.to_string(), *v)).collect()
    }

    #[test]
    fn insert_get_replace_remove() {
        let mut tree = TopicTree::new();
        assert_eq!(tree.insert("a/b", 1), None);
        assert_eq!(tree.insert("a/b", 2), Some(1));
        assert_eq!(tree.len(), 1);
        assert_eq!(tree.get("a/b"), Some(&2));
        assert_eq!(tree.get("a"), None, "an inner node holds no value");
        assert_eq!(tree.get("a/b/c"), None);
        *tree.get_mut("a/b").unwrap() += 5;
        assert_eq!(tree.get("a/b"), Some(&7));
        assert_eq!(tree.remove("a"), None);
        assert_eq!(tree.remove("a/b"), Some(7));
        assert_eq!(tree.remove("a/b"), None);
        assert!(tree.is_empty());
        assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn hash_visits_the_node_itself_and_its_whole_subtree() {
        let tree = tree_of(&["a", "a/b", "a/b/c", "ab", "b/a"]);
        assert_eq!(
            matching(&tree, "a/#"),
            owned(&[("a", 0), ("a/b", 1), ("a/b/c", 2)])
        );
        assert_eq!(matching(&tree, "#").len(), 5);
        assert_eq!(matching(&tree, "a/b/c/#"), owned(&[("a/b/c", 2)]));
    }

    #[test]
    fn plus_visits_one_level_including_empty_levels() {
        let tree = tree_of(&["a/b", "a/", "a/b/c", "a", "x/b", "/b"]);
        assert_eq!(matching(&tree, "a/+"), owned(&[("a/", 1), ("a/b", 0)]));
        assert_eq!(
            matching(&tree, "+/b"),
            owned(&[("/b", 5), ("a/b", 0), ("x/b", 4)])
        );
        assert_eq!(matching(&tree, "+/+/+"), owned(&[("a/b/c", 2)]));
        assert_eq!(matching(&tree, "+/#").len(), 6);
    }

    #[test]
    fn literal_patterns_visit_at_most_one_topic() {
        let tree = tree_of(&["a/b", "a//b", "a/b/"]);
        assert_eq!(matching(&tree, "a//b"), owned(&[("a//b", 1)]));
        assert_eq!(matching(&tree, "a/b/"), owned(&[("a/b/", 2)]));
        assert_eq!(matching(&tree, "a"), owned(&[]));
    }

    #[test]
    fn remove_prunes_only_what_is_empty() {
        let mut tree = tree_of(&["a/b/c/d", "a/b", "a/x"]);
        assert_eq!(tree.node_count(), 1 + 5);
        assert_eq!(tree.remove("a/b/c/d"), Some(0));
        assert_eq!(tree.node_count(), 1 + 3);
        assert_eq!(tree.remove("a/b"), Some(1));
        assert_eq!(tree.node_count(), 1 + 2);
        assert_eq!(tree.get("a/x"), Some(&2));
        assert_eq!(tree.remove("a/x"), Some(2));
        assert_eq!(tree.node_count(), 1);
    }

    #[test]
    fn deep_topics_do_not_overflow_a_thread_stack() {
        let handle = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(|| {
                let deep = vec!["x"; 32768].join("/");
                let mut tree = tree_of(&[&deep, "x"]);
                let seen = matching(&tree, "#").len() + matching(&tree, &deep).len();
                assert_eq!(tree.remove(&deep), Some(0));
                tree.insert(&deep, 1);
                drop(tree);
                seen
            })
            .unwrap();
        assert_eq!(handle.join().unwrap(), 3);
    }

    #[test]
    fn removing_an_inner_topic_keeps_its_children() {
        let mut tree = tree_of(&["a", "a/b"]);
        assert_eq!(tree.remove("a"), Some(0));
        assert_eq!(tree.get("a/b"), Some(&1));
        assert_eq!(matching(&tree, "a/#"), owned(&[("a/b", 1)]));
    }
}
