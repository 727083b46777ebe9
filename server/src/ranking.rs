//! Ranking of agents, RVP election, the serving cap, and the "where do I get
//! content X" answer, as pure functions over rows the store has read.
//!
//! # Ranking order (design map)
//!
//! 1. most real free disk space, 2. marked preferred, 3. chassis (desktop,
//!    server, VM, laptop, unknown), 4. OS type (server before workstation),
//! 5. longest uptime, 6. most usable free space; ties go to the lower agent id
//!    so every server process ranks the same rows the same way.
//!
//! For one content in one site, agents that serve peers come first (an agent
//! whose heartbeat says `serves: false` — `uploads_max = 0`, on battery,
//! busy — answers every peer `DeviceBusy`: it is elected RVP only when no agent
//! of the site serves, and listed as a source after those that do), then agents
//! that already hold more of it (a device that holds the package serves it
//! better than the best ranked device that has none of it), then the ranking
//! above.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Most byte ranges one agent may report for one content.
pub const RANGES_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chassis {
    Desktop,
    Server,
    Vm,
    Laptop,
    #[default]
    Unknown,
}

impl Chassis {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Desktop => "desktop",
            Self::Server => "server",
            Self::Vm => "vm",
            Self::Laptop => "laptop",
            Self::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "desktop" => Self::Desktop,
            "server" => Self::Server,
            "vm" => Self::Vm,
            "laptop" => Self::Laptop,
            _ => Self::Unknown,
        }
    }
    fn rank(self) -> u8 {
        self as u8
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OsType {
    Server,
    Workstation,
    #[default]
    Unknown,
}

impl OsType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Server => "server",
            Self::Workstation => "workstation",
            Self::Unknown => "unknown",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "server" => Self::Server,
            "workstation" => Self::Workstation,
            _ => Self::Unknown,
        }
    }
    fn rank(self) -> u8 {
        self as u8
    }
}

/// The hardware facts ranking reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RankFacts {
    pub disk_free_bytes: u64,
    pub preferred: bool,
    pub chassis: Chassis,
    pub os_type: OsType,
    pub uptime_secs: u64,
    pub disk_usable_bytes: u64,
}

/// Compare two agents: `Less` means `a` ranks before `b`.
pub fn rank_cmp(a: &RankFacts, a_id: &str, b: &RankFacts, b_id: &str) -> Ordering {
    b.disk_free_bytes
        .cmp(&a.disk_free_bytes)
        .then(b.preferred.cmp(&a.preferred))
        .then(a.chassis.rank().cmp(&b.chassis.rank()))
        .then(a.os_type.rank().cmp(&b.os_type.rank()))
        .then(b.uptime_secs.cmp(&a.uptime_secs))
        .then(b.disk_usable_bytes.cmp(&a.disk_usable_bytes))
        .then(a_id.cmp(b_id))
}

/// An active agent of one site, with what it holds of one content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub agent_id: String,
    pub addresses: Vec<String>,
    pub port: u16,
    pub facts: RankFacts,
    /// Bytes of the content it holds (0 when none).
    pub held_bytes: u64,
    pub ranges: Vec<(u64, u64)>,
    /// It serves peers now, as its last heartbeat said. One that does not refuses every
    /// session (`DeviceBusy`): it is no use as a source or as the site's RVP while another
    /// agent of the site serves.
    pub serves: bool,
}

/// The order of candidates for one content: those that serve first, then more held, then
/// by ranking.
pub fn candidate_cmp(a: &Candidate, b: &Candidate) -> Ordering {
    b.serves
        .cmp(&a.serves)
        .then(b.held_bytes.cmp(&a.held_bytes))
        .then_with(|| rank_cmp(&a.facts, &a.agent_id, &b.facts, &b.agent_id))
}

/// Sort candidates for one content by [`candidate_cmp`].
pub fn sort_candidates(c: &mut [Candidate]) {
    c.sort_by(candidate_cmp);
}

/// Pick the RVP of a site for one content: keep `current` while it is still an
/// active candidate (no flapping) and it serves peers or the first of the sorted
/// candidates does not either; else that first one. So an RVP that stops serving
/// is replaced when another agent serves, and one that does not serve is elected
/// only when none does (and then kept until one does).
pub fn elect<'a>(sorted: &'a [Candidate], current: Option<&str>) -> Option<&'a Candidate> {
    let best = sorted.first()?;
    current
        .and_then(|id| sorted.iter().find(|c| c.agent_id == id))
        .filter(|c| c.serves || !best.serves)
        .or(Some(best))
}

