//! When and how fast background transfers may run: a ceiling (absolute rate
//! and share of the measured capacity) and a time-of-day schedule.
//!
//! A schedule is a list of rules written as administrators write them:
//!
//! ```text
//! 08:00-18:00=2mbit, 18:00-08:00=80%, sat-sun=unlimited
//! ```
//!
//! Each rule is `[days ]HH:MM-HH:MM=LIMIT` or `days=LIMIT`, where days is
//! `mon`..`sun` or a range `mon-fri`, and LIMIT is `pause`, `unlimited`, a
//! rate (`500kbit`, `20mbit`, `1gbit`, bits per second) or a share of the
//! measured capacity (`50%`). Windows may wrap past midnight. The first rule
//! that matches wins; no match means unlimited. The caller passes the local
//! weekday and minute of the day: this module never reads a clock.

use std::fmt;

/// A limit on background sending.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Unlimited,
    Paused,
    /// Bits per second.
    Rate(u64),
    /// Share of the measured capacity, 0..=1.
    Share(f64),
}

impl Limit {
    /// The rate ceiling in bytes/s given a capacity estimate, `None` for no ceiling;
    /// `Some(0)` means paused.
    pub fn bytes_per_s(&self, capacity_bytes_per_s: u64) -> Option<u64> {
        match *self {
            Limit::Unlimited => None,
            Limit::Paused => Some(0),
            Limit::Rate(bits) => Some(bits / 8),
            Limit::Share(f) => Some((capacity_bytes_per_s as f64 * f) as u64),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// Bit d set: weekday d (0 = Monday) matches.
    days: u8,
    /// Minutes of the day, start inclusive, end exclusive; None = all day.
    window: Option<(u16, u16)>,
    limit: Limit,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Schedule {
    rules: Vec<Rule>,
}

/// A schedule could not be parsed; says which rule and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleError {
    pub rule: String,
    pub reason: &'static str,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "schedule rule {:?}: {}; write rules like \"mon-fri 08:00-18:00=2mbit, 50%\" or \"sat-sun=unlimited\"",
            self.rule, self.reason
        )
    }
}

impl std::error::Error for ScheduleError {}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
/// Most rules in one schedule.
pub const RULES_MAX: usize = 64;

fn day(s: &str) -> Option<u8> {
    DAYS.iter().position(|d| *d == s).map(|i| i as u8)
}

fn hhmm(s: &str) -> Option<u16> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
    (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
}

fn limit(s: &str) -> Option<Limit> {
    let s = s.trim().to_ascii_lowercase();
    if s == "pause" || s == "paused" {
        return Some(Limit::Paused);
    }
    if s == "unlimited" || s == "none" {
        return Some(Limit::Unlimited);
    }
    if let Some(p) = s.strip_suffix('%') {
        let v: f64 = p.trim().parse().ok()?;
        return (0.0..=100.0).contains(&v).then_some(Limit::Share(v / 100.0));
    }
    for (suffix, mul) in [
        ("gbit", 1_000_000_000u64),
        ("mbit", 1_000_000),
        ("kbit", 1_000),
        ("bit", 1),
    ] {
        if let Some(n) = s.strip_suffix(suffix) {
            let v: f64 = n.trim().parse().ok()?;
            return (v > 0.0).then_some(Limit::Rate((v * mul as f64) as u64));
        }
    }
    None
}

