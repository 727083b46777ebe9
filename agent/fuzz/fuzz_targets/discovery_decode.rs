//! Every discovery datagram goes through `discovery::wire::decode` and then
//! the discovery core; neither may panic, whatever the bytes, and a query
//! (content or manifest) that decodes encodes back to the same bytes; no
//! answer is larger than its query.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_agent::discovery::{wire, Core, DiscoveryKey, Incoming};
use lowtide_engine::wire::DeploymentKey;

const NOW: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let key = DiscoveryKey::from_deployment(&DeploymentKey([7; 32]));
    // As received from anyone: almost always stopped by the length or tag check.
    let _ = wire::decode(&key, data, NOW);
    let mut core = Core::new(key.clone(), 1, 4500, 90_000);
    let from = "10.0.0.9:4501".parse().unwrap();
    let _ = core.on_datagram(NOW, from, data);
    // As an insider holding the key could send them: past the tag, into the field checks.
    if data.len() >= 16 {
        let mut buf = data.to_vec();
        buf[..2].copy_from_slice(&wire::MAGIC);
        buf[2] = wire::VERSION;
        // Mostly fresh, so the checks after the clock are reached too.
        if data[15] & 1 == 0 {
            buf[8..16].copy_from_slice(&(NOW - u64::from(data[14]) * 100).to_le_bytes());
        }
        if wire::retag(&key, &mut buf) {
            match wire::decode(&key, &buf, NOW) {
                Err(wire::DecodeError::Tag) => panic!("a packet tagged with the key failed the tag check"),
                Ok(m) if m.kind == wire::KIND_QUERY => {
                    let again = wire::encode_query(&key, m.sent_ms, m.sender, m.nonce, m.content, m.port);
                    assert_eq!(&again[..], &buf[..], "a query decodes and encodes back to itself");
                    if let Incoming::Query { msg, .. } = core.on_datagram(NOW, from, &buf) {
                        let r = core.reply(NOW, &msg, 500, false, true);
                        assert!(r.len() < buf.len(), "a reply is smaller than its query");
                    }
                }
                Ok(m) if m.kind == wire::KIND_MANIFEST_QUERY => {
                    let content = m.content.expect("a manifest query names its content");
                    let again =
                        wire::encode_manifest_query(&key, m.sent_ms, m.sender, m.nonce, content, m.port, m.offset);
                    assert_eq!(&again[..], &buf[..], "a manifest query decodes and encodes back to itself");
                    if let Incoming::Query { msg, .. } = core.on_datagram(NOW, from, &buf) {
                        // The input itself as the kept signed manifest.
                        if let Some(r) = core.manifest_chunk(NOW, &msg, data) {
                            assert!(r.len() < buf.len(), "a chunk is smaller than its query");
                        }
                    }
                }
                Ok(m) if m.kind == wire::KIND_MANIFEST_CHUNK => {
                    assert_eq!(wire::chunk_data(&buf, &m).len(), m.len as usize);
                    assert!(m.offset as u64 + m.len as u64 <= m.total as u64);
                    let _ = core.on_datagram(NOW, from, &buf);
                }
                _ => {
                    let _ = core.on_datagram(NOW, from, &buf);
                }
            }
        }
    }
});
