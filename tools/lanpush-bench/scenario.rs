//! What each scenario publishes and subscribes to, and how many messages each subscriber should
//! therefore receive.
//!
//! - **fanout**: every publisher sends to `bench/fanout`; every subscriber subscribes to exactly
//!   `bench/fanout`. Publisher `p` of `P` runs at `rate / P`, phase-shifted by `p / rate` so the
//!   combined stream is evenly spaced.
//! - **fanin**: publisher `p` sends to `bench/fanin/p{p}`; every subscriber subscribes to
//!   `bench/fanin/+`. Pacing as for fanout.
//! - **plant**: gateway `g` publishes `plant/gw{g}/tag{t}` for every `t < T` as one burst every
//!   `C` ms, gateway `g`'s cycle offset by `g * C / G` (PLCs are not synchronised). HMI `h` of `H`
//!   watches one pattern, by `h % 4`, with `k = h / 4`:
//!   - 0: `plant/#` (plant overview, historian: everything),
//!   - 1: `plant/gw{k % G}/#` (one line's HMI: one gateway),
//!   - 2: `plant/+/tag{k % T}` (a trend of one tag across every gateway),
//!   - 3: `plant/gw{k % G}/tag{k % T}` (a faceplate: one tag).
//!
//!   The patterns overlap (every message goes to all overview HMIs plus those of its gateway
//!   and tag); each HMI has one pattern on its own connection, so a message reaches an HMI once.

use crate::params::{Params, ScenarioKind};
use crate::publisher::{Pace, Schedule};

/// One publisher to create.
#[derive(Debug, Clone, PartialEq)]
pub struct PubPlan {
    pub client_id: String,
    pub topics: Vec<String>,
    pub pacing: Pacing,
}

/// Pacing relative to the run's start.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    Rate {
        per_s: f64,
        phase_ns: u64,
    },
    Bursts {
        burst: u64,
        period_ns: u64,
        phase_ns: u64,
    },
    Unpaced,
}

impl Pacing {
    pub fn pace(self, run_start_ns: u64) -> Pace {
        match self {
            Pacing::Rate { per_s, phase_ns } => {
                Pace::Scheduled(Schedule::at_rate(run_start_ns + phase_ns, per_s))
            }
            Pacing::Bursts {
                burst,
                period_ns,
                phase_ns,
            } => Pace::Scheduled(Schedule::bursts(run_start_ns + phase_ns, burst, period_ns)),
            Pacing::Unpaced => Pace::Unpaced,
        }
    }
}

/// One subscriber to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubPlan {
    pub client_id: String,
    pub pattern: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub publishers: Vec<PubPlan>,
    pub subscribers: Vec<SubPlan>,
}

fn paced(params: &Params, index: usize) -> Pacing {
    if params.rate == 0.0 {
        return Pacing::Unpaced;
    }
    let per_s = params.rate / params.publishers as f64;
    let phase_ns = (index as f64 * 1e9 / params.rate) as u64;
    Pacing::Rate { per_s, phase_ns }
}

/// The HMI pattern of the plant scenario (see the module docs).
pub fn plant_pattern(hmi: usize, gateways: usize, tags: usize) -> String {
    let k = hmi / 4;
    match hmi % 4 {
        0 => "plant/#".to_string(),
        1 => format!("plant/gw{}/#", k % gateways),
        2 => format!("plant/+/tag{}", k % tags),
        _ => format!("plant/gw{}/tag{}", k % gateways, k % tags),
    }
}

pub fn plan(params: &Params) -> Plan {
    // Short ids keep the engine's logs readable and identify runs of different tools apart.
    let pid = std::process::id();
    match params.scenario {
        ScenarioKind::Fanout => Plan {
            publishers: (0..params.publishers)
                .map(|p| PubPlan {
                    client_id: format!("bench-{pid}-pub{p}"),
                    topics: vec!["bench/fanout".into()],
                    pacing: paced(params, p),
                })
                .collect(),
            subscribers: (0..params.subscribers)
                .map(|s| SubPlan {
                    client_id: format!("bench-{pid}-sub{s}"),
                    pattern: "bench/fanout".into(),
                })
                .collect(),
        },
        ScenarioKind::Fanin => Plan {
            publishers: (0..params.publishers)
                .map(|p| PubPlan {
                    client_id: format!("bench-{pid}-pub{p}"),
                    topics: vec![format!("bench/fanin/p{p}")],
                    pacing: paced(params, p),
                })
                .collect(),
            subscribers: (0..params.subscribers)
                .map(|s| SubPlan {
                    client_id: format!("bench-{pid}-sub{s}"),
                    pattern: "bench/fanin/+".into(),
                })
                .collect(),
        },
        ScenarioKind::Plant => {
            let gateways = params.publishers;
            let period_ns = params.cycle_ms * 1_000_000;
            Plan {
                publishers: (0..gateways)
                    .map(|g| PubPlan {
                        client_id: format!("bench-{pid}-gw{g}"),
                        topics: (0..params.tags)
                            .map(|t| format!("plant/gw{g}/tag{t}"))
                            .collect(),
                        pacing: Pacing::Bursts {
                            burst: params.tags as u64,
                            period_ns,
                            phase_ns: period_ns * g as u64 / gateways as u64,
                        },
                    })
                    .collect(),
                subscribers: (0..params.subscribers)
                    .map(|h| SubPlan {
                        client_id: format!("bench-{pid}-hmi{h}"),
                        pattern: plant_pattern(h, gateways, params.tags),
                    })
                    .collect(),
            }
        }
    }
}

