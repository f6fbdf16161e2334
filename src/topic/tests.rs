//! Properties: the indexes agree with [`pattern_matches`], the plain definition of matching.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;

use super::*;
use crate::proto::{validate_pattern, validate_topic, MAX_TOPIC_BYTES};

/// Few, short level names (the empty one included) so that random topics and patterns collide.
fn level() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["a", "b", ""]).prop_map(str::to_string)
}

fn topic() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..=4)
        .prop_map(|levels| levels.join("/"))
        .prop_filter("valid topic", |t| {
            validate_topic(t, MAX_TOPIC_BYTES).is_ok()
        })
}

fn pattern() -> impl Strategy<Value = String> {
    let pattern_level = prop_oneof![3 => level(), 1 => Just("+".to_string())];
    (prop::collection::vec(pattern_level, 0..=4), any::<bool>())
        .prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#".to_string());
            }
            levels.join("/")
        })
        .prop_filter("valid pattern", |p| {
            validate_pattern(p, MAX_TOPIC_BYTES).is_ok()
        })
}

#[derive(Debug, Clone)]
enum Op {
    Insert(String, u8),
    Remove(String, u8),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        3 => (pattern(), 0..4u8).prop_map(|(p, v)| Op::Insert(p, v)),
        1 => (pattern(), 0..4u8).prop_map(|(p, v)| Op::Remove(p, v)),
    ];
    prop::collection::vec(op, 0..40)
}

/// Distinct non-empty level prefixes of `paths`: the trie nodes a pruned trie must have
/// (besides the root).
fn distinct_prefixes<'a>(paths: impl Iterator<Item = Vec<&'a str>>) -> usize {
    let mut prefixes = BTreeSet::new();
    for path in paths {
        for end in 1..=path.len() {
            prefixes.insert(path[..end].to_vec());
        }
    }
    prefixes.len()
}

fn pattern_path(pattern: &str) -> Vec<&str> {
    let (path, _) = split_pattern(pattern);
    levels(path).collect()
}

/// Runs `ops` on a `TopicIndex` and on a set of pairs, checking every return value; returns both.
fn apply(ops: &[Op]) -> (TopicIndex<u8>, BTreeSet<(String, u8)>) {
    let mut index = TopicIndex::new();
    let mut model = BTreeSet::new();
    for op in ops {
        match op {
            Op::Insert(p, v) => {
                assert_eq!(index.insert(p, *v), model.insert((p.clone(), *v)), "{op:?}")
            }
            Op::Remove(p, v) => {
                assert_eq!(index.remove(p, v), model.remove(&(p.clone(), *v)), "{op:?}")
            }
        }
        assert_eq!(index.len(), model.len());
    }
    (index, model)
}

