//! Test harness: a real server on 127.0.0.1 over a real database (a fresh
//! SQLite file, or a fresh PostgreSQL database created for the test), with a
//! hand-driven clock.
//!
//! PostgreSQL comes from `LOWTIDE_TEST_PG_URL` (scripts/test.sh starts one with
//! scripts/pg-test.sh). Without it the PostgreSQL half of each test is skipped
//! with a loud message, except under `CI=true`, where that is a failure.

#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::sync::Arc;

use lowtide_server::api::{self, App};
use lowtide_server::clock::Clock;
use lowtide_server::config::Config;
use lowtide_server::store::Store;
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token-0123456789";
/// A fixed start time: 2026-01-01T00:00:00Z.
pub const T0_MS: i64 = 1_767_225_600_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Db {
    Sqlite,
    Postgres,
}

/// Run `$name(Db)` once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(super::common::Db::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(super::common::Db::Postgres).await
            }
        }
    )*};
}

/// A database for one test: its URL, and what to drop afterwards.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    pg_admin: Option<(String, String)>,
}

impl TestDb {
    /// `None` when PostgreSQL is wanted but not configured (outside CI).
    pub async fn new(db: Db) -> Option<Self> {
        let dir = tempfile::tempdir().expect("tempdir");
        match db {
            Db::Sqlite => Some(Self {
                url: format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display()),
                dir,
                pg_admin: None,
            }),
            Db::Postgres => {
                let Ok(base) = std::env::var("LOWTIDE_TEST_PG_URL") else {
                    if std::env::var("CI").is_ok_and(|v| v == "true") {
                        panic!("LOWTIDE_TEST_PG_URL is not set but CI=true: scripts/test.sh must start PostgreSQL with scripts/pg-test.sh");
                    }
                    // Straight to stderr, not eprintln!: the test harness would swallow that for a passing test.
                    use std::io::Write;
                    let _ = writeln!(
                        std::io::stderr(),
                        "\n*** SKIPPED the PostgreSQL half of this test: LOWTIDE_TEST_PG_URL is not set. \
                         Run `eval \"$(scripts/pg-test.sh env)\"` first (scripts/test.sh does). ***\n"
                    );
                    return None;
                };
                let name = format!("lt_test_{}", hex::encode(rand::random::<[u8; 6]>()));
                let mut conn = connect(&base).await;
                exec(&mut conn, format!("CREATE DATABASE {name}")).await;
                let (prefix, _) = base.rsplit_once('/').expect("LOWTIDE_TEST_PG_URL ends in /<database>");
                Some(Self {
                    url: format!("{prefix}/{name}"),
                    dir,
                    pg_admin: Some((base, name)),
                })
            }
        }
    }

    pub async fn drop_db(&self) {
        if let Some((base, name)) = &self.pg_admin {
            let mut conn = connect(base).await;
            exec(&mut conn, format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
}

async fn connect(url: &str) -> sqlx::AnyConnection {
    use sqlx::Connection;
    sqlx::any::install_default_drivers();
    sqlx::AnyConnection::connect(url)
        .await
        .expect("connect to LOWTIDE_TEST_PG_URL")
}

async fn exec(conn: &mut sqlx::AnyConnection, sql: String) {
    use sqlx::Executor;
    conn.execute(sqlx::AssertSqlSafe(sql))
        .await
        .expect("admin statement on PostgreSQL");
}

/// One running server.
pub struct Server {
    pub base: String,
    pub app: Arc<App>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    pub async fn start(db: &TestDb, clock: Clock, tweak: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = Config {
            state_dir: db.dir.path().to_path_buf(),
            database_url: Some(db.url.clone()),
            admin_token: Some(ADMIN.into()),
            inactive_after_secs: 300,
            peers_active_max: 8,
            body_bytes_max: 64 * 1024,
            topology_bytes_max: 256 * 1024,
            db_connections_max: 4,
            ..Config::default()
        };
        tweak(&mut cfg);
        let store = Store::open(&cfg.database_url(), cfg.db_connections_max)
            .await
            .expect("open store");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let base = format!("http://{}", listener.local_addr().unwrap());
        cfg.public_url = Some(base.clone());
        let app = App::new(store, cfg, clock).await.expect("app");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(app.clone(), listener, async move {
            let _ = rx.await;
        }));
        Self {
            base,
            app,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server shut down cleanly");
        }
        self.app.store.close().await;
    }
}

/// A test: database, server, client, clock.
pub struct H {
    pub db: TestDb,
    pub srv: Server,
    pub clock: Clock,
    pub http: reqwest::Client,
}

pub struct Resp {
    pub status: u16,
    pub body: Vec<u8>,
    pub headers: reqwest::header::HeaderMap,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// The `error` reason of a 4xx answer.
    pub fn reason(&self) -> String {
        self.json()["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error reason in {}", self.text()))
            .to_string()
    }
}

