//! Harness for the integration tests that span crates and processes.
//!
//! The tests drive `scripts/testbed/sites.py` (the same topology as
//! `scripts/demo.sh` and `scripts/bench-distribution.sh`) with the binaries
//! of this build and read its JSON report. What is not built yet is built with
//! `cargo build` in the test's own profile first.

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binaries the multi-site testbed starts.
pub const BINARIES: [(&str, &str); 4] = [
    ("lowtide-agent", "lowtide-agent"),
    ("lowtide-server", "lowtide-server"),
    ("lowtide-delayline", "lowtide-delayline"),
    ("lowtide-wanprobe", "lowtide-wanprobe"),
];

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// Whether this process may build namespaces. When it may not, the test is
/// skipped with a message, except under `CI=true` (CI runs as root), where
/// that is a failure.
pub fn root_or_skip(test: &str) -> bool {
    netns::is_root(&format!(
        "{test}: network namespaces, qdiscs, packet taps; run `sudo -E cargo test -p lowtide-tests`"
    ))
}

/// The directory holding this test binary's profile outputs (`target/<profile>`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps")
        .to_path_buf()
}

/// Build the testbed's binaries in this test's profile (a no-op when
/// `cargo test --workspace` built them already) and return their directory.
/// `LOWTIDE_TESTBED_BIN_DIR` names a directory of already built ones instead
/// (e.g. `target/release`).
pub fn binaries() -> PathBuf {
    if let Some(dir) = std::env::var_os("LOWTIDE_TESTBED_BIN_DIR") {
        let dir = PathBuf::from(dir);
        for (_, bin) in BINARIES {
            assert!(
                dir.join(bin).exists(),
                "LOWTIDE_TESTBED_BIN_DIR: no {} (build it, or unset the variable)",
                dir.join(bin).display()
            );
        }
        return dir;
    }
    let dir = profile_dir();
    let release = dir.file_name().is_some_and(|n| n == "release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // What cargo set for this test's process describes this package; passed on, it would make
    // build scripts that watch such variables (ring watches CARGO_MANIFEST_DIR) rebuild everything.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_BIN_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    cmd.current_dir(repo()).args(["build", "-q"]);
    if release {
        cmd.arg("--release");
    }
    for (pkg, _) in BINARIES {
        cmd.args(["-p", pkg]);
    }
    let st = cmd.status().expect("run cargo build for the testbed binaries");
    assert!(st.success(), "cargo build of the testbed binaries failed");
    for (_, bin) in BINARIES {
        assert!(dir.join(bin).exists(), "{} was not built", dir.join(bin).display());
    }
    dir
}
