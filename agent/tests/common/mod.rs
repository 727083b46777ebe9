//! Test harness: a real Lowtide server (the `lowtide_server` library's HTTP
//! API over SQLite in a temporary directory, on 127.0.0.1, system clock) and
//! real `lowtide-agent run` processes on loopback, each with its own state
//! directory and an ephemeral UDP port. Every process is killed on drop, so a
//! failing test leaves nothing behind.

#![allow(dead_code, reason = "each test binary uses a different part of the harness")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::Duration;

use lowtide_engine::content::ContentId;
use lowtide_server::api::{self, App};
use lowtide_server::clock::Clock;
use lowtide_server::config::Config;
use lowtide_server::publish::{self, PublishRequest, PublishSource};
use lowtide_server::store::Store;
use lowtide_server::topology::Topology;
use serde_json::Value;

/// A `deployment_secret` for agents that must not use the key the server hands out.
pub const SECRET: &str = "agent-test-deployment-secret";
/// Polls while waiting for an agent to come up (50 ms apart).
const READY_POLLS_MAX: usize = 600;
/// Log lines of each agent a failed test prints (the end of the story).
const LOG_TAIL_ON_FAILURE: usize = 80;

/// Deterministic test bytes.
pub fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

pub struct Server {
    pub base: String,
    pub dir: tempfile::TempDir,
    pub app: Arc<App>,
    pub token: String,
    rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// A server whose topology has a standard site `hq` covering 127.0.0.0/8 and its
    /// child site `branch` (10.99.0.0/24, reached only with `site_override`),
    /// and a token good for 20 enrolments.
    pub fn start() -> Self {
        Self::start_opts(None)
    }

    /// [`start`](Self::start) over HTTPS with this PEM certificate and key (for 127.0.0.1).
    pub fn start_tls(cert: &Path, key: &Path) -> Self {
        Self::start_opts(Some((cert.to_path_buf(), key.to_path_buf())))
    }

    /// Like [`start`](Self::start), with `tweak` applied to the server's config.
    pub fn start_tweaked(tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_opts_tweaked(None, tweak)
    }

    fn start_opts(tls: Option<(PathBuf, PathBuf)>) -> Self {
        Self::start_opts_tweaked(tls, |_| {})
    }

