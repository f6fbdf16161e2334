//! Who a client is ([`Identity`]) and what it may do ([`Acl`]), as plain values shared by every
//! listener kind: the native session checks HELLO's token here, an MQTT session would check
//! CONNECT's username and password the same way ([`Authenticator::authenticate`]).
//!
//! **Secrets** are stored in the config as argon2 PHC strings (`lanpush passwd` makes one), never
//! in clear. Checking one costs what its parameters say (19 MiB and 2 passes, the argon2 crate's
//! defaults and OWASP's minimum: 31 ms on the reference machine, `bench/auth.rs`, by design).
//! So the check is split: [`Authenticator::begin`] answers at once when it can, else returns
//! the argon2 run to make ([`Verification`]); the engine makes it on its `lanpush-auth` thread
//! (`crate::engine::verifier`), never on a reactor, and [`Authenticator::finish`] takes the
//! verdict. [`Authenticator::authenticate`] does both on the calling thread. Besides:
//!
//! - **a secret that verified is remembered**: per configured user, a keyed BLAKE2b digest of the
//!   last secret that verified (the key is random per process, so the digest is useless outside
//!   it). A HELLO with the same secret costs one digest (about 1 µs) instead of an argon2 run: a
//!   reconnect storm of known clients costs no more than anonymous ones. The cache holds one
//!   entry per configured user, so it is bounded by the config;
//! - **argon2 runs are budgeted per reactor** (`auth.max_verifications_per_s`, a token bucket
//!   the caller owns and passes in): past it, a HELLO that would need one is refused with
//!   UNAUTHENTICATED ("too many authentication attempts") before any hashing. A password-guessing
//!   client therefore costs the engine at most that many runs a second per reactor (10 by
//!   default: about a third of the verifier thread's core each);
//! - an unknown user is verified against a dummy hash, so unknown users and wrong secrets take the
//!   same time and the same budget (no user enumeration by timing).

pub mod acl;
mod password;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use ahash::HashMap;

pub use acl::{Acl, PatternSet, SubscribeScope, TopicFilter};
pub use password::{check_phc, hash_password, PasswordError};

use crate::config::AuthConfig;
use crate::engine::limits::TokenBucket;

/// A secret that `Debug` does not show (operations and logs may print the value holding it).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<none>"
        } else {
            "<redacted>"
        })
    }
}

/// An authenticated (or anonymous) client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The configured user, `None` for anonymous.
    pub user: Option<Box<str>>,
    pub acl: Acl,
    /// Sees everything in STATS (other connections, their client ids and subscriptions).
    pub admin: bool,
    /// May read the HTTP `/metrics` and `/stats` when they require credentials (as `admin`
    /// may; `/stats` then shows what STATS shows this identity).
    pub metrics: bool,
}

impl Identity {
    /// The user name, or `anonymous`.
    pub fn name(&self) -> &str {
        self.user.as_deref().unwrap_or("anonymous")
    }

    /// Anonymous with every right: what an engine without `[auth]` config gives every client.
    pub fn unrestricted() -> Identity {
        Identity {
            user: None,
            acl: Acl::everything(),
            admin: true,
            metrics: true,
        }
    }
}

/// Why a HELLO's credentials were refused. The `Display` text is what the client is told: it
/// does not say whether the user exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("credentials required: this engine does not accept anonymous clients")]
    Missing,
    #[error("the token must be \"user:secret\"")]
    BadToken,
    #[error("unknown user or wrong secret")]
    Rejected {
        /// For the audit log only.
        user: String,
        /// The user exists (for the audit log only).
        known: bool,
    },
    #[error("too many authentication attempts on this reactor; try again in a second")]
    Throttled { user: String },
    #[error("the token names another user than the client certificate ({certificate:?})")]
    CertificateMismatch {
        /// The token's user (for the audit log).
        user: String,
        certificate: String,
    },
}

impl AuthError {
    /// The user named, if any (for the audit log).
    pub fn user(&self) -> Option<&str> {
        match self {
            AuthError::Rejected { user, .. }
            | AuthError::Throttled { user }
            | AuthError::CertificateMismatch { user, .. } => Some(user),
            AuthError::Missing | AuthError::BadToken => None,
        }
    }
}

/// The result of a successful check.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub identity: Arc<Identity>,
    /// An argon2 verification ran (false: anonymous, or the secret was remembered).
    pub verified_slowly: bool,
}

/// What [`Authenticator::begin`] found.
#[derive(Debug)]
pub enum Check {
    /// Answered without an argon2 run.
    Done(Authenticated),
    /// An argon2 run decides: make it ([`Verification::run`], on any thread), then give its
    /// answer to [`Authenticator::finish`] with the [`PendingAuth`].
    Verify(PendingAuth, Verification),
}

