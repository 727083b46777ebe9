//! Real `lowtide-agent run` processes, each in its own network namespace,
//! against a real server (the `lowtide_server` library in this process, its
//! listening socket opened inside the router's namespace): two subnets,
//! 10.61.1.0/24 (site `hq`) and 10.61.2.0/24 (site `branch`, a child of
//! `hq`), each a bridge in a router namespace that forwards between them.
//!
//! - a package published once reaches every agent byte-exact, from the
//!   origin exactly once;
//! - a corrupting peer (the debug-build test hook `LOWTIDE_TEST_CORRUPT_SERVING`)
//!   is dropped and the download completes byte-exact from the honest one;
//! - SIGKILL of the serving peer mid-transfer loses nothing;
//! - an agent killed and restarted mid-download resumes without fetching
//!   what it had verified again;
//! - an agent moved to the other subnet mid-download notices, re-registers
//!   in the other site and finishes from that site's peer;
//! - an unknown content id, a manifest tampered with in flight and a full
//!   disk are clear errors that corrupt nothing, and the next get after
//!   freeing space resumes;
//! - `get` and `status` driven through the CLI as a user would.
//!
//! Peers are slowed with a `tbf` qdisc where a test needs a download to be
//! in progress while it acts; nothing asserts on time (conditions are waited
//! for with generous deadlines).
//!
//! Needs root (network namespaces, tc, tmpfs). Without root the tests say why
//! and pass, except under `CI=true`, where not being root is a failure. Every
//! namespace (`ltns-<pid>-...`) and mount is removed by a guard on drop, even
//! when a test fails; namespaces left by a test process that was killed are
//! removed by the next run.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{data, Agent, ChildGuard, Server};
use lowtide_engine::content::ContentId;
use lowtide_tests::netns::run;
use serde_json::Value;

const PREFIX: &str = "ltns-";
/// The UDP port every agent serves on (each has its own namespace).
const PORT: u16 = 4500;
/// Polls for a condition the test waits on, [`POLL`] apart: a generous deadline
/// (a loaded machine is slow, never this slow), not a timing assertion.
const WAIT_POLLS: u32 = 3600;
const POLL: Duration = Duration::from_millis(50);
const MIB: usize = 1024 * 1024;
static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Whether the tests may build their namespaces (else they say why and pass, except under CI).
fn is_root() -> bool {
    lowtide_tests::netns::is_root("network namespaces, tc, tmpfs")
}

/// Wait until `f` gives a value, at most [`WAIT_POLLS`] polls; `what` names the condition in the panic.
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..WAIT_POLLS {
        if let Some(v) = f() {
            return v;
        }
        std::thread::sleep(POLL);
    }
    panic!("gave up waiting for {what}");
}

/// Remove namespaces of ours whose test process is gone (killed before its guards ran).
fn sweep_stale() {
    for line in run(&["ip", "netns", "list"]).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Site {
    Hq,
    Branch,
}

impl Site {
    fn id(self) -> &'static str {
        match self {
            Site::Hq => "hq",
            Site::Branch => "branch",
        }
    }
    fn net(self) -> &'static str {
        match self {
            Site::Hq => "10.61.1",
            Site::Branch => "10.61.2",
        }
    }
    fn bridge(self) -> &'static str {
        match self {
            Site::Hq => "br1",
            Site::Branch => "br2",
        }
    }
}

/// The network namespaces of one test and the server; everything is deleted on drop.
struct Lab {
    tag: String,
    router: String,
    namespaces: Vec<String>,
    /// Agent name -> (namespace, address).
    hosts: Vec<(String, String, String)>,
    next_host: u8,
    root: tempfile::TempDir,
    srv: Option<Server>,
}

