//! The HTTP API: agent endpoints, admin endpoints, `/files` (origin with Range
//! support), `/metrics`, `/openapi.json`, `/healthz`. Routes and their auth are
//! listed in [`crate::openapi::ROUTES`].
//!
//! Every error is a JSON object `{"error": "..."}` (plus `errors` with line
//! numbers for CSV uploads) with a 4xx status that says whose fault it is.
//! Bodies are read whole, bounded by `body_bytes_max` (`topology_bytes_max`
//! for CSV uploads), and parsed here so that a malformed body gets a message
//! naming the line and column.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use lowtide_engine::content::ContentId;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tower::ServiceExt;

use crate::clock::{Clock, Stopwatch};
use crate::config::Config;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::publish::{self, PublishRequest};
use crate::store::{
    AgentAuth, AssignmentsAnswer, AssignmentsRequest, Enrolled, Facts, HeartbeatReply, Inventory, Store, TrafficReport,
};
use crate::topology::{self, Topology};

/// Shared state of the HTTP handlers.
pub struct App {
    pub store: Store,
    pub cfg: Config,
    pub clock: Clock,
    pub metrics: Metrics,
    /// Hex Ed25519 public key that signs manifests.
    pub public_key: String,
}

impl App {
    pub async fn new(store: Store, cfg: Config, clock: Clock) -> Result<Arc<Self>, Error> {
        let key = store.signing_key().await?;
        store.set_heartbeat_secs(cfg.heartbeat_secs);
        Ok(Arc::new(Self {
            store,
            cfg,
            clock,
            metrics: Metrics::default(),
            public_key: hex::encode(key.verifying_key().to_bytes()),
        }))
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Agents last seen at or after this time are active.
    fn active_since(&self) -> i64 {
        self.now().saturating_sub(self.cfg.inactive_after_ms())
    }

    fn cap(&self) -> usize {
        self.cfg.peers_active_max as usize
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = match &self {
            Error::Invalid { message, errors } => serde_json::json!({"error": message, "errors": errors}),
            e => serde_json::json!({"error": e.to_string()}),
        };
        (status, Json(body)).into_response()
    }
}

type ApiResult = Result<Response, Error>;

fn body(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<Bytes, Error> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Error::TooLarge(format!(
                "request body is larger than the {limit} bytes this endpoint accepts; nothing was written"
            ))
        } else {
            Error::BadRequest(format!("could not read the request body: {r}"))
        }
    })
}

fn json_body<T: DeserializeOwned>(b: Result<Bytes, BytesRejection>, limit: usize) -> Result<T, Error> {
    let b = body(b, limit)?;
    serde_json::from_slice(&b).map_err(|e| {
        Error::BadRequest(format!(
            "request body is not the JSON this endpoint takes: {e}; nothing was written"
        ))
    })
}

fn bearer(h: &HeaderMap) -> Result<&str, Error> {
    let v = h.get(header::AUTHORIZATION).ok_or_else(|| {
        Error::Unauthorized("missing Authorization header: send `Authorization: Bearer <credential>`".into())
    })?;
    v.to_str()
        .ok()
        .and_then(|s| s.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| Error::Unauthorized("Authorization header must be `Bearer <credential>`".into()))
}

fn admin(app: &App, h: &HeaderMap) -> Result<(), Error> {
    let Some(want) = &app.cfg.admin_token else {
        return Err(Error::Forbidden(
            "the HTTP admin API is off: set admin_token in the config or LOWTIDE_ADMIN_TOKEN".into(),
        ));
    };
    let got = bearer(h)?;
    // Compare hashes so the comparison time says nothing about the token.
    if blake3::hash(got.as_bytes()) != blake3::hash(want.as_bytes()) {
        return Err(Error::Unauthorized("wrong admin token".into()));
    }
    Ok(())
}

async fn agent(app: &App, h: &HeaderMap) -> Result<AgentAuth, Error> {
    app.store.authenticate(bearer(h)?).await
}