/// A check waiting for its argon2 run: the user named, the identity a verified secret gives
/// (`None`: no such user, verified against the dummy hash all the same), the secret's keyed
/// digest to remember, and the client certificate's identity the token must match.
#[derive(Debug)]
pub struct PendingAuth {
    name: Box<str>,
    identity: Option<Arc<Identity>>,
    digest: [u8; 32],
    certificate: Option<Arc<Identity>>,
}

impl PendingAuth {
    /// The user the token named (for the audit log).
    pub fn user(&self) -> &str {
        &self.name
    }
}

/// One argon2 run to make: a PHC string and the secret to check against it. It takes what
/// the hash's parameters say (31 ms with the defaults, `bench/auth.rs`), so the engine makes
/// it on its `lanpush-auth` thread (`crate::engine::verifier`), never on a reactor.
#[derive(Debug)]
pub struct Verification {
    hash: String,
    secret: SecretBytes,
}

/// A secret's bytes, which `Debug` does not show.
struct SecretBytes(Vec<u8>);

impl std::fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Verification {
    /// Runs argon2: whether the secret matches the hash (false for a malformed hash).
    pub fn run(&self) -> bool {
        password::verify(&self.hash, &self.secret.0)
    }
}

/// A token that verified must name the client certificate's user, when there is one.
fn check_certificate(
    done: Authenticated,
    certificate: Option<&Arc<Identity>>,
) -> Result<Authenticated, AuthError> {
    match certificate {
        Some(cert) if cert.user != done.identity.user => Err(AuthError::CertificateMismatch {
            user: done.identity.name().to_string(),
            certificate: cert.name().to_string(),
        }),
        _ => Ok(done),
    }
}

struct User {
    hash: String,
    identity: Arc<Identity>,
}

/// Checks credentials against the configured users; shared by every reactor.
pub struct Authenticator {
    anonymous: Option<Arc<Identity>>,
    users: HashMap<Box<str>, User>,
    /// Per user, the keyed digest of the last secret that verified.
    verified: Mutex<HashMap<Box<str>, [u8; 32]>>,
    digest_key: [u8; 32],
    /// Verified when the user is unknown, so that takes as long as a wrong secret.
    dummy_hash: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("anonymous", &self.anonymous.is_some())
            .field("users", &self.users.len())
            .finish()
    }
}

impl Authenticator {
    /// The authenticator for a validated `[auth]` config (`Config` validation has checked the
    /// hashes, roles and patterns).
    pub fn new(config: &AuthConfig) -> Authenticator {
        let roles: HashMap<&str, &crate::config::RoleConfig> =
            config.roles.iter().map(|r| (r.name.as_str(), r)).collect();
        let identity = |user: Option<&str>,
                        role_names: &[String],
                        publish: &[String],
                        subscribe: &[String],
                        (admin, metrics): (bool, bool)| {
            let mut p: Vec<&str> = publish.iter().map(String::as_str).collect();
            let mut s: Vec<&str> = subscribe.iter().map(String::as_str).collect();
            let (mut admin, mut metrics) = (admin, metrics);
            for name in role_names {
                if let Some(role) = roles.get(name.as_str()) {
                    p.extend(role.publish.iter().map(String::as_str));
                    s.extend(role.subscribe.iter().map(String::as_str));
                    admin |= role.admin;
                    metrics |= role.metrics;
                }
            }
            Arc::new(Identity {
                user: user.map(Box::from),
                acl: Acl {
                    publish: PatternSet::new(p),
                    subscribe: PatternSet::new(s),
                },
                admin,
                metrics,
            })
        };
        let anonymous = config
            .anonymous
            .then(|| identity(None, &config.anonymous_roles, &[], &[], (false, false)));
        let users = config
            .users
            .iter()
            .map(|u| {
                let user = User {
                    hash: u.secret_hash.clone(),
                    identity: identity(
                        Some(&u.name),
                        &u.roles,
                        &u.publish,
                        &u.subscribe,
                        (u.admin, u.metrics),
                    ),
                };
                (Box::from(u.name.as_str()), user)
            })
            .collect();
        Authenticator {
            anonymous,
            users,
            verified: Mutex::new(HashMap::default()),
            digest_key: password::random_bytes(),
            dummy_hash: password::dummy_hash(),
        }
    }

    /// An authenticator that lets everyone in with every right (tests, embedding).
    pub fn unrestricted() -> Authenticator {
        Authenticator {
            anonymous: Some(Arc::new(Identity::unrestricted())),
            users: HashMap::default(),
            verified: Mutex::new(HashMap::default()),
            digest_key: [0; 32],
            dummy_hash: String::new(),
        }
    }

