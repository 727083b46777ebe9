//! `lowtide-server-loadgen`: load generator for `scripts/bench-server.sh`.
//!
//! Against a running server (loopback only), it sets up a topology of
//! `--sites` sites, publishes one small package, enrols `--agents` simulated
//! agents (a fifth of them holding the package), then runs two timed phases
//! with `--concurrency` connections each: heartbeats (agents in turn), then
//! sources requests. It prints one JSON object with requests per second, p99
//! latency and error counts. Every loop is bounded in time and count.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Parser;
use lowtide_server::clock::Stopwatch;
use serde_json::{json, Value};

/// Most requests one phase sends, whatever its duration.
const PHASE_REQUESTS_MAX: usize = 50_000_000;
/// How long to wait for the server to come up.
const STARTUP_WAIT_MS: u64 = 30_000;

#[derive(Parser)]
#[command(about = "Load generator for the Lowtide server (loopback only)")]
struct Args {
    /// Server base URL; must be a loopback address. Repeat it for several
    /// servers on one database: agent i talks to server i mod N (setup goes to the first).
    #[arg(long = "url", default_value = "http://127.0.0.1:7400")]
    urls: Vec<String>,
    #[arg(long, env = "LOWTIDE_ADMIN_TOKEN")]
    admin_token: String,
    #[arg(long, default_value_t = 10_000)]
    agents: usize,
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// Concurrent requests in flight.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Length of each timed phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Label for the JSON output (sqlite, postgres, postgres-2-servers).
    #[arg(long, default_value = "sqlite")]
    db: String,
    /// Directory for the package file the server publishes (must be readable by the server).
    #[arg(long, default_value = "/tmp")]
    work_dir: std::path::PathBuf,
}

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &str,
        body: Option<Vec<u8>>,
    ) -> anyhow::Result<(u16, Vec<u8>)> {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {auth}"));
        if let Some(b) = body {
            r = r.header("content-type", "application/json").body(b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        Ok((status, resp.bytes().await?.to_vec()))
    }

    async fn json(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let (status, b) = self
            .call(method, path, auth, body.map(|v| v.to_string().into_bytes()))
            .await?;
        if !(200..300).contains(&status) {
            bail!("{path}: {status} {}", String::from_utf8_lossy(&b));
        }
        Ok(if b.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&b)?
        })
    }
}

fn subnet_of_site(i: usize) -> (u8, u8) {
    (1 + (i / 256) as u8, (i % 256) as u8)
}

fn facts(i: usize, sites: usize, free: u64) -> Vec<u8> {
    let (a, b) = subnet_of_site(i % sites);
    let host = 10 + (i / sites) % 240;
    json!({"hostname": format!("sim-{i}"), "addresses": [format!("10.{a}.{b}.{host}")], "subnets": [format!("10.{a}.{b}.0/24")],
           "port": 7000, "disk_free_bytes": free, "disk_usable_bytes": free / 2,
           "chassis": if i.is_multiple_of(3) { "laptop" } else { "desktop" }, "os_type": "workstation", "uptime_secs": 1000 + i, "preferred": i.is_multiple_of(50)})
    .to_string()
    .into_bytes()
}

struct PhaseResult {
    ok: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
}

fn p99_ms(lat: &mut [u32]) -> f64 {
    if lat.is_empty() {
        return 0.0;
    }
    lat.sort_unstable();
    let i = ((lat.len() as f64) * 0.99).ceil() as usize;
    lat[i.clamp(1, lat.len()) - 1] as f64 / 1000.0
}

