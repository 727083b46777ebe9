//! Discovery on a real LAN: two network namespaces joined by a veth pair
//! (10.77.N.1/24 and 10.77.N.2/24, named `ltdisc-<pid>-a/b`, removed on drop
//! even when a check fails). Each side runs the real discovery service on a
//! thread moved into its namespace, with a stand-in engine that says what it
//! holds. Broadcast finds the holder, the role of the site kind is obeyed
//! (a VPN agent does not answer, a Wi-Fi agent finds it without broadcasting),
//! and a peer that stops answering is dropped; a signed manifest the holder
//! kept comes across in chunks, byte-exact. Needs root and `ip`; skipped
//! (with a message) otherwise.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use lowtide_agent::discovery::service::{Discovery, Settings};
use lowtide_agent::worker::{Cmd, Handle, Held};
use lowtide_engine::content::ContentId;
use lowtide_engine::wire::{DeploymentKey, Keys};

/// The two namespaces; deleted (with their veth pair) on drop.
struct Lan {
    a: String,
    b: String,
    net: u8,
}

impl Lan {
    fn new() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || Command::new("ip").arg("-V").output().is_err() {
            eprintln!("\n*** SKIPPED discovery_netns: needs root and iproute2 (ip) ***\n");
            return None;
        }
        let pid = std::process::id();
        let net = (pid % 200) as u8 + 20;
        let lan = Lan {
            a: format!("ltdisc-{pid}-a"),
            b: format!("ltdisc-{pid}-b"),
            net,
        };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &lan.a]);
        ip(&["netns", "add", &lan.b]);
        let (va, vb) = (format!("ltd{pid}a"), format!("ltd{pid}b"));
        ip(&[
            "link", "add", &va, "netns", &lan.a, "type", "veth", "peer", "name", &vb, "netns", &lan.b,
        ]);
        for (ns, dev, host) in [(&lan.a, &va, 1), (&lan.b, &vb, 2)] {
            let addr = format!("10.77.{net}.{host}/24");
            ip(&["-n", ns, "addr", "add", &addr, "broadcast", "+", "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        Some(lan)
    }

    fn addr(&self, host: u8) -> IpAddr {
        IpAddr::from([10, 77, self.net, host])
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// What a test asks of an agent thread.
enum Ask {
    Lookup(ContentId, mpsc::Sender<Vec<lowtide_agent::discovery::Found>>),
    Peers(mpsc::Sender<Vec<IpAddr>>),
    Manifest(ContentId, IpAddr, mpsc::Sender<Result<Vec<u8>, String>>),
    SiteKind(Option<&'static str>),
    Stop,
}

/// A discovery service on its own thread inside namespace `ns`, whose stand-in
/// engine (port `engine_port`) holds all of `holds`, if anything; it keeps signed manifests
/// in `manifest_dir`.
fn agent(ns: &str, engine_port: u16, holds: Option<ContentId>, manifest_dir: &std::path::Path) -> mpsc::Sender<Ask> {
    let manifest_dir = manifest_dir.to_path_buf();
    let (tx, rx) = mpsc::channel::<Ask>();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
        // SAFETY: setns on a namespace file we hold open; it moves this thread only.
        assert_eq!(
            unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
            0,
            "setns {ns}"
        );
        let (etx, erx) = mpsc::channel::<Cmd>();
        std::thread::spawn(move || {
            while let Ok(c) = erx.recv() {
                if let Cmd::Held { id, reply } = c {
                    let held = (Some(id) == holds).then(|| Held {
                        content: id,
                        size: 1 << 20,
                        held_bytes: 1 << 20,
                        complete: true,
                        ranges: vec![(0, 1 << 20)],
                        missing_blocks: Vec::new(),
                    });
                    let _ = reply.send(Ok(held));
                }
            }
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let settings = Settings {
                enabled: true,
                port: 4501,
                interval_secs: 1,
                peer_timeout_secs: 3,
                scan_per_sec: 0,
                scan_prefix_min: 24,
                lookup_ms: 500,
                manifest_dir,
            };
            let keys = Keys::new(DeploymentKey::derive(b"ltdisc test"));
            let d = Discovery::start(settings, &keys, engine_port, Handle::new(etx));
            d.set_site_kind(Some("standard"));
            loop {
                let got = match rx.try_recv() {
                    Ok(a) => a,
                    Err(mpsc::TryRecvError::Empty) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                };
                match got {
                    Ask::Lookup(id, back) => {
                        let _ = back.send(d.lookup(id).await);
                    }
                    Ask::Peers(back) => {
                        let st = d.status();
                        let ips = st["peers"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|p| p["addr"].as_str().unwrap().parse::<SocketAddr>().unwrap().ip())
                            .collect();
                        let _ = back.send(ips);
                    }
                    Ask::SiteKind(k) => d.set_site_kind(k),
                    Ask::Manifest(id, peer, back) => {
                        let _ = back.send(d.fetch_manifest(id, peer).await.map_err(|e| e.to_string()));
                    }
                    Ask::Stop => break,
                }
            }
            d.stop();
        });
    });
    tx
}

fn lookup(a: &mpsc::Sender<Ask>, id: ContentId) -> Vec<lowtide_agent::discovery::Found> {
    let (tx, rx) = mpsc::channel();
    a.send(Ask::Lookup(id, tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn peers(a: &mpsc::Sender<Ask>) -> Vec<IpAddr> {
    let (tx, rx) = mpsc::channel();
    a.send(Ask::Peers(tx)).unwrap();
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

/// Wait (at most 30 s) until `f` holds.
fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..300 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{what}: not within 30 s");
}

#[test]
fn discovery_finds_holders_on_a_real_lan_and_obeys_site_roles() {
    let Some(lan) = Lan::new() else { return };
    let id = ContentId::of(b"package on the LAN");
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let holder = agent(&lan.a, 4600, Some(id), dirs.0.path());
    let asker = agent(&lan.b, 4700, None, dirs.1.path());

    // Broadcast: the holder answers with its engine port, at its address on the shared subnet.
    let mut found = Vec::new();
    wait_until("the holder answers a broadcast look-up", || {
        found = lookup(&asker, id);
        !found.is_empty()
    });
    assert_eq!(found[0].addr, SocketAddr::new(lan.addr(1), 4600));
    assert!(found[0].complete && found[0].serving, "{found:?}");
    assert_eq!(found[0].how, lowtide_agent::discovery::How::Broadcast);
    // Content nobody holds: no answer at all (holders of nothing stay silent).
    assert!(lookup(&asker, ContentId::of(b"nobody has this")).is_empty());
    // Presence rounds fill the peer table on both sides.
    wait_until("the asker's peer table lists the holder", || {
        peers(&asker).contains(&lan.addr(1))
    });
    wait_until("the holder's peer table lists the asker", || {
        peers(&holder).contains(&lan.addr(2))
    });

    // The signed manifest the holder kept (three chunks' worth) comes across byte-exact; one it
    // does not keep gets no answer, and the asker says so.
    let signed = lowtide_agent::server::SignedManifest {
        manifest: format!("{{\"id\":\"{id}\",\"pad\":\"{}\"}}", "x".repeat(2500)),
        signature: "5a".repeat(64),
        public_key: String::new(),
    };
    lowtide_agent::manifests::save(dirs.0.path(), &id, &signed).unwrap();
    let ask_manifest = |id| {
        let (tx, rx) = mpsc::channel();
        asker.send(Ask::Manifest(id, lan.addr(1), tx)).unwrap();
        rx.recv_timeout(Duration::from_secs(30)).unwrap()
    };
    let got = ask_manifest(id).expect("the manifest from the holder");
    assert_eq!(got, lowtide_agent::manifests::to_bytes(&signed).unwrap());
    let e = ask_manifest(ContentId::of(b"nobody has this")).unwrap_err();
    assert!(e.contains("did not send the manifest"), "{e}");

    // A Wi-Fi agent does not broadcast but still finds the holder (unicast to known peers).
    asker.send(Ask::SiteKind(Some("wifi"))).unwrap();
    let found = lookup(&asker, id);
    assert_eq!(found.len(), 1, "unicast look-up from a Wi-Fi agent");
    assert_eq!(found[0].how, lowtide_agent::discovery::How::Known, "not broadcast");

    // A VPN agent does not answer: the asker finds nothing, and drops it once it is silent.
    holder.send(Ask::SiteKind(Some("vpn"))).unwrap();
    asker.send(Ask::SiteKind(Some("standard"))).unwrap();
    wait_until("a VPN holder is not found", || lookup(&asker, id).is_empty());
    wait_until("the silent peer is dropped", || !peers(&asker).contains(&lan.addr(1)));

    holder.send(Ask::Stop).unwrap();
    asker.send(Ask::Stop).unwrap();
}
