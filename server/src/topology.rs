//! The site tree: parse, check and write the topology CSV, map an agent's
//! addresses to its site, and propose a topology from the subnets agents report.
//!
//! # The CSV table administrators edit
//!
//! ```text
//! id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps
//! hq,Head office,,standard,10.0.0.0/16,,
//! hq-wifi,Head office Wi-Fi,hq,wifi,10.1.0.0/22,,
//! paris,Paris branch,hq,standard,10.20.0.0/24 10.20.1.0/24,20000,100000
//! vpn,Remote workers,hq,vpn,172.16.0.0/16,,
//! ```
//!
//! - `id`: letters, digits, `.`, `_`, `-`; unique. `parent` names another row (or is
//!   empty for the one top site, the head office).
//! - `type`: `standard` (wired LAN), `vpn` (never serves content), `wifi`.
//! - `subnets`: CIDRs separated by spaces or `;`, no host bits set, none overlapping
//!   another (in any row).
//! - `wan_up_kbps` / `wan_down_kbps`: optional limits of the WAN link to the parent.
//!
//! Every bad row is reported with its line number and nothing is applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::LineError;

/// The header every topology CSV starts with.
pub const CSV_HEADER: [&str; 7] = [
    "id",
    "name",
    "parent",
    "type",
    "subnets",
    "wan_up_kbps",
    "wan_down_kbps",
];
/// Most sites in one topology.
pub const SITES_MAX: usize = 100_000;
/// Most subnets on one site.
pub const SITE_SUBNETS_MAX: usize = 256;
/// Longest site id or name.
pub const SITE_FIELD_CHARS_MAX: usize = 128;
/// Most line errors reported for one file.
pub const LINE_ERRORS_MAX: usize = 100;

/// What a site's LAN does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SiteKind {
    /// Wired LAN: shares content and broadcasts discovery.
    Standard,
    /// VPN clients: never serve content to each other.
    Vpn,
    /// Wi-Fi: shares content, no broadcast discovery.
    Wifi,
}

impl SiteKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standard => "standard",
            Self::Vpn => "vpn",
            Self::Wifi => "wifi",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "standard" => Some(Self::Standard),
            "vpn" => Some(Self::Vpn),
            "wifi" | "wi-fi" => Some(Self::Wifi),
            _ => None,
        }
    }

    /// Whether agents of this site may serve content.
    pub fn serves(self) -> bool {
        self != Self::Vpn
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub parent: Option<String>,
    pub kind: SiteKind,
    pub subnets: Vec<IpNet>,
    pub wan_up_kbps: Option<u64>,
    pub wan_down_kbps: Option<u64>,
}

/// A checked site tree (a valid tree, no overlapping subnets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topology {
    sites: Vec<Site>,
    index: HashMap<String, usize>,
}