/// Run `concurrency` workers for `seconds`; worker requests go to `make(agent index)`.
async fn phase<F, Fut>(concurrency: usize, seconds: u64, agents: usize, make: F) -> PhaseResult
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let make = Arc::new(make);
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let sw = Stopwatch::start();
    let deadline_us = seconds * 1_000_000;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (make, next, errors) = (make.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            while sw.elapsed_us() < deadline_us {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= PHASE_REQUESTS_MAX {
                    break;
                }
                let t = Stopwatch::start();
                let ok = make(n % agents).await;
                lat.push(u32::try_from(t.elapsed_us()).unwrap_or(u32::MAX));
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap_or_default());
    }
    let secs = sw.elapsed_us() as f64 / 1e6;
    let errors = errors.load(Ordering::Relaxed);
    PhaseResult {
        ok: latencies_us.len() as u64 - errors,
        errors,
        secs,
        latencies_us,
    }
}

async fn run(args: Args) -> anyhow::Result<Value> {
    for url in &args.urls {
        let host = url.trim_start_matches("http://").split(['/', ':']).next().unwrap_or("");
        if !(host == "localhost" || host.starts_with("127.") || host == "[::1]") {
            bail!("the load generator only targets loopback addresses, not {host:?}");
        }
    }
    anyhow::ensure!(args.sites >= 2 && args.sites <= 10_000, "--sites must be 2..=10000");
    anyhow::ensure!(
        args.agents >= 1 && args.concurrency >= 1,
        "--agents and --concurrency must be positive"
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let servers: Arc<Vec<Client>> = Arc::new(
        args.urls
            .iter()
            .map(|u| Client {
                http: http.clone(),
                base: u.trim_end_matches('/').to_string(),
            })
            .collect(),
    );
    // Agent i talks to c[i % c.len()]; setup goes to c[0].
    let c = servers;
    let admin = args.admin_token.clone();

    // Wait for the server.
    let sw = Stopwatch::start();
    loop {
        let mut up = 0;
        for s in c.iter() {
            if let Ok((200, _)) = s.call(reqwest::Method::GET, "/healthz", "", None).await {
                up += 1;
            }
        }
        if up == c.len() {
            break;
        }
        if sw.elapsed_us() > STARTUP_WAIT_MS * 1000 {
            bail!("not every server of {:?} answered /healthz in time", args.urls)
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Topology: site 0 is the top, the others its children.
    let mut csv = String::from("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\n");
    for i in 0..args.sites {
        let (a, b) = subnet_of_site(i);
        let parent = if i == 0 { String::new() } else { "s0".into() };
        csv.push_str(&format!("s{i},Site {i},{parent},standard,10.{a}.{b}.0/24,,\n"));
    }
    let (status, body) = c[0]
        .call(
            reqwest::Method::PUT,
            "/v1/admin/topology",
            &admin,
            Some(csv.into_bytes()),
        )
        .await?;
    if status != 200 {
        bail!("topology import: {status} {}", String::from_utf8_lossy(&body));
    }
    let pkg = args
        .work_dir
        .join(format!("lowtide-loadgen-{}.bin", std::process::id()));
    std::fs::write(
        &pkg,
        (0..(1u32 << 20))
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect::<Vec<u8>>(),
    )?;
    let published = c[0]
        .json(
            reqwest::Method::POST,
            "/v1/admin/content",
            &admin,
            Some(json!({"name": "loadgen", "version": "1", "path": pkg})),
        )
        .await;
    let _ = std::fs::remove_file(&pkg);
    let cid = published?["id"]
        .as_str()
        .context("publish answer has no id")?
        .to_string();
    let token = c[0]
        .json(
            reqwest::Method::POST,
            "/v1/admin/tokens",
            &admin,
            Some(json!({"uses": args.agents, "note": "loadgen"})),
        )
        .await?["token"]
        .as_str()
        .context("token answer has no token")?
        .to_string();

    // Enrol, first heartbeat, inventory (every fifth agent holds the package).
    eprintln!("loadgen: enrolling {} agents", args.agents);
    let creds: Arc<Vec<std::sync::OnceLock<String>>> =
        Arc::new((0..args.agents).map(|_| std::sync::OnceLock::new()).collect());
    let setup_errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (c, creds, next, token, cid, errs) = (
            c.clone(),
            creds.clone(),
            next.clone(),
            token.clone(),
            cid.clone(),
            setup_errors.clone(),
        );
        let sites = args.sites;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= creds.len() {
                    break;
                }
                let r: anyhow::Result<()> = async {
                    let c = &c[i % c.len()];
                    let e = c
                        .json(
                            reqwest::Method::POST,
                            "/v1/enroll",
                            "",
                            Some(json!({"token": token, "hostname": format!("sim-{i}")})),
                        )
                        .await?;
                    let cred = e["credential"].as_str().context("no credential")?.to_string();
                    let (s, b) = c
                        .call(
                            reqwest::Method::POST,
                            "/v1/heartbeat",
                            &cred,
                            Some(facts(i, sites, 1 << 30)),
                        )
                        .await?;
                    anyhow::ensure!(s == 200, "heartbeat {s} {}", String::from_utf8_lossy(&b));
                    if i.is_multiple_of(5) {
                        c.json(
                            reqwest::Method::PUT,
                            "/v1/inventory",
                            &cred,
                            Some(json!({"items": [{"content": cid, "complete": true}]})),
                        )
                        .await?;
                    }
                    let _ = creds[i].set(cred);
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    if errs.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("loadgen: setup of agent {i} failed: {e:#}");
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let setup_errors = setup_errors.load(Ordering::Relaxed);
    if setup_errors > 0 {
        bail!("{setup_errors} agents could not be set up");
    }
    let creds: Arc<Vec<String>> = Arc::new(creds.iter().map(|c| c.get().cloned().unwrap_or_default()).collect());

    eprintln!(
        "loadgen: heartbeat phase, {} s, {} connections",
        args.seconds, args.concurrency
    );
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..args.agents)
            .map(|i| facts(i, args.sites, (1 << 30) + i as u64 * 4096))
            .collect(),
    );
    let hb = {
        let (c, creds, bodies) = (c.clone(), creds.clone(), bodies.clone());
        phase(args.concurrency, args.seconds, args.agents, move |i| {
            let (c, creds, bodies) = (c.clone(), creds.clone(), bodies.clone());
            async move {
                matches!(
                    c[i % c.len()]
                        .call(
                            reqwest::Method::POST,
                            "/v1/heartbeat",
                            &creds[i],
                            Some(bodies[i].clone())
                        )
                        .await,
                    Ok((200, _))
                )
            }
        })
        .await
    };
    eprintln!("loadgen: sources phase, {} s", args.seconds);
    let src = {
        let (c, creds) = (c.clone(), creds.clone());
        let path = format!("/v1/content/{cid}/sources");
        phase(args.concurrency, args.seconds, args.agents, move |i| {
            let (c, creds, path) = (c.clone(), creds.clone(), path.clone());
            async move {
                matches!(
                    c[i % c.len()].call(reqwest::Method::GET, &path, &creds[i], None).await,
                    Ok((200, _))
                )
            }
        })
        .await
    };
    let mut all: Vec<u32> = hb.latencies_us.iter().chain(&src.latencies_us).copied().collect();
    let mut hb_lat = hb.latencies_us;
    let mut src_lat = src.latencies_us;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    Ok(json!({
        "db": args.db,
        "agents": args.agents,
        "heartbeats_per_s": round(hb.ok as f64 / hb.secs),
        "sources_per_s": round(src.ok as f64 / src.secs),
        "p99_ms": round(p99_ms(&mut all)),
        "errors": hb.errors + src.errors,
        "heartbeat_p99_ms": round(p99_ms(&mut hb_lat)),
        "sources_p99_ms": round(p99_ms(&mut src_lat)),
        "sites": args.sites,
        "concurrency": args.concurrency,
        "seconds_per_phase": args.seconds,
        "servers": c.len(),
    }))
}

fn main() -> std::process::ExitCode {
    lowtide_server::install_tls_provider();
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(v) => {
            println!("{v}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadgen: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