    fn start_opts_tweaked(tls: Option<(PathBuf, PathBuf)>, tweak: impl FnOnce(&mut Config)) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        Self::start_with(
            listener,
            base,
            b"id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,127.0.0.0/8,,\n\
              branch,Branch,hq,standard,10.99.0.0/24,,\n",
            tls,
            tweak,
        )
    }

    /// A server answering on `listener` (which may belong to another network
    /// namespace), reached by agents at `base`, with the topology `csv`.
    pub fn start_on(listener: std::net::TcpListener, base: String, csv: &[u8]) -> Self {
        Self::start_with(listener, base, csv, None, |_| {})
    }

    fn start_with(
        listener: std::net::TcpListener,
        base: String,
        csv: &[u8],
        tls: Option<(PathBuf, PathBuf)>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (base, app, stop, task, token) = rt.block_on(async {
            listener.set_nonblocking(true).unwrap();
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let mut cfg = Config {
                state_dir: dir.path().to_path_buf(),
                public_url: Some(base.clone()),
                admin_token: Some("agent-test-admin-token-0123".into()),
                heartbeat_secs: 2,
                ..Config::default()
            };
            tweak(&mut cfg);
            let store = Store::open(&cfg.database_url(), 4).await.unwrap();
            let clock = Clock::System;
            let now = clock.now_ms();
            let topo = Topology::parse_csv(csv).unwrap();
            store.import_topology(&topo, now).await.unwrap();
            let token = store
                .create_token(20, 3_600_000, "agent tests", now)
                .await
                .unwrap()
                .token;
            let app = App::new(store, cfg, clock).await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let stop = async move {
                let _ = rx.await;
            };
            let task = match &tls {
                Some((cert, key)) => {
                    let cfg = api::load_tls(cert, key).unwrap();
                    tokio::spawn(api::serve_tls(app.clone(), listener, cfg, stop))
                }
                None => tokio::spawn(api::serve(app.clone(), listener, stop)),
            };
            (base, app, tx, task, token)
        });
        Self {
            base,
            dir,
            app,
            token,
            rt,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Rotate the P2P deployment key as `lowtide-server deployment-key rotate` does.
    pub fn rotate_key(&self) -> lowtide_server::store::DeploymentKeys {
        let app = self.app.clone();
        self.rt.block_on(async move {
            app.store
                .rotate_deployment_key(app.clock.now_ms(), false)
                .await
                .unwrap()
        })
    }

    /// Kill the server as a crash would: every task (the listener, open
    /// connections, requests in flight) stops at once, nothing is shut down cleanly.
    pub fn crash(&mut self) {
        let fresh = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let old = std::mem::replace(&mut self.rt, fresh);
        self.stop = None;
        self.task = None;
        old.shutdown_background();
    }

    /// Start the server again after [`crash`](Self::crash): same database, same
    /// address, same configuration, a new process state.
    pub fn restart(&mut self) {
        let cfg = self.app.cfg.clone();
        let addr = self.base.trim_start_matches("http://").to_string();
        let (app, stop, task) = self.rt.block_on(async move {
            let store = Store::open(&cfg.database_url(), 4).await.unwrap();
            let listener = tokio::net::TcpListener::bind(&addr).await.unwrap();
            let app = App::new(store, cfg, Clock::System).await.unwrap();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(api::serve(app.clone(), listener, async move {
                let _ = rx.await;
            }));
            (app, tx, task)
        });
        self.app = app;
        self.stop = Some(stop);
        self.task = Some(task);
    }

    /// Bytes the agents reported per (site, link), as the server recorded them.
    pub fn traffic(&self) -> Vec<(String, String, u64)> {
        let app = self.app.clone();
        self.rt
            .block_on(async move { app.store.traffic().await.unwrap() })
            .into_iter()
            .map(|r| (r.site, r.link, r.bytes))
            .collect()
    }

    /// The sources the server would name to agent `agent_id` of site `site` for `id`.
    pub fn sources_for(&self, agent_id: &str, site: &str, id: &ContentId) -> Value {
        let app = self.app.clone();
        let auth = lowtide_server::store::AgentAuth {
            id: agent_id.into(),
            site: Some(site.into()),
        };
        let id = *id;
        let answer = self.rt.block_on(async move {
            let now = app.clock.now_ms();
            let since = now - app.cfg.inactive_after_ms();
            app.store
                .sources(&auth, &id, since, app.cfg.peers_active_max as usize, now)
                .await
                .unwrap()
        });
        serde_json::to_value(answer).unwrap()
    }

    /// The RVP, serving peers and bench of `site` for `id` (the admin view; elects if needed).
    pub fn election(&self, site: &str, id: &ContentId) -> Value {
        let app = self.app.clone();
        let (site, id) = (site.to_string(), *id);
        let e = self.rt.block_on(async move {
            let now = app.clock.now_ms();
            let since = now - app.cfg.inactive_after_ms();
            app.store
                .election(&site, &id, since, app.cfg.peers_active_max as usize, now)
                .await
                .unwrap()
        });
        serde_json::to_value(e).unwrap()
    }

    /// Body bytes the server sent as the origin (`/files`) since it started.
    pub fn origin_bytes(&self) -> u64 {
        self.app.metrics.origin_bytes()
    }

    /// Publish `bytes` (kept in the server's file store, served at /files/{id}).
    pub fn publish(&self, bytes: &[u8], name: &str, version: &str) -> ContentId {
        let p = self.dir.path().join(format!("{name}-{version}.bin"));
        std::fs::write(&p, bytes).unwrap();
        let app = self.app.clone();
        let info = self.rt.block_on(async move {
            publish::publish(
                &app.store,
                &app.cfg.files_dir(),
                &app.cfg.public_url(),
                &PublishRequest {
                    name: name.into(),
                    version: version.into(),
                    source: PublishSource::Path(p),
                    origins: vec![],
                    store: true,
                },
                app.clock.now_ms(),
            )
            .await
            .unwrap()
        });
        assert_eq!(info.id, ContentId::of(bytes));
        info.id
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = self.rt.block_on(t);
        }
        let app = self.app.clone();
        self.rt.block_on(async move { app.store.close().await });
    }
}

/// One `lowtide-agent run` process; killed on drop.
pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub site: String,
    /// Extra environment for the daemon.
    pub env: Vec<(String, String)>,
    /// The network namespace the daemon runs in (`ip netns exec`); the
    /// commands run where the test runs: the control socket is a file.
    pub netns: Option<String>,
    child: Option<Child>,
}

/// An agent config: the lines of `base` whose keys `extra` does not set, then `extra`.
pub fn config_with(base: &str, extra: &str) -> String {
    let key = |l: &str| l.split('=').next().unwrap_or_default().trim().to_string();
    let overridden: Vec<String> = extra.lines().map(key).collect();
    let mut text: String = base
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(extra);
    text.push('\n');
    text
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_lowtide-agent")
}

/// A `lowtide-agent` command without any `LOWTIDE_*` variable of the test's
/// environment (the server's share the prefix), logging at `warn`.
pub fn command() -> Command {
    let mut c = Command::new(bin());
    clean_env(&mut c);
    c
}

/// `lowtide-agent` run in network namespace `ns` with `ip netns exec` (which
/// execs it: the child's pid is the agent's), environment as [`command`]'s.
pub fn command_in(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, bin()]);
    clean_env(&mut c);
    c
}

fn clean_env(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LOWTIDE_") {
            c.env_remove(k);
        }
    }
    c.env("LOWTIDE_LOG", "warn");
}

impl Agent {
    /// Write a config under `root/name` and start the daemon; returns once it heartbeated.
    pub fn start(srv: &Server, root: &Path, name: &str, cache_limit_mib: u64) -> Self {
        Self::start_in(srv, root, name, cache_limit_mib, "hq")
    }