/// Split holders into the serving set (at most `cap`, the RVP always among them)
/// and the bench. Input sorted by [`sort_candidates`]; non-holders are skipped.
pub fn serving_and_bench<'a>(
    sorted: &'a [Candidate],
    rvp: Option<&str>,
    cap: usize,
) -> (Vec<&'a Candidate>, Vec<&'a Candidate>) {
    let holders: Vec<&Candidate> = sorted.iter().filter(|c| c.held_bytes > 0).collect();
    let mut serving: Vec<&Candidate> = Vec::new();
    if let Some(r) = rvp.and_then(|id| holders.iter().find(|c| c.agent_id == id)) {
        serving.push(r);
    }
    let mut bench = Vec::new();
    for c in holders {
        if serving.iter().any(|s| s.agent_id == c.agent_id) {
            continue;
        }
        if serving.len() < cap {
            serving.push(c);
        } else {
            bench.push(c);
        }
    }
    serving.sort_by(|a, b| candidate_cmp(a, b));
    (serving, bench)
}

/// Check, sort and merge byte ranges `[start, end)` of a content of `size` bytes.
pub fn normalize_ranges(mut r: Vec<(u64, u64)>, size: u64) -> Result<Vec<(u64, u64)>, String> {
    if r.len() > RANGES_MAX {
        return Err(format!(
            "{} ranges; at most {RANGES_MAX} may be reported, merge neighbouring ones",
            r.len()
        ));
    }
    for &(s, e) in &r {
        if s >= e || e > size {
            return Err(format!(
                "range [{s}, {e}) is empty or past the end of the content ({size} bytes)"
            ));
        }
    }
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    Ok(out)
}

pub fn ranges_bytes(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|(s, e)| e - s).sum()
}

/// Text form stored in the database: `start-end,start-end`.
pub fn ranges_to_text(r: &[(u64, u64)]) -> String {
    r.iter().map(|(s, e)| format!("{s}-{e}")).collect::<Vec<_>>().join(",")
}

pub fn ranges_from_text(t: &str) -> Vec<(u64, u64)> {
    t.split(',')
        .filter_map(|p| {
            let (s, e) = p.split_once('-')?;
            Some((s.parse().ok()?, e.parse().ok()?))
        })
        .collect()
}

