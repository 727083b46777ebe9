//! Prometheus metrics in the text exposition format, kept by hand: request
//! counts per route and status, a latency histogram, and gauges read from the
//! database at scrape time (so every server behind a load balancer reports the
//! same agent and content counts).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::store::{Counts, TrafficRow};

/// Upper bounds of the latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 11] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 500_000, 2_000_000,
];

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    origin_bytes: AtomicU64,
}

impl Metrics {
    /// Count one finished request on `route` (the route template, not the raw path).
    pub fn observe(&self, route: &str, status: u16, latency_us: u64) {
        *self
            .requests
            .lock()
            .expect("metrics lock")
            .entry((route.to_string(), status))
            .or_default() += 1;
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&b| latency_us <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(latency_us, Ordering::Relaxed);
    }

    /// Requests seen on `route` with `status`.
    pub fn requests(&self, route: &str, status: u16) -> u64 {
        self.requests
            .lock()
            .expect("metrics lock")
            .get(&(route.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// Count body bytes this server sent as an origin (`/files`, full or Range answers).
    pub fn add_origin_bytes(&self, n: u64) {
        self.origin_bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Body bytes this server sent as an origin since it started.
    pub fn origin_bytes(&self) -> u64 {
        self.origin_bytes.load(Ordering::Relaxed)
    }

    pub fn render(&self, counts: &Counts, traffic: &[TrafficRow], backend: &str) -> String {
        let mut out = String::new();
        let w = &mut out;
        let _ = writeln!(
            w,
            "# HELP lowtide_http_requests_total HTTP requests answered, by route template and status."
        );
        let _ = writeln!(w, "# TYPE lowtide_http_requests_total counter");
        for ((route, status), n) in self.requests.lock().expect("metrics lock").iter() {
            let _ = writeln!(
                w,
                "lowtide_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                route.replace(['"', '\\', '\n'], "_")
            );
        }
        let _ = writeln!(
            w,
            "# HELP lowtide_origin_served_bytes_total Body bytes this server sent as an origin (/files), by Content-Length."
        );
        let _ = writeln!(w, "# TYPE lowtide_origin_served_bytes_total counter");
        let _ = writeln!(w, "lowtide_origin_served_bytes_total {}", self.origin_bytes());
        let _ = writeln!(
            w,
            "# HELP lowtide_http_request_duration_seconds Time to answer HTTP requests."
        );
        let _ = writeln!(w, "# TYPE lowtide_http_request_duration_seconds histogram");
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                w,
                "lowtide_http_request_duration_seconds_bucket{{le=\"{}\"}} {cum}",
                *b as f64 / 1e6
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(w, "lowtide_http_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            w,
            "lowtide_http_request_duration_seconds_sum {}",
            self.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(w, "lowtide_http_request_duration_seconds_count {count}");
        let gauges = [
            (
                "lowtide_agents",
                "Agents by status.",
                vec![
                    ("status=\"active\"", counts.agents_active),
                    ("status=\"inactive\"", counts.agents_inactive),
                    ("status=\"revoked\"", counts.agents_revoked),
                ],
            ),
            (
                "lowtide_content",
                "Published content by state.",
                vec![
                    ("state=\"live\"", counts.content_live),
                    ("state=\"retired\"", counts.content_retired),
                ],
            ),
            ("lowtide_sites", "Sites in the topology.", vec![("", counts.sites)]),
        ];
        for (name, help, vals) in gauges {
            let _ = writeln!(w, "# HELP {name} {help}");
            let _ = writeln!(w, "# TYPE {name} gauge");
            for (label, v) in vals {
                if label.is_empty() {
                    let _ = writeln!(w, "{name} {v}");
                } else {
                    let _ = writeln!(w, "{name}{{{label}}} {v}");
                }
            }
        }
        let _ = writeln!(
            w,
            "# HELP lowtide_site_bytes_total Bytes agents reported, by site and link (lan, wan, origin)."
        );
        let _ = writeln!(w, "# TYPE lowtide_site_bytes_total counter");
        for t in traffic {
            let site = t.site.replace(['"', '\\', '\n'], "_");
            let _ = writeln!(
                w,
                "lowtide_site_bytes_total{{site=\"{site}\",link=\"{}\"}} {}",
                t.link, t.bytes
            );
        }
        let _ = writeln!(w, "# HELP lowtide_server_info The database backend in use.");
        let _ = writeln!(w, "# TYPE lowtide_server_info gauge");
        let _ = writeln!(
            w,
            "lowtide_server_info{{backend=\"{backend}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_counts_and_buckets() {
        let m = Metrics::default();
        m.observe("/v1/heartbeat", 200, 300);
        m.observe("/v1/heartbeat", 200, 30_000);
        m.observe("/v1/heartbeat", 401, 100);
        let traffic = [TrafficRow {
            site: "paris".into(),
            link: "wan".into(),
            bytes: 42,
        }];
        let text = m.render(
            &Counts {
                agents_active: 3,
                ..Default::default()
            },
            &traffic,
            "sqlite",
        );
        assert!(
            text.contains("lowtide_http_requests_total{route=\"/v1/heartbeat\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("lowtide_http_request_duration_seconds_bucket{le=\"0.00025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lowtide_http_request_duration_seconds_bucket{le=\"0.0005\"} 2"),
            "{text}"
        );
        assert!(text.contains("lowtide_http_request_duration_seconds_count 3"), "{text}");
        assert!(text.contains("lowtide_agents{status=\"active\"} 3"), "{text}");
        assert!(
            text.contains("lowtide_site_bytes_total{site=\"paris\",link=\"wan\"} 42"),
            "{text}"
        );
    }
}
