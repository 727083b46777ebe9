//! The agent checks every manifest the server sends against the key it pinned at
//! enrolment before it stores anything. `verify` must never panic, must accept
//! exactly texts signed by the pinned key that parse as manifests, and must
//! refuse the key the answer itself carries when that is not the pinned one.
#![no_main]

use ed25519_dalek::{Signer, SigningKey};
use libfuzzer_sys::fuzz_target;
use lowtide_agent::server::{Manifest, SignedManifest};

fuzz_target!(|data: &[u8]| {
    let pinned = SigningKey::from_bytes(&[7; 32]);
    let pinned_hex = hex::encode(pinned.verifying_key().to_bytes());
    // 1. A whole answer from a hostile server or a man in the middle.
    if let Ok(sm) = serde_json::from_slice::<SignedManifest>(data) {
        let _ = sm.verify(&pinned_hex);
        // A pinned key read from a damaged credential file.
        let _ = sm.verify(&sm.public_key);
    }
    // 2. The bytes as manifest text, signed by an attacker's key that the answer carries.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let evil = SigningKey::from_bytes(&[9; 32]);
    let forged = SignedManifest {
        manifest: text.to_string(),
        signature: hex::encode(evil.sign(text.as_bytes()).to_bytes()),
        public_key: hex::encode(evil.verifying_key().to_bytes()),
    };
    assert!(forged.verify(&pinned_hex).is_err(), "accepted a manifest signed by another key");
    // 3. Signed by the pinned key: verifies iff it parses.
    let good = SignedManifest {
        signature: hex::encode(pinned.sign(text.as_bytes()).to_bytes()),
        public_key: pinned_hex.clone(),
        ..forged
    };
    match (good.verify(&pinned_hex), serde_json::from_str::<Manifest>(text)) {
        (Ok(m), Ok(p)) => assert_eq!(m, p),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("verify {a:?} disagrees with parse {b:?}"),
    }
});
