//! Helpers shared by the tests that build network namespaces (`agent`, `ebpf`,
//! `benches/delayline`): the root check, running `ip`/`tc` and unique names.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Whether this process is root and so may build namespaces. When it is not,
/// the test is skipped with a message naming what it `needs` root for, except
/// under `CI=true` (CI runs as root), where that is a failure.
pub fn is_root(needs: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root: these tests need root ({needs})"
        );
        eprintln!("skipping: needs root ({needs})");
    }
    root
}

/// Runs a command (`args[0]` with the rest as arguments) and returns its
/// standard output; panics with its output when it fails.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().expect("spawn command");
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A name no other test of this run or of a concurrent run uses:
/// `<prefix><process id>-<counter>`.
pub fn unique(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