fn id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= SITE_FIELD_CHARS_MAX
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let net: IpNet = s
        .parse()
        .map_err(|_| format!("{s:?} is not a CIDR subnet such as 10.1.2.0/24"))?;
    if net.trunc() != net {
        return Err(format!("{s} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

fn split_subnets(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| c == ';' || c.is_whitespace())
        .filter(|p| !p.is_empty())
}

impl Topology {
    /// Check sites given in order; `lines[i]` is the line number reported for `sites[i]`.
    pub fn from_sites(sites: Vec<Site>, lines: &[usize]) -> Result<Self, Vec<LineError>> {
        let line = |i: usize| lines.get(i).copied().unwrap_or(i + 2);
        let mut errors = Vec::new();
        let mut index = HashMap::new();
        for (i, s) in sites.iter().enumerate() {
            if let Some(prev) = index.insert(s.id.clone(), i) {
                errors.push(LineError {
                    line: line(i),
                    message: format!("site id {:?} already used on line {}", s.id, line(prev)),
                });
                index.insert(s.id.clone(), prev);
            }
        }
        let mut roots = Vec::new();
        for (i, s) in sites.iter().enumerate() {
            match &s.parent {
                None => roots.push(i),
                Some(p) if p == &s.id => errors.push(LineError {
                    line: line(i),
                    message: format!("site {:?} is its own parent", s.id),
                }),
                Some(p) if !index.contains_key(p) => errors.push(LineError {
                    line: line(i),
                    message: format!("parent {p:?} of site {:?} is not a site in this file", s.id),
                }),
                Some(_) => {}
            }
        }
        if sites.is_empty() {
            errors.push(LineError {
                line: 1,
                message: "no sites: the file needs at least the top site (empty parent)".into(),
            });
        } else if roots.is_empty() {
            errors.push(LineError {
                line: 2,
                message: "no top site: exactly one site must have an empty parent".into(),
            });
        }
        for &r in roots.iter().skip(1) {
            errors.push(LineError {
                line: line(r),
                message: format!(
                    "site {:?} has no parent, but {:?} on line {} is already the top site; give it a parent",
                    sites[r].id,
                    sites[roots[0]].id,
                    line(roots[0])
                ),
            });
        }
        // Cycles: walk up from each site; a walk longer than the site count loops.
        let mut reported = HashSet::new();
        for (i, s) in sites.iter().enumerate() {
            let mut cur = s.parent.as_deref();
            let mut steps = 0;
            while let Some(p) = cur {
                if p == s.id {
                    if reported.insert(i) {
                        errors.push(LineError {
                            line: line(i),
                            message: format!("site {:?} is its own ancestor (a cycle in parent links)", s.id),
                        });
                    }
                    break;
                }
                steps += 1;
                if steps > sites.len() {
                    break;
                }
                cur = index.get(p).and_then(|&j| sites[j].parent.as_deref());
            }
        }
        // Overlapping subnets across all rows (sorted sweep; containment is overlap).
        let mut nets: Vec<(IpNet, usize)> = sites
            .iter()
            .enumerate()
            .flat_map(|(i, s)| s.subnets.iter().map(move |n| (*n, i)))
            .collect();
        nets.sort_by_key(|a| (a.0.network(), a.0.prefix_len()));
        let mut open: Option<(IpNet, usize)> = None;
        for &(n, i) in &nets {
            if let Some((o, j)) = open {
                if o.contains(&n.network()) {
                    errors.push(LineError {
                        line: line(i.max(j)),
                        message: format!(
                            "subnet {n} (site {:?}) overlaps {o} (site {:?}, line {})",
                            sites[i].id,
                            sites[j].id,
                            line(i.min(j))
                        ),
                    });
                    if o.contains(&n.broadcast()) {
                        continue;
                    }
                }
            }
            open = Some((n, i));
        }
        if errors.is_empty() {
            Ok(Self { sites, index })
        } else {
            errors.sort_by_key(|e| e.line);
            errors.truncate(LINE_ERRORS_MAX);
            Err(errors)
        }
    }

    /// Parse and check a topology CSV. All errors, each with its line number.
    pub fn parse_csv(bytes: &[u8]) -> Result<Self, Vec<LineError>> {
        let one = |line, message: String| vec![LineError { line, message }];
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            one(line, "not UTF-8 text; save the file as UTF-8 CSV".into())
        })?;
        let mut rdr = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(text.as_bytes());
        let header = rdr
            .headers()
            .map_err(|e| one(1, format!("cannot read the header: {e}")))?
            .clone();
        let got: Vec<&str> = header.iter().collect();
        if got != CSV_HEADER {
            return Err(one(
                1,
                format!(
                    "header must be exactly {:?}, found {:?}",
                    CSV_HEADER.join(","),
                    got.join(",")
                ),
            ));
        }
        let mut sites = Vec::new();
        let mut lines = Vec::new();
        let mut errors = Vec::new();
        for rec in rdr.records() {
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    let line = e.position().map(|p| p.line() as usize).unwrap_or(0);
                    errors.push(LineError {
                        line,
                        message: format!("not valid CSV: {e}"),
                    });
                    if errors.len() >= LINE_ERRORS_MAX {
                        break;
                    }
                    continue;
                }
            };
            let line = rec.position().map(|p| p.line() as usize).unwrap_or(0);
            if rec.len() != CSV_HEADER.len() {
                let message = format!(
                    "has {} fields; every row needs {} ({})",
                    rec.len(),
                    CSV_HEADER.len(),
                    CSV_HEADER.join(",")
                );
                errors.push(LineError { line, message });
                continue;
            }
            if sites.len() >= SITES_MAX {
                errors.push(LineError {
                    line,
                    message: format!("more than {SITES_MAX} sites"),
                });
                break;
            }
            let mut bad = |m: String| errors.push(LineError { line, message: m });
            let id = rec[0].to_string();
            if !id_ok(&id) {
                bad(format!(
                    "site id {id:?} must be 1-{SITE_FIELD_CHARS_MAX} letters, digits, '.', '_' or '-'"
                ));
            }
            let name = if rec[1].is_empty() {
                id.clone()
            } else {
                rec[1].to_string()
            };
            if name.chars().count() > SITE_FIELD_CHARS_MAX {
                bad(format!("name is longer than {SITE_FIELD_CHARS_MAX} characters"));
            }
            let parent = Some(rec[2].to_string()).filter(|p| !p.is_empty());
            let kind = SiteKind::parse(&rec[3]).unwrap_or_else(|| {
                bad(format!("type {:?} must be standard, vpn or wifi", &rec[3]));
                SiteKind::Standard
            });
            let mut subnets = Vec::new();
            for s in split_subnets(&rec[4]) {
                match parse_cidr(s) {
                    Ok(n) => subnets.push(n),
                    Err(m) => bad(m),
                }
            }
            if subnets.len() > SITE_SUBNETS_MAX {
                bad(format!("more than {SITE_SUBNETS_MAX} subnets on one site"));
            }
            let mut limit = |col: usize| -> Option<u64> {
                let v = &rec[col];
                if v.is_empty() {
                    return None;
                }
                v.parse::<u64>()
                    .ok()
                    .filter(|&n| n > 0 && n <= i64::MAX as u64)
                    .or_else(|| {
                        bad(format!(
                            "{} {v:?} must be a positive whole number of kbit/s, or empty for no limit",
                            CSV_HEADER[col]
                        ));
                        None
                    })
            };
            let wan_up_kbps = limit(5);
            let wan_down_kbps = limit(6);
            sites.push(Site {
                id,
                name,
                parent,
                kind,
                subnets,
                wan_up_kbps,
                wan_down_kbps,
            });
            lines.push(line);
        }
        if !errors.is_empty() {
            // Report the structural errors too, so one upload shows everything.
            if !lines.is_empty() {
                if let Err(more) = Self::from_sites(sites, &lines) {
                    errors.extend(more.into_iter().filter(|e| lines.contains(&e.line)));
                }
            }
            errors.sort_by_key(|e| e.line);
            errors.dedup();
            errors.truncate(LINE_ERRORS_MAX);
            return Err(errors);
        }
        Self::from_sites(sites, &lines)
    }

    /// The CSV form, parents before children, which [`parse_csv`](Self::parse_csv) reads back.
    pub fn to_csv(&self) -> String {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(CSV_HEADER).expect("writing to a Vec cannot fail");
        for s in self.in_tree_order() {
            let subnets = s.subnets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ");
            let num = |v: Option<u64>| v.map(|n| n.to_string()).unwrap_or_default();
            w.write_record([
                s.id.as_str(),
                s.name.as_str(),
                s.parent.as_deref().unwrap_or(""),
                s.kind.as_str(),
                subnets.as_str(),
                num(s.wan_up_kbps).as_str(),
                num(s.wan_down_kbps).as_str(),
            ])
            .expect("writing to a Vec cannot fail");
        }
        String::from_utf8(w.into_inner().expect("flushing a Vec cannot fail")).expect("CSV of UTF-8 fields is UTF-8")
    }

    /// Sites, each after its parent (depth-first from the top, in input order).
    pub fn in_tree_order(&self) -> Vec<&Site> {
        let mut children: BTreeMap<Option<&str>, Vec<&Site>> = BTreeMap::new();
        for s in &self.sites {
            children.entry(s.parent.as_deref()).or_default().push(s);
        }
        let mut out = Vec::with_capacity(self.sites.len());
        let mut stack: Vec<&Site> = children.get(&None).cloned().unwrap_or_default();
        stack.reverse();
        while let Some(s) = stack.pop() {
            out.push(s);
            if let Some(c) = children.get(&Some(s.id.as_str())) {
                stack.extend(c.iter().rev());
            }
        }
        out
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    pub fn site(&self, id: &str) -> Option<&Site> {
        self.index.get(id).map(|&i| &self.sites[i])
    }

    pub fn parent(&self, id: &str) -> Option<&Site> {
        self.site(id)?.parent.as_deref().and_then(|p| self.site(p))
    }

    /// The top site (head office), if any.
    pub fn root(&self) -> Option<&Site> {
        self.sites.iter().find(|s| s.parent.is_none())
    }

    /// The site of an agent: its override when that names a site, else the site
    /// whose subnet most specifically contains one of its addresses.
    pub fn site_for(&self, addresses: &[IpAddr], site_override: Option<&str>) -> Option<&str> {
        if let Some(o) = site_override.and_then(|o| self.site(o)) {
            return Some(&o.id);
        }
        let mut best: Option<(u8, &str)> = None;
        for s in &self.sites {
            for n in &s.subnets {
                if addresses.iter().any(|a| n.contains(a)) && best.is_none_or(|(len, _)| n.prefix_len() > len) {
                    best = Some((n.prefix_len(), &s.id));
                }
            }
        }
        best.map(|(_, id)| id)
    }
}