    /// Checks `user` and `secret` (HELLO's token split at its first ':'; an MQTT CONNECT's
    /// username and password), or anonymous when both are `None`, on the calling thread: an
    /// argon2 run, if one is needed, runs here ([`Authenticator::begin`] then
    /// [`Authenticator::finish`]). For callers that may block (the HTTP Basic check on the
    /// metrics thread, tests).
    pub fn authenticate(
        &self,
        credentials: Option<(&str, &[u8])>,
        now: Instant,
        slow_budget: &mut TokenBucket,
    ) -> Result<Authenticated, AuthError> {
        match self.begin(credentials, now, slow_budget)? {
            Check::Done(done) => Ok(done),
            Check::Verify(pending, verification) => self.finish(pending, verification.run()),
        }
    }

    /// The first, fast half of a check: the answer when it needs no argon2 run (anonymous,
    /// a remembered secret, a spent budget), else the run to make ([`Verification`], on any
    /// thread) and what [`Authenticator::finish`] needs with its verdict ([`PendingAuth`]).
    /// An argon2 run takes a token from `slow_budget` at `now`; with none left it is not
    /// attempted. An unknown user is verified against the dummy hash, like a known one.
    pub fn begin(
        &self,
        credentials: Option<(&str, &[u8])>,
        now: Instant,
        slow_budget: &mut TokenBucket,
    ) -> Result<Check, AuthError> {
        let Some((name, secret)) = credentials else {
            return self
                .anonymous
                .clone()
                .map(|identity| {
                    Check::Done(Authenticated {
                        identity,
                        verified_slowly: false,
                    })
                })
                .ok_or(AuthError::Missing);
        };
        let user = self.users.get(name);
        let digest = password::keyed_digest(&self.digest_key, secret);
        if let Some(user) = user {
            let remembered = self
                .verified
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
                .is_some_and(|d| password::digests_equal(d, &digest));
            if remembered {
                return Ok(Check::Done(Authenticated {
                    identity: user.identity.clone(),
                    verified_slowly: false,
                }));
            }
        }
        if !slow_budget.try_take(now) {
            return Err(AuthError::Throttled {
                user: name.to_string(),
            });
        }
        let hash = user.map_or(self.dummy_hash.as_str(), |u| u.hash.as_str());
        Ok(Check::Verify(
            PendingAuth {
                name: name.into(),
                identity: user.map(|u| u.identity.clone()),
                digest,
                certificate: None,
            },
            Verification {
                hash: hash.to_string(),
                secret: SecretBytes(secret.to_vec()),
            },
        ))
    }

