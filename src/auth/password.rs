//! Secrets as argon2 PHC strings, and the keyed digest that remembers a verified one.

use std::io::Read;
use std::sync::OnceLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use blake2::digest::{KeyInit, Mac};

/// Why `lanpush passwd` could not make a hash.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("the password is empty")]
    Empty,
    #[error("cannot read random bytes for the salt: {0}")]
    Random(std::io::Error),
    #[error("argon2: {0}")]
    Hash(String),
}

/// A salted argon2id PHC string for `password`, with the argon2 crate's default parameters
/// (19 MiB, 2 passes, 1 lane).
pub fn hash_password(password: &[u8]) -> Result<String, PasswordError> {
    if password.is_empty() {
        return Err(PasswordError::Empty);
    }
    let salt_bytes: [u8; 16] = read_random().map_err(PasswordError::Random)?;
    let salt =
        SaltString::encode_b64(&salt_bytes).map_err(|e| PasswordError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether the PHC string is an argon2 hash this build can verify (checked at config load).
pub fn check_phc(phc: &str) -> Result<(), String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    match hash.algorithm.as_str() {
        "argon2id" | "argon2i" | "argon2d" => {}
        other => return Err(format!("algorithm {other:?} is not argon2")),
    }
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err("no salt or no hash".into());
    }
    argon2::Params::try_from(&hash).map_err(|e| format!("argon2 parameters: {e}"))?;
    Ok(())
}

/// Whether `secret` matches the PHC string (false for a malformed one).
pub(crate) fn verify(phc: &str, secret: &[u8]) -> bool {
    PasswordHash::new(phc)
        .map(|hash| Argon2::default().verify_password(secret, &hash).is_ok())
        .unwrap_or(false)
}

/// A hash no secret is known for, with the default parameters, made once.
pub(crate) fn dummy_hash() -> String {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY
        .get_or_init(|| {
            // Any secret will do, nobody is told it: an unknown user is refused whatever.
            let secret: [u8; 16] = random_bytes();
            hash_password(&secret).unwrap_or_default()
        })
        .clone()
}

/// Keyed BLAKE2b-256 of `secret`: what the verified-secret cache keeps instead of the secret.
pub(crate) fn keyed_digest(key: &[u8; 32], secret: &[u8]) -> [u8; 32] {
    // A 32-byte key is within BLAKE2b's 64-byte limit, so `new_from_slice` cannot fail.
    let mut mac = <blake2::Blake2bMac<blake2::digest::consts::U32> as KeyInit>::new_from_slice(key)
        .expect("a 32-byte key fits BLAKE2b");
    mac.update(secret);
    mac.finalize().into_bytes().into()
}

/// Compares two digests in constant time.
pub(crate) fn digests_equal(a: &[u8; 32], b: &[u8; 32]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

fn read_random<const N: usize>() -> std::io::Result<[u8; N]> {
    let mut buf = [0u8; N];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// Random bytes for a per-process key; if the kernel's generator cannot be read, a key from
/// the standard library's randomly seeded hasher (weaker, but never a constant).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    read_random().unwrap_or_else(|_| {
        use std::hash::{BuildHasher, RandomState};
        let mut out = [0u8; N];
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let word = RandomState::new().hash_one(i).to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_verifies_its_password_only_and_is_salted() {
        let a = hash_password(b"pw").unwrap();
        let b = hash_password(b"pw").unwrap();
        assert_ne!(a, b, "salted");
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert!(check_phc(&a).is_ok());
        assert!(verify(&a, b"pw"));
        assert!(!verify(&a, b"pw2"));
        assert!(check_phc("$md5$x").is_err());
        assert!(check_phc("plain").is_err());
        assert!(matches!(hash_password(b""), Err(PasswordError::Empty)));
    }
}
