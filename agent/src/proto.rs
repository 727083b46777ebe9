//! The control protocol between `lowtide-agent` commands and the running
//! daemon, over the Unix socket `<state_dir>/agent.sock` (mode 0660).
//!
//! JSON lines: the client sends one [`Request`] line; the daemon answers
//! with zero or more [`Reply::Progress`] lines (only for `get`) and then
//! exactly one [`Reply::Ok`] or [`Reply::Error`] line, and closes.
//!
//! ```text
//! > {"cmd":"get","content":"3f2a…"}
//! < {"progress":{"content":"3f2a…","size":1048576,"held_bytes":65536,"phase":"peers","sources":2,...}}
//! < {"ok":{"content":"3f2a…","size":1048576,"bytes_from_peers":1048576,"path":"/var/cache/lowtide/store/3f2a…/data",...}}
//! > {"cmd":"status"}
//! < {"ok":{"agent_id":"…","site":"hq","transfers":[…],"bytes_by_source":{…},…}}
//! ```
//!
//! Commands: `get`, `status`, `peers`, `cache_ls`, `cache_rm`, `cache_verify`,
//! `pause`, `resume`.

use std::path::PathBuf;

use lowtide_engine::content::ContentId;
use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads.
pub const REQUEST_BYTES_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Fetch a content into the cache. The answer names the cached file; the
    /// client copies it where it wants (the daemon writes only its own directories).
    Get {
        content: ContentId,
    },
    Status,
    /// The peers the server named as sources.
    Peers,
    CacheLs,
    CacheRm {
        content: ContentId,
    },
    /// Re-verify one content, or everything.
    CacheVerify {
        content: Option<ContentId>,
    },
    /// Pause serving background (WAN) transfers.
    Pause,
    Resume,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Progress(Progress),
    Ok(serde_json::Value),
    Error(String),
}

/// Where a download stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Progress {
    pub content: Option<ContentId>,
    pub size: u64,
    pub held_bytes: u64,
    /// `manifest`, `peers`, `origin`, `done`.
    pub phase: String,
    /// Sources in use right now (peers not dropped, or 1 for the origin).
    pub sources: usize,
    /// Receive rate from peers, bytes per second, as the engine measures it.
    pub peer_rate_bytes_per_s: u64,
}

/// The answer to a finished `get`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetDone {
    pub content: ContentId,
    pub name: String,
    pub version: String,
    pub size: u64,
    /// Already in the cache before this request.
    pub bytes_already_held: u64,
    pub bytes_from_peers: u64,
    pub bytes_from_origin: u64,
    /// Which sources were used and why.
    pub sources: Vec<String>,
    /// The verified content in the cache (readable by the agent's group).
    pub path: PathBuf,
    /// This agent's site, and whether the server made it the site's RVP for this content.
    pub site: Option<String>,
    pub you_are_rvp: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proto_lines_roundtrip() {
        let id = ContentId::of(b"x");
        let r = Request::Get { content: id };
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.starts_with("{\"cmd\":\"get\""), "{line}");
        assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>("{\"cmd\":\"status\"}").unwrap(),
            Request::Status
        );
        assert!(serde_json::from_str::<Request>("{\"cmd\":\"format_disk\"}").is_err());
        let e = serde_json::to_string(&Reply::Error("no".into())).unwrap();
        assert_eq!(e, "{\"error\":\"no\"}");
    }
}