impl std::str::FromStr for Schedule {
    type Err = ScheduleError;
    fn from_str(text: &str) -> Result<Self, ScheduleError> {
        let mut rules = Vec::new();
        for raw in text.split(',').map(str::trim).filter(|r| !r.is_empty()) {
            let err = |reason| ScheduleError {
                rule: raw.chars().take(80).collect(),
                reason,
            };
            if rules.len() == RULES_MAX {
                return Err(err("too many rules (64 at most)"));
            }
            let (when, lim) = match raw.rsplit_once('=') {
                Some((w, l)) => (w.trim(), l),
                None => ("", raw),
            };
            let limit = limit(lim)
                .ok_or_else(|| err("the limit must be pause, unlimited, a rate like 20mbit, or a share like 50%"))?;
            let mut days = 0x7f;
            let mut window = None;
            for part in when.split_whitespace() {
                if let Some((a, b)) = part.split_once('-') {
                    if let (Some(a), Some(b)) = (day(a), day(b)) {
                        days = 0;
                        let mut d = a;
                        loop {
                            days |= 1 << d;
                            if d == b {
                                break;
                            }
                            d = (d + 1) % 7;
                        }
                        continue;
                    }
                    let (a, b) = (
                        hhmm(a).ok_or_else(|| err("bad time: use HH:MM"))?,
                        hhmm(b).ok_or_else(|| err("bad time: use HH:MM"))?,
                    );
                    if a == b {
                        return Err(err("the time window is empty"));
                    }
                    window = Some((a, b));
                } else if let Some(d) = day(part) {
                    days = 1 << d;
                } else {
                    return Err(err("expected days (mon..sun, mon-fri) or a time window (08:00-18:00)"));
                }
            }
            rules.push(Rule { days, window, limit });
        }
        Ok(Self { rules })
    }
}

impl Schedule {
    /// The limit in force on `weekday` (0 = Monday) at `minute` of the day (local time).
    pub fn limit_at(&self, weekday: u8, minute: u16) -> Limit {
        for r in &self.rules {
            let (day_ok, in_window) = match r.window {
                None => (r.days & (1 << weekday) != 0, true),
                Some((a, b)) if a < b => (r.days & (1 << weekday) != 0, minute >= a && minute < b),
                // Wrapping window: the part after midnight belongs to the day it started on.
                Some((a, b)) => {
                    if minute >= a {
                        (r.days & (1 << weekday) != 0, true)
                    } else {
                        (r.days & (1 << ((weekday + 6) % 7)) != 0, minute < b)
                    }
                }
            };
            if day_ok && in_window {
                return r.limit;
            }
        }
        Limit::Unlimited
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_picks_the_first_matching_rule() {
        let s: Schedule = "sat-sun=unlimited, mon-fri 08:00-18:00=2mbit, 18:00-08:00=80%"
            .parse()
            .unwrap();
        assert_eq!(s.limit_at(0, 9 * 60), Limit::Rate(2_000_000));
        assert_eq!(s.limit_at(0, 20 * 60), Limit::Share(0.8));
        assert_eq!(
            s.limit_at(1, 3 * 60),
            Limit::Share(0.8),
            "past midnight, from Monday's evening window"
        );
        assert_eq!(s.limit_at(5, 9 * 60), Limit::Unlimited);
        assert_eq!(Limit::Rate(2_000_000).bytes_per_s(0), Some(250_000));
        assert_eq!(Limit::Share(0.5).bytes_per_s(1000), Some(500));
    }

    #[test]
    fn schedule_wrapping_window_respects_days() {
        let s: Schedule = "fri 22:00-06:00=pause".parse().unwrap();
        assert_eq!(s.limit_at(4, 23 * 60), Limit::Paused);
        assert_eq!(s.limit_at(5, 60), Limit::Paused, "Saturday 01:00 is still Friday night");
        assert_eq!(s.limit_at(6, 60), Limit::Unlimited);
    }

    #[test]
    fn schedule_errors_name_the_rule_and_the_fix() {
        for bad in [
            "08:00-18:00=fast",
            "25:00-26:00=1mbit",
            "monday=pause",
            "08:00-08:00=pause",
            "=150%",
        ] {
            let e = bad.parse::<Schedule>().unwrap_err().to_string();
            assert!(
                e.contains("schedule rule") && e.contains("write rules like"),
                "{bad}: {e}"
            );
        }
    }
}
