//! Admission and authorisation state of one connection (its [`Guard`]) and of one shard
//! ([`ShardGuard`]: the argon2 budget, the audit log), as plain values. The fan-out core calls
//! them at three places only: HELLO (who is this?), PUBLISH and SUBSCRIBE (may it?). The rules
//! themselves are in `crate::auth`, shared with every listener kind.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use super::audit::{AuditKind, AuditLog};
use super::limits::TokenBucket;
use super::session::Fatal;
use crate::auth::{AuthError, Authenticator, Check, Identity, PendingAuth, Verification};
use crate::config::Config;
use crate::proto::error_code;

/// Bytes of client input an ERROR reason or an audit line quotes at most.
pub(crate) const QUOTE_BYTES: usize = 64;

/// `input` for an ERROR reason or a log line: Rust-escaped and quoted, cut to its first
/// [`QUOTE_BYTES`] bytes (on a character boundary) with the full length said when cut. A
/// 65 KB topic comes back as 64 bytes and "… (65535 bytes)", never whole.
pub(crate) fn quote(input: &str) -> String {
    if input.len() <= QUOTE_BYTES {
        return format!("{input:?}");
    }
    let mut end = QUOTE_BYTES;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… ({} bytes)", &input[..end], input.len())
}

/// The identity a connection has before its HELLO: no rights at all.
fn nobody() -> Arc<Identity> {
    static NOBODY: OnceLock<Arc<Identity>> = OnceLock::new();
    NOBODY
        .get_or_init(|| {
            Arc::new(Identity {
                user: None,
                acl: crate::auth::Acl::default(),
                admin: false,
                metrics: false,
            })
        })
        .clone()
}

/// One connection's identity, source address and publish rate.
#[derive(Debug, Clone)]
pub(crate) struct Guard {
    pub identity: Arc<Identity>,
    pub peer: Option<SocketAddr>,
    /// `limits.max_publish_rate_per_s`, bursts of one second's worth.
    rate: Option<TokenBucket>,
    /// The last ERROR about a refused PUBLISH; while it is unwritten further refusals are only
    /// counted in `untold`. Weak, so it does not count as a holder itself: an unwritten reply is
    /// held by the outbox and the session's reply list (two), a written one by the list at
    /// most (`Session::queue_reply`).
    pub notice: Option<Weak<[u8]>>,
    untold: u64,
    /// The names of the client certificate a TLS handshake verified (`crate::tls`), offered as
    /// the identity at HELLO.
    pub certificate: Option<Vec<String>>,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            identity: nobody(),
            peer: None,
            rate: None,
            notice: None,
            untold: 0,
            certificate: None,
        }
    }
}

impl Guard {
    /// The name audit lines and STATS give the connection's identity.
    pub(crate) fn who(&self) -> &str {
        self.identity.name()
    }

    /// The connection said HELLO as `identity`.
    pub(crate) fn admit(&mut self, identity: Arc<Identity>, config: &Config, now: Instant) {
        self.identity = identity;
        let rate = config.limits.max_publish_rate_per_s;
        self.rate = (rate > 0).then(|| TokenBucket::new(rate, rate, now));
    }

    /// Whether one more PUBLISH is within the rate at `now`.
    pub(crate) fn check_rate(&mut self, now: Instant) -> bool {
        self.rate.as_mut().is_none_or(|bucket| bucket.try_take(now))
    }

    /// A PUBLISH was refused: `Some(untold)` if the client should get a notice now (the
    /// refusals since the last one, not counting this one), `None` if the last notice is still
    /// unwritten (this refusal is counted for the next).
    pub(crate) fn take_untold(&mut self) -> Option<u64> {
        if self.notice.as_ref().is_some_and(|n| n.strong_count() > 1) {
            self.untold += 1;
            return None;
        }
        self.notice = None;
        Some(std::mem::take(&mut self.untold))
    }
}

/// Security counters of one shard (docs/PROTOCOL.md §11).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GuardCounters {
    /// HELLOs refused with UNAUTHENTICATED.
    pub auth_failures: u64,
    /// PUBLISHes and SUBSCRIBEs refused with FORBIDDEN.
    pub acl_denied: u64,
    /// Frames a partly allowed subscription matched but its identity may not receive.
    pub acl_filtered: u64,
    /// HELLOs refused because another identity holds the client id.
    pub id_conflicts: u64,
    /// Connections closed because a newer one of the same identity took their client id.
    pub id_takeovers: u64,
    /// PUBLISHes dropped by `limits.max_publish_rate_per_s`.
    pub rate_limited: u64,
    /// SUBSCRIBEs refused at `limits.max_subscriptions_per_connection`.
    pub subscriptions_refused: u64,
    /// PUBLISHes and SUBSCRIBEs refused for a topic or pattern past `limits.max_topic_bytes`
    /// or `limits.max_topic_levels`.
    pub topic_limit: u64,
    /// Connections refused at accept by `limits.max_connections_per_address`.
    pub address_refused: u64,
}