    /// Start an agent pinned to `site` (with `site_override` unless it is `hq`).
    pub fn start_in(srv: &Server, root: &Path, name: &str, cache_limit_mib: u64, site: &str) -> Self {
        Self::start_with(srv, root, name, cache_limit_mib, site, "")
    }

    /// Start an agent with `extra` config lines, which replace the defaults' lines of the same keys.
    pub fn start_with(srv: &Server, root: &Path, name: &str, cache_limit_mib: u64, site: &str, extra: &str) -> Self {
        let dir = root.join(name);
        let base = format!(
            "server_url = {:?}\nenrol_token = {:?}\nstate_dir = {:?}\n\
             listen = \"127.0.0.1:0\"\ncache_limit_mib = {cache_limit_mib}\n\
             advertise_addresses = [\"127.0.0.1\"]\nhostname = {name:?}\npeer_stall_secs = 30\n\
             heartbeat_secs = 1\ninventory_secs = 1\ndriver = \"portable\"\n\
             metrics_listen = \"127.0.0.1:0\"\ndiscovery = false\n\
             busy_cpu_percent_max = 0\nbusy_disk_percent_max = 0\n{}",
            srv.base,
            srv.token,
            dir.join("state"),
            if site == "hq" {
                String::new()
            } else {
                format!("site_override = {site:?}\n")
            }
        );
        Self::start_raw(root, name, &config_with(&base, extra), site, None, Vec::new())
    }

    /// Start a daemon with exactly the config `text` under `root/name`, in
    /// network namespace `netns` if given, with `env`; returns once it
    /// heartbeated and the server put it in `site`.
    pub fn start_raw(
        root: &Path,
        name: &str,
        text: &str,
        site: &str,
        netns: Option<&str>,
        env: Vec<(String, String)>,
    ) -> Self {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(&config, text).unwrap();
        let mut a = Self {
            name: name.into(),
            log: dir.join("agent.log"),
            dir,
            config,
            site: site.into(),
            env,
            netns: netns.map(String::from),
            child: None,
        };
        a.spawn();
        a
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match &self.netns {
            Some(ns) => command_in(ns),
            None => command(),
        };
        let child = cmd
            .args(["--config", self.config.to_str().unwrap(), "run"])
            .env("LOWTIDE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lowtide-agent run");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        for _ in 0..READY_POLLS_MAX {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent {} exited ({st}) at start:\n{}", self.name, self.log_text());
            }
            let out = self.cli(&["status", "--json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).unwrap();
                if v["site"] == self.site.as_str() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent {} did not come up:\n{}", self.name, self.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        command()
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run lowtide-agent")
    }

    /// Run a command that must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.succeeded(&format!("{args:?}"), self.cli(args));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `out` of the command `what` on this agent, which must have succeeded (else its
    /// stderr and the agent's log say why).
    pub fn succeeded(&self, what: &str, out: Output) -> Output {
        assert!(
            out.status.success(),
            "lowtide-agent {what} on {} failed: {}\n--- agent log ---\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        out
    }

    /// Run a command that must fail; its stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "lowtide-agent {args:?} on {} should have failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).unwrap()
    }

    pub fn get_json(&self, id: &ContentId, to: &Path) -> Value {
        serde_json::from_str(&self.ok(&["get", &id.to_string(), "--to", to.to_str().unwrap(), "--json"])).unwrap()
    }

    /// `lowtide-agent get --json` of `id` to `to` on this agent, in the background
    /// (stdout and stderr piped); [`ChildGuard::wait_ok`] reads its answer.
    pub fn spawn_get(&self, id: &ContentId, to: &Path) -> ChildGuard {
        ChildGuard::new(
            command()
                .arg("--config")
                .arg(&self.config)
                .args(["get", &id.to_string(), "--json", "--to"])
                .arg(to)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    /// The agent's Prometheus metrics, scraped over HTTP.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.status()["metrics"].as_str().unwrap().to_string();
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// SIGKILL and reap, as a crash or a pulled plug would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether the daemon process is running (started and not yet stopped or killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGTERM and wait; the daemon must exit cleanly.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of our own child.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "agent {} exit {st}:\n{}", self.name, self.log_text());
        }
    }
}

/// A child process killed on drop (unless waited for), so a failing test leaves none behind.
pub struct ChildGuard(Option<Child>);

impl ChildGuard {
    pub fn new(child: Child) -> Self {
        Self(Some(child))
    }

    /// Wait for it to end; its output (what was piped).
    pub fn wait(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }

    /// Wait for a `get --json` of agent `a` that must succeed; its answer.
    pub fn wait_ok(self, a: &Agent) -> Value {
        serde_json::from_slice(&a.succeeded("get", self.wait()).stdout).unwrap()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // A failed test shows what each of its agents logged last: a wait that timed out
        // says nothing of why without it.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_ON_FAILURE)..];
            eprintln!(
                "--- last {} of {} log lines of agent {} (the test failed) ---\n{}",
                tail.len(),
                lines.len(),
                self.name,
                tail.join("\n")
            );
        }
    }
}
