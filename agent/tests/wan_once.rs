//! Each package crosses each WAN link once: real `lowtide-agent run` processes
//! on loopback, a real server in-process. The head-office site `hq` holds the
//! package (one agent, `p`, got it from the origin); four agents of the child
//! site `branch` all run `get` at once. Only the branch's RVP fetches from `p`
//! (background protocol); the other three take it from the branch's agents
//! (foreground), the RVP included while it still downloads.
//!
//! Bytes are counted where they are sent: `p`'s engine counts the payload it
//! served (the branch is its only client, so that is what crossed the
//! hq→branch link), the server counts what it sent as the origin.

mod common;

use common::{data, Agent, Server};
use lowtide_engine::content::ContentId;
use serde_json::Value;

/// Slack for retransmissions and end-game duplicates on a link.
const SLACK: f64 = 1.05;

/// Start `get` on every agent at once; returns the children (killed on drop).
fn gets_at_once(agents: &[&Agent], id: &ContentId, root: &std::path::Path) -> Vec<Get> {
    agents
        .iter()
        .map(|a| {
            let child = common::command()
                .arg("--config")
                .arg(&a.config)
                .args(["get", &id.to_string(), "--json", "--to"])
                .arg(root.join(format!("{}.bin", a.name)))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            Get {
                name: a.name.clone(),
                child: Some(child),
            }
        })
        .collect()
}

/// A running `get`; killed on drop unless waited for.
struct Get {
    name: String,
    child: Option<std::process::Child>,
}

