//! Request bodies (and path parameters) of the agent endpoints and the admin
//! uploads, sent through the real router onto a real SQLite store. Whatever the
//! bytes, the answer must be a success or a 4xx with a JSON `error` reason:
//! a 5xx means bad input reached the database or a handler unchecked.
//!
//! The first byte picks the endpoint, the rest is the body (or the path id).
#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use lowtide_server::api::{self, App};
use lowtide_server::clock::Clock;
use lowtide_server::config::Config;
use lowtide_server::publish::{self, PublishRequest, PublishSource};
use lowtide_server::store::Store;
use lowtide_server::topology::Topology;
use tower::ServiceExt;

const ADMIN: &str = "fuzz-admin-token-0123456789";

struct Harness {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    credential: String,
    _dir: tempfile::TempDir,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (router, credential) = rt.block_on(async {
            let cfg = Config {
                state_dir: dir.path().to_path_buf(),
                public_url: Some("http://127.0.0.1:9".into()),
                admin_token: Some(ADMIN.into()),
                body_bytes_max: 64 * 1024,
                topology_bytes_max: 256 * 1024,
                db_connections_max: 1,
                ..Config::default()
            };
            let store = Store::open(&cfg.database_url(), 1).await.unwrap();
            let now = Clock::System.now_ms();
            let topo = Topology::parse_csv(
                b"id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.0/16,,\n\
                  br,Branch,hq,standard,10.1.0.0/16,1000,2000\n",
            )
            .unwrap();
            store.import_topology(&topo, now).await.unwrap();
            let token = store.create_token(1_000_000, 3_600_000_000, "fuzz", now).await.unwrap().token;
            let (_, credential) = store.enrol(&token, "fuzz-agent", now).await.unwrap();
            let file = dir.path().join("pkg.bin");
            std::fs::write(&file, vec![0x5a; 100_000]).unwrap();
            let app = App::new(store, cfg, Clock::System).await.unwrap();
            publish::publish(
                &app.store,
                &app.cfg.files_dir(),
                &app.cfg.public_url(),
                &PublishRequest {
                    name: "pkg".into(),
                    version: "1".into(),
                    source: PublishSource::Path(file),
                    origins: vec![],
                    store: true,
                },
                now,
            )
            .await
            .unwrap();
            (api::router(app), credential)
        });
        Harness {
            rt,
            router,
            credential,
            _dir: dir,
        }
    })
}

fn percent_encode(b: &[u8]) -> String {
    b.iter().map(|c| format!("%{c:02X}")).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else { return };
    let h = harness();
    let bearer = format!("Bearer {}", h.credential);
    let admin = format!("Bearer {ADMIN}");
    let (method, uri, auth): (Method, String, Option<&str>) = match which % 9 {
        0 => (Method::POST, "/v1/enroll".into(), None),
        1 => (Method::POST, "/v1/heartbeat".into(), Some(&bearer)),
        2 => (Method::PUT, "/v1/inventory".into(), Some(&bearer)),
        3 => (Method::POST, "/v1/traffic".into(), Some(&bearer)),
        4 => (Method::PUT, "/v1/admin/topology".into(), Some(&admin)),
        5 => (Method::POST, "/v1/admin/tokens".into(), Some(&admin)),
        6 => (Method::GET, format!("/v1/content/{}/sources", percent_encode(body)), Some(&bearer)),
        7 => (Method::GET, format!("/v1/content/{}/manifest", percent_encode(body)), Some(&bearer)),
        _ => (Method::POST, "/v1/heartbeat".into(), Some(std::str::from_utf8(body).unwrap_or("x"))),
    };
    let mut req = Request::builder().method(method).uri(&uri);
    if let Some(a) = auth {
        let Ok(v) = axum::http::HeaderValue::from_str(a) else { return };
        req = req.header("authorization", v);
    }
    let req = req.body(Body::from(body.to_vec())).unwrap();
    let router = h.router.clone();
    h.rt.block_on(async move {
        let resp = router.oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert!(
            !status.is_server_error(),
            "{uri}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        if status.is_client_error() {
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("4xx answers are JSON");
            assert!(v["error"].is_string(), "4xx answer without a reason: {v}");
        }
    });
});
