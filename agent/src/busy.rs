//! Whether this device may serve peers now: CPU use (`/proc/stat`), disk
//! busy time (`/proc/diskstats`), the power supply
//! (`/sys/class/power_supply`), and the site kind (a VPN site's agents do
//! not serve).
//!
//! The parsers and [`Limits::refusal`] are pure; the daemon samples the
//! files every `busy_check_secs` and, when the answer changes, tells the
//! engine to refuse (every request and session gets `Reject(DeviceBusy)`),
//! tells discovery to say so in its replies, and shows the reason in
//! `status` and the metrics.

use std::path::Path;

/// CPU time counters of the first line of `/proc/stat`: (busy, total) in ticks.
pub fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if v.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Milliseconds each whole disk spent doing I/O (field 13 of `/proc/diskstats`),
/// leaving out loop, RAM and device-mapper devices and partitions of disks listed.
pub fn parse_diskstats(text: &str) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(name), Some(ticks)) = (f.get(2), f.get(12).and_then(|t| t.parse::<u64>().ok())) else {
            continue;
        };
        if ["loop", "ram", "zram", "dm-", "sr"].iter().any(|p| name.starts_with(p)) {
            continue;
        }
        // A partition follows its disk (sda, sda1; nvme0n1, nvme0n1p1): keep the disk only.
        if out
            .iter()
            .any(|(d, _)| name.starts_with(d.as_str()) && name.len() > d.len())
        {
            continue;
        }
        out.push((name.to_string(), ticks));
    }
    out
}

/// Whether the device runs on battery: a `Battery` supply that is `Discharging`
/// while no `Mains` supply is online. No supplies (a server, a VM): not on battery.
pub fn on_battery(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let read = |p: &Path, f: &str| {
        std::fs::read_to_string(p.join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let (mut discharging, mut mains) = (false, false);
    for e in entries.flatten().take(64) {
        let p = e.path();
        match read(&p, "type").as_str() {
            "Battery" => discharging |= read(&p, "status") == "Discharging",
            "Mains" => mains |= read(&p, "online") == "1",
            _ => {}
        }
    }
    discharging && !mains
}

/// One reading of the counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reading {
    pub cpu: Option<(u64, u64)>,
    pub disks: Vec<(String, u64)>,
}

impl Reading {
    pub fn from_proc(proc_dir: &Path) -> Self {
        let read = |f: &str| std::fs::read_to_string(proc_dir.join(f)).unwrap_or_default();
        Self {
            cpu: parse_proc_stat(&read("stat")),
            disks: parse_diskstats(&read("diskstats")),
        }
    }
}

/// Use between two readings `elapsed_ms` apart: CPU percent and the busiest disk's percent.
pub fn usage(before: &Reading, after: &Reading, elapsed_ms: u64) -> (Option<u8>, Option<u8>) {
    let cpu = match (before.cpu, after.cpu) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => Some((b1.saturating_sub(b0) * 100 / (t1 - t0)).min(100) as u8),
        _ => None,
    };
    let disk = after
        .disks
        .iter()
        .filter_map(|(name, t1)| {
            let t0 = before.disks.iter().find(|(n, _)| n == name)?.1;
            Some((t1.saturating_sub(t0) * 100 / elapsed_ms.max(1)).min(100) as u8)
        })
        .max();
    (cpu, disk)
}

/// The configured thresholds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// 0: never refuse for CPU.
    pub cpu_percent_max: u8,
    /// 0: never refuse for disk.
    pub disk_percent_max: u8,
    pub serve_on_battery: bool,
}

impl Limits {
    /// Why the device should not serve now, if it should not.
    pub fn refusal(&self, cpu: Option<u8>, disk: Option<u8>, battery: bool, site_kind: Option<&str>) -> Option<String> {
        if site_kind == Some("vpn") {
            return Some("on a VPN site (its agents do not serve)".into());
        }
        if battery && !self.serve_on_battery {
            return Some("on battery (serve_on_battery = false)".into());
        }
        if let Some(c) = cpu.filter(|&c| self.cpu_percent_max > 0 && c > self.cpu_percent_max) {
            return Some(format!(
                "CPU {c}% busy (busy_cpu_percent_max = {})",
                self.cpu_percent_max
            ));
        }
        if let Some(d) = disk.filter(|&d| self.disk_percent_max > 0 && d > self.disk_percent_max) {
            return Some(format!(
                "disk {d}% busy (busy_disk_percent_max = {})",
                self.disk_percent_max
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_reads_cpu_and_disks() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let b = parse_proc_stat("cpu  250 0 150 750 150 0 0 0 0 0\n").unwrap();
        assert_eq!(a, (200, 1000));
        let disks = "   7 0 loop0 0 0 0 0 0 0 0 0 0 500 0 0 0 0 0 0 0\n\
                     8 0 sda 1 2 3 4 5 6 7 8 0 1000 9\n\
                     8 1 sda1 1 2 3 4 5 6 7 8 0 900 9\n\
                     259 0 nvme0n1 1 2 3 4 5 6 7 8 0 300 9\n\
                     short line\n";
        let d0 = parse_diskstats(disks);
        assert_eq!(d0, vec![("sda".to_string(), 1000), ("nvme0n1".to_string(), 300)]);
        let before = Reading {
            cpu: Some(a),
            disks: d0,
        };
        let after = Reading {
            cpu: Some(b),
            disks: vec![("sda".into(), 1500), ("nvme0n1".into(), 400)],
        };
        // 200 of 300 ticks busy; sda busy 500 of 1000 ms.
        assert_eq!(usage(&before, &after, 1000), (Some(66), Some(50)));
        assert_eq!(
            usage(&after, &after, 1000),
            (None, Some(0)),
            "no ticks passed: CPU unknown"
        );
        assert_eq!(parse_proc_stat("nonsense"), None);
    }

    #[test]
    fn busy_refuses_for_each_reason_and_only_then() {
        let l = Limits {
            cpu_percent_max: 80,
            disk_percent_max: 90,
            serve_on_battery: false,
        };
        assert_eq!(l.refusal(Some(50), Some(50), false, Some("standard")), None);
        assert!(l.refusal(Some(81), None, false, None).unwrap().contains("CPU 81%"));
        assert!(l.refusal(None, Some(95), false, None).unwrap().contains("disk 95%"));
        assert!(l.refusal(None, None, true, None).unwrap().contains("battery"));
        assert!(l.refusal(None, None, false, Some("vpn")).unwrap().contains("VPN"));
        let never = Limits {
            cpu_percent_max: 0,
            disk_percent_max: 0,
            serve_on_battery: true,
        };
        assert_eq!(never.refusal(Some(100), Some(100), true, Some("wifi")), None);
    }

    #[test]
    fn busy_reads_the_power_supply() {
        let dir = tempfile::tempdir().unwrap();
        let supply = |name: &str, files: &[(&str, &str)]| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            for (f, v) in files {
                std::fs::write(p.join(f), format!("{v}\n")).unwrap();
            }
        };
        assert!(!on_battery(dir.path()), "no supply: not on battery");
        assert!(!on_battery(&dir.path().join("missing")));
        supply("BAT0", &[("type", "Battery"), ("status", "Discharging")]);
        assert!(on_battery(dir.path()));
        supply("AC", &[("type", "Mains"), ("online", "1")]);
        assert!(!on_battery(dir.path()), "plugged in");
        supply("AC", &[("type", "Mains"), ("online", "0")]);
        supply("BAT0", &[("type", "Battery"), ("status", "Charging")]);
        assert!(!on_battery(dir.path()));
    }
}
