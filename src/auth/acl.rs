//! What an identity may publish and subscribe to: allow-lists of topic patterns, as values.
//!
//! A PUBLISH is allowed when one of the identity's `publish` patterns matches its topic. A
//! SUBSCRIBE's pattern is classified once, when it arrives ([`Acl::subscribe_scope`]):
//!
//! - **wholly allowed** ([`SubscribeScope::All`]): one `subscribe` pattern covers every topic the
//!   pattern can match (`plant/line1/#` under `plant/#`). Nothing is checked per delivery: the
//!   common case costs nothing on the hot path;
//! - **partly allowed** ([`SubscribeScope::Partial`]): some topic could match both the pattern
//!   and an allowed one (`#` with `plant/line1/#` allowed). The subscription is taken, and every
//!   topic delivered to it (live, snapshot, replay, GAP) is matched against the allowed patterns
//!   that overlap it ([`TopicFilter`], kept with the subscription): usually one or two;
//! - **denied** ([`SubscribeScope::Denied`]): no topic could match both; refused.
//!
//! Patterns follow the subscription syntax (`+` one level, `#` the rest); `#` alone allows
//! everything and is checked without looking at the topic.

use std::sync::Arc;

/// One level of a compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Literal(Box<[u8]>),
    Plus,
    Hash,
}

/// A pattern split into levels once, so matching a topic is a walk over its bytes: no
/// iterator per level, no allocation. Matches exactly what [`crate::topic::pattern_matches`] matches (a
/// property test holds them together); about 5 times faster, which is what an ACL check on
/// every PUBLISH and on every delivery of a partly allowed subscription needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Compiled {
    text: Box<str>,
    levels: Vec<Level>,
}

impl Compiled {
    fn new(pattern: &str) -> Compiled {
        let levels = pattern
            .split('/')
            .map(|l| match l {
                "+" => Level::Plus,
                "#" => Level::Hash,
                l => Level::Literal(l.as_bytes().into()),
            })
            .collect();
        Compiled {
            text: pattern.into(),
            levels,
        }
    }

    fn matches(&self, topic: &str) -> bool {
        let mut rest = topic.as_bytes();
        let mut levels = self.levels.iter().peekable();
        while let Some(level) = levels.next() {
            // `rest` is the topic from the start of the level being matched.
            let end = match level {
                Level::Hash => return true,
                Level::Plus => rest.iter().position(|&b| b == b'/').unwrap_or(rest.len()),
                Level::Literal(lit) => {
                    if !rest.starts_with(lit) {
                        return false;
                    }
                    if rest.len() > lit.len() && rest[lit.len()] != b'/' {
                        return false;
                    }
                    lit.len()
                }
            };
            if end == rest.len() {
                // The topic's last level: the pattern must end too, or go on with `#` alone.
                return match levels.next() {
                    None => true,
                    Some(Level::Hash) => levels.next().is_none(),
                    Some(_) => false,
                };
            }
            rest = &rest[end + 1..];
        }
        // The pattern ended with levels of the topic left.
        false
    }
}

/// A list of allowed patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternSet {
    /// One of the patterns is `#`: everything is allowed.
    all: bool,
    patterns: Vec<Compiled>,
}

impl PatternSet {
    /// The set of `patterns`, each valid by [`crate::proto::validate_pattern`] (the config
    /// checks them).
    pub fn new<S: AsRef<str>>(patterns: impl IntoIterator<Item = S>) -> PatternSet {
        let mut set = PatternSet::default();
        for p in patterns {
            let p = p.as_ref();
            if p == "#" {
                set.all = true;
            }
            if !set.patterns.iter().any(|q| &*q.text == p) {
                set.patterns.push(Compiled::new(p));
            }
        }
        set
    }

    /// Everything.
    pub fn everything() -> PatternSet {
        PatternSet::new(["#"])
    }

    /// Whether a pattern of the set matches `topic`.
    pub fn matches(&self, topic: &str) -> bool {
        self.all || self.patterns.iter().any(|p| p.matches(topic))
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|p| &*p.text)
    }
}

