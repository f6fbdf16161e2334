//! Arbitrary ACL allow-lists, a subscription pattern and topics (those that pass validation,
//! optionally squeezed onto a small alphabet so they collide): what a subscription delivers
//! under `Acl::subscribe_scope` (All / Partial filter / Denied) must be exactly the topics the
//! pattern matches and the ACL allows.
#![no_main]

use arbitrary::Arbitrary;
use lanpush::auth::{Acl, PatternSet, SubscribeScope};
use lanpush::proto::{validate_pattern, validate_topic};
use lanpush::topic::pattern_matches;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    squeeze: bool,
    allowed: Vec<String>,
    pattern: String,
    topics: Vec<String>,
}

fn squeeze(s: &str, on: bool) -> String {
    if !on {
        return s.to_string();
    }
    s.bytes()
        .map(|b| match b % 5 {
            0 => 'a',
            1 => 'b',
            2 => '/',
            3 => '+',
            _ => '#',
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let max = 1024;
    let allowed: Vec<String> = input
        .allowed
        .iter()
        .map(|p| squeeze(p, input.squeeze))
        .filter(|p| validate_pattern(p, max).is_ok())
        .collect();
    let pattern = squeeze(&input.pattern, input.squeeze);
    if validate_pattern(&pattern, max).is_err() {
        return;
    }
    let acl = Acl {
        publish: PatternSet::default(),
        subscribe: PatternSet::new(&allowed),
    };
    let scope = acl.subscribe_scope(&pattern);
    for topic in &input.topics {
        let topic = squeeze(topic, input.squeeze).replace(['+', '#'], "c");
        if validate_topic(&topic, max).is_err() || !pattern_matches(&pattern, &topic) {
            continue;
        }
        let delivered = match &scope {
            SubscribeScope::All => true,
            SubscribeScope::Partial(filter) => filter.allows(&topic),
            SubscribeScope::Denied => false,
        };
        assert_eq!(delivered, acl.may_receive(&topic), "{topic} via {pattern} under {allowed:?}");
    }
});