/// What a HELLO's credentials need, as far as the reactor can tell without an argon2 run.
#[derive(Debug)]
pub(crate) enum HelloAuth {
    Admitted(Arc<Identity>),
    /// The run to make off the reactor, and what finishes the check with its verdict.
    Verify(PendingAuth, Verification),
}

/// One shard's share of admission: the argon2 budget, the audit log and the counters.
#[derive(Debug)]
pub(crate) struct ShardGuard {
    slow_budget: TokenBucket,
    pub audit: AuditLog,
    pub counters: GuardCounters,
}

impl ShardGuard {
    pub(crate) fn new(shard: u16, config: &Config, now: Instant) -> ShardGuard {
        let per_s = u64::from(config.auth.max_verifications_per_s);
        ShardGuard {
            slow_budget: TokenBucket::new(per_s, per_s, now),
            audit: AuditLog::new(shard),
            counters: GuardCounters::default(),
        }
    }

    /// Checks HELLO's token as far as it can without an argon2 run: the identity, the run to
    /// make ([`HelloAuth::Verify`], finished by [`ShardGuard::finish_authentication`]), or the
    /// fatal ERROR (counted and audited). The run takes a token of this shard's budget.
    pub(crate) fn begin_authentication(
        &mut self,
        auth: &Authenticator,
        token: &str,
        now: Instant,
        conn_id: u64,
        peer: Option<SocketAddr>,
        certificate: Option<&[String]>,
    ) -> Result<HelloAuth, Fatal> {
        match auth.begin_token(token, certificate, now, &mut self.slow_budget) {
            Ok(Check::Done(done)) => Ok(HelloAuth::Admitted(done.identity)),
            Ok(Check::Verify(pending, verification)) => {
                Ok(HelloAuth::Verify(pending, verification))
            }
            Err(e) => Err(self.refused(e, now, conn_id, peer)),
        }
    }

    /// The argon2 run of a HELLO answered `verified`: the identity, or the fatal ERROR (counted
    /// and audited), exactly as if the run had been made in [`ShardGuard::begin_authentication`].
    pub(crate) fn finish_authentication(
        &mut self,
        auth: &Authenticator,
        pending: PendingAuth,
        verified: bool,
        now: Instant,
        conn_id: u64,
        peer: Option<SocketAddr>,
    ) -> Result<Arc<Identity>, Fatal> {
        auth.finish(pending, verified)
            .map(|done| done.identity)
            .map_err(|e| self.refused(e, now, conn_id, peer))
    }

    /// A HELLO refused for `e`: counted, audited, and the ERROR the client gets.
    pub(crate) fn refused(
        &mut self,
        e: AuthError,
        now: Instant,
        conn_id: u64,
        peer: Option<SocketAddr>,
    ) -> Fatal {
        self.counters.auth_failures += 1;
        let who = e.user().map_or_else(|| "-".to_string(), quote);
        let detail = match &e {
            AuthError::Rejected { known: false, .. } => {
                format!("HELLO refused: {e} (no such user)")
            }
            _ => format!("HELLO refused: {e}"),
        };
        self.audit
            .record(now, AuditKind::AuthFailure, conn_id, peer, &who, &detail);
        Fatal::new(error_code::UNAUTHENTICATED, e.to_string())
    }

    /// Audits one event on a connection.
    pub(crate) fn record(
        &mut self,
        now: Instant,
        kind: AuditKind,
        conn_id: u64,
        guard: &Guard,
        detail: &str,
    ) {
        self.audit
            .record(now, kind, conn_id, guard.peer, guard.who(), detail);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quote_is_short_whatever_the_input() {
        assert_eq!(quote("a/b"), "\"a/b\"");
        let long = "x".repeat(65_535);
        let q = quote(&long);
        assert!(q.len() < QUOTE_BYTES + 30, "{q}");
        assert!(q.ends_with("(65535 bytes)"), "{q}");
        let wide = "é".repeat(100);
        assert!(quote(&wide).contains("(200 bytes)"));
    }
}