/// The allowed patterns a partly allowed subscription's topics are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    allowed: Vec<Compiled>,
}

impl TopicFilter {
    /// Whether a topic the subscription matched may be delivered.
    pub fn allows(&self, topic: &str) -> bool {
        self.allowed.iter().any(|p| p.matches(topic))
    }

    /// The allowed patterns it checks.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.allowed.iter().map(|p| &*p.text)
    }
}

/// How much of a subscription pattern an identity may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeScope {
    /// Every topic the pattern matches is allowed.
    All,
    /// Only the topics the filter allows.
    Partial(Arc<TopicFilter>),
    /// No topic the pattern matches is allowed.
    Denied,
}

/// An identity's publish and subscribe allow-lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub publish: PatternSet,
    pub subscribe: PatternSet,
}

impl Acl {
    /// Publish and subscribe to everything.
    pub fn everything() -> Acl {
        Acl {
            publish: PatternSet::everything(),
            subscribe: PatternSet::everything(),
        }
    }

    /// Whether a PUBLISH to `topic` is allowed (one comparison when `#` is allowed).
    pub fn may_publish(&self, topic: &str) -> bool {
        self.publish.matches(topic)
    }

    /// Whether a topic may be delivered to this identity, whatever its subscription.
    pub fn may_receive(&self, topic: &str) -> bool {
        self.subscribe.matches(topic)
    }

    /// Whether the identity may see anything under `prefix` (STATS shows only such prefixes).
    pub fn may_see_prefix(&self, prefix: &str) -> bool {
        let pattern = format!("{prefix}/#");
        !matches!(self.subscribe_scope(&pattern), SubscribeScope::Denied)
    }

    /// Classifies a SUBSCRIBE pattern (valid by [`crate::proto::validate_pattern`]); see the
    /// module's documentation.
    pub fn subscribe_scope(&self, pattern: &str) -> SubscribeScope {
        let set = &self.subscribe;
        if set.all
            || set
                .patterns()
                .any(|allowed| pattern_covers(allowed, pattern))
        {
            return SubscribeScope::All;
        }
        let allowed: Vec<Compiled> = set
            .patterns
            .iter()
            .filter(|allowed| patterns_intersect(&allowed.text, pattern))
            .cloned()
            .collect();
        if allowed.is_empty() {
            SubscribeScope::Denied
        } else {
            SubscribeScope::Partial(Arc::new(TopicFilter { allowed }))
        }
    }
}

/// Whether every topic `inner` matches is matched by `outer` (both valid patterns).
pub fn pattern_covers(outer: &str, inner: &str) -> bool {
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            // `outer` matches whatever follows, nothing included.
            (Some("#"), _) => return true,
            (None, None) => return true,
            // `inner`'s `#` matches any depth: only an `outer` `#` (above) covers it.
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            _ => return false,
        }
    }
}

