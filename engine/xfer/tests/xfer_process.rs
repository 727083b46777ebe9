//! Real processes on loopback: `lowtide-xfer serve` with each driver, and a
//! `fetch` that takes from both at once and must come out byte-exact.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_lowtide-xfer");

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn xfer(store: &Path, key: &str) -> Command {
    let mut c = Command::new(BIN);
    c.arg("--store")
        .arg(store)
        .env("LOWTIDE_KEY", key)
        .env("LOWTIDE_LOG", "warn");
    c
}

/// Start a server with `driver`; returns it and the address it listens on.
fn serve(store: &Path, driver: &str, file: &Path) -> (Server, String) {
    serve_with(store, driver, file, &[])
}

fn serve_with(store: &Path, driver: &str, file: &Path, extra: &[&str]) -> (Server, String) {
    let mut child = xfer(store, "k1")
        .args(["--driver", driver, "serve", "--listen", "127.0.0.1:0"])
        .args(extra)
        .arg("--add")
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
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (Server(child), addr)
}

#[test]
fn fetch_from_two_servers_with_both_drivers_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    let data: Vec<u8> = (0..12_345_678u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let id = lowtide_engine::content::ContentId::of(&data).to_string();
    let (_a, addr_a) = serve(&dir.path().join("sa"), "uring", &file);
    let (_b, addr_b) = serve(&dir.path().join("sb"), "portable", &file);
    let out = dir.path().join("out.bin");
    let summary = dir.path().join("summary.json");
    let status = xfer(&dir.path().join("sc"), "k1")
        .args([
            "fetch",
            &id,
            "--from",
            &addr_a,
            "--from",
            &addr_b,
            "-q",
            "--timeout-secs",
            "120",
            "--to",
        ])
        .arg(&out)
        .arg("--json")
        .arg(&summary)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&out).unwrap() == data, "fetched bytes differ");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(s["bytes"], data.len() as u64);
}

#[test]
fn fetch_with_the_wrong_key_fails_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    std::fs::write(&file, vec![5u8; 100_000]).unwrap();
    let id = lowtide_engine::content::ContentId::of(&vec![5u8; 100_000]).to_string();
    let (_a, addr) = serve(&dir.path().join("sa"), "portable", &file);
    let out = xfer(&dir.path().join("sc"), "not-the-key")
        .args(["fetch", &id, "--from", &addr, "-q", "--timeout-secs", "60"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("did not answer") && err.contains("LOWTIDE_KEY"), "{err}");
}

#[test]
fn fetch_of_unknown_content_is_refused_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    std::fs::write(&file, vec![1u8; 1000]).unwrap();
    let (_a, addr) = serve(&dir.path().join("sa"), "portable", &file);
    let unknown = lowtide_engine::content::ContentId::of(b"nobody has this").to_string();
    let out = xfer(&dir.path().join("sc"), "k1")
        .args(["fetch", &unknown, "--from", &addr, "-q", "--timeout-secs", "60"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the request (NotFound)"), "{err}");
}

#[test]
fn encrypted_fetch_from_both_drivers_is_byte_exact() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    let data: Vec<u8> = (0..4_000_037u32)
        .map(|i| (i.wrapping_mul(2246822519) >> 11) as u8)
        .collect();
    std::fs::write(&file, &data).unwrap();
    let id = lowtide_engine::content::ContentId::of(&data).to_string();
    let (_a, addr_a) = serve(&dir.path().join("sa"), "uring", &file);
    let (_b, addr_b) = serve(&dir.path().join("sb"), "portable", &file);
    let out = dir.path().join("out.bin");
    let summary = dir.path().join("summary.json");
    let status = xfer(&dir.path().join("sc"), "k1")
        .args([
            "fetch",
            &id,
            "--encrypt",
            "--from",
            &addr_a,
            "--from",
            &addr_b,
            "-q",
            "--timeout-secs",
            "120",
            "--to",
        ])
        .arg(&out)
        .arg("--json")
        .arg(&summary)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&out).unwrap() == data, "fetched bytes differ");
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&summary).unwrap()).unwrap();
    assert_eq!(
        (s["encrypted"].as_bool(), s["sealed_rejected"].as_u64()),
        (Some(true), Some(0)),
        "{s}"
    );
}

#[test]
fn a_server_that_requires_encryption_refuses_plain_fetches_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pkg.bin");
    let data = vec![3u8; 200_000];
    std::fs::write(&file, &data).unwrap();
    let id = lowtide_engine::content::ContentId::of(&data).to_string();
    let (_a, addr) = serve_with(&dir.path().join("sa"), "portable", &file, &["--require-encryption"]);
    let out = xfer(&dir.path().join("sc"), "k1")
        .args(["fetch", &id, "--from", &addr, "-q", "--timeout-secs", "60"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EncryptionRequired"), "{err}");
    let got = dir.path().join("out.bin");
    let out = xfer(&dir.path().join("sd"), "k1")
        .args([
            "fetch",
            &id,
            "--encrypt",
            "--from",
            &addr,
            "-q",
            "--timeout-secs",
            "60",
            "--to",
        ])
        .arg(&got)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::read(&got).unwrap() == data);
}