fn content_id(s: &str) -> Result<ContentId, Error> {
    s.parse()
        .map_err(|e: lowtide_engine::content::ParseContentIdError| Error::BadRequest(e.to_string()))
}

fn json<T: serde::Serialize>(v: &T) -> ApiResult {
    Ok(Json(v).into_response())
}

fn csv_response(text: String) -> ApiResult {
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/csv; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

// ---- agent endpoints ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    token: String,
    #[serde(default)]
    hostname: String,
}

async fn enroll(State(app): State<Arc<App>>, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let req: EnrollRequest = json_body(b, app.cfg.body_bytes_max)?;
    let keys = app.store.deployment_keys(app.now()).await?;
    let (agent_id, credential) = app.store.enrol(&req.token, &req.hostname, app.now()).await?;
    tracing::info!(agent = %agent_id, hostname = %req.hostname, "enrolled");
    json(&Enrolled {
        agent_id,
        credential,
        server_public_key: app.public_key.clone(),
        heartbeat_secs: app.cfg.heartbeat_secs,
        deployment_key: keys.current,
        deployment_key_previous: keys.previous,
    })
}

async fn heartbeat(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let cred = bearer(&h)?;
    let facts: Facts = json_body(b, app.cfg.body_bytes_max)?;
    let now = app.now();
    let (agent_id, site) = app.store.heartbeat(cred, &facts, now).await?;
    let site_kind = match &site {
        Some(s) => app.store.topology(now).await?.site(s).map(|s| s.kind),
        None => None,
    };
    let keys = app.store.deployment_keys(now).await?;
    json(&HeartbeatReply {
        agent_id,
        site,
        site_kind,
        heartbeat_secs: app.cfg.heartbeat_secs,
        deployment_key: keys.current,
        deployment_key_previous: keys.previous,
    })
}

async fn inventory(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let a = agent(&app, &h).await?;
    let inv: Inventory = json_body(b, app.cfg.body_bytes_max)?;
    let n = app.store.update_inventory(&a, &inv, app.now()).await?;
    json(&serde_json::json!({"recorded": n}))
}

async fn traffic(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let a = agent(&app, &h).await?;
    let t: TrafficReport = json_body(b, app.cfg.body_bytes_max)?;
    app.store.add_traffic(&a, &t).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn sources(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let id = content_id(&id)?;
    let a = agent(&app, &h).await?;
    json(
        &app.store
            .sources(&a, &id, app.active_since(), app.cap(), app.now())
            .await?,
    )
}

/// Longest an assignments request may wait for something new.
pub const ASSIGNMENTS_WAIT_MS_MAX: u64 = 25_000;
/// While an assignments request waits, the database is read again this often anyway
/// (another server process may have recorded the change).
pub const ASSIGNMENTS_RECHECK_MS: u64 = 2_000;

/// What the agent should fetch for its site as its RVP. Long poll: answers at once when
/// there is an assignment not in `running`, else when one appears (or an RVP is elected),
/// else after `wait_ms`.
async fn assignments(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    let mut a = agent(&app, &h).await?;
    let req: AssignmentsRequest = json_body(b, app.cfg.body_bytes_max)?;
    app.store.rvp_polled(&a.id, app.now()).await?;
    let wait = std::time::Duration::from_millis(req.wait_ms.min(ASSIGNMENTS_WAIT_MS_MAX));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before the read, so a change during the read is not missed.
        let changed = app.store.assignments_changed().notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        // An agent that just enrolled asks before its first heartbeat placed it in a site:
        // look again, or it would learn nothing for the whole wait (its RVP role included).
        if a.site.is_none() {
            a = agent(&app, &h).await?;
        }
        let list = app.store.assignments(&a, app.active_since(), app.now()).await?;
        let now = tokio::time::Instant::now();
        if now >= deadline || list.iter().any(|x| !req.running.contains(&x.content)) {
            return json(&AssignmentsAnswer { assignments: list });
        }
        let recheck = now + std::time::Duration::from_millis(ASSIGNMENTS_RECHECK_MS);
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(recheck.min(deadline)) => {}
        }
    }
}