/// Whether some topic matches both patterns.
pub fn patterns_intersect(a: &str, b: &str) -> bool {
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::pattern_matches;
    use proptest::prelude::*;

    #[test]
    fn covers_and_intersects_by_example() {
        for (outer, inner) in [
            ("#", "a/b"),
            ("a/#", "a"),
            ("a/#", "a/+/c"),
            ("a/+", "a/b"),
            ("a/+", "a/+"),
            ("a/+/#", "a/b/#"),
        ] {
            assert!(pattern_covers(outer, inner), "{outer} covers {inner}");
        }
        for (outer, inner) in [
            ("a/b", "a/+"),
            ("a/+", "a/#"),
            ("a/+/#", "a/#"),
            ("a/b", "a/b/c"),
            ("a/b/c", "a/b"),
        ] {
            assert!(
                !pattern_covers(outer, inner),
                "{outer} does not cover {inner}"
            );
        }
        assert!(patterns_intersect("#", "x/y"));
        assert!(patterns_intersect("a/+/c", "a/b/+"));
        assert!(patterns_intersect("a/#", "a"));
        assert!(!patterns_intersect("a/b", "a/c"));
        assert!(!patterns_intersect("a/+", "a/b/c"));
    }

    #[test]
    fn a_wide_subscription_is_partial_a_narrow_one_whole_a_foreign_one_denied() {
        let acl = Acl {
            publish: PatternSet::new(["plant/line1/temp"]),
            subscribe: PatternSet::new(["plant/line1/#", "site/+/alarm"]),
        };
        assert_eq!(acl.subscribe_scope("plant/line1/+"), SubscribeScope::All);
        assert_eq!(acl.subscribe_scope("plant/line2/#"), SubscribeScope::Denied);
        let SubscribeScope::Partial(filter) = acl.subscribe_scope("#") else {
            panic!("# is partly allowed");
        };
        assert!(filter.allows("plant/line1/temp"));
        assert!(filter.allows("site/a/alarm"));
        assert!(!filter.allows("plant/line1_x"));
        assert!(!filter.allows("site/a/b/alarm"));
        let SubscribeScope::Partial(filter) = acl.subscribe_scope("plant/#") else {
            panic!("plant/# is partly allowed");
        };
        assert_eq!(filter.patterns().collect::<Vec<_>>(), ["plant/line1/#"]);
        assert!(acl.may_publish("plant/line1/temp"));
        assert!(!acl.may_publish("plant/line1/valve_cmd"));
        assert!(acl.may_see_prefix("plant/line1"));
        assert!(acl.may_see_prefix("plant"));
        assert!(!acl.may_see_prefix("plant/line2"));
    }

    fn pattern() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "+", "ab"]), 0..4).prop_flat_map(
            |levels| {
                let base = levels.join("/");
                prop_oneof![
                    Just(if base.is_empty() {
                        "a".to_string()
                    } else {
                        base.clone()
                    }),
                    Just(if base.is_empty() {
                        "#".to_string()
                    } else {
                        format!("{base}/#")
                    }),
                ]
            },
        )
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..6)
            .prop_map(|l| l.join("/"))
    }

    fn any_topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "", "ab"]), 1..6)
            .prop_map(|l| l.join("/"))
    }

    proptest! {
        /// The compiled matcher is the reference one, empty levels included.
        #[test]
        fn compiled_patterns_match_as_the_reference(p in pattern(), t in any_topic()) {
            prop_assert_eq!(Compiled::new(&p).matches(&t), pattern_matches(&p, &t), "{} {}", p, t);
        }

        /// Against the reference matcher: a covered pattern never matches a topic its cover
        /// does not, and a topic matched by both patterns means they intersect.
        #[test]
        fn covers_and_intersects_agree_with_matching(
            outer in pattern(),
            inner in pattern(),
            topics in prop::collection::vec(topic(), 1..32),
        ) {
            for t in &topics {
                let (o, i) = (pattern_matches(&outer, t), pattern_matches(&inner, t));
                if pattern_covers(&outer, &inner) {
                    prop_assert!(!i || o, "{} covers {} but not {}", outer, inner, t);
                }
                if o && i {
                    prop_assert!(patterns_intersect(&outer, &inner), "{} {} share {}", outer, inner, t);
                }
            }
        }

        /// A partial subscription delivers exactly the topics the ACL allows.
        #[test]
        fn a_partial_filter_is_the_acl_on_the_pattern(
            allowed in prop::collection::vec(pattern(), 1..4),
            sub in pattern(),
            topics in prop::collection::vec(topic(), 1..32),
        ) {
            let acl = Acl { publish: PatternSet::default(), subscribe: PatternSet::new(&allowed) };
            let scope = acl.subscribe_scope(&sub);
            for t in topics.iter().filter(|t| pattern_matches(&sub, t)) {
                let delivered = match &scope {
                    SubscribeScope::All => true,
                    SubscribeScope::Partial(f) => f.allows(t),
                    SubscribeScope::Denied => false,
                };
                prop_assert_eq!(delivered, acl.may_receive(t), "{} via {} under {:?}", t, sub, allowed);
            }
        }
    }
}
