//! Topic patterns and the indexes built on them. Sans-IO: plain data structures, no sockets.
//!
//! A topic is a `/`-separated list of levels (`plant/line1/temp`); empty levels are levels
//! (`a//b` has three). A pattern may use two wildcards, each occupying a whole level:
//!
//! - `+` matches exactly one level (`a/+` matches `a/b` and `a/`, not `a` nor `a/b/c`);
//! - `#` is only the last level and matches the rest, including nothing (`a/#` matches `a`,
//!   `a/b` and `a/b/c`; `#` alone matches every topic).
//!
//! Both indexes assume their inputs passed [`crate::proto::validate_topic`] or
//! [`crate::proto::validate_pattern`]; they never panic on other input, but what it matches is
//! then unspecified.
//!
//! - [`TopicIndex`]: pattern → values (the subscriptions), queried with a topic on every publish.
//! - [`TopicTree`]: topic → value (the retained values), queried with a pattern on SUBSCRIBE.
//! - [`pattern_matches`]: the reference definition of matching, one pair at a time.

mod index;
mod tree;

#[cfg(test)]
mod tests;

pub use index::TopicIndex;
pub use tree::TopicTree;

/// Whether `pattern` matches `topic`: the plain definition, level by level, without an index.
///
/// Cost is linear in the length of the shorter input; it does not allocate.
pub fn pattern_matches(pattern: &str, topic: &str) -> bool {
    let mut pattern_levels = pattern.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (pattern_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some(p), Some(t)) if p == t => {}
            _ => return false,
        }
    }
}

/// Splits a pattern into the levels a trie walks (every level but a trailing `#`) and whether
/// it ends with `#`. `None` levels means the pattern is `#` alone: zero levels, then `#`.
fn split_pattern(pattern: &str) -> (Option<&str>, bool) {
    if pattern == "#" {
        (None, true)
    } else if let Some(path) = pattern.strip_suffix("/#") {
        (Some(path), true)
    } else {
        (Some(pattern), false)
    }
}

/// The levels of `path` as a cloneable iterator; `None` gives no levels at all.
fn levels(path: Option<&str>) -> impl Iterator<Item = &str> + Clone {
    path.into_iter().flat_map(|p| p.split('/'))
}
