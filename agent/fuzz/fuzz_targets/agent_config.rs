//! The agent's TOML config: parsing and checking must never panic, and every
//! derived value must be computable for a config that passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_agent::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = Config::from_toml(text) else { return };
    if cfg.check().is_err() {
        return;
    }
    let _ = cfg.check_for_daemon();
    let _ = cfg.store_dir();
    let _ = cfg.socket_path();
    let _ = cfg.credential_path();
    assert!(cfg.cache_limit_bytes() >= 1 << 20);
});
