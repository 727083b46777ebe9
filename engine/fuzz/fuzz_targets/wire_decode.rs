//! Every datagram from the network goes through `wire::decode` first; it must
//! never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_engine::wire::{self, DeploymentKey};

fuzz_target!(|data: &[u8]| {
    let key = DeploymentKey([7; 32]);
    // As received: almost always stopped by the tag check.
    let _ = wire::decode(&key, data);
    // As an insider holding the key could send them: past the tag, into the body parsers.
    if data.len() >= 4 {
        let mut buf = data.to_vec();
        buf[..2].copy_from_slice(&wire::MAGIC);
        buf[2] = wire::VERSION;
        if wire::retag(&key, &mut buf) {
            assert!(!matches!(wire::decode(&key, &buf), Err(wire::WireError::BadTag)));
        }
    }
});
