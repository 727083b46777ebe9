//! `lowtide-xfer`: move bytes with the Lowtide engine, without a server.
//!
//! ```text
//! lowtide-xfer add   --store DIR FILE...                 hash files into a store, print their ids
//! lowtide-xfer serve --store DIR --listen ADDR [--add FILE]... [--monitor auto|ebpf|netlink|off]
//! lowtide-xfer fetch --store DIR --from ADDR [--from ADDR]... ID [--to PATH]
//! ```
//!
//! Every packet is authenticated with the deployment key from `LOWTIDE_KEY`
//! (or `--key`); both ends need the same one. The agent will own these
//! commands later; this one exists to test and benchmark the engine.
//!
//! `serve` watches the egress interface toward each peer that asks for the
//! background protocol (route lookup) with the eBPF monitor, or rtnetlink when
//! BPF cannot be loaded (`--monitor`), samples it every few milliseconds and
//! hands the backlog and the rate of other traffic to the background sessions.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use lowtide_ebpf::watch::{MonitorMode, PathWatch, SAMPLE_INTERVAL};
use lowtide_engine::content::{ContentId, BLOCK_CHUNKS_LOG_DEFAULT};
use lowtide_engine::endpoint::{DriverChoice, Endpoint, EndpointConfig, FetchNews};
use lowtide_engine::io::uring::ZeroCopy;
use lowtide_engine::session::fetch::FetchConfig;
use lowtide_engine::session::serve::ServerConfig;
use lowtide_engine::store::Store;
use lowtide_engine::time::Clock;
use lowtide_engine::wire::DeploymentKey;

#[derive(Parser)]
#[command(
    name = "lowtide-xfer",
    version,
    about = "Serve and fetch content with the Lowtide engine"
)]
struct Cli {
    /// Deployment key (any passphrase; both ends must use the same).
    #[arg(long, env = "LOWTIDE_KEY", hide_env_values = true, global = true)]
    key: Option<String>,
    /// Content store directory.
    #[arg(long, global = true, default_value = "./lowtide-store")]
    store: PathBuf,
    /// Store size limit, in MiB.
    #[arg(long, global = true, default_value_t = 1 << 20)]
    store_limit_mib: u64,
    /// I/O driver: auto, uring or portable.
    #[arg(long, global = true, default_value = "auto")]
    driver: DriverChoice,
    /// Zero-copy send with io_uring: auto (probe, keep it only if the kernel really avoids copies), on, off.
    #[arg(long, global = true, default_value = "auto", value_parser = parse_zc)]
    zero_copy: ZeroCopy,
    #[command(subcommand)]
    cmd: Cmd,
}

