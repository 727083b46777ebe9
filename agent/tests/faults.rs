//! Fault tests with real `lowtide-agent` processes: the agent killed with
//! SIGKILL at random points of a download 50 times in a row, and the server
//! killed and restarted in the middle of a distribution. Each prints what
//! happened, what was lost (asserted to be nothing) and the recovery time
//! (reported, never asserted). Run with `-- --nocapture` to see the figures.
//! (Network faults in namespaces are in `netns.rs`.)
#![expect(
    clippy::disallowed_methods,
    reason = "a fault test is a driver: it reads the wall clock to report recovery times"
)]

mod common;

use std::time::{Duration, Instant};

use common::{data, Agent, Server};
use lowtide_engine::content::ContentId;
use serde_json::Value;

/// SIGKILLs that must land while the content is still partial.
const KILLS: usize = 50;
/// Attempts at most (a kill that lands after the download finished does not count).
const ATTEMPTS_MAX: usize = 200;
/// Polls of 10 ms while waiting on an agent's state.
const POLLS_MAX: usize = 3000;

/// What the agent's store holds of `id`: (held bytes, complete).
fn held(a: &Agent, id: &ContentId) -> (u64, bool) {
    let v: Value = serde_json::from_str(&a.ok(&["cache", "ls", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|i| i["content"] == id.to_string())
        .map_or((0, false), |i| {
            (
                i["held_bytes"].as_u64().unwrap_or(0),
                i["complete"].as_bool() == Some(true),
            )
        })
}

/// Tiny deterministic generator for the kill points (no seed from the clock: a failure replays).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

#[test]
fn agent_killed_50_times_mid_download_never_corrupts_its_store() {
    let srv = Server::start();
    let root = tempfile::tempdir().unwrap();
    let bytes = data(24 * 1024 * 1024 + 12_345, 41);
    let id = srv.publish(&bytes, "crashy", "1");
    // A seeder peer, so the download runs through the engine (UDP, store commits).
    let seeder = Agent::start(&srv, root.path(), "seed", 256);
    seeder.get_json(&id, &root.path().join("seed.bin"));
    let mut b = Agent::start(&srv, root.path(), "b", 256);

    // A reference download gives the window the kill points are drawn from.
    let t = Instant::now();
    b.get_json(&id, &root.path().join("ref.bin"));
    let window_ms = (t.elapsed().as_millis() as u64).max(20);
    b.ok(&["cache", "rm", &id.to_string()]);

    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut kills, mut attempts, mut restarts_total) = (0, 0, Duration::ZERO);
    let mut last_held = 0u64;
    let (mut kept_total, mut early, mut completed) = (0u64, 0, 0);
    while kills < KILLS {
        attempts += 1;
        assert!(
            attempts <= ATTEMPTS_MAX,
            "only {kills} of {attempts} kills landed mid-download"
        );
        let out = root.path().join("out.bin");
        let get = b.spawn_get(&id, &out);
        if attempts.is_multiple_of(5) {
            // Early: while it asks the server for the manifest, table and sources.
            early += 1;
            std::thread::sleep(Duration::from_millis(rng.below(100)));
        } else {
            // While blocks arrive from the peer and are committed.
            wait_for("data flowing", || {
                let s = b.status();
                s["transfers"]
                    .as_array()
                    .and_then(|t| t.first())
                    .and_then(|t| t["bytes_held"].as_u64())
                    .is_some_and(|h| h > last_held)
                    || !s["recent"].as_array().unwrap().is_empty()
            });
            std::thread::sleep(Duration::from_millis(rng.below(window_ms / 4)));
        }
        b.kill();
        drop(get);
        let t = Instant::now();
        b.spawn();
        restarts_total += t.elapsed();
        // Nothing the store reported as held is wrong: verify re-reads every held block.
        let v = b.cli(&["cache", "verify"]);
        assert_eq!(
            v.status.code(),
            Some(0),
            "kill {kills}: damaged blocks after a SIGKILL:\n{}\n{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let (h, complete) = held(&b, &id);
        // Nothing verified before is lost: held bytes only grow between kills.
        assert!(h >= last_held, "kill {kills}: held {h} < {last_held} before the kill");
        if complete {
            // The download finished before the kill: start over, with a shorter window.
            completed += 1;
            b.ok(&["cache", "rm", &id.to_string()]);
            last_held = 0;
            continue;
        }
        kept_total += h;
        last_held = h;
        kills += 1;
    }
    // Finish: the last get completes from what was kept, byte-exact.
    let out = root.path().join("final.bin");
    let r = b.spawn_get(&id, &out).wait_ok(&b);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        bytes,
        "byte-exact after {kills} kills: {r}"
    );
    assert_eq!(r["bytes_already_held"].as_u64(), Some(last_held), "{r}");
    assert!(b.ok(&["cache", "verify"]).contains("ok"));
    println!(
        "sigkill x{kills} during downloads of {} MiB ({attempts} attempts: {early} in the \
         manifest/sources phase, the rest 0-{} ms after blocks started arriving; {completed} \
         finished before the kill and were started over): store verified clean after every \
         kill, held bytes never went down (mean {:.1} MiB held at a kill), final file \
         byte-exact ({} bytes already held); mean restart-to-ready {:.0} ms",
        bytes.len() >> 20,
        window_ms / 4,
        kept_total as f64 / kills as f64 / 1048576.0,
        last_held,
        restarts_total.as_secs_f64() * 1000.0 / attempts as f64
    );
}

/// Poll until `f` is true; how long it took.
fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    for _ in 0..POLLS_MAX {
        if f() {
            return t.elapsed();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: not within {} s", POLLS_MAX / 100);
}

fn holders(srv: &Server, agent: &Agent, id: &ContentId) -> Vec<String> {
    let agent_id = agent.status()["agent_id"].as_str().unwrap().to_string();
    let v = srv.sources_for(&agent_id, "hq", id);
    v["sources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["held_percent"] == 100 && s["agent_id"].is_string())
        .map(|s| s["agent_id"].as_str().unwrap_or("").to_string())
        .collect()
}

#[test]
fn agents_keep_going_when_the_server_dies_and_resync_when_it_returns() {
    let mut srv = Server::start();
    let root = tempfile::tempdir().unwrap();
    let bytes = data(32 * 1024 * 1024, 43);
    let id = srv.publish(&bytes, "big", "1");
    let seeder = Agent::start(&srv, root.path(), "seed", 256);
    seeder.get_json(&id, &root.path().join("seed.bin"));
    let b = Agent::start(&srv, root.path(), "b", 256);
    let c = Agent::start(&srv, root.path(), "c", 256);

    // b starts; the server dies as soon as b is receiving from its peer.
    let out_b = root.path().join("b.bin");
    let get_b = b.spawn_get(&id, &out_b);
    wait_for("b receiving", || {
        let s = b.status();
        s["transfers"].as_array().is_some_and(|t| !t.is_empty()) || !s["recent"].as_array().unwrap().is_empty()
    });
    let crash = Instant::now();
    srv.crash();
    // b finishes with the peer it already knows, while the server is down.
    let r = get_b.wait_ok(&b);
    let done_without_server = crash.elapsed();
    assert_eq!(std::fs::read(&out_b).unwrap(), bytes, "byte-exact: {r}");
    assert_eq!(
        r["bytes_from_peers"].as_u64().unwrap() + r["bytes_already_held"].as_u64().unwrap(),
        bytes.len() as u64,
        "all of it from the peer: {r}"
    );
    // c, with no manifest yet, gets a clear error and loses nothing (these agents run without
    // discovery, so no peer can stand in for the server; netns.rs has the case where one does).
    let e = c.fails(&[
        "get",
        &id.to_string(),
        "--to",
        root.path().join("c0.bin").to_str().unwrap(),
    ]);
    assert!(!e.is_empty());
    assert_eq!(held(&c, &id), (0, false));
    // Every agent is still up.
    for a in [&seeder, &b, &c] {
        assert!(a.status()["agent_id"].is_string(), "{} died with the server", a.name);
    }

    // The server comes back on the same database; the agents re-sync by themselves.
    srv.restart();
    let back = Instant::now();
    let resync = wait_for("b's new copy known to the restarted server", || {
        holders(&srv, &c, &id).len() >= 2
    });
    let c_first_heartbeat = wait_for("c heartbeating again", || {
        c.metrics().lines().any(|l| l == "lowtide_agent_heartbeat_ok 1")
    });
    let out_c = root.path().join("c.bin");
    let rc = c.get_json(&id, &out_c);
    assert_eq!(std::fs::read(&out_c).unwrap(), bytes);
    assert_eq!(rc["bytes_from_origin"], 0, "c got it from its peers: {rc}");
    println!(
        "server crash mid-distribution: b finished from its known peer {:.2} s after the crash \
         without the server; c's get failed cleanly while it was down; after the restart the \
         server knew b's copy in {:.2} s (re-sync), c heartbeating within {:.2} s, c then got it \
         from peers ({} bytes); lost: nothing (byte-exact, held content intact); total {:.1} s",
        done_without_server.as_secs_f64(),
        resync.as_secs_f64(),
        c_first_heartbeat.as_secs_f64(),
        rc["bytes_from_peers"],
        back.elapsed().as_secs_f64()
    );
}
