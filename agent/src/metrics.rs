//! Prometheus metrics of one agent, in the text exposition format, and the
//! small HTTP responder that serves them on `metrics_listen` (off unless
//! configured). Bytes by source are what administrators of such systems read:
//! same-site peers, the parent site, the origin, and the share from peers.

use std::fmt::Write;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest request head read from a scraper.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// A scraper that sends nothing for this long is dropped.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The values one scrape shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Values {
    pub peer_bytes: u64,
    pub parent_bytes: u64,
    pub origin_bytes: u64,
    pub served_bytes: u64,
    pub serve_sessions: u64,
    pub transfers: u64,
    pub cache_used_bytes: u64,
    pub cache_limit_bytes: u64,
    pub cache_items: u64,
    pub dropped_datagrams: u64,
    pub heartbeat_ok: bool,
    pub background_paused: bool,
    /// The device refuses to serve now (busy, on battery, VPN site).
    pub serving_refused: bool,
    pub requests_refused: u64,
    pub discovery_peers: u64,
    /// Discovery packets dropped, by reason.
    pub discovery_dropped: Vec<(&'static str, u64)>,
    /// Paused because the egress monitor sees the link busy with other traffic.
    pub busy_paused: bool,
    pub busy_pauses: u64,
    pub egress_backlog_bytes: u64,
    pub egress_other_bytes_per_s: u64,
    pub monitor_bpf: bool,
}

pub fn render(v: &Values) -> String {
    let mut s = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, lines: &[(&str, String)]| {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in lines {
            let _ = writeln!(s, "{name}{labels} {value}");
        }
    };
    metric(
        "lowtide_agent_received_bytes_total",
        "counter",
        "Verified content bytes received, by source: same-site peers, the parent site, the origin.",
        &[
            ("{source=\"peer\"}", v.peer_bytes.to_string()),
            ("{source=\"parent\"}", v.parent_bytes.to_string()),
            ("{source=\"origin\"}", v.origin_bytes.to_string()),
        ],
    );
    let total = v.peer_bytes + v.parent_bytes + v.origin_bytes;
    let ratio = if total == 0 {
        0.0
    } else {
        (v.peer_bytes + v.parent_bytes) as f64 / total as f64
    };
    metric(
        "lowtide_agent_peer_bytes_ratio",
        "gauge",
        "Share of received bytes that came from peers (same site or parent site), 0 to 1.",
        &[("", format!("{ratio:.4}"))],
    );
    metric(
        "lowtide_agent_served_bytes_total",
        "counter",
        "Payload bytes served to peers.",
        &[("", v.served_bytes.to_string())],
    );
    metric(
        "lowtide_agent_serve_sessions",
        "gauge",
        "Peers being served now.",
        &[("", v.serve_sessions.to_string())],
    );
    metric(
        "lowtide_agent_transfers",
        "gauge",
        "Fetches from peers in progress.",
        &[("", v.transfers.to_string())],
    );
    metric(
        "lowtide_agent_cache_used_bytes",
        "gauge",
        "Bytes the content cache takes.",
        &[("", v.cache_used_bytes.to_string())],
    );
    metric(
        "lowtide_agent_cache_limit_bytes",
        "gauge",
        "Size limit of the content cache.",
        &[("", v.cache_limit_bytes.to_string())],
    );
    metric(
        "lowtide_agent_cache_items",
        "gauge",
        "Contents in the cache, complete or partial.",
        &[("", v.cache_items.to_string())],
    );
    metric(
        "lowtide_agent_dropped_datagrams_total",
        "counter",
        "Datagrams dropped before any session saw them (bad tag, malformed).",
        &[("", v.dropped_datagrams.to_string())],
    );
    metric(
        "lowtide_agent_heartbeat_ok",
        "gauge",
        "1 when the last heartbeat reached the server.",
        &[("", u8::from(v.heartbeat_ok).to_string())],
    );
    metric(
        "lowtide_agent_background_paused",
        "gauge",
        "1 while serving background transfers is paused.",
        &[("", u8::from(v.background_paused).to_string())],
    );
    metric(
        "lowtide_agent_serving_refused",
        "gauge",
        "1 while the device refuses to serve peers (busy CPU or disk, on battery, VPN site).",
        &[("", u8::from(v.serving_refused).to_string())],
    );
    metric(
        "lowtide_agent_serve_requests_refused_total",
        "counter",
        "Requests refused and sessions ended while the device refused to serve.",
        &[("", v.requests_refused.to_string())],
    );
    metric(
        "lowtide_agent_discovery_peers",
        "gauge",
        "Agents on the local subnets that answered discovery within the timeout.",
        &[("", v.discovery_peers.to_string())],
    );
    let dropped: Vec<(String, String)> = v
        .discovery_dropped
        .iter()
        .map(|(why, n)| (format!("{{reason=\"{why}\"}}"), n.to_string()))
        .collect();
    let dropped: Vec<(&str, String)> = dropped.iter().map(|(l, n)| (l.as_str(), n.clone())).collect();
    metric(
        "lowtide_agent_discovery_dropped_total",
        "counter",
        "Discovery packets dropped, by reason (malformed, version, tag, stale, replayed, rate_limited, unsolicited).",
        &dropped,
    );
    metric(
        "lowtide_agent_background_busy",
        "gauge",
        "1 while background serving is paused because other traffic keeps the link busy.",
        &[("", u8::from(v.busy_paused).to_string())],
    );
    metric(
        "lowtide_agent_busy_pauses_total",
        "counter",
        "Times background serving paused because the link was busy.",
        &[("", v.busy_pauses.to_string())],
    );
    metric(
        "lowtide_agent_egress_backlog_bytes",
        "gauge",
        "Bytes queued on the watched egress qdisc (the largest over watched interfaces).",
        &[("", v.egress_backlog_bytes.to_string())],
    );
    metric(
        "lowtide_agent_egress_other_bytes_per_second",
        "gauge",
        "Traffic other than Lowtide's leaving the watched interfaces (eBPF only; 0 with the netlink fallback).",
        &[("", v.egress_other_bytes_per_s.to_string())],
    );
    metric(
        "lowtide_agent_egress_monitor_bpf",
        "gauge",
        "1 when an eBPF egress monitor is attached (0: netlink fallback or none).",
        &[("", u8::from(v.monitor_bpf).to_string())],
    );
    s
}

