//! The client ids the engine has seen: how often each connected (a reconnect count for STATS),
//! and when its last connection closed, so that ids that are gone are forgotten.
//!
//! Bounded: an id whose last connection closed `limits.client_session_expiry_s` ago is dropped,
//! and the ids that are gone are never more than `limits.max_connections` (the oldest gone are
//! dropped first), so a client inventing ids cannot grow the engine. Touched once per HELLO and
//! once per close, never on the data path; the clock is the caller's (`now`).
//!
//! It also says who holds each id: the identity (user) of its connections. While an id has a
//! connection, a HELLO of another identity is refused (`Err`); one of the same authenticated
//! identity takes it over (the caller closes the previous holder, [`Claim::taken_from`]).
//! Anonymous connections share ids as they always did: they have no identity to prove.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ahash::HashMap;

use super::acks::PublisherPosition;
use super::core::ConnRef;

/// A connection holding an id: its shard and its reference there.
pub(crate) type Holder = (u16, ConnRef);

struct Entry {
    hellos: u64,
    connected: u32,
    gone_at: Option<Instant>,
    /// The user of its connections (`None`: anonymous).
    owner: Option<Box<str>>,
    /// The latest connection to say HELLO with it, while open.
    holder: Option<Holder>,
    /// The last publisher of this id that asked for acknowledgements: how far the engine took
    /// its messages, so a resend after a reconnect is not taken twice (`acks.rs`).
    publisher: Option<Arc<PublisherPosition>>,
}

/// A HELLO's claim on its client id, granted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Claim {
    /// Earlier connections with this id.
    pub reconnects: u64,
    /// The connection of the same identity that held the id: it must be closed.
    pub taken_from: Option<Holder>,
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

    /// A HELLO with `client_id` (not empty) by `user` (`None`: anonymous) on connection
    /// `holder`: the claim, or `Err` when a connection of another identity holds the id.
    pub(crate) fn hello(
        &self,
        client_id: &str,
        now: Instant,
        user: Option<&str>,
        holder: Holder,
    ) -> Result<Claim, ()> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let claim = match inner.by_id.get_mut(client_id) {
            Some(entry) => {
                if entry.connected > 0 && entry.owner.as_deref() != user {
                    return Err(());
                }
                let taken_from = if user.is_some() && entry.connected > 0 {
                    entry.holder
                } else {
                    None
                };
                entry.hellos += 1;
                entry.connected += 1;
                entry.gone_at = None;
                entry.owner = user.map(Box::from);
                entry.holder = Some(holder);
                Claim {
                    reconnects: entry.hellos - 1,
                    taken_from,
                }
            }
            None => {
                inner.by_id.insert(
                    client_id.into(),
                    Entry {
                        hellos: 1,
                        connected: 1,
                        gone_at: None,
                        owner: user.map(Box::from),
                        holder: Some(holder),
                        publisher: None,
                    },
                );
                Claim {
                    reconnects: 0,
                    taken_from: None,
                }
            }
        };
        if inner.by_id.len() >= 2 * inner.swept_len.max(512) {
            self.sweep(&mut inner, now);
        }
        Ok(claim)
    }

    /// Connection `conn_id`, which had said HELLO with `client_id`, closed.
    pub(crate) fn gone(&self, client_id: &str, conn_id: u64, now: Instant) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = inner.by_id.get_mut(client_id) {
            entry.connected = entry.connected.saturating_sub(1);
            if entry.holder.is_some_and(|(_, c)| c.id == conn_id) {
                entry.holder = None;
            }
            if entry.connected == 0 {
                entry.gone_at = Some(now);
            }
        }
    }

    /// The position of publisher `publisher_id` of `client_id` (which said HELLO), made when
    /// the id's last publisher was another one: one per id, so bounded with the ids.
    pub(crate) fn publisher_position(
        &self,
        client_id: &str,
        publisher_id: u64,
    ) -> Option<Arc<PublisherPosition>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entry = inner.by_id.get_mut(client_id)?;
        match &entry.publisher {
            Some(p) if p.publisher_id == publisher_id => Some(p.clone()),
            _ => {
                let p = Arc::new(PublisherPosition::new(publisher_id));
                entry.publisher = Some(p.clone());
                Some(p)
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

    fn holder(id: u64) -> Holder {
        (0, ConnRef { slot: 0, id })
    }

    fn hello(clients: &ClientSessions, id: &str, now: Instant) -> u64 {
        clients.hello(id, now, None, holder(1)).unwrap().reconnects
    }

    #[test]
    fn reconnects_are_counted_and_gone_ids_expire() {
        let t0 = Instant::now();
        let clients = ClientSessions::new(Duration::from_secs(60), 10_000);
        assert_eq!(hello(&clients, "hmi1", t0), 0);
        clients.gone("hmi1", 1, t0);
        assert_eq!(hello(&clients, "hmi1", t0), 1);
        clients.gone("hmi1", 1, t0);
        // A flood of new ids long after: the gone one is swept away, the live ones stay.
        let later = t0 + Duration::from_secs(61);
        for i in 0..2000 {
            hello(&clients, &format!("x{i}"), later);
        }
        assert_eq!(hello(&clients, "hmi1", later), 0, "forgotten");
        assert_eq!(clients.len(), 2001);
    }

    #[test]
    fn an_id_in_use_goes_only_to_the_same_identity_which_takes_it_over() {
        let t0 = Instant::now();
        let clients = ClientSessions::new(Duration::from_secs(60), 100);
        let first = clients.hello("hmi", t0, Some("op"), holder(1)).unwrap();
        assert_eq!(first.taken_from, None);
        assert_eq!(
            clients.hello("hmi", t0, Some("intruder"), holder(2)),
            Err(())
        );
        assert_eq!(clients.hello("hmi", t0, None, holder(3)), Err(()));
        let second = clients.hello("hmi", t0, Some("op"), holder(4)).unwrap();
        assert_eq!(second.taken_from, Some(holder(1)));
        // The old one closes after; the id stays with connection 4, then is free once gone.
        clients.gone("hmi", 1, t0);
        assert_eq!(
            clients.hello("hmi", t0, Some("intruder"), holder(5)),
            Err(())
        );
        clients.gone("hmi", 4, t0);
        assert!(clients
            .hello("hmi", t0, Some("intruder"), holder(6))
            .is_ok());
        // Anonymous connections share an id without taking it from each other.
        assert_eq!(
            clients
                .hello("anon", t0, None, holder(7))
                .unwrap()
                .taken_from,
            None
        );
        assert_eq!(
            clients
                .hello("anon", t0, None, holder(8))
                .unwrap()
                .taken_from,
            None
        );
    }

    #[test]
    fn ids_that_are_gone_are_bounded_in_number() {
        let t0 = Instant::now();
        let clients = ClientSessions::new(Duration::from_secs(3600), 1000);
        for i in 0..100_000u32 {
            let id = format!("churn-{i}");
            let now = t0 + Duration::from_millis(i as u64);
            hello(&clients, &id, now);
            clients.gone(&id, 1, now);
        }
        assert!(clients.len() <= 2 * 1000 + 1, "{}", clients.len());
    }
}
