//! The server's TOML config: parsing and checking must never panic, and every
//! derived value must be computable for a config that passes the check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_server::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = Config::from_toml(text) else { return };
    if cfg.check().is_err() {
        return;
    }
    let _ = cfg.database_url();
    let _ = cfg.files_dir();
    let _ = cfg.public_url();
    assert!(cfg.inactive_after_ms() >= 1000);
});