/// Whole percent held, rounded down (100 only when complete).
pub fn percent(held: u64, size: u64) -> u64 {
    if size == 0 || held >= size {
        100
    } else {
        (held as u128 * 100 / size as u128) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(id: &str, free: u64, held: u64) -> Candidate {
        Candidate {
            agent_id: id.into(),
            addresses: vec![],
            port: 0,
            facts: RankFacts {
                disk_free_bytes: free,
                ..Default::default()
            },
            held_bytes: held,
            ranges: vec![],
            serves: true,
        }
    }

    fn refusing(c: Candidate) -> Candidate {
        Candidate { serves: false, ..c }
    }

    #[test]
    fn rank_follows_design_order() {
        let base = RankFacts {
            disk_free_bytes: 100,
            ..Default::default()
        };
        let more_disk = RankFacts {
            disk_free_bytes: 101,
            ..Default::default()
        };
        assert_eq!(rank_cmp(&more_disk, "b", &base, "a"), Ordering::Less);
        let preferred = RankFacts {
            preferred: true,
            ..base.clone()
        };
        assert_eq!(rank_cmp(&preferred, "b", &base, "a"), Ordering::Less);
        let desktop = RankFacts {
            chassis: Chassis::Desktop,
            ..base.clone()
        };
        let laptop = RankFacts {
            chassis: Chassis::Laptop,
            ..base.clone()
        };
        assert_eq!(rank_cmp(&desktop, "b", &laptop, "a"), Ordering::Less);
        let pref_laptop = RankFacts {
            preferred: true,
            ..laptop.clone()
        };
        assert_eq!(
            rank_cmp(&pref_laptop, "b", &desktop, "a"),
            Ordering::Less,
            "preferred outranks chassis"
        );
        let srv = RankFacts {
            os_type: OsType::Server,
            ..base.clone()
        };
        let ws = RankFacts {
            os_type: OsType::Workstation,
            ..base.clone()
        };
        assert_eq!(rank_cmp(&srv, "b", &ws, "a"), Ordering::Less);
        let up = RankFacts {
            uptime_secs: 10,
            ..ws.clone()
        };
        assert_eq!(rank_cmp(&up, "b", &ws, "a"), Ordering::Less);
        let usable = RankFacts {
            disk_usable_bytes: 10,
            ..ws.clone()
        };
        assert_eq!(rank_cmp(&usable, "b", &ws, "a"), Ordering::Less);
        assert_eq!(
            rank_cmp(&ws, "a", &ws.clone(), "b"),
            Ordering::Less,
            "ties go to the lower id"
        );
    }

    #[test]
    fn elect_is_sticky_and_falls_back() {
        let mut c = vec![cand("a", 1, 0), cand("b", 5, 0), cand("c", 3, 10)];
        sort_candidates(&mut c);
        assert_eq!(
            c.iter().map(|c| c.agent_id.as_str()).collect::<Vec<_>>(),
            ["c", "b", "a"]
        );
        assert_eq!(elect(&c, None).unwrap().agent_id, "c");
        assert_eq!(elect(&c, Some("a")).unwrap().agent_id, "a");
        assert_eq!(elect(&c, Some("gone")).unwrap().agent_id, "c");
        assert!(elect(&[], Some("a")).is_none());
    }

    #[test]
    fn elect_prefers_agents_that_serve() {
        // z holds it whole and has the most disk, but serves nobody: a, which serves, is elected.
        let mut c = vec![refusing(cand("z", 9, 10)), cand("a", 1, 0), cand("b", 2, 0)];
        sort_candidates(&mut c);
        let order: Vec<&str> = c.iter().map(|c| c.agent_id.as_str()).collect();
        assert_eq!(order, ["b", "a", "z"], "those that serve first, then by ranking");
        assert_eq!(elect(&c, None).unwrap().agent_id, "b");
        // An RVP that stops serving is replaced while another agent serves...
        assert_eq!(elect(&c, Some("z")).unwrap().agent_id, "b");
        // ...and one that serves stays, even with a better one about (no flapping).
        assert_eq!(elect(&c, Some("a")).unwrap().agent_id, "a");
        // Nobody serves: the best of them, and the recorded one stays.
        let mut none: Vec<Candidate> = c.iter().cloned().map(refusing).collect();
        sort_candidates(&mut none);
        assert_eq!(elect(&none, None).unwrap().agent_id, "z", "holds the most");
        assert_eq!(elect(&none, Some("a")).unwrap().agent_id, "a");
        // Serving holders come before refusing ones, within the cap.
        let mut h = vec![refusing(cand("z", 9, 10)), cand("a", 1, 5), cand("b", 2, 5)];
        sort_candidates(&mut h);
        let (s, bench) = serving_and_bench(&h, Some("b"), 2);
        let ids: Vec<&str> = s.iter().map(|c| c.agent_id.as_str()).collect();
        assert_eq!(ids, ["b", "a"]);
        assert_eq!(bench.len(), 1);
        assert_eq!(bench[0].agent_id, "z");
    }

    #[test]
    fn serving_cap_benches_the_rest_and_keeps_the_rvp() {
        let mut c: Vec<Candidate> = (0..6).map(|i| cand(&format!("p{i}"), 100 - i, 50)).collect();
        c.push(cand("none", 1000, 0));
        sort_candidates(&mut c);
        let (s, b) = serving_and_bench(&c, Some("p5"), 3);
        let ids: Vec<&str> = s.iter().map(|c| c.agent_id.as_str()).collect();
        assert_eq!(ids, ["p0", "p1", "p5"]);
        assert_eq!(b.len(), 3);
        assert!(!s.iter().chain(&b).any(|c| c.agent_id == "none"));
    }

    #[test]
    fn ranges_normalize_and_reject() {
        assert_eq!(
            normalize_ranges(vec![(10, 20), (0, 5), (5, 12)], 100).unwrap(),
            vec![(0, 20)]
        );
        assert!(normalize_ranges(vec![(10, 10)], 100).is_err());
        assert!(normalize_ranges(vec![(90, 101)], 100).is_err());
        let r = vec![(0, 5), (7, 9)];
        assert_eq!(ranges_from_text(&ranges_to_text(&r)), r);
        assert_eq!(percent(37, 100), 37);
        assert_eq!(percent(99_999, 100_000), 99);
        assert_eq!(percent(0, 0), 100);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn ranges_normalize_keeps_exactly_the_same_bytes(r in prop::collection::vec((0u64..200, 1u64..50), 0..20)) {
                let size = 300;
                let input: Vec<(u64, u64)> = r.iter().map(|&(s, l)| (s, (s + l).min(size))).filter(|(s, e)| s < e).collect();
                let out = normalize_ranges(input.clone(), size).unwrap();
                for w in out.windows(2) {
                    prop_assert!(w[0].1 < w[1].0, "sorted, disjoint, not touching: {:?}", out);
                }
                for b in 0..size {
                    let held_in = input.iter().any(|&(s, e)| s <= b && b < e);
                    let held_out = out.iter().any(|&(s, e)| s <= b && b < e);
                    prop_assert_eq!(held_in, held_out, "byte {}", b);
                }
                prop_assert_eq!(ranges_from_text(&ranges_to_text(&out)), out);
            }
        }
    }
}