impl Get {
    fn wait(mut self, log: &str) -> Value {
        let out = self.child.take().unwrap().wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "get on {} failed: {}\n--- agent log ---\n{log}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Get {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn served(a: &Agent) -> u64 {
    a.status()["served"]["payload_bytes"].as_u64().unwrap()
}

/// Of what the agent served, the bytes it sent again (lost or late on the path).
fn resent(a: &Agent) -> u64 {
    a.status()["served"]["resent_bytes"].as_u64().unwrap()
}

fn agent_id(a: &Agent) -> String {
    a.status()["agent_id"].as_str().unwrap().to_string()
}

/// Bytes of `id` the agent holds (0 when it has not begun).
fn held(a: &Agent, id: &ContentId) -> u64 {
    let ls: Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
    ls.as_array()
        .unwrap()
        .iter()
        .find(|h| h["content"] == id.to_string().as_str())
        .map_or(0, |h| h["held_bytes"].as_u64().unwrap())
}

/// The hq agent `p`, holding the package from the origin, and four branch agents.
fn setup(srv: &Server, root: &std::path::Path, bytes: &[u8], id: &ContentId) -> (Agent, Vec<Agent>) {
    // Every "link" here is loopback, so hq's egress monitor would see the branch's LAN traffic
    // as competing traffic on its WAN and pause background serving: not in this test.
    let p = Agent::start_with(srv, root, "p", 256, "hq", "busy_other_kbit = 0");
    let r = p.get_json(id, &root.join("p.bin"));
    assert_eq!(r["bytes_from_origin"], bytes.len() as u64, "{r}\n{}", p.log_text());
    let branch: Vec<Agent> = (1..=4)
        .map(|i| Agent::start_in(srv, root, &format!("b{i}"), 256, "branch"))
        .collect();
    (p, branch)
}

#[test]
fn wan_once_four_branch_agents_get_at_once() {
    let srv = Server::start();
    let root = tempfile::tempdir().unwrap();
    let bytes = data(12 * 1024 * 1024 + 4321, 21);
    let size = bytes.len() as u64;
    let id = srv.publish(&bytes, "pkg", "1");
    let (p, branch) = setup(&srv, root.path(), &bytes, &id);
    let origin_before = srv.origin_bytes();
    assert!(origin_before >= size, "p got it from the origin: {origin_before}");

    let refs: Vec<&Agent> = branch.iter().collect();
    let gets = gets_at_once(&refs, &id, root.path());
    let results: Vec<Value> = gets
        .into_iter()
        .zip(&branch)
        .map(|(g, a)| g.wait(&a.log_text()))
        .collect();
    for a in &branch {
        assert_eq!(
            std::fs::read(root.path().join(format!("{}.bin", a.name))).unwrap(),
            bytes,
            "{} byte-exact",
            a.name
        );
        assert!(a.ok(&["cache", "verify"]).contains("ok"));
    }

    // The hq→branch link carried the package once.
    let wan = served(&p);
    eprintln!(
        "hq served the branch {wan} bytes for a {size}-byte package ({:.4}×; {} of them resent)",
        wan as f64 / size as f64,
        resent(&p)
    );
    assert!(
        wan as f64 <= SLACK * size as f64,
        "hq served the branch {wan} bytes for a {size}-byte package\n{results:#?}"
    );
    // Nobody in the branch went to the origin.
    assert_eq!(
        srv.origin_bytes(),
        origin_before,
        "{results:#?}\n--- p ---\n{}\n--- b1 ---\n{}",
        p.log_text(),
        branch[0].log_text()
    );
    for r in &results {
        assert_eq!(r["bytes_from_origin"], 0, "{r}");
    }
    // Exactly one branch agent, the RVP, took bytes from the parent site; the others took
    // everything from the branch.
    let rvp = srv.election("branch", &id)["rvp"].as_str().unwrap().to_string();
    for (a, r) in branch.iter().zip(&results) {
        let parent = r["bytes_from_parent"].as_u64().unwrap();
        if agent_id(a) == rvp {
            assert!(parent > 0, "the RVP fetched from hq: {r}");
            assert!(r["you_are_rvp"].as_bool().unwrap(), "{r}");
        } else {
            assert_eq!(parent, 0, "{} is no RVP and took nothing from hq: {r}", a.name);
            assert_eq!(
                r["bytes_from_peers"].as_u64().unwrap() + r["bytes_already_held"].as_u64().unwrap(),
                size,
                "{r}"
            );
        }
    }
}

#[test]
fn wan_once_when_the_branch_rvp_dies_mid_transfer() {
    // Agents heartbeat every second; the server takes one unheard for 5 s as gone.
    let srv = Server::start_tweaked(|c| c.inactive_after_secs = 5);
    let root = tempfile::tempdir().unwrap();
    let block = 16 * 1024;
    let bytes = data(1024 * block, 22);
    let size = bytes.len() as u64;
    let half = size / 2;
    let id = srv.publish(&bytes, "pkg", "2");
    let (p, mut branch) = setup(&srv, root.path(), &bytes, &id);

    // So that the kill lands mid-transfer whatever the machine's speed: hq holds only the
    // first half (its second half went bad on disk) and the origin is away, so the branch
    // can get no more than that half until the origin is back.
    let data_file = p.state_dir().join("store").join(id.to_string()).join("data");
    let mut on_disk = std::fs::read(&data_file).unwrap();
    for b in 512..1024 {
        on_disk[b * block] ^= 1;
    }
    std::fs::write(&data_file, &on_disk).unwrap();
    assert_eq!(p.cli(&["cache", "verify"]).status.code(), Some(2));
    let origin_file = srv.dir.path().join("files").join(id.to_string());
    let away = origin_file.with_extension("away");
    std::fs::rename(&origin_file, &away).unwrap();
    let origin_before = srv.origin_bytes();
    let p_origin_before = p.status()["bytes_by_source"]["origin"].as_u64().unwrap();

    let refs: Vec<&Agent> = branch.iter().collect();
    let mut gets: Vec<Option<Get>> = gets_at_once(&refs, &id, root.path()).into_iter().map(Some).collect();
    let mut rvp = None;
    for _ in 0..600 {
        if let Some(r) = srv.election("branch", &id)["rvp"].as_str() {
            rvp = Some(r.to_string());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let rvp = rvp.expect("the branch has an RVP once its agents ask");
    let ids: Vec<String> = branch.iter().map(agent_id).collect();
    let dead = ids.iter().position(|i| *i == rvp).expect("the RVP is a branch agent");
    let survivors: Vec<usize> = (0..4).filter(|i| *i != dead).collect();

    // The RVP gets hq's half, the others take it from the branch (bounded waits: what the
    // survivors hold at the kill is what the bound below credits, whatever it is).
    for _ in 0..1200 {
        if held(&branch[dead], &id) >= half {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let rvp_held = held(&branch[dead], &id);
    assert!(rvp_held <= half, "hq holds only half: {rvp_held}");
    for _ in 0..1200 {
        if survivors.iter().all(|i| held(&branch[*i], &id) >= rvp_held) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let site_held = survivors.iter().map(|i| held(&branch[*i], &id)).max().unwrap();
    let served_before = served(&p);

    // The RVP dies; the origin comes back, hq's RVP completes its copy from it (it was told
    // to: the branch wants the package), and a new branch RVP takes the rest from hq.
    branch[dead].kill();
    drop(gets[dead].take());
    std::fs::rename(&away, &origin_file).unwrap();
    let mut results = Vec::new();
    for (i, g) in gets.into_iter().enumerate() {
        if let Some(g) = g {
            results.push((i, g.wait(&branch[i].log_text())));
        }
    }
    for (i, _) in &results {
        assert_eq!(
            std::fs::read(root.path().join(format!("b{}.bin", i + 1))).unwrap(),
            bytes,
            "b{} byte-exact",
            i + 1
        );
    }
    // A new RVP was elected among the survivors, and it finished the fetch from hq.
    let new_rvp = srv.election("branch", &id)["rvp"].as_str().unwrap().to_string();
    assert_ne!(new_rvp, rvp, "a new RVP replaced the dead one");
    assert!(ids.contains(&new_rvp));

    // What crossed the WAN: everything hq sent before the kill (the dead RVP's share, part of
    // which the site may never have got), plus at most the rest of the package (with slack).
    // What the survivors held at the kill did not cross again.
    let wan = served(&p);
    let bound = SLACK * size as f64 + served_before as f64 - site_held as f64;
    eprintln!(
        "hq served the branch {wan} bytes ({:.4}× the package; {} of them resent); {served_before} before \
         the kill, the survivors then held {site_held}; bound {bound:.0}",
        wan as f64 / size as f64,
        resent(&p)
    );
    assert!(
        (wan as f64) <= bound,
        "hq served {wan} bytes; bound {bound:.0} = 1.05 × {size} + {served_before} sent before the kill \
         - {site_held} the survivors held\n{results:#?}"
    );
    assert!(site_held > 0, "the survivors held some of it at the kill");
    // The origin served hq's missing half once (to hq's RVP), and nobody in the branch.
    let p_origin = p.status()["bytes_by_source"]["origin"].as_u64().unwrap() - p_origin_before;
    assert_eq!(
        p_origin,
        size - half,
        "hq's RVP fetched its missing half from the origin"
    );
    let logs = || {
        std::iter::once(&p)
            .chain(branch.iter())
            .map(|a| {
                let t = a.log_text();
                let lines: Vec<&str> = t
                    .lines()
                    .filter(|l| {
                        l.contains("origin") || l.contains("dropped") || l.contains("RVP") || l.contains("WARN")
                    })
                    .collect();
                format!("--- {} ---\n{}", a.name, lines.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(srv.origin_bytes() - origin_before, p_origin, "{}", logs());
    // Only the RVPs took bytes from hq.
    for (i, r) in &results {
        assert_eq!(r["bytes_from_origin"], 0, "{r}");
        if ids[*i] != new_rvp {
            assert_eq!(r["bytes_from_parent"], 0, "b{} is no RVP: {r}", i + 1);
        }
    }
}
