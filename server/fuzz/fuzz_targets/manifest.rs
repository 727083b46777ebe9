//! Signed manifests come back from the database (and, through agents, from the
//! network); `SignedManifest::verify` must never panic, must accept exactly the
//! texts signed by the key it is given, and must refuse any other key or a
//! changed byte.
#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use lowtide_server::store::{Manifest, SignedManifest};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7; 32]);
    let public = hex::encode(key.verifying_key().to_bytes());
    // 1. Anything at all, as a JSON answer: parse, then verify against our key.
    if let Ok(sm) = serde_json::from_slice::<SignedManifest>(data) {
        let _ = sm.verify(&public);
        let _ = sm.verify(&sm.public_key);
    }
    // 2. The bytes as the manifest text, signed by us: verifies iff the text is a manifest.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let sm = SignedManifest {
        manifest: text.to_string(),
        signature: hex::encode(key.sign(text.as_bytes()).to_bytes()),
        public_key: public.clone(),
    };
    let parsed = serde_json::from_str::<Manifest>(text);
    match (sm.verify(&public), parsed) {
        (Ok(m), Ok(p)) => assert_eq!(m, p),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("verify {a:?} disagrees with parse {b:?}"),
    }
    // 3. Another key, or one flipped bit of the text, never verifies.
    let other = hex::encode(SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes());
    assert!(sm.verify(&other).is_err());
    if !text.is_empty() {
        let mut bytes = text.as_bytes().to_vec();
        let i = bytes.len() / 2;
        bytes[i] ^= 1;
        if let Ok(t) = String::from_utf8(bytes) {
            let forged = SignedManifest { manifest: t, ..sm.clone() };
            assert!(forged.verify(&public).is_err(), "a changed manifest verified");
        }
    }
});
