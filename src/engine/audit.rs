//! The security audit log: one line per authentication failure, ACL denial, client id takeover
//! or conflict, and limit hit, through `tracing` with target `lanpush::audit` (the embedding
//! process, or `lanpush serve`, decides where it goes).
//!
//! Rate-limited per reactor, so a hostile client cannot turn the log into a flood of its own:
//! at most [`AUDIT_LINES_PER_S`] lines a second; past that, events are only counted by kind,
//! and the first line after the second is up says what was suppressed. The limiter is a plain
//! value fed `now` ([`AuditLimiter`]); every event is also counted in STATS whether or not its
//! line was written.

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Audit lines each reactor writes per second at most.
pub(crate) const AUDIT_LINES_PER_S: u32 = 20;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditKind {
    AuthFailure,
    AclDenied,
    IdTakeover,
    IdConflict,
    LimitHit,
}

const KINDS: usize = 5;

impl AuditKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            AuditKind::AuthFailure => "auth_failure",
            AuditKind::AclDenied => "acl_denied",
            AuditKind::IdTakeover => "id_takeover",
            AuditKind::IdConflict => "id_conflict",
            AuditKind::LimitHit => "limit_hit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Events suppressed in one window, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Suppressed([u64; KINDS]);

impl Suppressed {
    pub(crate) fn total(&self) -> u64 {
        self.0.iter().sum()
    }
}

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for kind in [
            AuditKind::AuthFailure,
            AuditKind::AclDenied,
            AuditKind::IdTakeover,
            AuditKind::IdConflict,
            AuditKind::LimitHit,
        ] {
            let n = self.0[kind.index()];
            if n > 0 {
                write!(f, "{}{}={n}", if first { "" } else { " " }, kind.as_str())?;
                first = false;
            }
        }
        Ok(())
    }
}

/// The decision for one event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Write its line; first, if `Some`, a line saying what the last window suppressed.
    Write(Option<Suppressed>),
    /// Count it only.
    Suppress,
}

/// At most `per_window` lines per one-second window.
#[derive(Debug)]
pub(crate) struct AuditLimiter {
    per_window: u32,
    window_end: Option<Instant>,
    written: u32,
    suppressed: Suppressed,
}

impl AuditLimiter {
    pub(crate) fn new(per_window: u32) -> AuditLimiter {
        AuditLimiter {
            per_window,
            window_end: None,
            written: 0,
            suppressed: Suppressed::default(),
        }
    }

    pub(crate) fn admit(&mut self, now: Instant, kind: AuditKind) -> Admit {
        let mut report = None;
        if self.window_end.is_none_or(|end| now >= end) {
            self.window_end = Some(now + Duration::from_secs(1));
            self.written = 0;
            if self.suppressed.total() > 0 {
                report = Some(std::mem::take(&mut self.suppressed));
            }
        }
        if self.written < self.per_window {
            self.written += 1;
            Admit::Write(report)
        } else {
            self.suppressed.0[kind.index()] += 1;
            Admit::Suppress
        }
    }
}

/// One reactor's audit log.
#[derive(Debug)]
pub(crate) struct AuditLog {
    limiter: AuditLimiter,
    reactor: u16,
    /// Tests only: every line written, as `event who detail`. (A `tracing` subscriber in a
    /// test sees nothing when another test thread registers the same call site first, so the
    /// tests read this copy.)
    #[cfg(test)]
    pub(crate) written: Vec<String>,
}

impl AuditLog {
    pub(crate) fn new(reactor: u16) -> AuditLog {
        AuditLog {
            limiter: AuditLimiter::new(AUDIT_LINES_PER_S),
            reactor,
            #[cfg(test)]
            written: Vec::new(),
        }
    }

    /// Logs one event: `who` is the identity (or the user a failed HELLO named), `peer` the
    /// source address when known, `detail` what was refused or done (already bounded: it quotes
    /// at most a short prefix of client input).
    pub(crate) fn record(
        &mut self,
        now: Instant,
        kind: AuditKind,
        conn_id: u64,
        peer: Option<SocketAddr>,
        who: &str,
        detail: &str,
    ) {
        match self.limiter.admit(now, kind) {
            Admit::Suppress => {}
            Admit::Write(report) => {
                if let Some(s) = report {
                    #[cfg(test)]
                    self.written.push(format!("suppressed - {s}"));
                    tracing::warn!(
                        target: "lanpush::audit",
                        event = "suppressed",
                        reactor = self.reactor,
                        total = s.total(),
                        "audit lines suppressed in the last second: {s}"
                    );
                }
                #[cfg(test)]
                self.written
                    .push(format!("{} {who} {detail}", kind.as_str()));
                let peer = peer.map_or_else(|| "-".to_string(), |p| p.to_string());
                tracing::warn!(
                    target: "lanpush::audit",
                    event = kind.as_str(),
                    reactor = self.reactor,
                    conn = conn_id,
                    peer = %peer,
                    who = who,
                    "{detail}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_the_window_and_the_rest_is_summed_up() {
        let t0 = Instant::now();
        let mut l = AuditLimiter::new(3);
        let mut written = 0;
        for i in 0..1000 {
            let kind = if i % 2 == 0 {
                AuditKind::AuthFailure
            } else {
                AuditKind::AclDenied
            };
            if let Admit::Write(report) = l.admit(t0, kind) {
                assert_eq!(report, None);
                written += 1;
            }
        }
        assert_eq!(written, 3);
        let t1 = t0 + Duration::from_secs(1);
        let Admit::Write(Some(report)) = l.admit(t1, AuditKind::LimitHit) else {
            panic!("the next window starts with the summary");
        };
        assert_eq!(report.total(), 997);
        assert_eq!(report.to_string(), "auth_failure=498 acl_denied=499");
        assert_eq!(l.admit(t1, AuditKind::LimitHit), Admit::Write(None));
    }
}
