//! `lowtide-agent`: the daemon (`run`) and the commands that talk to it over
//! its Unix socket (`get`, `status`, `cache`, `pause`, `resume`). A thin shell
//! over the `lowtide_agent` library.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use lowtide_agent::config::Config;
use lowtide_agent::proto::{GetDone, Progress, Reply, Request, Target};
use lowtide_engine::content::ContentId;

#[derive(Parser)]
#[command(
    name = "lowtide-agent",
    version,
    about = "Lowtide agent: fetch and serve packages peer to peer"
)]
struct Cli {
    /// TOML config file (default /etc/lowtide/agent.toml); LOWTIDE_* environment variables override it.
    #[arg(long, short, env = "LOWTIDE_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent daemon until SIGINT or SIGTERM.
    Run,
    /// Fetch a content (by its id, or name[@version]) through the running agent.
    Get {
        /// Content id (64 hexadecimal characters, the BLAKE3 hash the server published), or
        /// name[@version]: without a version, the newest one that is not retired.
        content: String,
        /// Copy the finished content to this file.
        #[arg(long)]
        to: Option<PathBuf>,
        /// No progress bar; print only the result (also the default when stderr is not a terminal).
        #[arg(long, short)]
        quiet: bool,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Site, peers, active transfers, bytes by source.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Peers the server named as sources, and which are in use.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The content cache.
    Cache {
        #[command(subcommand)]
        cmd: CacheCmd,
    },
    /// Stop serving background (WAN) transfers until `resume`.
    Pause,
    /// Serve background transfers again.
    Resume,
}

#[derive(Subcommand)]
enum CacheCmd {
    /// List cached content.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Remove a content from the cache.
    Rm { content: ContentId },
    /// Re-read and re-verify cached content (one, or all); bad blocks are dropped and fetched again later.
    Verify { content: Option<ContentId> },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("LOWTIDE_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lowtide-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    let cfg = Config::load(cli.config.as_deref(), |k| std::env::var(k).ok())?;
    let sock = cfg.socket_path();
    match cli.cmd {
        Cmd::Run => {
            // Before the runtime starts its threads: capabilities are per thread, and the
            // threads started afterwards inherit the set left once BPF is attached.
            cfg.check_for_daemon()?;
            let mon = lowtide_agent::monitor::setup(&cfg);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(lowtide_agent::daemon::run(cfg, mon))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Get {
            content,
            to,
            quiet,
            json,
        } => {
            let interactive = !quiet && std::io::stderr().is_terminal();
            let id = match content.parse::<Target>().map_err(anyhow::Error::msg)? {
                Target::Id(id) => id,
                Target::Name { name, version } => {
                    let v = call(&sock, &Request::Resolve { name, version })?;
                    let id: ContentId = serde_json::from_value(v["content"].clone())
                        .context("the agent's answer to the name look-up is not understood")?;
                    if interactive {
                        eprintln!(
                            "{} {} is {id}",
                            v["name"].as_str().unwrap_or(""),
                            v["version"].as_str().unwrap_or("")
                        );
                    }
                    id
                }
            };
            let to = match to {
                Some(t) if t.is_relative() => Some(
                    std::env::current_dir()
                        .context("reading the current directory")?
                        .join(t),
                ),
                t => t,
            };
            get(&sock, id, to, interactive, json)
        }
        Cmd::Status { json } => {
            let v = call(&sock, &Request::Status)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_status(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Peers { json } => {
            let v = call(&sock, &Request::Peers)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in v.as_array().into_iter().flatten() {
                    let s = |k: &str| p[k].as_str().unwrap_or("-").to_string();
                    println!(
                        "{:<22} {:<10} site {:<12} {:<11} {}{}",
                        s("addr"),
                        s("kind"),
                        s("site"),
                        s("protocol"),
                        s("reason"),
                        if p["active"].as_bool() == Some(true) {
                            format!(", sending {} B/s", p["receiving_bytes_per_s"])
                        } else {
                            String::new()
                        }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Cache { cmd } => {
            match cmd {
                CacheCmd::Ls { json } => {
                    let v = call(&sock, &Request::CacheLs)?;
                    if json {
                        println!("{}", serde_json::to_string_pretty(&v)?);
                    } else {
                        for i in v.as_array().into_iter().flatten() {
                            println!(
                                "{}  {:>12}  {}",
                                i["content"].as_str().unwrap_or("?"),
                                i["size"],
                                if i["complete"].as_bool() == Some(true) {
                                    "complete".to_string()
                                } else {
                                    format!("partial ({} bytes held)", i["held_bytes"])
                                }
                            );
                        }
                    }
                }
                CacheCmd::Rm { content } => {
                    call(&sock, &Request::CacheRm { content })?;
                    println!("removed {content}");
                }
                CacheCmd::Verify { content } => {
                    let v = call(&sock, &Request::CacheVerify { content })?;
                    let mut bad_total = 0;
                    for i in v.as_array().into_iter().flatten() {
                        let bad = i["bad_blocks"].as_array().map_or(0, Vec::len);
                        bad_total += bad;
                        println!(
                            "{}  {}",
                            i["content"].as_str().unwrap_or("?"),
                            if bad == 0 {
                                "ok".to_string()
                            } else {
                                format!("{bad} bad block(s) dropped; they are fetched again on the next get")
                            }
                        );
                    }
                    if bad_total > 0 {
                        return Ok(ExitCode::from(2));
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Pause => {
            call(&sock, &Request::Pause)?;
            println!("background serving paused");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Resume => {
            call(&sock, &Request::Resume)?;
            println!("background serving resumed");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn connect(sock: &Path, req: &Request) -> anyhow::Result<BufReader<UnixStream>> {
    let mut s = UnixStream::connect(sock).with_context(|| {
        format!(
            "cannot reach the agent at {}: is `lowtide-agent run` running (systemctl status lowtide-agent), \
             with the same state_dir?",
            sock.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    s.write_all(&line).context("sending the request to the agent")?;
    Ok(BufReader::new(s))
}

fn read_reply(r: &mut BufReader<UnixStream>) -> anyhow::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line).context("reading the agent's answer")? == 0 {
        bail!("the agent closed the connection without an answer (see its log: journalctl -u lowtide-agent)");
    }
    serde_json::from_str(&line).with_context(|| format!("the agent's answer is not understood: {line}"))
}

/// One request, one answer.
fn call(sock: &Path, req: &Request) -> anyhow::Result<serde_json::Value> {
    let mut r = connect(sock, req)?;
    loop {
        match read_reply(&mut r)? {
            Reply::Ok(v) => return Ok(v),
            Reply::Error(e) => bail!("{e}"),
            Reply::Progress(_) => continue,
        }
    }
}

fn get(sock: &Path, id: ContentId, to: Option<PathBuf>, interactive: bool, json: bool) -> anyhow::Result<ExitCode> {
    let mut r = connect(sock, &Request::Get { content: id })?;
    let bar = interactive.then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {binary_bytes_per_sec} [{wide_bar}] ETA {eta} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let result = loop {
        match read_reply(&mut r)? {
            Reply::Progress(p) => {
                if let Some(b) = &bar {
                    show(b, &p);
                }
            }
            Reply::Ok(v) => break Ok(v),
            Reply::Error(e) => break Err(e),
        }
    };
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let v = match result {
        Ok(v) => v,
        Err(e) => bail!("{e}"),
    };
    let d: GetDone = serde_json::from_value(v.clone()).context("the agent's answer is not understood")?;
    if let Some(to) = &to {
        export(&d.path, to)?;
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} {}@{}: {} bytes ({} from peers, {} from the parent site, {} from the origin, {} already cached){}",
        d.content,
        d.name,
        d.version,
        d.size,
        d.bytes_from_peers,
        d.bytes_from_parent,
        d.bytes_from_origin,
        d.bytes_already_held,
        to.map(|t| format!(" -> {}", t.display())).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Copy the verified content out of the cache: to a temporary file beside
/// `to`, synced, then renamed, so `to` is never seen half-written.
fn export(src: &Path, to: &Path) -> anyhow::Result<()> {
    let mut name = to.file_name().unwrap_or_default().to_os_string();
    name.push(".lowtide-partial");
    let tmp = to.with_file_name(name);
    std::fs::copy(src, &tmp).with_context(|| {
        format!(
            "copying {} to {} (is this user in the agent's group, to read the cache?)",
            src.display(),
            tmp.display()
        )
    })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, to).with_context(|| format!("renaming to {}", to.display()))
}

fn show(b: &ProgressBar, p: &Progress) {
    if p.size > 0 {
        b.set_length(p.size);
    }
    b.set_position(p.held_bytes);
    b.set_message(match p.phase.as_str() {
        "peers" => format!("{} peer(s)", p.sources),
        "origin" => "origin".to_string(),
        other => other.to_string(),
    });
}

fn print_status(v: &serde_json::Value) {
    let s = |k: &str| match &v[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        x => x.to_string(),
    };
    println!("agent     {} ({})", s("agent_id"), s("hostname"));
    println!("server    {}", s("server"));
    println!("site      {} ({})", s("site"), s("site_kind"));
    if !v["heartbeat_error"].is_null() {
        println!("heartbeat FAILING: {}", s("heartbeat_error"));
    }
    println!(
        "udp       {} ({} driver){}",
        s("udp"),
        s("driver"),
        if v["background_paused"].as_bool() != Some(true) {
            ""
        } else if v["monitor"]["paused_busy"].as_bool() == Some(true) {
            ", background serving paused: the link is busy with other traffic"
        } else {
            ", background serving paused"
        }
    );
    let m = &v["monitor"];
    if let Some(ifs) = m["interfaces"].as_array() {
        for i in ifs {
            println!(
                "egress    {} ({}): backlog {} bytes, other traffic {}{}",
                i["name"].as_str().unwrap_or("?"),
                i["kind"].as_str().unwrap_or("?"),
                i["backlog_bytes"],
                i["other_bytes_per_s"]
                    .as_u64()
                    .map_or("not visible".to_string(), |b| format!("{} kbit/s", b * 8 / 1000)),
                i["degraded"]
                    .as_str()
                    .map_or(String::new(), |d| format!(" [eBPF unavailable: {d}]"))
            );
        }
        if ifs.is_empty() {
            println!(
                "egress    not watched (monitor {}): delay signal only",
                m["mode"].as_str().unwrap_or("?")
            );
        }
    }
    let b = &v["bytes_by_source"];
    println!(
        "received  {} from same-site peers, {} from the parent site, {} from the origin",
        b["peer"], b["parent"], b["origin"]
    );
    println!(
        "served    {} bytes in {} session(s)",
        v["served"]["payload_bytes"], v["served"]["sessions_opened"]
    );
    println!(
        "cache     {} item(s), {} of {} bytes",
        v["cache"]["items"], v["cache"]["used_bytes"], v["cache"]["limit_bytes"]
    );
    let peers: Vec<String> = v["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    println!(
        "peers     {}",
        if peers.is_empty() { "-".into() } else { peers.join(" ") }
    );
    for t in v["transfers"].as_array().into_iter().flatten() {
        println!(
            "transfer  {} {}/{} bytes from {} source(s)",
            t["content"].as_str().unwrap_or("?"),
            t["bytes_held"],
            t["size"],
            t["live_sources"]
        );
    }
    for d in v["dropped_peers"].as_array().into_iter().flatten() {
        println!(
            "dropped   {} for {}: {}",
            d["addr"].as_str().unwrap_or("?"),
            d["content"].as_str().map_or("?", |c| &c[..c.len().min(12)]),
            d["reason"].as_str().unwrap_or("?")
        );
    }
}
