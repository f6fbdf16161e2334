//! Arbitrary HTTP request heads into `basic_credentials` (the `Authorization: Basic` header of
//! `/metrics` and `/stats`): never a panic, and what it returns is a non-empty user without
//! ':' whose `user:secret` re-encodes to a header it reads back the same.
#![no_main]

use base64::Engine as _;
use lanpush::metrics::basic_credentials;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|head: &[u8]| {
    if let Some((user, secret)) = basic_credentials(head) {
        assert!(!user.is_empty() && !user.contains(':'));
        let mut pair = user.clone().into_bytes();
        pair.push(b':');
        pair.extend_from_slice(&secret);
        let again = format!(
            "GET / HTTP/1.1\r\nAuthorization: Basic {}\r\n\r\n",
            base64::engine::general_purpose::STANDARD.encode(&pair)
        );
        assert_eq!(basic_credentials(again.as_bytes()), Some((user, secret)));
    }
});