async fn manifest(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let id = content_id(&id)?;
    agent(&app, &h).await?;
    json(&app.store.manifest(&id, &app.public_key).await?)
}

async fn table(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    let id = content_id(&id)?;
    agent(&app, &h).await?;
    let t = app.store.block_table(&id).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        )],
        t,
    )
        .into_response())
}

async fn resolve_latest(State(app): State<Arc<App>>, h: HeaderMap, Path(name): Path<String>) -> ApiResult {
    agent(&app, &h).await?;
    json(&app.store.resolve_name(&name, None).await?)
}

async fn resolve_version(
    State(app): State<Arc<App>>,
    h: HeaderMap,
    Path((name, version)): Path<(String, String)>,
) -> ApiResult {
    agent(&app, &h).await?;
    json(&app.store.resolve_name(&name, Some(&version)).await?)
}

async fn server_key(State(app): State<Arc<App>>) -> ApiResult {
    json(&serde_json::json!({"public_key": app.public_key}))
}

async fn files(State(app): State<Arc<App>>, Path(id): Path<String>, req: Request) -> ApiResult {
    let id = content_id(&id)?;
    let c = app.store.live_content(&id).await?;
    if !c.stored {
        return Err(Error::NotFound(format!(
            "content {id} is not kept in this server's file store; use its other origins"
        )));
    }
    let path = app.cfg.files_dir().join(id.to_string());
    if !path.is_file() {
        return Err(Error::NotFound(format!(
            "content {id} is recorded but its file is missing from {}; publish it again",
            app.cfg.files_dir().display()
        )));
    }
    // A HEAD answer carries the Content-Length but no body.
    let sends_body = req.method() == axum::http::Method::GET;
    let resp = tower_http::services::ServeFile::new(path).oneshot(req).await;
    let r = match resp {
        Ok(r) => r.into_response(),
        Err(never) => match never {},
    };
    if sends_body && r.status().is_success() {
        let len = r
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        app.metrics.add_origin_bytes(len.unwrap_or(0));
    }
    Ok(r)
}

// ---- admin endpoints ----

#[derive(Deserialize)]
struct AllQuery {
    #[serde(default)]
    all: bool,
}

async fn content_ls(State(app): State<Arc<App>>, h: HeaderMap, Query(q): Query<AllQuery>) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.list_content(q.all).await?)
}

async fn content_publish(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    admin(&app, &h)?;
    let req: PublishRequest = json_body(b, app.cfg.body_bytes_max)?;
    let info = publish::publish(&app.store, &app.cfg.files_dir(), &app.cfg.public_url(), &req, app.now()).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn content_show(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.content(&content_id(&id)?).await?)
}

async fn content_retire(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.retire_content(&content_id(&id)?, app.now()).await?)
}

async fn tokens_ls(State(app): State<Arc<App>>, h: HeaderMap) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.list_tokens().await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    #[serde(default = "one")]
    uses: i64,
    ttl_hours: Option<u64>,
    #[serde(default)]
    note: String,
}

fn one() -> i64 {
    1
}

async fn tokens_create(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    admin(&app, &h)?;
    let req: TokenRequest = json_body(b, app.cfg.body_bytes_max)?;
    let ttl_ms = i64::try_from(
        req.ttl_hours
            .unwrap_or(app.cfg.token_ttl_hours)
            .saturating_mul(3_600_000),
    )
    .unwrap_or(i64::MAX);
    let t = app.store.create_token(req.uses, ttl_ms, &req.note, app.now()).await?;
    Ok((StatusCode::CREATED, Json(t)).into_response())
}

async fn tokens_revoke(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&app, &h)?;
    app.store.revoke_token(&id, app.now()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct RotateQuery {
    #[serde(default)]
    drop_previous: bool,
}

async fn deployment_key_rotate(State(app): State<Arc<App>>, h: HeaderMap, Query(q): Query<RotateQuery>) -> ApiResult {
    admin(&app, &h)?;
    let keys = app.store.rotate_deployment_key(app.now(), q.drop_previous).await?;
    tracing::info!(keys = %keys, "deployment key rotated");
    json(&serde_json::json!({"rotated": keys.to_string()}))
}

async fn agents_ls(State(app): State<Arc<App>>, h: HeaderMap) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.list_agents(app.active_since()).await?)
}

