//! The security mechanisms of SECURITY.md, end to end with real agent
//! processes: the P2P deployment key comes from the server (no shared secret
//! in any config), follows a rotation, and an agent keyed otherwise cannot
//! talk to the others.

mod common;

use common::{data, Agent, Server, SECRET};
use serde_json::Value;

fn credential(a: &Agent) -> Value {
    serde_json::from_slice(&std::fs::read(a.state_dir().join("credential.json")).unwrap()).unwrap()
}

#[test]
fn agents_key_p2p_with_the_servers_key_and_follow_its_rotation() {
    let srv = Server::start();
    let root = tempfile::tempdir().unwrap();
    let bytes = data(1024 * 1024 + 77, 3);
    let id = srv.publish(&bytes, "tool", "1.0");
    let a = Agent::start(&srv, root.path(), "a", 64);
    let first = credential(&a)["deployment_key"].as_str().unwrap().to_string();
    assert_eq!(first.len(), 64, "the enrolment handed out a key: {}", credential(&a));
    let ra = a.get_json(&id, &root.path().join("a.bin"));
    assert_eq!(ra["bytes_from_origin"], bytes.len() as u64, "{ra}");

    // Rotate: a learns the new key with its next heartbeat (1 s) and keeps the old one as previous.
    let keys = srv.rotate_key();
    assert_ne!(keys.current, first);
    assert_eq!(keys.previous.as_deref(), Some(first.as_str()));
    let mut seen = Value::Null;
    for _ in 0..100 {
        seen = credential(&a);
        if seen["deployment_key"] == keys.current.as_str() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(seen["deployment_key"], keys.current.as_str(), "{seen}");
    assert_eq!(seen["deployment_key_previous"], first.as_str(), "{seen}");

    // b enrols after the rotation (new key only): it gets everything from a, whose engine was re-keyed.
    let b = Agent::start(&srv, root.path(), "b", 64);
    assert_eq!(credential(&b)["deployment_key"], keys.current.as_str());
    let out_b = root.path().join("b.bin");
    let rb = b.get_json(&id, &out_b);
    assert_eq!(std::fs::read(&out_b).unwrap(), bytes);
    assert_eq!(rb["bytes_from_peers"], bytes.len() as u64, "{rb}\n{}", b.log_text());

    // c overrides the server's key with a deployment_secret: a and b drop its packets, so
    // everything comes from the origin.
    let c = Agent::start_with(
        &srv,
        root.path(),
        "c",
        64,
        "hq",
        &format!("deployment_secret = {SECRET:?}\npeer_stall_secs = 2"),
    );
    let out_c = root.path().join("c.bin");
    let rc = c.get_json(&id, &out_c);
    assert_eq!(std::fs::read(&out_c).unwrap(), bytes);
    assert_eq!(rc["bytes_from_origin"], bytes.len() as u64, "{rc}");
    assert_eq!(rc["bytes_from_peers"], 0, "{rc}");
    let dropped = |x: &Agent| x.status()["dropped_datagrams"].as_u64().unwrap();
    assert!(dropped(&a) + dropped(&b) > 0, "{} {}", a.status(), b.status());
}