impl H {
    pub async fn start(db: Db) -> Option<Self> {
        Self::start_with(db, |_| {}).await
    }

    pub async fn start_with(db: Db, tweak: impl FnOnce(&mut Config)) -> Option<Self> {
        let db = TestDb::new(db).await?;
        lowtide_server::install_tls_provider();
        let clock = Clock::manual(T0_MS);
        let srv = Server::start(&db, clock.clone(), tweak).await;
        Some(Self {
            db,
            srv,
            clock,
            http: reqwest::Client::new(),
        })
    }

    pub async fn finish(self) {
        self.srv.stop().await;
        self.db.drop_db().await;
    }

    pub async fn req(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Vec<u8>>,
        extra: &[(&str, &str)],
    ) -> Resp {
        let url = format!("{}{}", self.srv.base, path);
        let mut r = self.http.request(method.parse().unwrap(), url);
        if let Some(a) = auth {
            r = r.header("authorization", format!("Bearer {a}"));
        }
        for (k, v) in extra {
            r = r.header(*k, *v);
        }
        if let Some(b) = body {
            r = r.body(b);
        }
        let resp = r.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.expect("body").to_vec();
        Resp { status, body, headers }
    }

    pub async fn get(&self, path: &str, auth: Option<&str>) -> Resp {
        self.req("GET", path, auth, None, &[]).await
    }

    pub async fn send(&self, method: &str, path: &str, auth: Option<&str>, v: &Value) -> Resp {
        self.req(
            method,
            path,
            auth,
            Some(serde_json::to_vec(v).unwrap()),
            &[("content-type", "application/json")],
        )
        .await
    }

    /// Create a token with `uses` uses through the admin API.
    pub async fn token(&self, uses: i64) -> String {
        let r = self
            .send(
                "POST",
                "/v1/admin/tokens",
                Some(ADMIN),
                &serde_json::json!({"uses": uses, "note": "test"}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["token"].as_str().unwrap().to_string()
    }

    /// Enrol one agent and return (agent id, credential).
    pub async fn enrol(&self, token: &str, hostname: &str) -> (String, String) {
        let r = self
            .send(
                "POST",
                "/v1/enroll",
                None,
                &serde_json::json!({"token": token, "hostname": hostname}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        (
            v["agent_id"].as_str().unwrap().to_string(),
            v["credential"].as_str().unwrap().to_string(),
        )
    }

    pub async fn heartbeat(&self, cred: &str, facts: Value) -> Resp {
        self.send("POST", "/v1/heartbeat", Some(cred), &facts).await
    }

    pub async fn import_csv(&self, csv: &str) -> Resp {
        self.req(
            "PUT",
            "/v1/admin/topology",
            Some(ADMIN),
            Some(csv.as_bytes().to_vec()),
            &[("content-type", "text/csv")],
        )
        .await
    }

    /// Publish `data` from a file through the admin API; returns the content id.
    pub async fn publish_bytes(&self, name: &str, data: &[u8]) -> String {
        let p = self.db.dir.path().join(format!("{name}.pkg"));
        std::fs::write(&p, data).unwrap();
        let r = self
            .send(
                "POST",
                "/v1/admin/content",
                Some(ADMIN),
                &serde_json::json!({"name": name, "version": "1.0", "path": p}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["id"].as_str().unwrap().to_string()
    }

    pub async fn agents(&self) -> Vec<Value> {
        let r = self.get("/v1/admin/agents", Some(ADMIN)).await;
        assert_eq!(r.status, 200, "{}", r.text());
        r.json().as_array().unwrap().clone()
    }
}

/// Deterministic test bytes.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}
