//! argon2 runs off the reactor, against the real binary: with one reactor, a HELLO whose
//! password check takes most of a second (deliberately expensive argon2 parameters) does not
//! hold back the reactor's other connections (docs/SECURITY.md, "Where argon2 runs").

mod util;

use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use util::{Got, Raw, Server, TempFile};

/// How long the slow user's check should take: long enough that a blocked reactor is obvious,
/// short enough for CI.
const TARGET: Duration = Duration::from_millis(700);

/// An argon2id PHC string of `secret` whose check takes about [`TARGET`] on this machine
/// (19 MiB like `lanpush passwd`, more passes), and how long making it took: a check costs the
/// same run.
fn expensive_hash(secret: &[u8]) -> (String, Duration) {
    let salt = SaltString::encode_b64(b"lanpush-test-salt").expect("salt");
    let hash_with = |passes: u32| {
        let params = Params::new(19_456, passes, 1, None).expect("params");
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let start = Instant::now();
        let phc = argon2
            .hash_password(secret, &salt)
            .expect("hash")
            .to_string();
        (phc, start.elapsed())
    };
    // Calibrated on this machine: the passes that make TARGET, from the cost of eight (after
    // one run that pays for the first touch of the memory).
    hash_with(2);
    let (_, eight) = hash_with(8);
    let passes = (TARGET.as_secs_f64() / eight.as_secs_f64() * 8.0).clamp(8.0, 800.0) as u32;
    hash_with(passes)
}

#[test]
fn a_slow_password_check_does_not_hold_back_the_reactors_other_connections() {
    let (phc, cost) = expensive_hash(b"slow-pw");
    let config = format!(
        r#"
[limits]
handshake_timeout_ms = 30000

[auth]
anonymous = true
[[auth.users]]
name = "slow"
secret_hash = "{phc}"
"#
    );
    let file = TempFile::new("engine.toml", &config);
    let server = Server::start_with(&["--threads", "1", "--config", file.path_str()]);
    let addr = server.addr;

    let mut bystander = Raw::connect(addr);
    bystander.hello(0);
    bystander.ping(1, Duration::from_secs(5));

    let mut slow = Raw::connect(addr);
    let start = Instant::now();
    slow.send_hello_as("slow-client", 0, "slow:slow-pw");
    // PING the other connection of the same reactor until the slow HELLO is answered: had the
    // reactor made the argon2 run itself, one of these PONGs would wait for all of it.
    let (mut pings, mut worst) = (0u64, Duration::ZERO);
    let welcomed = loop {
        assert!(
            start.elapsed() < cost * 10 + Duration::from_secs(10),
            "no WELCOME for the slow HELLO"
        );
        pings += 1;
        worst = worst.max(bystander.ping(1 + pings, Duration::from_secs(30)));
        match slow.read(Duration::from_millis(10)) {
            None => continue,
            Some(Got::Welcome(_)) => break start.elapsed(),
            Some(other) => panic!("expected WELCOME, got {other:?}"),
        }
    };
    assert!(
        welcomed >= cost / 2,
        "the check took {welcomed:?}: it did not run the {cost:?} argon2"
    );
    assert!(
        worst < cost / 4,
        "a PONG waited {worst:?} while a {cost:?} check ran: the reactor was blocked"
    );
    assert!(
        pings >= 3,
        "only {pings} PINGs answered during a {welcomed:?} check"
    );
    eprintln!(
        "slow check {cost:?} (WELCOME after {welcomed:?}); {pings} PINGs meanwhile, worst round \
         trip {worst:?}"
    );
    // Remembered now: a second HELLO with that secret is answered without a run.
    let mut again = Raw::connect(addr);
    let start = Instant::now();
    again.hello_as("slow-again", "slow:slow-pw");
    assert!(start.elapsed() < cost / 2, "{:?}", start.elapsed());
}
