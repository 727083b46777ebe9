//! Hostile peers over real UDP sockets, with real `lowtide-xfer` processes:
//! one honest server reached through a proxy that replays old datagrams in
//! both directions, one server whose proxy corrupts the data it sends (a peer
//! that lies about what it holds), and garbage sprayed at the fetcher the
//! whole time. The fetch must come out byte-exact, drop the liar, count the
//! garbage and keep going. Figures are printed (`-- --nocapture`), never asserted.
#![expect(
    clippy::disallowed_methods,
    reason = "a fault test is a driver: it reads the wall clock to report recovery times"
)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lowtide-xfer");
const KEY: &str = "fault-test-key";
/// Datagrams a replaying proxy remembers.
const REPLAY_RING: usize = 512;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xfer(store: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--store")
        .arg(store)
        .args(["--driver", "portable"])
        .env("LOWTIDE_KEY", KEY)
        .env("LOWTIDE_LOG", "warn");
    c
}

fn serve(store: &Path, file: &Path) -> (Proc, SocketAddr) {
    let mut child = xfer(store)
        .args(["serve", "--listen", "127.0.0.1:0", "--add"])
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut lines = BufReader::new(err).lines();
    let addr = loop {
        let line = lines.next().expect("server exited before listening").unwrap();
        if let Some(rest) = line.strip_prefix("serving on ") {
            break rest.split_whitespace().next().unwrap().parse().unwrap();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr)
}

/// What a proxy does to the datagrams it forwards.
#[derive(Clone, Copy)]
enum Mischief {
    /// Forward everything, and after every third datagram send an old one again (either direction).
    Replay,
    /// Flip the last byte of every datagram from the server longer than 200 bytes (the data payload).
    Corrupt,
}

#[derive(Default)]
struct ProxyStats {
    forwarded: AtomicU64,
    replayed: AtomicU64,
    corrupted: AtomicU64,
}

/// A UDP proxy in front of `upstream` for one client; stops with `stop`.
fn proxy(upstream: SocketAddr, mischief: Mischief, stop: Arc<AtomicBool>) -> (SocketAddr, Arc<ProxyStats>) {
    let front = UdpSocket::bind("127.0.0.1:0").unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").unwrap();
    back.connect(upstream).unwrap();
    for s in [&front, &back] {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    }
    let addr = front.local_addr().unwrap();
    let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
    let stats = Arc::new(ProxyStats::default());
    let (front, back) = (Arc::new(front), Arc::new(back));
    // Client -> server.
    {
        let (front, back, client, stats, stop) =
            (front.clone(), back.clone(), client.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut ring: Vec<Vec<u8>> = Vec::new();
            let mut buf = [0u8; 65536];
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let Ok((len, from)) = front.recv_from(&mut buf) else {
                    continue;
                };
                *client.lock().unwrap() = Some(from);
                let _ = back.send(&buf[..len]);
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                n += 1;
                if let Mischief::Replay = mischief {
                    if n.is_multiple_of(3) && !ring.is_empty() {
                        let _ = back.send(&ring[(n * 7919) % ring.len()]);
                        stats.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    if ring.len() < REPLAY_RING {
                        ring.push(buf[..len].to_vec());
                    } else {
                        ring[n % REPLAY_RING] = buf[..len].to_vec();
                    }
                }
            }
        });
    }
    // Server -> client.
    let out_stats = stats.clone();
    std::thread::spawn(move || {
        let mut ring: Vec<Vec<u8>> = Vec::new();
        let mut buf = [0u8; 65536];
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            let Ok(len) = back.recv(&mut buf) else { continue };
            let Some(to) = *client.lock().unwrap() else { continue };
            n += 1;
            match mischief {
                Mischief::Corrupt if len > 200 => {
                    buf[len - 1] ^= 0x5a;
                    stats.corrupted.fetch_add(1, Ordering::Relaxed);
                }
                Mischief::Corrupt => {}
                Mischief::Replay => {
                    if n.is_multiple_of(3) && !ring.is_empty() {
                        let _ = front.send_to(&ring[(n * 7919) % ring.len()], to);
                        stats.replayed.fetch_add(1, Ordering::Relaxed);
                    }
                    if ring.len() < REPLAY_RING {
                        ring.push(buf[..len].to_vec());
                    } else {
                        ring[n % REPLAY_RING] = buf[..len].to_vec();
                    }
                }
            }
            let _ = front.send_to(&buf[..len], to);
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
        }
    });
    (addr, out_stats)
}