async fn agents_show(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.agent(&id, app.active_since()).await?)
}

async fn agents_revoke(State(app): State<Arc<App>>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    admin(&app, &h)?;
    app.store.revoke_agent(&id, app.now()).await?;
    tracing::info!(agent = %id, "agent revoked");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn topology_export(State(app): State<Arc<App>>, h: HeaderMap) -> ApiResult {
    admin(&app, &h)?;
    csv_response(app.store.topology(app.now()).await?.to_csv())
}

/// Check an uploaded topology CSV: every bad line, or the topology.
pub fn check_topology_csv(bytes: &[u8]) -> Result<Topology, Error> {
    Topology::parse_csv(bytes).map_err(|errors| Error::Invalid {
        message: format!(
            "topology not imported: {} bad line(s); fix them and upload again (nothing was changed)",
            errors.len()
        ),
        errors,
    })
}

async fn topology_import(State(app): State<Arc<App>>, h: HeaderMap, b: Result<Bytes, BytesRejection>) -> ApiResult {
    admin(&app, &h)?;
    let b = body(b, app.cfg.topology_bytes_max)?;
    let topo = check_topology_csv(&b)?;
    app.store.import_topology(&topo, app.now()).await?;
    tracing::info!(sites = topo.sites().len(), "topology imported");
    json(&serde_json::json!({"sites": topo.sites().len()}))
}

async fn topology_proposal(State(app): State<Arc<App>>, h: HeaderMap) -> ApiResult {
    admin(&app, &h)?;
    csv_response(topology::propose(&app.store.reported_subnets().await?).to_csv())
}

async fn election(State(app): State<Arc<App>>, h: HeaderMap, Path((site, id)): Path<(String, String)>) -> ApiResult {
    admin(&app, &h)?;
    let id = content_id(&id)?;
    json(
        &app.store
            .election(&site, &id, app.active_since(), app.cap(), app.now())
            .await?,
    )
}

async fn traffic_ls(State(app): State<Arc<App>>, h: HeaderMap) -> ApiResult {
    admin(&app, &h)?;
    json(&app.store.traffic().await?)
}

// ---- operations ----

async fn metrics(State(app): State<Arc<App>>) -> ApiResult {
    let counts = app.store.counts(app.active_since()).await?;
    let backend = match app.store.backend() {
        crate::store::Backend::Sqlite => "sqlite",
        crate::store::Backend::Postgres => "postgres",
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        app.metrics.render(&counts, &app.store.traffic().await?, backend),
    )
        .into_response())
}

async fn openapi() -> ApiResult {
    json(&crate::openapi::document())
}

async fn healthz(State(app): State<Arc<App>>) -> ApiResult {
    app.store.counts(app.active_since()).await?;
    json(&serde_json::json!({"ok": true}))
}

async fn observe(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let sw = Stopwatch::start();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let resp = next.run(req).await;
    let us = sw.elapsed_us();
    app.metrics.observe(&route, resp.status().as_u16(), us);
    tracing::debug!(%method, %route, status = resp.status().as_u16(), latency_us = us, "request");
    resp
}

/// Longest plain-text error body rewrapped by [`json_errors`].
const PLAIN_ERROR_BYTES_MAX: usize = 4096;

/// Error answers that axum produces itself (a path parameter that is not
/// UTF-8, a bad query string, an unknown route or method) are plain text;
/// wrap them in the API's `{"error": ...}` form so every 4xx/5xx is JSON.
/// Found by the `http_bodies` fuzz target (`/v1/content/%FF%FF/manifest`).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), PLAIN_ERROR_BYTES_MAX).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    (status, Json(serde_json::json!({"error": text}))).into_response()
}