/// The stalled subscribers (`--stalled N`): each subscribes to every topic the scenario
/// publishes, on its own connection, and then never reads.
pub fn stalled(params: &Params) -> Vec<SubPlan> {
    let pid = std::process::id();
    let pattern = match params.scenario {
        ScenarioKind::Fanout => "bench/fanout",
        ScenarioKind::Fanin => "bench/fanin/+",
        ScenarioKind::Plant => "plant/#",
    };
    (0..params.stalled)
        .map(|s| SubPlan {
            client_id: format!("bench-{pid}-stalled{s}"),
            pattern: pattern.into(),
        })
        .collect()
}

/// MQTT-style matching: `+` is one level, a final `#` the rest including nothing (the engine's
/// own definition).
pub use lanpush::topic::pattern_matches as matches;

/// How many measured messages a subscriber to `pattern` should receive, given what was sent per
/// topic.
pub fn expected_for(pattern: &str, sent: &[(&str, u64)]) -> u64 {
    sent.iter()
        .filter(|(topic, _)| matches(pattern, topic))
        .map(|(_, n)| n)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamArgs;

    #[test]
    fn matching_follows_mqtt() {
        assert!(matches("plant/#", "plant/gw0/tag1"));
        assert!(matches("plant/#", "plant"));
        assert!(matches("plant/+/tag1", "plant/gw3/tag1"));
        assert!(!matches("plant/+/tag1", "plant/gw3/tag10"));
        assert!(!matches("plant/+", "plant/gw3/tag1"));
        assert!(matches("bench/fanout", "bench/fanout"));
        assert!(!matches("bench/fanout", "bench/fanout/x"));
        assert!(matches("#", "a/b"));
    }

    #[test]
    fn plant_plan_has_overlapping_patterns_and_spread_phases() {
        let params = Params::resolve(
            ScenarioKind::Plant,
            ParamArgs {
                gateways: Some(2),
                tags: Some(3),
                cycle_ms: Some(100),
                hmis: Some(8),
                ..Default::default()
            },
        )
        .unwrap();
        let plan = plan(&params);
        assert_eq!(plan.publishers.len(), 2);
        assert_eq!(plan.publishers[1].topics[2], "plant/gw1/tag2");
        assert_eq!(
            plan.publishers[1].pacing,
            Pacing::Bursts {
                burst: 3,
                period_ns: 100_000_000,
                phase_ns: 50_000_000
            }
        );
        let patterns: Vec<&str> = plan
            .subscribers
            .iter()
            .map(|s| s.pattern.as_str())
            .collect();
        assert_eq!(
            patterns,
            [
                "plant/#",
                "plant/gw0/#",
                "plant/+/tag0",
                "plant/gw0/tag0",
                "plant/#",
                "plant/gw1/#",
                "plant/+/tag1",
                "plant/gw1/tag1"
            ]
        );
        let sent = [
            ("plant/gw0/tag0", 10),
            ("plant/gw1/tag1", 10),
            ("plant/gw1/tag2", 10),
        ];
        assert_eq!(expected_for("plant/#", &sent), 30);
        assert_eq!(expected_for("plant/gw1/#", &sent), 20);
        assert_eq!(expected_for("plant/+/tag1", &sent), 10);
    }

    #[test]
    fn stalled_subscribers_take_every_topic() {
        for (kind, pattern) in [
            (ScenarioKind::Fanout, "bench/fanout"),
            (ScenarioKind::Fanin, "bench/fanin/+"),
            (ScenarioKind::Plant, "plant/#"),
        ] {
            let params = Params::resolve(
                kind,
                ParamArgs {
                    stalled: Some(2),
                    ..Default::default()
                },
            )
            .unwrap();
            let stalled = stalled(&params);
            assert_eq!(stalled.len(), 2);
            assert!(stalled.iter().all(|s| s.pattern == pattern));
            for publisher in plan(&params).publishers {
                for topic in &publisher.topics {
                    assert!(matches(pattern, topic), "{pattern} misses {topic}");
                }
            }
        }
    }

    #[test]
    fn fanout_publishers_interleave() {
        let params = Params::resolve(
            ScenarioKind::Fanout,
            ParamArgs {
                publishers: Some(4),
                rate: Some(1000.0),
                ..Default::default()
            },
        )
        .unwrap();
        let plan = plan(&params);
        assert_eq!(
            plan.publishers[3].pacing,
            Pacing::Rate {
                per_s: 250.0,
                phase_ns: 3_000_000
            }
        );
    }
}
