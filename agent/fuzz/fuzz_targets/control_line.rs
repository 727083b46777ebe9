//! The control socket (mode 0660: any member of the agent's group can write to
//! it) takes one JSON request line; the CLI reads JSON reply lines back. Neither
//! parser may panic, and whatever parses must survive a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_agent::proto::{self, Reply, Request, REQUEST_BYTES_MAX};

fuzz_target!(|data: &[u8]| {
    // As the daemon reads it: at most REQUEST_BYTES_MAX bytes, up to the first newline.
    let data = &data[..data.len().min(REQUEST_BYTES_MAX)];
    let line = match data.iter().position(|&b| b == b'\n') {
        Some(i) => &data[..=i],
        None => data,
    };
    if let Ok(line) = std::str::from_utf8(line) {
        match proto::parse_request(line) {
            Ok(req) => {
                let text = serde_json::to_string(&req).unwrap();
                assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
            }
            Err(e) => assert!(e.starts_with("not a request")),
        }
    }
    // As the CLI reads the daemon's answers.
    if let Ok(r) = serde_json::from_slice::<Reply>(data) {
        let text = serde_json::to_string(&r).unwrap();
        let back: Reply = serde_json::from_str(&text).unwrap();
        // Floats in `ok` values may not survive exactly; the variant does.
        assert_eq!(std::mem::discriminant(&back), std::mem::discriminant(&r));
    }
});
