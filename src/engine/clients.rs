//! The client ids the engine has seen: how often each connected (a reconnect count for STATS),
//! and when its last connection closed, so that ids that are gone are forgotten.
//!
//! Bounded: an id whose last connection closed `limits.client_session_expiry_s` ago is dropped,
//! and the ids that are gone are never more than `limits.max_connections` (the oldest gone are
//! dropped first), so a client inventing ids cannot grow the engine. Touched once per HELLO and
//! once per close, never on the data path; the clock is the caller's (`now`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use ahash::HashMap;

struct Entry {
    hellos: u64,
    connected: u32,
    gone_at: Option<Instant>,
}

struct Inner {
    by_id: HashMap<Box<str>, Entry>,
    /// Size after the last sweep: the next one comes when the map has doubled.
    swept_len: usize,
}

pub(crate) struct ClientSessions {
    inner: Mutex<Inner>,
    expiry: Duration,
    max_gone: usize,
}

impl ClientSessions {
    pub(crate) fn new(expiry: Duration, max_gone: usize) -> ClientSessions {
        ClientSessions {
            inner: Mutex::new(Inner {
                by_id: HashMap::default(),
                swept_len: 0,
            }),
            expiry,
            max_gone: max_gone.max(1),
        }
    }

    /// A HELLO with `client_id` (not empty): returns how many earlier connections it had.
    pub(crate) fn hello(&self, client_id: &str, now: Instant) -> u64 {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let reconnects = match inner.by_id.get_mut(client_id) {
            Some(entry) => {
                entry.hellos += 1;
                entry.connected += 1;
                entry.gone_at = None;
                entry.hellos - 1
            }
            None => {
                inner.by_id.insert(
                    client_id.into(),
                    Entry {
                        hellos: 1,
                        connected: 1,
                        gone_at: None,
                    },
                );
                0
            }
        };
        if inner.by_id.len() >= 2 * inner.swept_len.max(512) {
            self.sweep(&mut inner, now);
        }
        reconnects
    }

    /// A connection that had said HELLO with `client_id` closed.
    pub(crate) fn gone(&self, client_id: &str, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = inner.by_id.get_mut(client_id) {
            entry.connected = entry.connected.saturating_sub(1);
            if entry.connected == 0 {
                entry.gone_at = Some(now);
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.len()
    }

    fn sweep(&self, inner: &mut Inner, now: Instant) {
        let expiry = self.expiry;
        inner.by_id.retain(|_, e| {
            e.gone_at
                .is_none_or(|gone| now.saturating_duration_since(gone) < expiry)
        });
        let mut gone: Vec<(Instant, Box<str>)> = inner
            .by_id
            .iter()
            .filter_map(|(id, e)| e.gone_at.map(|at| (at, id.clone())))
            .collect();
        if gone.len() > self.max_gone {
            gone.sort_unstable();
            for (_, id) in &gone[..gone.len() - self.max_gone] {
                inner.by_id.remove(id);
            }
        }
        inner.swept_len = inner.by_id.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnects_are_counted_and_gone_ids_expire() {
        let t0 = Instant::now();
        let clients = ClientSessions::new(Duration::from_secs(60), 10_000);
        assert_eq!(clients.hello("hmi1", t0), 0);
        clients.gone("hmi1", t0);
        assert_eq!(clients.hello("hmi1", t0), 1);
        clients.gone("hmi1", t0);
        // A flood of new ids long after: the gone one is swept away, the live ones stay.
        let later = t0 + Duration::from_secs(61);
        for i in 0..2000 {
            clients.hello(&format!("x{i}"), later);
        }
        assert_eq!(clients.hello("hmi1", later), 0, "forgotten");
        assert_eq!(clients.len(), 2001);
    }

    #[test]
    fn ids_that_are_gone_are_bounded_in_number() {
        let t0 = Instant::now();
        let clients = ClientSessions::new(Duration::from_secs(3600), 1000);
        for i in 0..100_000u32 {
            let id = format!("churn-{i}");
            let now = t0 + Duration::from_millis(i as u64);
            clients.hello(&id, now);
            clients.gone(&id, now);
        }
        assert!(clients.len() <= 2 * 1000 + 1, "{}", clients.len());
    }
}