fn parse_zc(s: &str) -> Result<ZeroCopy, String> {
    match s {
        "auto" => Ok(ZeroCopy::Auto),
        "on" => Ok(ZeroCopy::On),
        "off" => Ok(ZeroCopy::Off),
        _ => Err(format!("unknown zero-copy mode {s:?}: use auto, on or off")),
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Hash files into the store and print their content ids.
    Add { files: Vec<PathBuf> },
    /// Serve the store's content on a UDP address until interrupted.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        /// Files to add before serving.
        #[arg(long)]
        add: Vec<PathBuf>,
        /// Serve encrypted sessions only (fetchers must use `fetch --encrypt`).
        #[arg(long)]
        require_encryption: bool,
        /// Egress monitor for background sessions: auto (eBPF if it loads, else netlink),
        /// ebpf, netlink (queue backlog only) or off (delay signal alone).
        #[arg(long, default_value = "auto")]
        monitor: MonitorMode,
    },
    /// Fetch content by id from one or more servers.
    Fetch {
        id: ContentId,
        #[arg(long = "from", required = true)]
        from: Vec<SocketAddr>,
        /// Local address to bind.
        #[arg(long, default_value = "0.0.0.0:0")]
        bind: SocketAddr,
        /// Copy the finished content here.
        #[arg(long)]
        to: Option<PathBuf>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// Write a JSON summary here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// No progress lines.
        #[arg(long, short)]
        quiet: bool,
        /// Ask the servers for the background (scavenger) protocol, as across a WAN.
        #[arg(long)]
        background: bool,
        /// Ask the servers to encrypt the data (AES-256-GCM, a key per session derived
        /// from the deployment key); a server that does not agree is dropped.
        #[arg(long)]
        encrypt: bool,
        /// Keep greeting the last source that stopped sending (a WAN link flap) for this
        /// long since it last sent anything, then drop it.
        #[arg(long, default_value_t = FetchConfig::default().source_give_up.as_secs())]
        source_give_up_secs: u64,
    },
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOWTIDE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lowtide-xfer: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn key(cli: &Cli) -> anyhow::Result<DeploymentKey> {
    match &cli.key {
        Some(k) if !k.is_empty() => Ok(DeploymentKey::derive(k.as_bytes())),
        _ => bail!("no deployment key: set LOWTIDE_KEY (or --key) to the same passphrase on both ends"),
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let mut store = Store::open(&cli.store, cli.store_limit_mib << 20)
        .with_context(|| format!("opening store {}", cli.store.display()))?;
    match &cli.cmd {
        Cmd::Add { files } => {
            for f in files {
                let t = store
                    .import(f, BLOCK_CHUNKS_LOG_DEFAULT)
                    .with_context(|| format!("adding {}", f.display()))?;
                println!("{}  {}", t.root(), f.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Serve {
            listen,
            add,
            require_encryption,
            monitor,
        } => {
            for f in add {
                let t = store
                    .import(f, BLOCK_CHUNKS_LOG_DEFAULT)
                    .with_context(|| format!("adding {}", f.display()))?;
                println!("{}  {}", t.root(), f.display());
            }
            let cfg = EndpointConfig {
                driver: cli.driver,
                zero_copy: cli.zero_copy,
                server: ServerConfig {
                    require_encryption: *require_encryption,
                    ..ServerConfig::default()
                },
                ..Default::default()
            };
            let mut ep = Endpoint::bind(*listen, key(&cli)?, store, cfg)?;
            let mut watch = PathWatch::new(*monitor, &[ep.local_addr().port()]);
            install_signals();
            eprintln!("serving on {} ({})", ep.local_addr(), ep.driver_description());
            let clock = Clock::new();
            let mut next_sample = clock.now();
            while !STOP.load(Ordering::Relaxed) {
                let wait = if watch.is_watching() {
                    SAMPLE_INTERVAL
                } else {
                    Duration::from_millis(200)
                };
                ep.poll(wait)?;
                for peer in ep.take_background_peers() {
                    watch.watch_peer(peer);
                    if *monitor == MonitorMode::Ebpf && !watch.bpf_attached() {
                        bail!("--monitor ebpf: no eBPF monitor toward {peer} (see the log above); use --monitor auto to fall back to netlink");
                    }
                }
                let now = clock.now();
                if now >= next_sample {
                    next_sample = now + SAMPLE_INTERVAL;
                    if let Some(signal) = watch.sample(now) {
                        ep.on_path_signal(&signal);
                    }
                }
            }
            let s = ep.server.stats();
            eprintln!(
                "served {} payload bytes in {} packets ({} resent), {} sessions; dropped datagrams: {}",
                s.payload_bytes_sent,
                s.packets_sent,
                s.payload_bytes_resent,
                s.sessions_opened,
                ep.drops.total()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Fetch {
            id,
            from,
            bind,
            to,
            timeout_secs,
            json,
            quiet,
            background,
            encrypt,
            source_give_up_secs,
        } => {
            let cfg = EndpointConfig {
                driver: cli.driver,
                zero_copy: cli.zero_copy,
                ..Default::default()
            };
            let mut ep = Endpoint::bind(*bind, key(&cli)?, store, cfg)?;
            install_signals();
            let clock = Clock::new();
            ep.start_fetch(
                *id,
                None,
                from,
                FetchConfig {
                    background: *background,
                    encrypt: *encrypt,
                    source_give_up: Duration::from_secs(*source_give_up_secs),
                    ..FetchConfig::default()
                },
            )?;
            let deadline = clock.now() + Duration::from_secs(*timeout_secs);
            let mut next_report = clock.now();
            let mut complete = false;
            // Encrypted datagrams whose AEAD tag failed, over every source.
            let mut sealed_rejected = 0u64;
            // Blocks verified over every source (more than the block count: some came twice).
            let mut blocks_verified = 0u64;
            // Payload bytes received over every source (table and duplicates included).
            let mut payload_bytes = 0u64;
            while !STOP.load(Ordering::Relaxed) {
                ep.poll(Duration::from_millis(100))?;
                for n in ep.take_news() {
                    match n {
                        FetchNews::Complete { sources, .. } => {
                            complete = true;
                            sealed_rejected = sources.iter().map(|s| s.sealed_rejected).sum();
                            blocks_verified = sources.iter().map(|s| s.blocks_verified).sum();
                            payload_bytes = sources.iter().map(|s| s.payload_bytes).sum();
                        }
                        FetchNews::SourceDropped { addr, reason, .. } => eprintln!("source {addr} dropped: {reason}"),
                    }
                }
                if complete || ep.fetching() == 0 {
                    break;
                }
                let now = clock.now();
                if now >= deadline {
                    bail!("timed out after {timeout_secs} s; what was verified is kept and the next fetch resumes from it");
                }
                if !quiet && now >= next_report {
                    next_report = now + Duration::from_secs(1);
                    for p in ep.progress() {
                        let live = p.sources.iter().filter(|s| s.active).count();
                        eprintln!(
                            "{}: {} / {} MiB from {live} source(s), {:.0} Mbit/s",
                            p.content.short(),
                            p.bytes_held >> 20,
                            p.size.map_or("?".into(), |s| (s >> 20).to_string()),
                            p.sources.iter().map(|s| s.rate_bytes_per_s).sum::<u64>() as f64 * 8.0 / 1e6
                        );
                    }
                }
                if ep.progress().iter().any(|p| p.live_sources == 0) {
                    bail!("every source was dropped (see above); check the addresses, the key (LOWTIDE_KEY) and that the servers hold {id}");
                }
            }
            if !complete {
                bail!("interrupted; what was verified is kept and the next fetch resumes from it");
            }
            let secs = clock.now().since(lowtide_engine::time::Time::ZERO).as_secs_f64();
            let size = ep.store.table(id).map_or(0, |t| t.geometry().size);
            eprintln!(
                "fetched {} ({size} bytes) in {secs:.2} s: {:.2} Gbit/s with the {} driver",
                id.short(),
                size as f64 * 8.0 / secs / 1e9,
                ep.driver_name()
            );
            if let Some(to) = to {
                ep.store
                    .export(id, to)
                    .with_context(|| format!("writing {}", to.display()))?;
            }
            if let Some(j) = json {
                let v = serde_json::json!({
                    "content": id.to_string(), "bytes": size, "seconds": secs,
                    "goodput_gbps": size as f64 * 8.0 / secs / 1e9, "driver": ep.driver_name(),
                    "dropped_datagrams": ep.drops.total(), "encrypted": encrypt,
                    "sealed_rejected": sealed_rejected,
                    "blocks": ep.store.table(id).map_or(0, |t| t.geometry().block_count()),
                    "blocks_verified": blocks_verified, "payload_bytes_received": payload_bytes,
                });
                std::fs::write(j, serde_json::to_vec_pretty(&v)?)
                    .with_context(|| format!("writing {}", j.display()))?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn install_signals() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}