fn naive_matches(model: &BTreeSet<(String, u8)>, topic: &str) -> Vec<u8> {
    let mut expected: Vec<u8> = model
        .iter()
        .filter(|(p, _)| pattern_matches(p, topic))
        .map(|(_, v)| *v)
        .collect();
    expected.sort_unstable();
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn index_matches_equal_the_naive_definition(
        ops in ops(),
        topics in prop::collection::vec(topic(), 1..10),
    ) {
        let (index, model) = apply(&ops);
        for topic in &topics {
            let expected = naive_matches(&model, topic);
            let mut got = Vec::new();
            index.collect_matches(topic, &mut got);
            got.sort_unstable();
            prop_assert_eq!(&got, &expected, "topic {:?}", topic);
            // The fallback walk for deep patterns must agree too.
            got.clear();
            index.collect_matches_on_heap(topic, &mut got);
            got.sort_unstable();
            prop_assert_eq!(&got, &expected, "heap walk, topic {:?}", topic);
        }
    }

    #[test]
    fn index_keeps_exactly_the_nodes_of_live_patterns(ops in ops()) {
        let (mut index, model) = apply(&ops);
        let expected = 1 + distinct_prefixes(model.iter().map(|(p, _)| pattern_path(p)));
        prop_assert_eq!(index.node_count(), expected);
        for (p, v) in &model {
            prop_assert!(index.remove(p, v));
        }
        prop_assert!(index.is_empty());
        prop_assert_eq!(index.node_count(), 1);
    }

    #[test]
    fn tree_visits_equal_filtering_every_key(
        topics in prop::collection::vec((topic(), any::<bool>()), 0..30),
        patterns in prop::collection::vec(pattern(), 1..10),
    ) {
        let mut tree = TopicTree::new();
        let mut model = BTreeMap::new();
        for (i, (topic, keep)) in topics.iter().enumerate() {
            prop_assert_eq!(tree.insert(topic, i), model.insert(topic.clone(), i));
            if !keep {
                prop_assert_eq!(tree.remove(topic), model.remove(topic));
            }
            prop_assert_eq!(tree.len(), model.len());
        }
        for (topic, value) in &model {
            prop_assert_eq!(tree.get(topic), Some(value));
        }
        for pattern in &patterns {
            let mut visited = Vec::new();
            tree.for_each_matching(pattern, |t, v| visited.push((t.to_string(), *v)));
            visited.sort();
            let expected: Vec<(String, usize)> = model
                .iter()
                .filter(|(t, _)| pattern_matches(pattern, t))
                .map(|(t, v)| (t.clone(), *v))
                .collect();
            // Sorted `visited` equal to the (unique) expected keys also proves no double visit.
            prop_assert_eq!(visited, expected, "pattern {:?}", pattern);
        }
        let expected_nodes = 1 + distinct_prefixes(model.keys().map(|t| t.split('/').collect()));
        prop_assert_eq!(tree.node_count(), expected_nodes);
    }

    #[test]
    fn pattern_without_wildcards_matches_only_itself(a in topic(), b in topic()) {
        prop_assert!(pattern_matches(&a, &a));
        prop_assert_eq!(pattern_matches(&a, &b), a == b);
    }
}

/// The properties above would pass on indexes that never match anything if the generators
/// rarely produced matching pairs: check that they do, on the same strategies.
#[test]
fn generated_cases_do_match() {
    let mut runner = TestRunner::deterministic();
    let strategy = (ops(), prop::collection::vec(topic(), 1..10));
    let (mut cases_with_matches, mut total_matches, cases) = (0, 0, 300);
    for _ in 0..cases {
        let (ops, topics) = strategy.new_tree(&mut runner).unwrap().current();
        let (index, _) = apply(&ops);
        let mut out = Vec::new();
        for topic in &topics {
            index.collect_matches(topic, &mut out);
        }
        total_matches += out.len();
        cases_with_matches += usize::from(!out.is_empty());
    }
    assert!(
        cases_with_matches * 2 > cases,
        "only {cases_with_matches} of {cases} cases had a match"
    );
    assert!(total_matches > cases * 3, "only {total_matches} matches");

    let mut tree_hits = 0;
    let strategy = (prop::collection::vec(topic(), 1..30), pattern());
    for _ in 0..cases {
        let (topics, pattern) = strategy.new_tree(&mut runner).unwrap().current();
        tree_hits += topics
            .iter()
            .filter(|t| pattern_matches(&pattern, t))
            .count();
    }
    assert!(tree_hits > cases * 3, "only {tree_hits} tree matches");
}

#[test]
fn reference_definition_edge_cases() {
    let cases = [
        ("#", "a", true),
        ("#", "a/b/c", true),
        ("#", "/", true),
        ("a/#", "a", true),
        ("a/#", "a/", true),
        ("a/#", "a/b/c", true),
        ("a/#", "ab", false),
        ("a/#", "b/a", false),
        ("a/+", "a/b", true),
        ("a/+", "a/", true),
        ("a/+", "a", false),
        ("a/+", "a/b/c", false),
        ("+", "a", true),
        ("+", "a/b", false),
        ("+/+", "/", true),
        ("+/#", "a", true),
        ("/#", "/a", true),
        ("/#", "a", false),
        ("a//b", "a//b", true),
        ("a//b", "a/b", false),
        ("a/+/b", "a//b", true),
        ("a/b", "a/b/", false),
    ];
    for (pattern, topic, expected) in cases {
        assert_eq!(
            pattern_matches(pattern, topic),
            expected,
            "{pattern} vs {topic}"
        );
    }
}
