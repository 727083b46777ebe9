//! Block tables come from peers (and the server); decoding must never panic and
//! a table that decodes must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lowtide_engine::content::BlockTable;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = BlockTable::decode(data) {
        assert_eq!(t.encode(), data);
    }
});
