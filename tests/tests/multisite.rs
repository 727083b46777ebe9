//! The multi-site distribution end to end (issue 6): the demo topology of
//! `scripts/testbed/sites.py` at a small package size, real `lowtide-server`
//! and `lowtide-agent` processes in network namespaces, TBF bottlenecks and
//! the delay line on the WAN links, and every byte figure counted on the links
//! by packet taps (`lowtide-wanprobe count`), not reported by the agents.
//!
//! What else crosses a branch WAN link besides the package: each agent's
//! heartbeats (every 2 s here), inventory reports, source look-ups and
//! manifest from the server in the head office, the block table once per link
//! (the RVP's; the other agents take it from their site's RVP), the
//! acknowledgements, and the packet headers Lowtide puts in each datagram
//! (48 bytes per 1424 of content). The latency probe is off here. All of it
//! counts; nothing is subtracted.
//!
//! Bounds per link. Issue 6's target is ≤ 1.05 × the package on each branch
//! link. On the link whose RVP is not killed (b2) it is met, narrowly
//! (1.047–1.049 × at load average ~12: the 3.4 % data header, acks ~1 %,
//! heartbeats every 2 s and inventory ~0.4 %, which grow with the run's
//! duration on a loaded machine), so the test prints each link against it
//! and asserts what does not depend on the machine's load:
//! - WAN-once: less than a second copy (`ONE_COPY_RATIO_MAX`). When every
//!   agent of a branch fetched across the WAN itself, a branch link carried
//!   4–7 ×; a second copy would be ≥ 2 ×.
//! - No duplicate data on the link whose RVP is not killed: the content that
//!   crossed (UDP payload toward the site less the 48-byte data header of each
//!   datagram) is ≤ `CONTENT_RATIO_MAX` × the package. Before the fetcher
//!   cancelled the blocks it took away from a stalled source, 3–9 % of the
//!   package crossed twice (1.045–1.088 ×); now 1.000–1.002 ×.
//!
//! The killed branch (b1) carries what was in flight to the killed RVP again
//! (its request window, ~1–3 % of a 32 MB package), so it is judged on the
//! failover bound below.
//!
//! Every failed property is listed at once, with the whole report.

use std::process::{Command, Stdio};

use serde_json::Value;

/// Package size: large enough that control traffic stays small next to it,
/// small enough for a loaded 2-core machine in a few minutes.
const SIZE_MB: u64 = 32;
/// Issue 6's target for what may cross a link or leave the origin, as a multiple of the package.
const ONCE_RATIO_MAX: f64 = 1.05;
/// Asserted on each branch link: the package crossed once, not twice (see the module docs).
const ONE_COPY_RATIO_MAX: f64 = 1.5;
/// Asserted on the branch link whose RVP is not killed: content that crossed, over the package.
const CONTENT_RATIO_MAX: f64 = 1.01;
/// Asserted after the RVP failover: content that crosses after the kill, over what the site
/// lacked. Every range the killed RVP had (30 % of the package) crossing again would be ≥ 1.43.
const FAILOVER_RATIO_MAX: f64 = 1.2;

fn run_testbed(dir: &std::path::Path) -> Value {
    let bins = lowtide_tests::binaries();
    let report = dir.join("report.json");
    let out = Command::new("python3")
        .arg(lowtide_tests::repo().join("scripts/testbed/sites.py"))
        .args([
            "run",
            "--methods",
            "lowtide",
            "--no-probe",
            "--kill-rvp",
            "b1",
            "--kill-at",
            "0.3",
        ])
        .args([
            "--size-mb",
            &SIZE_MB.to_string(),
            "--rate",
            "20mbit",
            "--timeout-s",
            "600",
        ])
        .arg("--bin-dir")
        .arg(&bins)
        .arg("--work")
        .arg(dir.join("work"))
        .arg("--json")
        .arg(&report)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .expect("run python3 scripts/testbed/sites.py");
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "sites.py failed ({}); its logs are kept under {}:\n{text}",
        out.status,
        dir.join("work").display()
    );
    serde_json::from_slice(&std::fs::read(&report).expect("sites.py wrote its report")).expect("report is JSON")
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a byte count: {v}"))
}

