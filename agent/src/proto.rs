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
//! Commands: `get`, `resolve` (a name and optional version to a content id,
//! asked of the server), `status`, `peers`, `cache_ls`, `cache_rm`,
//! `cache_verify`, `pause`, `resume`.

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
    /// The content id the server publishes under `name` (`version`, or the
    /// highest version that is not retired). Answers `{"content", "name", "version"}`.
    Resolve {
        name: String,
        version: Option<String>,
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

/// What `get` was asked for: a content id, or a name with an optional version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Id(ContentId),
    Name { name: String, version: Option<String> },
}

impl std::str::FromStr for Target {
    type Err = String;

    /// 64 hexadecimal characters are a content id; anything else is
    /// `name[@version]`, split at the last `@`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(id) = s.parse::<ContentId>() {
            return Ok(Target::Id(id));
        }
        let (name, version) = match s.rsplit_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (s, None),
        };
        if name.trim().is_empty() {
            return Err(format!(
                "{s:?} names no content: give a content id (64 hexadecimal characters) or name[@version]"
            ));
        }
        if version.is_some_and(|v| v.trim().is_empty()) {
            return Err(format!(
                "{s:?} ends in @ without a version: write {name}@VERSION, or {name} for the newest version"
            ));
        }
        Ok(Target::Name {
            name: name.to_string(),
            version: version.map(str::to_string),
        })
    }
}

/// Parse one request line as the daemon reads it (at most [`REQUEST_BYTES_MAX`]
/// bytes, up to and including the newline); the error is the reply to send.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line).map_err(|e| format!("not a request this agent understands: {e}"))
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
    /// `manifest`, `peers`, `waiting for the site RVP (N%)`, `waiting for the parent site
    /// RVP (N%)`, `origin`, `done`.
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
    /// From peers of this agent's site (foreground).
    pub bytes_from_peers: u64,
    /// From the parent (or an ancestor) site's RVP, over the background protocol.
    #[serde(default)]
    pub bytes_from_parent: u64,
    pub bytes_from_origin: u64,
    /// Which sources were used and why.
    pub sources: Vec<String>,
    /// The verified content in the cache (readable by the agent's group).
    pub path: PathBuf,
    /// This agent's site, and whether the server made it the site's RVP for this content.
    pub site: Option<String>,
    pub you_are_rvp: bool,
    /// Per source the engine fetched from: payload bytes received (duplicates and
    /// retransmissions included) and blocks verified from it.
    #[serde(default)]
    pub received: Vec<Received>,
}

/// What one source sent this agent during a `get`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Received {
    pub addr: std::net::SocketAddr,
    /// Asked for the background protocol (across a WAN link).
    pub background: bool,
    pub payload_bytes: u64,
    pub blocks_verified: u64,
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

    #[test]
    fn target_parses_ids_and_names() {
        let id = ContentId::of(b"x");
        assert_eq!(id.to_string().parse::<Target>(), Ok(Target::Id(id)));
        let t = |name: &str, v: Option<&str>| Target::Name {
            name: name.into(),
            version: v.map(Into::into),
        };
        assert_eq!("tool".parse::<Target>(), Ok(t("tool", None)));
        assert_eq!("tool kit@1.10".parse::<Target>(), Ok(t("tool kit", Some("1.10"))));
        assert_eq!("a@b@2".parse::<Target>(), Ok(t("a@b", Some("2"))), "the last @ splits");
        let e = "tool@".parse::<Target>().unwrap_err();
        assert!(e.contains("tool@VERSION"), "{e}");
        assert!("@1.0".parse::<Target>().unwrap_err().contains("name[@version]"));
        assert!("".parse::<Target>().is_err());
    }
}