/// Garbage at `to` until `stop`: random lengths and bytes, half of it with the
/// protocol's magic and version so it gets past the first check. Returns the count.
fn spray(to: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut sent = 0u64;
        let mut buf = vec![0u8; 1500];
        while !stop.load(Ordering::Relaxed) {
            let len = 1 + (next() % 1500) as usize;
            for b in buf[..len].iter_mut() {
                *b = next() as u8;
            }
            if sent.is_multiple_of(2) && len >= 3 {
                buf[..2].copy_from_slice(&lowtide_engine::wire::MAGIC);
                buf[2] = lowtide_engine::wire::VERSION;
            }
            if s.send_to(&buf[..len], to).is_ok() {
                sent += 1;
            }
            if sent.is_multiple_of(64) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        sent
    })
}

fn fetch(
    store: &Path,
    id: &str,
    from: &[SocketAddr],
    bind: SocketAddr,
    to: &Path,
    json: &Path,
) -> (std::process::Output, f64) {
    let mut c = xfer(store);
    c.args([
        "fetch",
        id,
        "--quiet",
        "--timeout-secs",
        "120",
        "--bind",
        &bind.to_string(),
        "--to",
    ])
    .arg(to)
    .arg("--json")
    .arg(json);
    for f in from {
        c.args(["--from", &f.to_string()]);
    }
    let t = Instant::now();
    let out = c.stdin(Stdio::null()).output().unwrap();
    (out, t.elapsed().as_secs_f64())
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[test]
fn fetch_survives_garbage_replays_and_a_lying_peer() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    let data: Vec<u8> = (0..8_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let id = lowtide_engine::content::ContentId::of(&data).to_string();
    let (_honest, honest_addr) = serve(&dir.path().join("s1"), &file);
    let (_liar, liar_addr) = serve(&dir.path().join("s2"), &file);

    // Reference: a clean fetch from the honest server alone.
    let (out, clean_secs) = fetch(
        &dir.path().join("ref"),
        &id,
        &[honest_addr],
        free_udp(),
        &dir.path().join("ref.bin"),
        &dir.path().join("ref.json"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let stop = Arc::new(AtomicBool::new(false));
    let (replay_addr, replay) = proxy(honest_addr, Mischief::Replay, stop.clone());
    let (corrupt_addr, corrupt) = proxy(liar_addr, Mischief::Corrupt, stop.clone());
    let bind = free_udp();
    let garbage = spray(bind, stop.clone());
    let to = dir.path().join("out.bin");
    let json = dir.path().join("out.json");
    let (out, secs) = fetch(
        &dir.path().join("f"),
        &id,
        &[replay_addr, corrupt_addr],
        bind,
        &to,
        &json,
    );
    stop.store(true, Ordering::Relaxed);
    let garbage = garbage.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fetch failed:\n{stderr}");
    assert!(std::fs::read(&to).unwrap() == data, "not byte-exact");
    // The liar was caught and dropped, if it got to send any data.
    let corrupted = corrupt.corrupted.load(Ordering::Relaxed);
    if corrupted > 0 {
        assert!(
            stderr.contains(&format!("source {corrupt_addr} dropped")),
            "the lying source was not dropped:\n{stderr}"
        );
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let dropped = summary["dropped_datagrams"].as_u64().unwrap();
    assert!(
        dropped > 0,
        "{garbage} garbage datagrams sent, none counted as dropped: {summary}"
    );
    // The honest server is still serving: a second fetch through it alone is byte-exact.
    let (out, _) = fetch(
        &dir.path().join("g"),
        &id,
        &[honest_addr],
        free_udp(),
        &dir.path().join("again.bin"),
        &dir.path().join("again.json"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(dir.path().join("again.bin")).unwrap() == data);
    println!(
        "hostile peers: {garbage} garbage datagrams at the fetcher ({dropped} dropped before any session), \
         {} old datagrams replayed (both directions), {corrupted} corrupted data datagrams from the lying \
         peer (dropped: {}); fetch byte-exact in {secs:.2} s vs {clean_secs:.2} s clean; the servers kept serving; lost: nothing",
        replay.replayed.load(Ordering::Relaxed),
        stderr.contains("dropped"),
    );
}