/// Answer one HTTP connection: `GET /metrics` gets `body()`, anything else 404.
pub async fn answer<S, F, Fut>(mut conn: S, body: F) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < REQUEST_BYTES_MAX {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<(), std::io::Error>(())
    };
    if tokio::time::timeout(REQUEST_TIMEOUT, read).await.is_err() {
        return Ok(());
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let (status, ctype, text) = if line.starts_with(b"GET /metrics ") || line == b"GET /metrics" {
        ("200 OK", "text/plain; version=0.0.4", body().await)
    } else {
        (
            "404 Not Found",
            "text/plain",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_bytes_by_source_and_peer_share() {
        let t = render(&Values {
            peer_bytes: 300,
            parent_bytes: 100,
            origin_bytes: 100,
            heartbeat_ok: true,
            ..Values::default()
        });
        assert!(
            t.contains("lowtide_agent_received_bytes_total{source=\"peer\"} 300\n"),
            "{t}"
        );
        assert!(t.contains("lowtide_agent_received_bytes_total{source=\"origin\"} 100\n"));
        assert!(t.contains("lowtide_agent_peer_bytes_ratio 0.8000\n"), "{t}");
        assert!(t.contains("lowtide_agent_heartbeat_ok 1\n"));
        assert!(t.contains("# TYPE lowtide_agent_served_bytes_total counter\n"));
        assert!(render(&Values::default()).contains("lowtide_agent_peer_bytes_ratio 0.0000\n"));
        let t = render(&Values {
            serving_refused: true,
            discovery_dropped: vec![("tag", 3), ("stale", 1)],
            ..Values::default()
        });
        assert!(t.contains("lowtide_agent_serving_refused 1\n"), "{t}");
        assert!(
            t.contains("lowtide_agent_discovery_dropped_total{reason=\"tag\"} 3\n"),
            "{t}"
        );
    }

    #[tokio::test]
    async fn metrics_http_answers_get_metrics_only() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        answer(server, || async { "m 1\n".to_string() }).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\n") && out.ends_with("\r\n\r\nm 1\n"),
            "{out}"
        );

        let (mut client, server) = tokio::io::duplex(64 * 1024);
        client.write_all(b"POST /admin HTTP/1.1\r\n\r\n").await.unwrap();
        answer(server, || async { "m 1\n".to_string() }).await.unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 404") && !out.contains("m 1"), "{out}");
    }
}
