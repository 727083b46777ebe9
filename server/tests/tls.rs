//! The API over HTTPS (`tls_cert` / `tls_key`), with a self-signed test
//! certificate for localhost and 127.0.0.1 (tests/data, valid until 2126).

mod common;

use std::sync::Arc;

use common::{Db, TestDb, ADMIN};
use lowtide_server::api::{self, App};
use lowtide_server::clock::Clock;
use lowtide_server::config::Config;
use lowtide_server::store::Store;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn data(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

async fn https_get(addr: std::net::SocketAddr, path: &str, auth: &str) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(data("test-cert.pem")).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the test certificate");
    let req =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {auth}\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn api_over_https(db: Db) {
    let Some(tdb) = TestDb::new(db).await else { return };
    let cfg = Config {
        state_dir: tdb.dir.path().to_path_buf(),
        database_url: Some(tdb.url.clone()),
        admin_token: Some(ADMIN.into()),
        tls_cert: Some(data("test-cert.pem")),
        tls_key: Some(data("test-key.pem")),
        ..Config::default()
    };
    cfg.check().unwrap();
    let tls =
        api::load_tls(cfg.tls_cert.as_ref().unwrap(), cfg.tls_key.as_ref().unwrap()).expect("test certificate loads");
    let store = Store::open(&cfg.database_url(), 2).await.unwrap();
    let app = App::new(store.clone(), cfg, Clock::manual(common::T0_MS))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve_tls(app, listener, tls, async move {
        let _ = stopped.await;
    }));
    let r = https_get(addr, "/healthz", "").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let r = https_get(addr, "/v1/admin/agents", ADMIN).await;
    assert!(r.starts_with("HTTP/1.1 200") && r.ends_with("[]"), "{r}");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
    store.close().await;
    tdb.drop_db().await;
}

#[test]
fn tls_config_needs_cert_and_key_together() {
    let cfg = Config {
        tls_cert: Some(data("test-cert.pem")),
        ..Config::default()
    };
    assert!(cfg
        .check()
        .unwrap_err()
        .to_string()
        .contains("tls_cert and tls_key go together"));
    let err = api::load_tls(&data("test-key.pem"), &data("test-key.pem")).unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
}

both!(api_over_https);
