//! Arbitrary patterns and topics (kept only if they validate): `TopicIndex` and `TopicTree`
//! must agree with `pattern_matches`, the plain definition.
#![no_main]

use arbitrary::Arbitrary;
use lanpush::proto::{validate_pattern, validate_topic};
use lanpush::topic::{pattern_matches, TopicIndex, TopicTree};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    /// Map every character onto `a b / + # ` (empty levels come from `//`) so that random
    /// strings collide often; otherwise use the strings as they are.
    small_alphabet: bool,
    patterns: Vec<(String, u8)>,
    /// Indexes into `patterns` of pairs to remove again.
    removals: Vec<u8>,
    topics: Vec<String>,
}

const MAX_BYTES: usize = 256;

fn shape(s: String, small_alphabet: bool) -> String {
    if !small_alphabet {
        return s;
    }
    s.chars()
        .map(|c| ['a', 'b', '/', '+', '#', '/'][c as usize % 6])
        .collect()
}

fuzz_target!(|input: Input| {
    let small = input.small_alphabet;
    let patterns: Vec<(String, u8)> = input
        .patterns
        .into_iter()
        .map(|(p, v)| (shape(p, small), v))
        .filter(|(p, _)| validate_pattern(p, MAX_BYTES).is_ok())
        .collect();
    let topics: Vec<String> = input
        .topics
        .into_iter()
        .map(|t| shape(t, small))
        .filter(|t| validate_topic(t, MAX_BYTES).is_ok())
        .collect();

    let mut index = TopicIndex::new();
    let mut live: Vec<(String, u8)> = Vec::new();
    for (p, v) in &patterns {
        let fresh = !live.contains(&(p.clone(), *v));
        assert_eq!(index.insert(p, *v), fresh);
        if fresh {
            live.push((p.clone(), *v));
        }
    }
    for &i in &input.removals {
        if let Some((p, v)) = patterns.get(usize::from(i)) {
            let was_live = live.iter().position(|(lp, lv)| lp == p && lv == v);
            assert_eq!(index.remove(p, v), was_live.is_some());
            if let Some(at) = was_live {
                live.swap_remove(at);
            }
        }
    }
    assert_eq!(index.len(), live.len());

    let mut tree = TopicTree::new();
    for (i, t) in topics.iter().enumerate() {
        tree.insert(t, i);
    }

    for t in &topics {
        let mut got = Vec::new();
        index.collect_matches(t, &mut got);
        got.sort_unstable();
        let mut expected: Vec<u8> = live
            .iter()
            .filter(|(p, _)| pattern_matches(p, t))
            .map(|(_, v)| *v)
            .collect();
        expected.sort_unstable();
        assert_eq!(got, expected, "topic {t:?}");
    }

    for (p, _) in &patterns {
        let mut visited = Vec::new();
        tree.for_each_matching(p, |t, _| visited.push(t.to_string()));
        visited.sort();
        let mut expected: Vec<String> = topics
            .iter()
            .filter(|t| pattern_matches(p, t))
            .cloned()
            .collect();
        expected.sort();
        expected.dedup();
        assert_eq!(visited, expected, "pattern {p:?}");
    }
});
