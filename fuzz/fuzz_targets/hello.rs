//! Arbitrary bytes as the body of a HELLO, the first frame a stranger sends: the decoder and the
//! token split must never panic, a decoded HELLO must re-encode to what decodes the same (the
//! optional trailing token included: absent, empty and present), its `Debug` must never show
//! the token, and a split token must give back exactly the user and secret it holds.
#![no_main]

use lanpush::auth::Authenticator;
use lanpush::proto::{decode_frame, encode_frame, Decoded, Frame, KIND_HELLO};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let mut bytes = Vec::with_capacity(body.len() + 5);
    bytes.extend_from_slice(&(body.len() as u32 + 1).to_le_bytes());
    bytes.push(KIND_HELLO);
    bytes.extend_from_slice(body);
    let Ok(Decoded::Frame(Frame::Hello(hello), used)) = decode_frame(&bytes, 1 << 20) else {
        return;
    };
    assert_eq!(used, bytes.len());
    let mut again = Vec::new();
    encode_frame(&mut again, &Frame::Hello(hello.clone()));
    match decode_frame(&again, 1 << 20) {
        Ok(Decoded::Frame(Frame::Hello(same), n)) => {
            assert_eq!(same, hello);
            assert_eq!(n, again.len());
        }
        other => panic!("re-encoded {hello:?} decodes as {other:?}"),
    }
    if !hello.token.is_empty() {
        // Debug is the same whatever the (non-empty) token: it shows none of it.
        let other = lanpush::proto::Hello {
            token: "x".into(),
            ..hello.clone()
        };
        assert_eq!(format!("{hello:?}"), format!("{other:?}"), "Debug shows the token");
    }
    match Authenticator::split_token(&hello.token) {
        Ok(None) => assert!(hello.token.is_empty()),
        Ok(Some((user, secret))) => {
            assert!(!user.is_empty() && !user.contains(':'));
            let mut joined = format!("{user}:").into_bytes();
            joined.extend_from_slice(secret);
            assert_eq!(joined, hello.token.as_bytes());
        }
        Err(_) => assert!(!hello.token.is_empty()),
    }
});
