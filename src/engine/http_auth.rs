//! The engine's side of authentication on the HTTP `/metrics` and `/stats`
//! (`crate::metrics::MetricsServer::start_authenticated`): credentials checked against the same
//! users as HELLO, with the same argon2 budget (`auth.max_verifications_per_s`, here for the
//! HTTP thread), failures audited; and what a non-admin identity is shown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::audit::{AuditKind, AuditLog};
use super::guard::quote;
use super::limits::TokenBucket;
use super::EngineShared;
use crate::auth::{AuthError, Identity};
use crate::config::Config;
use crate::metrics::{HttpAuth, MetricsSnapshot};

/// The audit log's "reactor" field for lines from the HTTP thread.
const HTTP_THREAD: u16 = u16::MAX;

/// Checks HTTP Basic credentials for the metrics server of `shared`'s engine.
pub(crate) fn http_auth(shared: Arc<EngineShared>, config: &Config) -> HttpAuth {
    let per_s = u64::from(config.auth.max_verifications_per_s);
    let state = Mutex::new((
        TokenBucket::new(per_s, per_s, Instant::now()),
        AuditLog::new(HTTP_THREAD),
    ));
    HttpAuth {
        check: Box::new(move |user: &str, secret: &[u8], peer: Option<SocketAddr>| {
            let now = Instant::now();
            // One thread serves HTTP: the lock is never contended.
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            let (budget, audit) = &mut *state;
            match shared.auth.authenticate(Some((user, secret)), now, budget) {
                Ok(done) => Some(done.identity),
                Err(e) => {
                    let detail = match &e {
                        AuthError::Rejected { known: false, .. } => {
                            format!("HTTP request refused: {e} (no such user)")
                        }
                        _ => format!("HTTP request refused: {e}"),
                    };
                    audit.record(now, AuditKind::AuthFailure, 0, peer, &quote(user), &detail);
                    None
                }
            }
        }),
    }
}

/// What `viewer` (a non-admin identity) may see of the merged latency histograms: the topic
/// prefixes its ACL lets it receive from, and no connection's figures (as STATS shows it).
pub(crate) fn scoped_snapshot(mut snapshot: MetricsSnapshot, viewer: &Identity) -> MetricsSnapshot {
    snapshot
        .prefixes
        .retain(|prefix, _| viewer.acl.may_see_prefix(prefix));
    snapshot.connections.clear();
    snapshot
}