    /// The second half of a check that needed an argon2 run: `verified` is
    /// [`Verification::run`]'s answer. A known user whose secret verified is admitted and the
    /// secret's digest remembered; anything else is refused alike.
    pub fn finish(&self, pending: PendingAuth, verified: bool) -> Result<Authenticated, AuthError> {
        let PendingAuth {
            name,
            identity,
            digest,
            certificate,
        } = pending;
        let identity = match identity {
            Some(identity) if verified => {
                self.verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name.clone(), digest);
                identity
            }
            known => {
                return Err(AuthError::Rejected {
                    user: name.into(),
                    known: known.is_some(),
                })
            }
        };
        let done = Authenticated {
            identity,
            verified_slowly: true,
        };
        check_certificate(done, certificate.as_ref())
    }

    /// The identity a verified client certificate gives (`crate::tls`, "Identity from a
    /// certificate"): the first of its `names` that is a configured user, if any.
    pub fn certificate_identity<S: AsRef<str>>(&self, names: &[S]) -> Option<Arc<Identity>> {
        names
            .iter()
            .find_map(|name| self.users.get(name.as_ref()))
            .map(|user| user.identity.clone())
    }

    /// Checks a HELLO's token on a connection whose client certificate named `certificate`
    /// (its names, `None` without a verified certificate): a certificate that names a user
    /// admits that user without a token; a token, when sent, is checked as usual and must then
    /// name the certificate's user. On the calling thread, like [`Authenticator::authenticate`].
    pub fn authenticate_token(
        &self,
        token: &str,
        certificate: Option<&[String]>,
        now: Instant,
        slow_budget: &mut TokenBucket,
    ) -> Result<Authenticated, AuthError> {
        match self.begin_token(token, certificate, now, slow_budget)? {
            Check::Done(done) => Ok(done),
            Check::Verify(pending, verification) => self.finish(pending, verification.run()),
        }
    }

    /// [`Authenticator::authenticate_token`]'s fast half ([`Authenticator::begin`]); the
    /// certificate's user is compared with the token's once the token is verified.
    pub fn begin_token(
        &self,
        token: &str,
        certificate: Option<&[String]>,
        now: Instant,
        slow_budget: &mut TokenBucket,
    ) -> Result<Check, AuthError> {
        let from_certificate = certificate.and_then(|names| self.certificate_identity(names));
        if let Some(identity) = &from_certificate {
            if token.is_empty() {
                return Ok(Check::Done(Authenticated {
                    identity: identity.clone(),
                    verified_slowly: false,
                }));
            }
        }
        let check = Self::split_token(token)
            .and_then(|credentials| self.begin(credentials, now, slow_budget))?;
        match check {
            Check::Done(done) => {
                check_certificate(done, from_certificate.as_ref()).map(Check::Done)
            }
            Check::Verify(pending, verification) => Ok(Check::Verify(
                PendingAuth {
                    certificate: from_certificate,
                    ..pending
                },
                verification,
            )),
        }
    }

    /// Splits a native HELLO token: empty is anonymous, otherwise `user:secret`.
    pub fn split_token(token: &str) -> Result<Option<(&str, &[u8])>, AuthError> {
        if token.is_empty() {
            return Ok(None);
        }
        match token.split_once(':') {
            Some((user, secret)) if !user.is_empty() => Ok(Some((user, secret.as_bytes()))),
            _ => Err(AuthError::BadToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    pub(crate) fn secure_config(hash: &str) -> Config {
        let text = format!(
            r#"
[auth]
anonymous = false
anonymous_roles = []
[[auth.roles]]
name = "hmi"
subscribe = ["plant/line1/#"]
[[auth.users]]
name = "op"
secret_hash = "{hash}"
roles = ["hmi"]
publish = ["plant/line1/setpoint"]
"#
        );
        Config::from_toml_str(&text, "test").unwrap()
    }

    #[test]
    fn a_remembered_secret_skips_argon2_and_a_wrong_one_never_passes() {
        let hash = hash_password(b"s3cret").unwrap();
        let auth = Authenticator::new(&secure_config(&hash).auth);
        let t0 = Instant::now();
        let mut budget = TokenBucket::new(100, 100, t0);
        let first = auth
            .authenticate(Some(("op", b"s3cret")), t0, &mut budget)
            .unwrap();
        assert!(first.verified_slowly);
        assert_eq!(first.identity.name(), "op");
        assert!(first.identity.acl.may_publish("plant/line1/setpoint"));
        assert!(!first.identity.acl.may_publish("plant/line1/valve_cmd"));
        let again = auth
            .authenticate(Some(("op", b"s3cret")), t0, &mut budget)
            .unwrap();
        assert!(!again.verified_slowly, "remembered");
        for (user, secret, known) in [("op", &b"wrong"[..], true), ("nobody", b"s3cret", false)] {
            assert_eq!(
                auth.authenticate(Some((user, secret)), t0, &mut budget)
                    .unwrap_err(),
                AuthError::Rejected {
                    user: user.into(),
                    known
                }
            );
        }
        assert_eq!(
            auth.authenticate(None, t0, &mut budget).unwrap_err(),
            AuthError::Missing
        );
    }

    #[test]
    fn argon2_runs_are_budgeted_per_second() {
        let hash = hash_password(b"pw").unwrap();
        let auth = Authenticator::new(&secure_config(&hash).auth);
        let t0 = Instant::now();
        let mut budget = TokenBucket::new(2, 2, t0);
        for _ in 0..2 {
            assert!(matches!(
                auth.authenticate(Some(("op", b"guess")), t0, &mut budget),
                Err(AuthError::Rejected { .. })
            ));
        }
        assert!(matches!(
            auth.authenticate(Some(("op", b"guess")), t0, &mut budget),
            Err(AuthError::Throttled { .. })
        ));
        let later = t0 + Duration::from_millis(500);
        assert!(auth
            .authenticate(Some(("op", b"pw")), later, &mut budget)
            .is_ok());
    }

    #[test]
    fn the_split_check_answers_at_once_when_it_can_and_remembers_only_after_finish() {
        let hash = hash_password(b"s3cret").unwrap();
        let auth = Authenticator::new(&secure_config(&hash).auth);
        let t0 = Instant::now();
        let mut budget = TokenBucket::new(100, 100, t0);
        let begin = |auth: &Authenticator, budget: &mut TokenBucket, secret: &[u8]| {
            auth.begin(Some(("op", secret)), t0, budget)
        };
        let Ok(Check::Verify(pending, verification)) = begin(&auth, &mut budget, b"s3cret") else {
            panic!("a secret not yet verified needs a run");
        };
        assert_eq!(pending.user(), "op");
        let shown = format!("{pending:?} {verification:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        // Until finish, nothing is remembered: the same secret needs a run again.
        assert!(matches!(
            begin(&auth, &mut budget, b"s3cret"),
            Ok(Check::Verify(..))
        ));
        assert!(verification.run());
        let done = auth.finish(pending, true).unwrap();
        assert!(done.verified_slowly);
        assert_eq!(done.identity.name(), "op");
        let Ok(Check::Done(again)) = begin(&auth, &mut budget, b"s3cret") else {
            panic!("remembered after finish");
        };
        assert!(!again.verified_slowly);
        // A wrong secret: the run says no, finish refuses and remembers nothing.
        let Ok(Check::Verify(pending, verification)) = begin(&auth, &mut budget, b"nope") else {
            panic!("a run");
        };
        assert!(!verification.run());
        assert_eq!(
            auth.finish(pending, false).unwrap_err(),
            AuthError::Rejected {
                user: "op".into(),
                known: true
            }
        );
        assert!(matches!(
            begin(&auth, &mut budget, b"nope"),
            Ok(Check::Verify(..))
        ));
    }

    #[test]
    fn an_unknown_user_costs_a_run_against_the_dummy_hash_and_a_token_of_the_budget() {
        let hash = hash_password(b"s3cret").unwrap();
        let auth = Authenticator::new(&secure_config(&hash).auth);
        let t0 = Instant::now();
        let mut budget = TokenBucket::new(1, 1, t0);
        let Ok(Check::Verify(pending, verification)) =
            auth.begin(Some(("nobody", b"s3cret")), t0, &mut budget)
        else {
            panic!("an unknown user is verified like a known one");
        };
        // The run is a real argon2 run of the default parameters (the dummy hash's).
        assert!(verification
            .hash
            .starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(!verification.run());
        // Even a verdict that said yes admits no one who does not exist.
        assert_eq!(
            auth.finish(pending, true).unwrap_err(),
            AuthError::Rejected {
                user: "nobody".into(),
                known: false
            }
        );
        assert!(matches!(
            auth.begin(Some(("op", b"s3cret")), t0, &mut budget),
            Err(AuthError::Throttled { .. })
        ));
    }

    #[test]
    fn a_token_for_another_user_than_the_certificate_is_refused_after_its_run() {
        let hash = hash_password(b"s3cret").unwrap();
        let auth = Authenticator::new(&secure_config(&hash).auth);
        let t0 = Instant::now();
        let mut budget = TokenBucket::new(100, 100, t0);
        let op = ["op".to_string()];
        let Ok(Check::Done(by_cert)) = auth.begin_token("", Some(&op), t0, &mut budget) else {
            panic!("a certificate naming a user needs no run");
        };
        assert_eq!(by_cert.identity.name(), "op");
        // A certificate naming no configured user leaves the token to decide.
        let other = ["someone-else".to_string()];
        assert!(matches!(
            auth.begin_token("op:s3cret", Some(&other), t0, &mut budget),
            Ok(Check::Verify(..))
        ));
        let Ok(Check::Verify(pending, verification)) =
            auth.begin_token("op:s3cret", Some(&op), t0, &mut budget)
        else {
            panic!("a run");
        };
        assert!(auth.finish(pending, verification.run()).is_ok());
        // A certificate of another configured user than the token's: found once the token
        // has verified, as when the check ran in one piece.
        let mut cfg = secure_config(&hash);
        let mut second = cfg.auth.users[0].clone();
        second.name = "op2".into();
        cfg.auth.users.push(second);
        let auth = Authenticator::new(&cfg.auth);
        let op2 = ["op2".to_string()];
        let Ok(Check::Verify(pending, verification)) =
            auth.begin_token("op:s3cret", Some(&op2), t0, &mut budget)
        else {
            panic!("a run");
        };
        assert_eq!(
            auth.finish(pending, verification.run()).unwrap_err(),
            AuthError::CertificateMismatch {
                user: "op".into(),
                certificate: "op2".into()
            }
        );
    }

    #[test]
    fn tokens_split_at_the_first_colon() {
        assert_eq!(Authenticator::split_token(""), Ok(None));
        assert_eq!(
            Authenticator::split_token("u:p:q"),
            Ok(Some(("u", &b"p:q"[..])))
        );
        assert_eq!(
            Authenticator::split_token("nocolon"),
            Err(AuthError::BadToken)
        );
        assert_eq!(Authenticator::split_token(":p"), Err(AuthError::BadToken));
    }
}