impl Lab {
    fn new() -> Self {
        sweep_stale();
        let tag = format!("{}-{}", std::process::id(), NEXT_LAB.fetch_add(1, Ordering::Relaxed));
        let router = format!("{PREFIX}{tag}-router");
        let mut lab = Self {
            tag,
            router: router.clone(),
            namespaces: Vec::new(),
            hosts: Vec::new(),
            next_host: 10,
            root: tempfile::tempdir().unwrap(),
            srv: None,
        };
        lab.add_ns(&router);
        run(&["ip", "netns", "exec", &router, "sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        for site in [Site::Hq, Site::Branch] {
            let br = site.bridge();
            // A fixed MAC: a bridge without one takes the lowest of its ports', so adding an
            // agent's link could change the router's MAC under the agents' ARP caches and cut
            // them off for half a minute.
            let mac = match site {
                Site::Hq => "02:00:0a:3d:01:01",
                Site::Branch => "02:00:0a:3d:02:01",
            };
            run(&["ip", "-n", &router, "link", "add", br, "address", mac, "type", "bridge"]);
            run(&[
                "ip",
                "-n",
                &router,
                "addr",
                "add",
                &format!("{}.1/24", site.net()),
                "dev",
                br,
            ]);
            run(&["ip", "-n", &router, "link", "set", br, "up"]);
        }
        let listener = bind_in(&router, "0.0.0.0:0");
        let base = format!("http://10.61.1.1:{}", listener.local_addr().unwrap().port());
        lab.srv = Some(Server::start_on(
            listener,
            base,
            b"id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\n\
              hq,HQ,,standard,10.61.1.0/24,,\n\
              branch,Branch,hq,standard,10.61.2.0/24,,\n",
        ));
        lab
    }

    fn srv(&self) -> &Server {
        self.srv.as_ref().unwrap()
    }

    fn root(&self) -> &Path {
        self.root.path()
    }

    fn add_ns(&mut self, ns: &str) {
        run(&["ip", "netns", "add", ns]);
        self.namespaces.push(ns.to_string());
        for k in ["all", "default"] {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{k}.disable_ipv6=1"),
            ]);
        }
        run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }

    /// A namespace for agent `name` on `site`'s subnet; its address.
    fn host(&mut self, name: &str, site: Site) -> (String, String) {
        let ns = format!("{PREFIX}{}-{name}", self.tag);
        self.add_ns(&ns);
        let addr = format!("{}.{}", site.net(), self.next_host);
        self.next_host += 1;
        let veth = format!("v-{name}");
        run(&[
            "ip",
            "-n",
            &self.router,
            "link",
            "add",
            &veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        run(&["ip", "-n", &self.router, "link", "set", &veth, "master", site.bridge()]);
        run(&["ip", "-n", &self.router, "link", "set", &veth, "up"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "add",
            "default",
            "via",
            &format!("{}.1", site.net()),
        ]);
        self.hosts.push((name.to_string(), ns.clone(), addr.clone()));
        (ns, addr)
    }

    fn config(&self, name: &str, extra: &str) -> String {
        let srv = self.srv();
        let dir = self.root().join(name);
        let base = format!(
            "server_url = {:?}\nenrol_token = {:?}\ndeployment_secret = {:?}\nstate_dir = {:?}\n\
             listen = \"0.0.0.0:{PORT}\"\ncache_limit_mib = 64\nhostname = {name:?}\n\
             peer_stall_secs = 30\nsources_refresh_secs = 2\nheartbeat_secs = 2\ninventory_secs = 1\n\
             driver = \"portable\"\n",
            srv.base,
            srv.token,
            common::SECRET,
            dir.join("state"),
        );
        common::config_with(&base, extra)
    }

    /// Start agent `name` in its own namespace on `site`'s subnet.
    fn agent(&mut self, name: &str, site: Site) -> Agent {
        self.agent_with(name, site, "", Vec::new())
    }

    fn agent_with(&mut self, name: &str, site: Site, extra: &str, env: Vec<(String, String)>) -> Agent {
        let (ns, _) = self.host(name, site);
        let text = self.config(name, extra);
        Agent::start_raw(self.root.path(), name, &text, site.id(), Some(&ns), env)
    }

    fn ns_of(&self, name: &str) -> &str {
        &self.hosts.iter().find(|h| h.0 == name).unwrap().1
    }

    /// The address peers reach agent `name` at.
    fn peer(&self, name: &str) -> String {
        let addr = &self.hosts.iter().find(|h| h.0 == name).unwrap().2;
        format!("{addr}:{PORT}")
    }

    /// Slow what agent `name` sends to `rate` (a tc rate such as "8mbit").
    fn shape(&self, name: &str, rate: &str) {
        run(&[
            "ip",
            "netns",
            "exec",
            self.ns_of(name),
            "tc",
            "qdisc",
            "replace",
            "dev",
            "eth0",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            "32kb",
            "latency",
            "100ms",
        ]);
    }

    /// Move agent `name`'s link to `site`'s bridge and renumber it into that subnet.
    fn move_to(&mut self, name: &str, site: Site) -> String {
        let ns = self.ns_of(name).to_string();
        let addr = format!("{}.{}", site.net(), self.next_host);
        self.next_host += 1;
        run(&[
            "ip",
            "-n",
            &self.router,
            "link",
            "set",
            &format!("v-{name}"),
            "master",
            site.bridge(),
        ]);
        run(&["ip", "-n", &ns, "addr", "flush", "dev", "eth0"]);
        run(&["ip", "-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
        run(&[
            "ip",
            "-n",
            &ns,
            "route",
            "replace",
            "default",
            "via",
            &format!("{}.1", site.net()),
        ]);
        let h = self.hosts.iter_mut().find(|h| h.0 == name).unwrap();
        h.2 = addr.clone();
        addr
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // A failed test shows its TCP sockets (the server's and the agents'): a stuck
        // connection is the usual story behind a timed-out request.
        if std::thread::panicking() {
            for ns in &self.namespaces {
                let o = Command::new("ip").args(["netns", "exec", ns, "ss", "-tanoi"]).output();
                if let Ok(o) = o {
                    eprintln!(
                        "TCP sockets in {ns} (the test failed):\n{}",
                        String::from_utf8_lossy(&o.stdout)
                    );
                }
            }
        }
        // The server first (its socket lives in the router's namespace), then the namespaces.
        self.srv = None;
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A TCP listener opened inside network namespace `ns` (by a thread that enters it).
fn bind_in(ns: &str, addr: &str) -> TcpListener {
    let (ns, addr) = (ns.to_string(), addr.to_string());
    std::thread::spawn(move || {
        enter(&ns);
        TcpListener::bind(&addr).unwrap()
    })
    .join()
    .unwrap()
}

/// Move the calling thread into network namespace `ns` (threads it spawns are there too).
fn enter(ns: &str) {
    let f = File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// A tmpfs mounted for a test; unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).unwrap();
        run(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &format!("size={size}"),
            "ltns-test",
            path.to_str().unwrap(),
        ]);
        Self(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The running transfer of `id` on `a`, if any.
fn transfer(a: &Agent, id: &ContentId) -> Option<Value> {
    a.status()["transfers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["content"] == id.to_string().as_str())
        .cloned()
}

fn held(a: &Agent, id: &ContentId) -> u64 {
    transfer(a, id).and_then(|t| t["bytes_held"].as_u64()).unwrap_or(0)
}

/// The content id of a file: its hash, as the publisher computed it.
fn hash_of(p: &Path) -> ContentId {
    ContentId::of(&std::fs::read(p).unwrap())
}

fn served(a: &Agent) -> u64 {
    a.status()["served"]["payload_bytes"].as_u64().unwrap()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn netns_a_package_published_once_reaches_every_agent_byte_exact() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(4 * MIB + 12_345, 21);
    let id = lab.srv().publish(&bytes, "tool", "1.0");
    let root = lab.root().to_path_buf();
    let out = |n: &str| root.join(format!("{n}.bin"));

    // The first agent, alone in hq so the server names it hq's RVP: nobody holds it, the origin.
    // (Agents start one site's first at a time: with several running, whichever the server ranks
    // first becomes the RVP, fetches for the site, and the one that asked takes it from there.)
    let a1 = lab.agent("a1", Site::Hq);
    let r1 = a1.get_json(&id, &out("a1"));
    assert_eq!(n(&r1, "bytes_from_origin"), bytes.len() as u64, "{r1}");
    // Two more of hq at once: from a1 (and each other).
    let a2 = lab.agent("a2", Site::Hq);
    let a3 = lab.agent("a3", Site::Hq);
    let (g2, g3) = (a2.spawn_get(&id, &out("a2")), a3.spawn_get(&id, &out("a3")));
    let (r2, r3) = (g2.wait_ok(&a2), g3.wait_ok(&a3));
    // The branch: its RVP across the router from hq's RVP in the background, the second from it.
    let b1 = lab.agent("b1", Site::Branch);
    let rb1 = b1.get_json(&id, &out("b1"));
    assert!(rb1["sources"].to_string().contains("background from"), "{rb1}");
    assert_eq!(n(&rb1, "bytes_from_parent"), bytes.len() as u64, "{rb1}");
    let b2 = lab.agent("b2", Site::Branch);
    let rb2 = b2.get_json(&id, &out("b2"));
    assert!(
        rb2["sources"]
            .to_string()
            .contains(&format!("foreground from {}", lab.peer("b1"))),
        "b2 fetched from b1, its own site: {rb2}"
    );

    // Every exported file hashes to the published id; the origin gave the bytes once.
    for (name, r) in [("a1", &r1), ("a2", &r2), ("a3", &r3), ("b1", &rb1), ("b2", &rb2)] {
        assert_eq!(hash_of(&out(name)), id, "{name}'s copy is byte-exact");
        if name != "a1" {
            assert_eq!(n(r, "bytes_from_origin"), 0, "{name}: {r}");
        }
    }
    assert_eq!(std::fs::read(out("b2")).unwrap(), bytes);
    assert_eq!(b1.status()["site"], "branch");
    assert!(served(&a1) > 0 && served(&b1) > 0);
}

#[test]
fn netns_a_corrupting_peer_is_dropped_and_the_download_completes_byte_exact() {
    if !is_root() {
        return;
    }
    if !cfg!(debug_assertions) {
        eprintln!("skipping: the corrupting-peer hook exists in debug builds only (this is --release)");
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(3 * MIB + 99, 22);
    let id = lab.srv().publish(&bytes, "tool", "2.0");
    let mut c = lab.agent("c", Site::Hq);
    let h = lab.agent("h", Site::Hq);
    let f = lab.agent("f", Site::Hq);
    c.get_json(&id, &lab.root().join("c.bin"));
    let rh = h.get_json(&id, &lab.root().join("h.bin"));
    assert_eq!(n(&rh, "bytes_from_origin"), 0, "{rh}");

    // c restarts with the hook: it now serves blocks that do not verify.
    c.stop();
    c.env = vec![("LOWTIDE_TEST_CORRUPT_SERVING".into(), "1".into())];
    c.spawn();
    assert!(c.log_text().contains("TEST HOOK"), "{}", c.log_text());
    // The honest peer is slowed so that c is asked for a good share.
    lab.shape("h", "8mbit");

    let out = lab.root().join("f.bin");
    let r = f.get_json(&id, &out);
    assert_eq!(hash_of(&out), id, "byte-exact despite the corrupting peer: {r}");
    let sources = r["sources"].to_string();
    let c_addr = lab.peer("c");
    assert!(
        sources.contains(&format!("dropped {c_addr}: sent a bad block")),
        "the answer says c was dropped: {r}"
    );
    assert!(!sources.contains(&format!("dropped {}", lab.peer("h"))), "{r}");
    assert_eq!(n(&r, "bytes_from_origin"), 0, "the rest came from h: {r}");
    let st = f.status();
    assert!(
        st["dropped_peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["addr"] == c_addr.as_str() && d["reason"].as_str().unwrap().contains("bad block")),
        "{st}"
    );
    assert!(f.ok(&["status"]).contains(&format!("dropped   {c_addr}")));
    assert!(
        f.log_text().contains(&format!("peer {c_addr} dropped")),
        "{}",
        f.log_text()
    );
    assert!(f.ok(&["cache", "verify"]).contains("ok"));
    // The hook really corrupted c's copy: its own verify finds the bad blocks.
    assert_eq!(c.cli(&["cache", "verify"]).status.code(), Some(2));
}

#[test]
fn netns_killing_the_serving_peer_mid_transfer_loses_nothing() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(4 * MIB, 23);
    let id = lab.srv().publish(&bytes, "tool", "3.0");
    let mut p1 = lab.agent("p1", Site::Hq);
    let mut p2 = lab.agent("p2", Site::Hq);
    let f = lab.agent("f", Site::Hq);
    p1.get_json(&id, &lab.root().join("p1.bin"));
    p2.get_json(&id, &lab.root().join("p2.bin"));
    lab.shape("p1", "8mbit");
    lab.shape("p2", "8mbit");

    let out = lab.root().join("f.bin");
    let get = f.spawn_get(&id, &out);
    // Kill the peer that has sent the most, once f has verified some of it.
    let (victim, held_at_kill) = wait_for("f to receive from a peer", || {
        let t = transfer(&f, &id)?;
        let held = t["bytes_held"].as_u64()?;
        let top = t["sources"]
            .as_array()?
            .iter()
            .max_by_key(|s| s["payload_bytes"].as_u64().unwrap_or(0))?
            .clone();
        (held > 0 && top["payload_bytes"].as_u64()? > 0).then(|| (top["addr"].as_str().unwrap().to_string(), held))
    });
    assert!(held_at_kill < bytes.len() as u64);
    let killed = if victim == lab.peer("p1") {
        p1.kill();
        "p1"
    } else {
        assert_eq!(victim, lab.peer("p2"));
        p2.kill();
        "p2"
    };
    let r = get.wait_ok(&f);
    assert_eq!(hash_of(&out), id, "byte-exact after {killed} was killed: {r}");
    let (peers, origin) = (n(&r, "bytes_from_peers"), n(&r, "bytes_from_origin"));
    assert_eq!(peers + origin, bytes.len() as u64, "{r}");
    assert!(peers >= held_at_kill, "what f verified before the kill was kept: {r}");
    assert!(f.ok(&["cache", "verify"]).contains("ok"));
}

#[test]
fn netns_an_agent_restarted_mid_download_resumes_without_refetching_verified_ranges() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(4 * MIB, 24);
    let size = bytes.len() as u64;
    let id = lab.srv().publish(&bytes, "tool", "4.0");
    let p = lab.agent("p", Site::Hq);
    let mut f = lab.agent("f", Site::Hq);
    p.get_json(&id, &lab.root().join("p.bin"));
    lab.shape("p", "4mbit");

    let out = lab.root().join("f.bin");
    let get = f.spawn_get(&id, &out);
    let held_before = wait_for("f to hold half", || {
        let h = held(&f, &id);
        (h >= size / 2).then_some(h)
    });
    // A crash: SIGKILL, no chance to flush anything.
    f.kill();
    let first = get.wait();
    assert!(!first.status.success(), "the get whose daemon died fails");
    assert!(!out.exists(), "nothing exported from an unfinished download");
    f.spawn();
    let served_before = served(&p);
    let r = f.get_json(&id, &out);
    let served_after = served(&p);
    assert_eq!(hash_of(&out), id, "byte-exact after the restart: {r}");
    let already = n(&r, "bytes_already_held");
    assert!(
        already > 0 && already < size,
        "verified ranges survived the crash: {already} kept, {held_before} held shortly before the kill: {r}"
    );
    assert_eq!(n(&r, "bytes_from_origin"), 0, "{r}");
    assert_eq!(n(&r, "bytes_from_peers") + already, size, "{r}");
    // What p sent for the second get: the missing part (and retransmissions), not the whole.
    let resent = served_after - served_before;
    eprintln!(
        "restart: {held_before} held at the kill, {already} kept, {resent} sent by the peer for the {} missing",
        size - already
    );
    assert!(
        resent >= size - already,
        "{resent} sent, {} were missing",
        size - already
    );
    assert!(
        resent < size - already / 2,
        "{resent} bytes sent for {} missing: verified ranges were fetched again",
        size - already
    );
    assert!(f.ok(&["cache", "verify"]).contains("ok"));
}

#[test]
fn netns_an_agent_moved_to_the_other_subnet_continues_from_the_new_sites_peers() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(4 * MIB, 25);
    let id = lab.srv().publish(&bytes, "tool", "5.0");
    let p1 = lab.agent("p1", Site::Hq);
    let p2 = lab.agent("p2", Site::Branch);
    p1.get_json(&id, &lab.root().join("p1.bin"));
    let r2 = p2.get_json(&id, &lab.root().join("p2.bin"));
    assert_eq!(n(&r2, "bytes_from_origin"), 0, "{r2}");
    // m heartbeats rarely and asks for sources rarely: only noticing the move makes it switch soon.
    // (Started after p2's get: had the server elected m hq's RVP, holding nothing, p2 would
    // have gone to the origin.)
    let m = lab.agent_with(
        "m",
        Site::Hq,
        "heartbeat_secs = 600\nsources_refresh_secs = 600\npeer_stall_secs = 600",
        Vec::new(),
    );
    lab.shape("p1", "4mbit");

    let out = lab.root().join("m.bin");
    let get = m.spawn_get(&id, &out);
    let held_at_move = wait_for("m to receive from p1", || {
        let h = held(&m, &id);
        (h > 0).then_some(h)
    });
    assert!(held_at_move < bytes.len() as u64);
    lab.move_to("m", Site::Branch);
    let r = get.wait_ok(&m);
    assert_eq!(hash_of(&out), id, "byte-exact after the move: {r}");
    let sources = r["sources"].to_string();
    let p2_addr = lab.peer("p2");
    assert!(
        sources.contains(&format!("foreground from {p2_addr}")),
        "m used the branch's peer: {r}\n{}",
        m.log_text()
    );
    assert_eq!(n(&r, "bytes_from_origin"), 0, "{r}");
    assert!(n(&r, "bytes_from_peers") >= held_at_move, "{r}");
    assert!(served(&p2) > 0, "p2 served m");
    assert_eq!(m.status()["site"], "branch");
    let log = m.log_text();
    assert!(log.contains("the addresses changed"), "{log}");
    assert!(m.ok(&["cache", "verify"]).contains("ok"));
}

/// An HTTP proxy in front of the server that can alter signed manifests in flight.
struct Interceptor {
    base: String,
    tamper: Arc<AtomicBool>,
}

impl Interceptor {
    /// Listen in `ns` and forward to `upstream` (an address in `ns`); runs until the process ends
    /// (the namespace goes with the test, and with it every socket of the proxy).
    fn start(ns: &str, listen_ip: &str, upstream: SocketAddr) -> Self {
        let listener = bind_in(ns, &format!("{listen_ip}:0"));
        let base = format!("http://{listen_ip}:{}", listener.local_addr().unwrap().port());
        let tamper = Arc::new(AtomicBool::new(false));
        let t = tamper.clone();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            enter(&ns);
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let t = t.clone();
                std::thread::spawn(move || {
                    let _ = proxy_one(conn, upstream, t.load(Ordering::SeqCst));
                });
            }
        });
        Self { base, tamper }
    }
}

/// Forward one request (`Connection: close` both ways); with `tamper`, change the origins of a
/// manifest answer (an attacker sending agents to its own server), keeping the signature.
fn proxy_one(mut conn: TcpStream, upstream: SocketAddr, tamper: bool) -> std::io::Result<()> {
    let mut req = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..k]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while req.len() < head_end + len {
        let k = conn.read(&mut buf)?;
        if k == 0 {
            break;
        }
        req.extend_from_slice(&buf[..k]);
    }
    let path = head.split_whitespace().nth(1).unwrap_or_default().to_string();
    let mut new_head: String = head
        .trim_end()
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    new_head.push_str("Connection: close\r\n\r\n");
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(new_head.as_bytes())?;
    up.write_all(&req[head_end..])?;
    let mut resp = Vec::new();
    up.read_to_end(&mut resp)?;
    if tamper && path.ends_with("/manifest") && resp.starts_with(b"HTTP/1.1 200") {
        let i = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let mut v: Value = serde_json::from_slice(&resp[i..]).unwrap();
        let mut m: Value = serde_json::from_str(v["manifest"].as_str().unwrap()).unwrap();
        m["origins"] = serde_json::json!(["http://10.61.1.66:8080/evil.bin"]);
        v["manifest"] = m.to_string().into();
        let body = serde_json::to_vec(&v).unwrap();
        let head: String = String::from_utf8_lossy(&resp[..i])
            .trim_end()
            .lines()
            .map(|l| {
                if l.to_ascii_lowercase().starts_with("content-length:") {
                    format!("content-length: {}\r\n", body.len())
                } else {
                    format!("{l}\r\n")
                }
            })
            .collect();
        resp = [head.as_bytes(), b"\r\n", &body].concat();
    }
    conn.write_all(&resp)
}

#[test]
fn netns_unknown_ids_and_tampered_manifests_are_clear_errors_that_corrupt_nothing() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let good = data(MIB + 7, 26);
    let other = data(MIB + 9, 27);
    let good_id = lab.srv().publish(&good, "good", "1");
    let other_id = lab.srv().publish(&other, "other", "1");
    let port: u16 = lab.srv().base.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = Interceptor::start(&lab.router, "10.61.1.1", SocketAddr::from(([127, 0, 0, 1], port)));
    // a talks to the server through the proxy, as through a compromised network path.
    let a = lab.agent_with("a", Site::Hq, &format!("server_url = {:?}", proxy.base), Vec::new());
    let out = |n: &str| lab.root().join(n);

    // Through the proxy, untouched: works.
    let r = a.get_json(&good_id, &out("good.bin"));
    assert_eq!(hash_of(&out("good.bin")), good_id, "{r}");

    // An unknown content id: the server's answer, with the id; nothing written.
    let unknown = ContentId::of(b"never published");
    let e = a.fails(&["get", &unknown.to_string(), "--to", out("u").to_str().unwrap()]);
    assert!(e.contains(&unknown.to_string()) && e.contains("404"), "{e}");
    assert!(!out("u").exists());

    // A manifest altered in flight (its origins point elsewhere): the signature does not verify.
    proxy.tamper.store(true, Ordering::SeqCst);
    let e = a.fails(&["get", &other_id.to_string(), "--to", out("o").to_str().unwrap()]);
    assert!(e.contains("signature does not verify"), "{e}");
    assert!(!out("o").exists());
    let ls = a.ok(&["cache", "ls"]);
    assert!(!ls.contains(&other_id.to_string()), "nothing of it cached: {ls}");
    // Even for content already held: the tampered manifest is refused before the cache answers.
    let e = a.fails(&["get", &good_id.to_string()]);
    assert!(e.contains("signature does not verify"), "{e}");
    assert!(a.ok(&["cache", "verify"]).contains("ok"));

    // The path is honest again: the same get works.
    proxy.tamper.store(false, Ordering::SeqCst);
    a.get_json(&other_id, &out("o"));
    assert_eq!(std::fs::read(out("o")).unwrap(), other);
}

/// Bytes of `id` the store of `a` holds durably (committed), from `cache ls`.
fn stored(a: &Agent, id: &ContentId) -> u64 {
    let ls: Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .find(|h| h["content"] == id.to_string().as_str())
        .map_or(0, |h| h["held_bytes"].as_u64().unwrap())
}

#[test]
fn netns_a_full_disk_is_a_clear_error_and_the_next_get_resumes() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    // 384 blocks of 16 KiB: the store's journal (16 bytes a block) needs a second page after
    // 256 blocks, which is when a disk filled up mid-download bites (the data is preallocated).
    let bytes = data(6 * MIB, 28);
    let size = bytes.len() as u64;
    let id = lab.srv().publish(&bytes, "tool", "6.0");
    let p = lab.agent("p", Site::Hq);
    p.get_json(&id, &lab.root().join("p.bin"));
    lab.shape("p", "4mbit");

    // d's store is on an 8 MiB tmpfs; its cache limit (64 MiB) does not know that.
    let store = lab.root().join("d-store");
    let fs = Tmpfs::mount(&store, "8m");
    let d = lab.agent_with("d", Site::Hq, &format!("store_dir = {store:?}"), Vec::new());

    // Something else fills the disk while d downloads, after d made its first blocks durable.
    let out = lab.root().join("d.bin");
    let get = d.spawn_get(&id, &out);
    let stored_before = wait_for("d to make some of it durable", || {
        let s = stored(&d, &id);
        (s >= MIB as u64).then_some(s)
    });
    let ballast = fs.0.join("ballast");
    {
        let mut f = File::create(&ballast).unwrap();
        let chunk = vec![0x55u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
    }
    let first = get.wait();
    let e = String::from_utf8_lossy(&first.stderr);
    assert!(
        !first.status.success(),
        "the disk filled up before the journal needed its second page"
    );
    assert!(
        e.contains("has no room") && e.contains("free disk space") && e.contains("resume"),
        "the error says the disk is full and what to do: {e}"
    );
    assert!(!out.exists());
    let kept = stored(&d, &id);
    assert!(kept >= stored_before && kept < size, "{kept}");
    assert!(d.ok(&["cache", "verify"]).contains("ok"), "what is held verifies");

    // Space freed: the next get completes without fetching what was kept.
    std::fs::remove_file(&ballast).unwrap();
    let r = d.get_json(&id, &out);
    assert_eq!(hash_of(&out), id, "{r}");
    assert!(n(&r, "bytes_already_held") >= kept, "resumed from what was kept: {r}");
    assert!(d.ok(&["cache", "verify"]).contains("ok"));
    drop(d);
    drop(fs);

    // A disk too small for the content: refused before any transfer, nothing left behind.
    let small = lab.root().join("e-store");
    let _fs2 = Tmpfs::mount(&small, "2m");
    let e_agent = lab.agent_with("e", Site::Hq, &format!("store_dir = {small:?}"), Vec::new());
    let err = e_agent.fails(&[
        "get",
        &id.to_string(),
        "--to",
        lab.root().join("e.bin").to_str().unwrap(),
    ]);
    assert!(err.contains("has no room") && err.contains("free disk space"), "{err}");
    assert!(!e_agent.ok(&["cache", "ls"]).contains(&id.to_string()));
    assert_eq!(
        std::fs::read_dir(&small).unwrap().count(),
        0,
        "nothing left in the store"
    );
}

#[test]
fn netns_cli_get_and_status_as_a_user_would() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(2 * MIB + 1, 29);
    let id = lab.srv().publish(&bytes, "tool", "7.0");
    // p starts alone, so it is the branch's RVP and gets it (with u running too, the server
    // could pick u to fetch for the site, and u's own get would find it cached: no transfer).
    let p = lab.agent("p", Site::Branch);
    p.get_json(&id, &lab.root().join("p.bin"));
    let u = lab.agent("u", Site::Branch);
    lab.shape("p", "4mbit");

    // A script runs `get` with stdout and stderr not terminals: one result line, no progress bar.
    let out = lab.root().join("u.bin");
    let get = ChildGuard::new(
        common::command()
            .arg("--config")
            .arg(&u.config)
            .args(["get", &id.to_string(), "--to"])
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Meanwhile the user looks at `status`: the transfer, its source.
    let during = wait_for("status to show the transfer", || {
        let s = u.ok(&["status"]);
        s.contains(&format!("transfer  {id}")).then_some(s)
    });
    assert!(during.contains("site      branch (standard)"), "{during}");
    assert!(during.contains(&lab.peer("p")), "the peer is listed: {during}");
    let done = get.wait();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let line = String::from_utf8(done.stdout).unwrap();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(
        line.starts_with(&format!(
            "{id} tool@7.0: {} bytes ({} from peers, 0 from the parent site, 0 from the origin",
            bytes.len(),
            bytes.len()
        )),
        "{line}"
    );
    assert!(
        done.stderr.is_empty(),
        "no progress bar for a script: {:?}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    let after = u.ok(&["status"]);
    assert!(
        after.contains(&format!(
            "received  {} from same-site peers, 0 from the parent site, 0 from the origin",
            bytes.len()
        )),
        "{after}"
    );
    assert!(!after.contains("transfer  "), "{after}");
    let peers = u.ok(&["peers"]);
    assert!(peers.contains(&lab.peer("p")), "{peers}");
}

#[test]
#[expect(
    clippy::disallowed_methods,
    reason = "a fault test reports how long the gets took without the server (never asserted)"
)]
fn netns_a_fresh_agent_gets_from_a_peer_while_the_server_is_down() {
    if !is_root() {
        return;
    }
    let mut lab = Lab::new();
    let bytes = data(6 * MIB + 11, 62);
    let id = lab.srv().publish(&bytes, "offline", "1");
    let root = lab.root().to_path_buf();
    let out = |n: &str| root.join(n);
    // p gets it with the server up, and keeps the signed manifest for peers.
    let p = lab.agent("p", Site::Hq);
    p.get_json(&id, &out("p.bin"));
    let kept = root.join("p/state/manifests").join(id.to_string());
    let signed = std::fs::read(&kept).expect("p kept the signed manifest");
    // Two fresh agents on p's subnet: enrolled, nothing held, no manifest.
    let f = lab.agent("f", Site::Hq);
    let g = lab.agent("g", Site::Hq);
    for a in [&f, &g] {
        wait_for("discovery role from a heartbeat answer", || {
            a.status()["discovery"]["role"].is_object().then_some(())
        });
    }
    lab.srv.as_mut().unwrap().crash();

    // p's manifest changed on disk (the size in it): g refuses it (pinned key), stores nothing.
    let mut forged = signed.clone();
    let text = String::from_utf8(forged.split_off(64)).unwrap();
    let size = bytes.len().to_string();
    assert!(text.contains(&size), "{text}");
    forged.extend_from_slice(text.replace(&size, &(bytes.len() + 1).to_string()).as_bytes());
    std::fs::write(&kept, &forged).unwrap();
    let e = g.fails(&["get", &id.to_string(), "--to", out("g.bin").to_str().unwrap()]);
    assert!(e.contains("signature does not verify"), "{e}");
    assert!(!out("g.bin").exists());
    assert!(
        !g.ok(&["cache", "ls"]).contains(&id.to_string()),
        "nothing of it cached"
    );

    // As the server signed it: f gets it from p without the server, byte-exact.
    std::fs::write(&kept, &signed).unwrap();
    let t = std::time::Instant::now();
    let r = f.get_json(&id, &out("f.bin"));
    let f_secs = t.elapsed().as_secs_f64();
    assert_eq!(std::fs::read(out("f.bin")).unwrap(), bytes, "byte-exact: {r}");
    assert_eq!(r["bytes_from_peers"].as_u64(), Some(bytes.len() as u64), "{r}");
    assert!(r["sources"].to_string().contains("the server is unreachable"), "{r}");
    // f now keeps the manifest too, and serves the next agent like p did.
    let e = g.fails(&["get", &ContentId::of(b"never published").to_string()]);
    assert!(e.contains("no peer could stand in for it"), "{e}");
    let t = std::time::Instant::now();
    let rg = g.get_json(&id, &out("g.bin"));
    assert_eq!(std::fs::read(out("g.bin")).unwrap(), bytes, "byte-exact: {rg}");
    println!(
        "server down: a manifest changed on the peer's disk was refused (nothing stored); f got {} bytes \
         from its peer in {f_secs:.2} s, then g in {:.2} s, byte-exact, without the server",
        bytes.len(),
        t.elapsed().as_secs_f64()
    );
}