/// The router with every route of [`crate::openapi::ROUTES`].
pub fn router(app: Arc<App>) -> Router {
    let body_max = app.cfg.body_bytes_max;
    let topo_max = app.cfg.topology_bytes_max;
    Router::new()
        .route("/v1/enroll", post(enroll))
        .route("/v1/heartbeat", post(heartbeat))
        .route("/v1/inventory", put(inventory))
        .route("/v1/traffic", post(traffic))
        .route("/v1/content/{id}/sources", get(sources))
        .route("/v1/assignments", post(assignments))
        .route("/v1/content/{id}/manifest", get(manifest))
        .route("/v1/content/{id}/table", get(table))
        .route("/v1/names/{name}", get(resolve_latest))
        .route("/v1/names/{name}/{version}", get(resolve_version))
        .route("/v1/server-key", get(server_key))
        .route("/files/{id}", get(files))
        .route("/v1/admin/content", get(content_ls).post(content_publish))
        .route("/v1/admin/content/{id}", get(content_show))
        .route("/v1/admin/content/{id}/retire", post(content_retire))
        .route("/v1/admin/tokens", get(tokens_ls).post(tokens_create))
        .route("/v1/admin/tokens/{id}", axum::routing::delete(tokens_revoke))
        .route("/v1/admin/deployment-key/rotate", post(deployment_key_rotate))
        .route("/v1/admin/agents", get(agents_ls))
        .route("/v1/admin/agents/{id}", get(agents_show))
        .route("/v1/admin/agents/{id}/revoke", post(agents_revoke))
        .route(
            "/v1/admin/topology",
            get(topology_export)
                .put(topology_import)
                .layer(DefaultBodyLimit::max(topo_max)),
        )
        .route("/v1/admin/topology/proposal", get(topology_proposal))
        .route("/v1/admin/sites/{site}/content/{id}/election", get(election))
        .route("/v1/admin/traffic", get(traffic_ls))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .layer(axum::middleware::map_response(json_errors))
        .layer(DefaultBodyLimit::max(body_max))
        .with_state(app)
}

/// Most time a client gets to finish its TLS handshake.
pub const TLS_HANDSHAKE_MS_MAX: u64 = 10_000;
/// Most time requests in flight get to finish after shutdown is asked.
pub const SHUTDOWN_DRAIN_MS_MAX: u64 = 30_000;

/// Read a PEM certificate chain and key into a TLS server configuration (ring provider, HTTP/1.1).
pub fn load_tls(cert: &std::path::Path, key: &std::path::Path) -> Result<Arc<rustls::ServerConfig>, Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, path: &std::path::Path, e: &dyn std::fmt::Display| {
        Error::BadRequest(format!("{what} {}: {e}; give a PEM file", path.display()))
    };
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad("cannot read the TLS certificate", cert, &e))?;
    if certs.is_empty() {
        return Err(bad("no certificate in", cert, &"empty"));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| bad("cannot read the TLS key", key, &e))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| Error::BadRequest(format!("TLS certificate and key do not work together: {e}")))?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Like [`serve`], over TLS: accept, handshake (bounded), then HTTP/1.1 on the
/// same router; on shutdown stop accepting and let requests in flight finish.
pub async fn serve_tls(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let router = router(app);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, router, watcher) = (acceptor.clone(), router.clone(), graceful.watcher());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(std::time::Duration::from_millis(TLS_HANDSHAKE_MS_MAX), acceptor.accept(tcp));
                    let tls = match handshake.await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
                    };
                    let svc = hyper_util::service::TowerToHyperService::new(router);
                    let conn = hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
                    if let Err(e) = watcher.watch(conn).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(
        std::time::Duration::from_millis(SHUTDOWN_DRAIN_MS_MAX),
        graceful.shutdown(),
    )
    .await
    .is_err()
    {
        tracing::warn!("requests still in flight after {SHUTDOWN_DRAIN_MS_MAX} ms; closing them");
    }
    Ok(())
}

/// Serve until `shutdown` resolves, then finish the requests in flight.
pub async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shutdown)
        .await
}
