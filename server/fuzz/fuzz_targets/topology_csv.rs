//! The topology CSV is uploaded by administrators (and proposed from what agents
//! report). Parsing must never panic; a topology that parses must export to CSV
//! that parses back to the same sites, and every site lookup must stay in the tree.
#![no_main]

use std::net::IpAddr;

use libfuzzer_sys::fuzz_target;
use lowtide_server::topology::Topology;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Topology::parse_csv(data) else { return };
    let csv = t.to_csv();
    let again = Topology::parse_csv(csv.as_bytes())
        .unwrap_or_else(|e| panic!("exported CSV does not parse back: {e:?}\n{csv}"));
    let sorted = |t: &Topology| {
        let mut v = t.sites().to_vec();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    };
    assert_eq!(sorted(&again), sorted(&t), "round trip changed the sites");
    assert_eq!(t.in_tree_order().len(), t.sites().len());
    if let Some(root) = t.root() {
        assert!(t.parent(&root.id).is_none());
    }
    for s in t.sites() {
        assert!(t.site(&s.id).is_some());
        for net in &s.subnets {
            let addr: IpAddr = net.addr();
            if let Some(found) = t.site_for(&[addr], None) {
                assert!(t.site(found).is_some(), "site_for named a site that is not in the tree");
            }
        }
        let _ = t.site_for(&[], Some(&s.id));
    }
});
