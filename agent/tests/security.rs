//! The security mechanisms of SECURITY.md, end to end with real agent
//! processes: the P2P deployment key comes from the server (no shared secret
//! in any config), follows a rotation, encrypted transfers between agents
//! work, and an agent keyed otherwise cannot talk to the others; the
//! server's TLS key is pinned at enrolment and a server with another key is
//! refused.

mod common;

use std::path::{Path, PathBuf};

use common::{data, Agent, Server, SECRET};
use lowtide_agent::server::Client;
use lowtide_agent::tls::PinVerifier;
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

    // e asks its peers to encrypt: everything still comes from them, byte-exact.
    let e = Agent::start_with(&srv, root.path(), "e", 64, "hq", "encrypt_p2p = true");
    let out_e = root.path().join("e.bin");
    let re = e.get_json(&id, &out_e);
    assert_eq!(std::fs::read(&out_e).unwrap(), bytes);
    assert_eq!(re["bytes_from_peers"], bytes.len() as u64, "{re}\n{}", e.log_text());

    // c overrides the server's key with a deployment_secret: a and b drop its packets, so
    // everything comes from the origin. Its site's RVP never answers it, and an agent waits
    // `rvp_wait_secs` for its site's RVP (600 s by default: this test took 10 minutes of CI);
    // what is tested here is the key, so c waits 10 s.
    let c = Agent::start_with(
        &srv,
        root.path(),
        "c",
        64,
        "hq",
        &format!("deployment_secret = {SECRET:?}\npeer_stall_secs = 2\nrvp_wait_secs = 10"),
    );
    let out_c = root.path().join("c.bin");
    let rc = c.get_json(&id, &out_c);
    assert_eq!(std::fs::read(&out_c).unwrap(), bytes);
    assert_eq!(rc["bytes_from_origin"], bytes.len() as u64, "{rc}");
    assert_eq!(rc["bytes_from_peers"], 0, "{rc}");
    let dropped = |x: &Agent| x.status()["dropped_datagrams"].as_u64().unwrap();
    assert!(dropped(&a) + dropped(&b) > 0, "{} {}", a.status(), b.status());
}

fn cert(name: &str) -> (PathBuf, PathBuf) {
    let (dir, stem) = match name {
        // The server crate's self-signed test certificate (localhost, 127.0.0.1).
        "test" => (
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../server/tests/data"),
            "test",
        ),
        _ => (Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data"), name),
    };
    (
        dir.join(format!("{stem}-cert.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

fn spki_of(pem: &Path) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(pem).unwrap();
    lowtide_agent::tls::spki_sha256(&der).unwrap()
}

#[test]
fn agents_pin_the_servers_tls_key_at_enrolment() {
    let (cert_a, key_a) = cert("test");
    // The hash `openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum` prints.
    let pin = spki_of(&cert_a);
    assert_eq!(pin, "101e9f12306fcaaba7ad70f62ab767d2465cc2491120e8ebf5b2ac7dcf223ae7");
    let srv = Server::start_tls(&cert_a, &key_a);
    assert!(srv.base.starts_with("https://"));
    let root = tempfile::tempdir().unwrap();
    let bytes = data(300_000, 9);
    let id = srv.publish(&bytes, "tool", "1.0");

    // Without a pin, a self-signed certificate is refused at enrolment, naming its key.
    let dir = root.path().join("nopin");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "server_url = {:?}\nenrol_token = {:?}\nstate_dir = {:?}\nlisten = \"127.0.0.1:0\"\n",
            srv.base,
            srv.token,
            dir.join("state")
        ),
    )
    .unwrap();
    let out = common::command()
        .args(["--config", config.to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("server_spki_sha256 = \"{pin}\"")), "{err}");
    assert!(!dir.join("state/credential.json").exists(), "nothing was written");

    // With the pin (written as openssl prints fingerprints), it enrols, keeps the pin and gets
    // the content from the server's own origin over https.
    let colons: Vec<String> = pin
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let a = Agent::start_with(
        &srv,
        root.path(),
        "a",
        64,
        "hq",
        &format!("server_spki_sha256 = {:?}", colons.join(":")),
    );
    assert_eq!(credential(&a)["server_spki_sha256"], pin.as_str());
    let out_a = root.path().join("a.bin");
    let ra = a.get_json(&id, &out_a);
    assert_eq!(std::fs::read(&out_a).unwrap(), bytes);
    assert_eq!(ra["bytes_from_origin"], bytes.len() as u64, "{ra}");
}

#[test]
fn a_pinned_client_refuses_a_server_with_another_key() {
    let (cert_a, key_a) = cert("test");
    let (cert_b, key_b) = cert("other");
    let (pin_a, pin_b) = (spki_of(&cert_a), spki_of(&cert_b));
    assert_ne!(pin_a, pin_b);
    let srv_a = Server::start_tls(&cert_a, &key_a);
    let srv_b = Server::start_tls(&cert_b, &key_b);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let pinned = PinVerifier::new(Some(pin_a.clone()), false).unwrap();
        Client::with_verifier(&srv_a.base, Some(&pinned))
            .unwrap()
            .health()
            .await
            .unwrap();
        assert_eq!(pinned.seen().as_deref(), Some(pin_a.as_str()));
        let e = Client::with_verifier(&srv_b.base, Some(&pinned))
            .unwrap()
            .health()
            .await
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains(&format!("presented a certificate with key {pin_b}")) && msg.contains("enrol again"),
            "{msg}"
        );
        // The system's trust store knows neither self-signed certificate.
        let system = PinVerifier::new(None, true).unwrap();
        let e = Client::with_verifier(&srv_b.base, Some(&system))
            .unwrap()
            .health()
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains(&pin_b), "{e:#}");
    });
}