#[test]
fn multisite_package_crosses_each_wan_link_once() {
    if !lowtide_tests::root_or_skip("multisite_package_crosses_each_wan_link_once") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("lowtide-multisite-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let report = run_testbed(&dir);
    let size = u(&report["package_bytes"]);
    let case = &report["cases"][0];
    let pretty = serde_json::to_string_pretty(case).unwrap();
    let bound = (ONCE_RATIO_MAX * size as f64) as u64;

    // Every property is checked and every failure listed, so one run shows all that is wrong.
    let mut failed: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failed.push(what);
        }
    };

    check(
        u(&case["counter_drops"]) == 0,
        "the packet taps missed frames: figures incomplete".into(),
    );

    // Every agent's copy has the package's SHA-256 (checked by sites.py on the cached file).
    let agents = case["agent_results"].as_array().unwrap();
    let bad: Vec<&str> = agents
        .iter()
        .filter(|a| a["verified"] != true)
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    check(bad.is_empty(), format!("copies that do not verify: {bad:?}"));

    // Each branch WAN link carried the package once (payload on the link, both directions, everything).
    let one_copy = (ONE_COPY_RATIO_MAX * size as f64) as u64;
    for (site, link) in case["links"].as_object().unwrap() {
        if link["kind"] == "vpn" {
            continue;
        }
        let carried = u(&link["payload_bytes"]);
        let x = |k: &str| u(&link[k]) as f64 / size as f64;
        let figures = format!(
            "WAN link to {site} carried {carried} bytes = {:.3} x the package (content {:.3} x, UDP toward \
             the site {:.3} x, upstream {:.3} x, TCP {:.3} x)",
            x("payload_bytes"),
            x("content_down_bytes"),
            x("udp_down_payload_bytes"),
            x("up_payload_bytes"),
            x("tcp_payload_bytes"),
        );
        let target = if carried <= bound { "met" } else { "NOT met" };
        eprintln!("{figures}; issue 6 target <= {ONCE_RATIO_MAX} x: {target}");
        check(
            carried <= one_copy,
            format!("{figures}: more than one copy (bound {ONE_COPY_RATIO_MAX} x)"),
        );
        if case["failover"]["site"].as_str() != Some(site.as_str()) {
            check(
                u(&link["content_down_bytes"]) as f64 <= CONTENT_RATIO_MAX * size as f64,
                format!("{figures}: content crossed more than once (bound {CONTENT_RATIO_MAX} x)"),
            );
        }
    }

    // The origin served the package at most once.
    let origin = u(&case["origin"]["payload_bytes"]);
    check(
        origin <= bound,
        format!(
            "the origin sent {origin} bytes = {:.3} x the package",
            origin as f64 / size as f64
        ),
    );

    // VPN agents served nothing: no data datagram left any of them (counted on their ports).
    for a in agents.iter().filter(|a| a["kind"] == "vpn") {
        let sent = u(&a["sent_udp_big_frames"]);
        check(
            sent == 0,
            format!("VPN agent {} sent {sent} data datagrams (served content)", a["name"]),
        );
    }

    // The Wi-Fi site got it from its wired parent site: what entered the Wi-Fi subnet came from
    // the parent's subnet, and none of it from the origin.
    let wifi = &case["wifi"];
    let from_parent = u(&wifi["from_parent_payload_bytes"]);
    let from_elsewhere = u(&wifi["from_elsewhere_payload_bytes"]);
    check(
        from_parent >= size,
        format!(
            "the Wi-Fi site received only {from_parent} bytes from its parent site {}",
            wifi["parent"]
        ),
    );
    check(
        from_elsewhere <= size / 20,
        format!("the Wi-Fi site received {from_elsewhere} bytes from outside its parent site"),
    );
    for a in agents.iter().filter(|a| a["site"] == wifi["site"]) {
        check(
            a["bytes_from_origin"].as_u64() == Some(0),
            format!("Wi-Fi agent {} used the origin ({})", a["name"], a["bytes_from_origin"]),
        );
    }

    // Killing branch 1's RVP mid-transfer: a new RVP is elected, and the content that crosses the
    // WAN after the kill is at most what the site did not hold yet (times the same bound). Content
    // = UDP payload toward the site less Lowtide's 48-byte data header per datagram, so that the
    // protocol's overhead (bounded above for the whole link) is not taken for ranges crossing again.
    let f = &case["failover"];
    if !f.is_object() {
        check(
            false,
            "the RVP of b1 was never seen mid-transfer, so it was not killed".into(),
        );
    } else {
        check(
            f["new_rvp"].as_str().is_some_and(|n| n != f["killed_agent"]),
            format!("no new RVP was elected in b1 after {} was killed", f["killed_agent"]),
        );
        let content = u(&f["wan_content_after_kill_bytes"]);
        let remaining = u(&f["remaining_at_kill_bytes"]);
        check(
            content as f64 <= FAILOVER_RATIO_MAX * remaining as f64,
            format!(
                "after the kill {content} bytes of content crossed the WAN ({} bytes in all) for {remaining} \
                 bytes the site did not hold: ranges already in the site crossed again",
                u(&f["wan_payload_after_kill_bytes"])
            ),
        );
        // The killed agent, restarted, completed from the site (its copy is checked above); it
        // must not have pulled the package across the WAN again either.
        let again = u(&f["wan_payload_after_restart_bytes"]);
        check(
            again <= size / 20,
            format!("the restarted agent made {again} bytes cross the WAN"),
        );
    }
    assert!(
        failed.is_empty(),
        "{} properties failed:\n- {}\n{pretty}",
        failed.len(),
        failed.join("\n- ")
    );
    let _ = std::fs::remove_dir_all(&dir);
}
