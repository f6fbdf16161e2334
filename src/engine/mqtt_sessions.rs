//! Persistent MQTT sessions (CONNECT with clean session 0), engine-wide: what a client id held
//! when its connection closed, so that its next connection, on whichever reactor, resumes.
//!
//! A saved session is the client's filters with their QoS and, per topic, the last sequence
//! number the client acknowledged at QoS 1. The next CONNECT of the id (clean session 0, same
//! engine run) takes it back: the filters are subscribed again, the QoS 1 ones with those
//! positions as a native resume (docs/PROTOCOL.md §8), so what the client missed comes from
//! the replay ring, at QoS 1.
//!
//! Bounded like `clients.rs`: a session is forgotten `limits.client_session_expiry_s` after it
//! was saved, and at most `limits.max_connections` are kept (the oldest saved are dropped
//! first). Touched once per CONNECT and once per close, never on the data path; the clock is
//! the caller's (`now`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ahash::HashMap;

use crate::mqtt::QoS;

/// A closed persistent session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SavedSession {
    pub filters: Vec<(String, QoS)>,
    /// Per topic, the last sequence number acknowledged (every earlier one was too).
    pub positions: Vec<(String, u64)>,
}

pub(crate) struct MqttSessions {
    inner: Mutex<HashMap<Box<str>, (SavedSession, Instant)>>,
    expiry: Duration,
    max_saved: usize,
}

impl MqttSessions {
    pub(crate) fn new(expiry: Duration, max_saved: usize) -> MqttSessions {
        MqttSessions {
            inner: Mutex::new(HashMap::default()),
            expiry,
            max_saved: max_saved.max(1),
        }
    }

    /// Keeps `session` for `client_id` (replacing an older one).
    pub(crate) fn save(&self, client_id: &str, session: SavedSession, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.retain(|_, (_, saved_at)| now.saturating_duration_since(*saved_at) < self.expiry);
        if !inner.contains_key(client_id) && inner.len() >= self.max_saved {
            let oldest = inner
                .iter()
                .min_by_key(|(_, (_, saved_at))| *saved_at)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                inner.remove(&id);
            }
        }
        inner.insert(client_id.into(), (session, now));
    }

    /// The session saved for `client_id`, if any and not expired; it is no longer saved.
    pub(crate) fn take(&self, client_id: &str, now: Instant) -> Option<SavedSession> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (session, saved_at) = inner.remove(client_id)?;
        (now.saturating_duration_since(saved_at) < self.expiry).then_some(session)
    }

    /// A clean-session CONNECT discards what was saved.
    pub(crate) fn forget(&self, client_id: &str) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.remove(client_id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map(|i| i.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: u64) -> SavedSession {
        SavedSession {
            filters: vec![("a/#".into(), QoS::AtLeastOnce)],
            positions: vec![("a/b".into(), n)],
        }
    }

    #[test]
    fn a_saved_session_is_taken_once_and_expires() {
        let t0 = Instant::now();
        let s = MqttSessions::new(Duration::from_secs(10), 100);
        s.save("c", session(3), t0);
        assert_eq!(s.take("c", t0), Some(session(3)));
        assert_eq!(s.take("c", t0), None, "taken");
        s.save("c", session(4), t0);
        assert_eq!(s.take("c", t0 + Duration::from_secs(10)), None, "expired");
        s.save("c", session(5), t0);
        s.forget("c");
        assert_eq!(s.take("c", t0), None, "forgotten");
    }

    #[test]
    fn at_most_max_saved_the_oldest_dropped_first() {
        let t0 = Instant::now();
        let s = MqttSessions::new(Duration::from_secs(100), 2);
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            s.save(id, session(i as u64), t0 + Duration::from_secs(i as u64));
        }
        assert_eq!(s.len(), 2);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(s.take("a", later), None, "the oldest went");
        assert_eq!(s.take("c", later), Some(session(2)));
    }
}
