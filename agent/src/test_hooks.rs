//! Fault injection for the integration tests (`tests/netns.rs`), compiled
//! into debug builds only.
//!
//! Why debug builds and an environment variable rather than a cargo feature:
//! the integration tests run the `lowtide-agent` binary cargo builds for
//! them, which is a debug build unless `--release` is asked for, and a test
//! cannot turn on a feature of the crate it tests; a feature would also be
//! switched on for every build of the workspace that unifies it. A release
//! build (the install script's, the package's) has no code for any hook, so
//! no environment can turn one on by accident; in a debug build the hook
//! logs a warning at start that says it is active.
//!
//! - `LOWTIDE_TEST_CORRUPT_SERVING=1`: at start, flip one bit in every 1 KiB
//!   chunk (so in every block) of every complete content in the store, behind the store's back, so the
//!   agent serves blocks that do not verify (a lying peer, or one whose disk
//!   went bad). Its own `cache verify` finds them.

use std::os::unix::fs::FileExt;

use lowtide_engine::content::CHUNK_BYTES;

use crate::worker::{Cmd, Handle};

/// The variable that turns the corrupting-peer hook on.
pub const CORRUPT_SERVING_VAR: &str = "LOWTIDE_TEST_CORRUPT_SERVING";

/// Run the hooks the environment asks for; a no-op when none is set.
pub async fn at_start(engine: &Handle) -> anyhow::Result<()> {
    if std::env::var(CORRUPT_SERVING_VAR).as_deref() != Ok("1") {
        return Ok(());
    }
    let held = engine.call(|reply| Cmd::List { reply }).await?;
    for h in held.into_iter().filter(|h| h.complete) {
        let id = h.content;
        let path = engine.call(|reply| Cmd::DataPath { id, reply }).await?;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
        let mut at = 0;
        let mut flipped = 0u64;
        while at < h.size {
            let mut b = [0u8; 1];
            f.read_exact_at(&mut b, at)?;
            b[0] ^= 0x10;
            f.write_all_at(&b, at)?;
            at += CHUNK_BYTES;
            flipped += 1;
        }
        tracing::warn!(
            "TEST HOOK {CORRUPT_SERVING_VAR}: flipped a bit in {flipped} chunk(s) of {}; \
             this agent now serves content that does not verify",
            id.short()
        );
    }
    Ok(())
}
