//! Compiles the BPF programs in `bpf/` with clang into `OUT_DIR`, where
//! `src/lib.rs` embeds them with `include_bytes!`.
//!
//! The compiler is `clang-19` unless `LOWTIDE_BPF_CLANG` names another one
//! (`scripts/setup.sh` installs clang-19 and libbpf-dev on Debian).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const PROGRAMS: &[&str] = &["egress"];
const HEADERS: &[&str] = &["kernel.h", "lowtide.h"];

fn main() {
    if env::var_os("CARGO_FEATURE_BPF").is_none() {
        return; // no BPF monitor, nothing to compile
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = env::var("LOWTIDE_BPF_CLANG").unwrap_or_else(|_| "clang-19".to_owned());
    println!("cargo:rerun-if-env-changed=LOWTIDE_BPF_CLANG");
    for header in HEADERS {
        println!("cargo:rerun-if-changed=bpf/{header}");
    }
    for program in PROGRAMS {
        let source = format!("bpf/{program}.bpf.c");
        println!("cargo:rerun-if-changed={source}");
        let object = out_dir.join(format!("{program}.bpf.o"));
        let output = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", "-Wall", "-Werror"])
            // asm/types.h for the UAPI headers lives under the multiarch directory on Debian.
            .args(["-I/usr/include/x86_64-linux-gnu", "-Ibpf", "-c", &source, "-o"])
            .arg(&object)
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} to compile {source}: {e}; install clang-19 and libbpf-dev (scripts/setup.sh) or set LOWTIDE_BPF_CLANG")
            });
        if !output.status.success() {
            panic!(
                "{clang} failed to compile {source} ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}
