//! `lowtide-server`: the daemon (`serve`) and the admin command line, a thin
//! shell over the `lowtide_server` library. Admin commands work on the
//! database directly, so they work whether or not a server is running.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lowtide_engine::content::ContentId;
use lowtide_server::api::{self, App};
use lowtide_server::clock::Clock;
use lowtide_server::config::Config;
use lowtide_server::publish::{PublishRequest, PublishSource};
use lowtide_server::store::Store;
use lowtide_server::topology;

#[derive(Parser)]
#[command(
    name = "lowtide-server",
    version,
    about = "Lowtide server: content metadata, agents, site topology, RVP election"
)]
struct Cli {
    /// TOML config file (keys in server/src/config.rs); LOWTIDE_* environment variables override it.
    #[arg(long, short, env = "LOWTIDE_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// State directory (overrides config and LOWTIDE_STATE_DIR).
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Database URL, sqlite://... or postgres://... (overrides config and LOWTIDE_DATABASE_URL).
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the HTTP API until SIGINT or SIGTERM.
    Serve {
        /// Address to listen on (overrides config).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Publish a package from a local file or an http:// URL.
    Publish {
        /// Local file to publish.
        #[arg(required_unless_present = "url", conflicts_with = "url")]
        path: Option<PathBuf>,
        /// Download from this URL instead of a local file.
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        /// Extra origin URL serving the same bytes (repeatable).
        #[arg(long = "origin")]
        origins: Vec<String>,
        /// Do not keep a copy in the server's file store.
        #[arg(long)]
        no_store: bool,
    },
    /// Published content.
    Content {
        #[command(subcommand)]
        cmd: ContentCmd,
    },
    /// Enrolment tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// The P2P deployment key agents get at enrolment and with every heartbeat.
    DeploymentKey {
        #[command(subcommand)]
        cmd: DeploymentKeyCmd,
    },
    /// Enrolled agents.
    Agents {
        #[command(subcommand)]
        cmd: AgentsCmd,
    },
    /// The site tree as CSV.
    Topology {
        #[command(subcommand)]
        cmd: TopologyCmd,
    },
}

#[derive(Subcommand)]
enum ContentCmd {
    /// List content.
    Ls {
        /// Include retired content.
        #[arg(long)]
        all: bool,
    },
    /// Show one content as JSON.
    Show { id: ContentId },
    /// Retire a content: agents are no longer told where to get it.
    Retire { id: ContentId },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create an enrolment token and print it (shown only once).
    Create {
        #[arg(long, default_value_t = 1)]
        uses: i64,
        /// Lifetime in hours (default: token_ttl_hours from the config).
        #[arg(long)]
        ttl_hours: Option<u64>,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Revoke an enrolment token by id.
    Revoke { id: String },
    /// List tokens.
    Ls,
}

#[derive(Subcommand)]
enum DeploymentKeyCmd {
    /// Fingerprints of the current and previous key.
    Show,
    /// Make a new key; the old one is still accepted until the next rotation.
    Rotate {
        /// Stop accepting the old key at once (a stolen device): agents that have not
        /// heartbeated since cannot talk P2P until they do.
        #[arg(long)]
        drop_previous: bool,
    },
}

#[derive(Subcommand)]
enum AgentsCmd {
    /// List agents with status, site and facts.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke an agent's credential.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum TopologyCmd {
    /// Replace the topology with a CSV file (all or nothing).
    Import { file: PathBuf },
    /// Write the topology as CSV (to stdout without a file).
    Export { file: Option<PathBuf> },
    /// Print a topology proposed from the subnets agents report.
    Propose,
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let mut cfg = Config::load(cli.config.as_deref(), |k| std::env::var(k).ok())?;
    if let Some(d) = &cli.state_dir {
        cfg.state_dir = d.clone();
    }
    if let Some(u) = &cli.database_url {
        cfg.database_url = Some(u.clone());
    }
    Ok(cfg)
}

async fn open(cfg: &Config) -> anyhow::Result<Store> {
    if cfg.database_url.is_none() {
        std::fs::create_dir_all(&cfg.state_dir).with_context(|| {
            format!(
                "creating state directory {}; pass --state-dir to use another",
                cfg.state_dir.display()
            )
        })?;
    }
    let url = cfg.database_url();
    Store::open(&url, cfg.db_connections_max).await.with_context(|| {
        format!(
            "opening the database ({})",
            url.split('@').next_back().unwrap_or_default()
        )
    })
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: finishing requests in flight");
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut cfg = load_config(&cli)?;
    let clock = Clock::System;
    match cli.cmd {
        Cmd::Serve { listen } => {
            if let Some(l) = listen {
                cfg.listen = l;
            }
            let store = open(&cfg).await?;
            let listener = tokio::net::TcpListener::bind(cfg.listen)
                .await
                .with_context(|| format!("listening on {}", cfg.listen))?;
            tracing::info!(
                listen = %listener.local_addr()?,
                backend = ?store.backend(),
                tls = cfg.tls_cert.is_some(),
                admin_api = cfg.admin_token.is_some(),
                "serving"
            );
            if cfg.admin_token.is_none() {
                tracing::warn!("admin_token is not set: the HTTP admin API answers 403 (the command line still works)");
            }
            let tls = match (&cfg.tls_cert, &cfg.tls_key) {
                (Some(c), Some(k)) => Some(api::load_tls(c, k)?),
                _ => None,
            };
            let app = App::new(store.clone(), cfg, clock).await?;
            match tls {
                Some(tls) => api::serve_tls(app, listener, tls, shutdown_signal())
                    .await
                    .context("serving HTTPS")?,
                None => api::serve(app, listener, shutdown_signal())
                    .await
                    .context("serving HTTP")?,
            }
            store.close().await;
            tracing::info!("stopped");
        }
        Cmd::Publish {
            path,
            url,
            name,
            version,
            origins,
            no_store,
        } => {
            let store = open(&cfg).await?;
            let source = match (path, url) {
                (Some(p), None) => {
                    PublishSource::Path(std::fs::canonicalize(&p).with_context(|| format!("reading {}", p.display()))?)
                }
                (None, Some(u)) => PublishSource::Url(u),
                _ => anyhow::bail!("give a file or --url, not both"),
            };
            let req = PublishRequest {
                name,
                version,
                source,
                origins,
                store: !no_store,
            };
            let info =
                lowtide_server::publish::publish(&store, &cfg.files_dir(), &cfg.public_url(), &req, clock.now_ms())
                    .await?;
            print_json(&info)?;
        }
        Cmd::Content { cmd } => {
            let store = open(&cfg).await?;
            match cmd {
                ContentCmd::Ls { all } => {
                    let mut out = std::io::stdout().lock();
                    writeln!(
                        out,
                        "{:<64}  {:<24} {:<12} {:>14}  state",
                        "id", "name", "version", "size"
                    )?;
                    for c in store.list_content(all).await? {
                        let state = if c.retired_ms.is_some() { "retired" } else { "live" };
                        writeln!(
                            out,
                            "{:<64}  {:<24} {:<12} {:>14}  {state}",
                            c.id, c.name, c.version, c.size
                        )?;
                    }
                }
                ContentCmd::Show { id } => print_json(&store.content(&id).await?)?,
                ContentCmd::Retire { id } => print_json(&store.retire_content(&id, clock.now_ms()).await?)?,
            }
        }
        Cmd::Token { cmd } => {
            let store = open(&cfg).await?;
            match cmd {
                TokenCmd::Create { uses, ttl_hours, note } => {
                    let ttl_ms = i64::try_from(ttl_hours.unwrap_or(cfg.token_ttl_hours).saturating_mul(3_600_000))
                        .unwrap_or(i64::MAX);
                    print_json(&store.create_token(uses, ttl_ms, &note, clock.now_ms()).await?)?;
                }
                TokenCmd::Revoke { id } => {
                    store.revoke_token(&id, clock.now_ms()).await?;
                    eprintln!("token {id} revoked");
                }
                TokenCmd::Ls => print_json(&store.list_tokens().await?)?,
            }
        }
        Cmd::DeploymentKey { cmd } => {
            let store = open(&cfg).await?;
            let keys = match cmd {
                DeploymentKeyCmd::Show => store.deployment_keys(clock.now_ms()).await?,
                DeploymentKeyCmd::Rotate { drop_previous } => {
                    store.rotate_deployment_key(clock.now_ms(), drop_previous).await?
                }
            };
            println!("{keys}");
            eprintln!("agents learn a new key at their next heartbeat (servers see it within 5 s)");
        }
        Cmd::Agents { cmd } => {
            let store = open(&cfg).await?;
            match cmd {
                AgentsCmd::Ls { json } => {
                    let agents = store
                        .list_agents(clock.now_ms().saturating_sub(cfg.inactive_after_ms()))
                        .await?;
                    if json {
                        print_json(&agents)?;
                    } else {
                        let mut out = std::io::stdout().lock();
                        writeln!(
                            out,
                            "{:<32}  {:<20} {:<9} {:<16} {:<8} {:<6} {:>16}  addresses",
                            "id", "hostname", "status", "site", "chassis", "serves", "free bytes"
                        )?;
                        for a in agents {
                            let status = serde_json::to_value(&a.status)?.as_str().unwrap_or("").to_string();
                            writeln!(
                                out,
                                "{:<32}  {:<20} {:<9} {:<16} {:<8} {:<6} {:>16}  {}",
                                a.id,
                                a.hostname,
                                status,
                                a.site.as_deref().unwrap_or("-"),
                                a.chassis.as_str(),
                                if a.serves { "yes" } else { "no" },
                                a.disk_free_bytes,
                                a.addresses.join(" ")
                            )?;
                        }
                    }
                }
                AgentsCmd::Revoke { id } => {
                    store.revoke_agent(&id, clock.now_ms()).await?;
                    eprintln!("agent {id} revoked");
                }
            }
        }
        Cmd::Topology { cmd } => {
            let store = open(&cfg).await?;
            match cmd {
                TopologyCmd::Import { file } => {
                    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
                    let topo = match api::check_topology_csv(&bytes) {
                        Ok(t) => t,
                        Err(lowtide_server::error::Error::Invalid { message, errors }) => {
                            for e in &errors {
                                eprintln!("{}:{}: {}", file.display(), e.line, e.message);
                            }
                            eprintln!("{message}");
                            return Ok(ExitCode::from(2));
                        }
                        Err(e) => return Err(e.into()),
                    };
                    store.import_topology(&topo, clock.now_ms()).await?;
                    eprintln!("imported {} sites", topo.sites().len());
                }
                TopologyCmd::Export { file } => {
                    let csv = store.topology(clock.now_ms()).await?.to_csv();
                    match file {
                        Some(f) => std::fs::write(&f, csv).with_context(|| format!("writing {}", f.display()))?,
                        None => print!("{csv}"),
                    }
                }
                TopologyCmd::Propose => print!("{}", topology::propose(&store.reported_subnets().await?).to_csv()),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOWTIDE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