/// Propose a topology from the subnets agents report: one standard site per
/// distinct subnet (subnets inside a larger reported one are folded into it),
/// the subnet with the most agents as the top site, the others its children.
/// `reports` holds, per agent, the subnets it reported.
pub fn propose(reports: &[Vec<IpNet>]) -> Topology {
    let mut counts: BTreeMap<IpNet, usize> = BTreeMap::new();
    for r in reports {
        let mut seen = HashSet::new();
        for n in r {
            if seen.insert(n.trunc()) {
                *counts.entry(n.trunc()).or_default() += 1;
            }
        }
    }
    // Fold subnets contained in a larger one into it.
    let nets: Vec<IpNet> = counts.keys().copied().collect();
    let mut folded: BTreeMap<IpNet, usize> = BTreeMap::new();
    for n in &nets {
        let outer = nets
            .iter()
            .filter(|o| o.prefix_len() < n.prefix_len() && o.contains(n))
            .min_by_key(|o| o.prefix_len());
        *folded.entry(*outer.unwrap_or(n)).or_default() += counts[n];
    }
    let mut ranked: Vec<(IpNet, usize)> = folded.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let site_id = |n: &IpNet| format!("net-{}", n.to_string().replace(['.', ':', '/'], "-"));
    let root = ranked.first().map(|(n, _)| site_id(n));
    let sites: Vec<Site> = ranked
        .iter()
        .map(|(n, count)| {
            let id = site_id(n);
            let parent = root.clone().filter(|r| r != &id);
            Site {
                name: format!("{n} ({count} agent{})", if *count == 1 { "" } else { "s" }),
                id,
                parent,
                kind: SiteKind::Standard,
                subnets: vec![*n],
                wan_up_kbps: None,
                wan_down_kbps: None,
            }
        })
        .collect();
    if sites.is_empty() {
        return Topology::default();
    }
    let lines: Vec<usize> = (2..sites.len() + 2).collect();
    Topology::from_sites(sites, &lines).expect("proposed subnets are disjoint and form a star")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps
hq,Head office,,standard,10.0.0.0/16,,
paris,Paris,hq,standard,10.20.0.0/24 10.20.1.0/24,20000,100000
paris-wifi,Paris Wi-Fi,paris,wifi,10.21.0.0/24,,
vpn,VPN,hq,vpn,172.16.0.0/16,,
";

    fn errs(csv: &str) -> Vec<LineError> {
        Topology::parse_csv(csv.as_bytes()).unwrap_err()
    }

    #[test]
    fn topology_csv_round_trips() {
        let t = Topology::parse_csv(GOOD.as_bytes()).unwrap();
        assert_eq!(t.sites().len(), 4);
        assert_eq!(t.to_csv(), GOOD);
        assert_eq!(Topology::parse_csv(t.to_csv().as_bytes()).unwrap(), t);
        assert_eq!(t.parent("paris-wifi").unwrap().id, "paris");
        assert_eq!(t.site("paris").unwrap().wan_up_kbps, Some(20000));
    }

    #[test]
    fn topology_site_for_takes_longest_prefix_and_override() {
        let csv = GOOD
            .replace("10.21.0.0/24", "10.0.5.0/24")
            .replace("paris-wifi,Paris Wi-Fi,paris", "hq-wifi,HQ Wi-Fi,hq");
        // 10.0.5.0/24 lies inside hq's 10.0.0.0/16: that is an overlap, refused.
        assert!(Topology::parse_csv(csv.as_bytes()).is_err());
        let t = Topology::parse_csv(GOOD.as_bytes()).unwrap();
        let a: IpAddr = "10.20.1.7".parse().unwrap();
        assert_eq!(t.site_for(&[a], None), Some("paris"));
        assert_eq!(t.site_for(&[a], Some("vpn")), Some("vpn"));
        assert_eq!(t.site_for(&[a], Some("nowhere")), Some("paris"));
        assert_eq!(t.site_for(&["192.168.1.1".parse().unwrap()], None), None);
    }

    #[test]
    fn topology_reports_line_numbers() {
        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.0/16,,\nb,B,nope,standard,,,\n");
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("\"nope\""), "{}", e[0].message);

        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.1/16,,\nb,B,hq,cable,10.1.0.0/33,x,\n");
        let lines: Vec<usize> = e.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 3, 3], "{e:?}");
        assert!(e[0].message.contains("did you mean 10.0.0.0/16"));
    }

    #[test]
    fn topology_rejects_cycles_overlaps_duplicates_and_bad_header() {
        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,,,\na,A,b,standard,,,\nb,B,a,standard,,,\n");
        assert!(e.iter().any(|e| e.line == 3 && e.message.contains("cycle")), "{e:?}");
        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,10.0.0.0/8,,\na,A,hq,standard,10.9.0.0/24,,\n");
        assert_eq!(e[0].line, 3);
        assert!(e[0].message.contains("overlaps 10.0.0.0/8"), "{e:?}");
        let e = errs(
            "id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,,,\nhq,again,hq,standard,,,\n",
        );
        assert!(
            e.iter()
                .any(|e| e.line == 3 && e.message.contains("already used on line 2")),
            "{e:?}"
        );
        let e = errs("id,name,parent\nhq,HQ,\n");
        assert_eq!(e[0].line, 1);
        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,,,\nx,X,,standard,,,\n");
        assert!(
            e.iter()
                .any(|e| e.line == 3 && e.message.contains("already the top site")),
            "{e:?}"
        );
        let e = errs("id,name,parent,type,subnets,wan_up_kbps,wan_down_kbps\nhq,HQ,,standard,,\n");
        assert_eq!(e[0].line, 2);
        assert!(e[0].message.contains("fields"), "{e:?}");
        assert!(Topology::parse_csv(b"\xff\xfe").is_err());
        assert!(Topology::parse_csv(b"").is_err());
    }

    #[test]
    fn topology_proposal_is_importable() {
        let n = |s: &str| s.parse::<IpNet>().unwrap();
        let reports = vec![
            vec![n("10.0.0.0/24")],
            vec![n("10.0.0.0/24")],
            vec![n("10.0.1.0/24"), n("fd00::/64")],
            vec![n("10.1.0.0/16")],
            vec![n("10.1.4.0/24")],
        ];
        let t = propose(&reports);
        assert_eq!(t.sites().len(), 4);
        let root = t.root().unwrap();
        assert_eq!(root.subnets, vec![n("10.0.0.0/24")]);
        assert!(t.site("net-10-1-0-0-16").unwrap().name.contains("2 agents"));
        assert_eq!(Topology::parse_csv(t.to_csv().as_bytes()).unwrap(), t);
        assert!(propose(&[]).is_empty());
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        /// A valid tree: site i's parent is some earlier site; site i owns 10.i.0.0/16 (disjoint).
        fn tree() -> impl Strategy<Value = Topology> {
            prop::collection::vec(
                (
                    any::<u16>(),
                    0u8..3,
                    any::<bool>(),
                    proptest::option::of(1u64..1_000_000),
                ),
                1..40,
            )
            .prop_map(|rows| {
                let sites: Vec<Site> = rows
                    .iter()
                    .enumerate()
                    .map(|(i, &(p, kind, has_net, lim))| Site {
                        id: format!("s{i}"),
                        name: format!("Site, \"{i}\""),
                        parent: (i > 0).then(|| format!("s{}", p as usize % i)),
                        kind: [SiteKind::Standard, SiteKind::Vpn, SiteKind::Wifi][kind as usize],
                        subnets: if has_net {
                            vec![format!("10.{i}.0.0/16").parse().unwrap()]
                        } else {
                            vec![]
                        },
                        wan_up_kbps: lim,
                        wan_down_kbps: None,
                    })
                    .collect();
                let lines: Vec<usize> = (2..sites.len() + 2).collect();
                Topology::from_sites(sites, &lines).expect("generated trees are valid")
            })
        }

        proptest! {
            #[test]
            fn topology_csv_round_trips_any_tree(t in tree()) {
                let back = Topology::parse_csv(t.to_csv().as_bytes()).unwrap();
                let mut a: Vec<_> = t.sites().to_vec();
                let mut b: Vec<_> = back.sites().to_vec();
                a.sort_by(|x, y| x.id.cmp(&y.id));
                b.sort_by(|x, y| x.id.cmp(&y.id));
                prop_assert_eq!(a, b);
            }

            #[test]
            fn topology_parse_never_panics_and_reports_real_lines(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
                let lines = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
                if let Err(errors) = Topology::parse_csv(&bytes) {
                    prop_assert!(!errors.is_empty() && errors.len() <= LINE_ERRORS_MAX);
                    for e in errors {
                        prop_assert!(e.line >= 1 && e.line <= lines + 1, "line {} of {}", e.line, lines);
                    }
                }
            }

            #[test]
            fn topology_parse_survives_mangled_good_files(t in tree(), cut in any::<prop::sample::Index>(), junk in "[,;\"\n a-z0-9./-]{0,12}") {
                let mut csv = t.to_csv();
                let at = cut.index(csv.len() + 1);
                let at = (0..=at).rev().find(|&i| csv.is_char_boundary(i)).unwrap_or(0);
                csv.insert_str(at, &junk);
                let _ = Topology::parse_csv(csv.as_bytes());
            }
        }
    }
}
