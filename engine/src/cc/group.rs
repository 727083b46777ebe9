//! Background sessions from one sender toward one bottleneck share one controller.
//!
//! # Why
//!
//! Three agents in a VPN site each fetch their own copy from the head office's
//! RVP: three background sessions from one sender cross one WAN link. With a
//! controller each, every one of them sees the queue the others' growth builds as
//! competing traffic its own window does not explain, and yields to it; the
//! yields and the regrowth after them kept the link's queue at 6–10 ms where one
//! flow keeps 3 (the distribution benchmark's VPN link). TCP's Congestion Manager
//! (RFC 3124) and the flow state exchange of RFC 8699 answer the same problem:
//! the flows of one sender over one path are one aggregate to the network, so they
//! take one window, and a scheduler divides it.
//!
//! # How
//!
//! [`Groups`] hands every background session a [`Member`]; members whose peers
//! share a [`group_key`] (the same IPv4 /24 or IPv6 /64: one LAN, so one site and
//! one WAN link behind it) share one [`Background`] controller:
//!
//! - every member's acknowledgements, losses and sends feed it, so it measures
//!   the aggregate's delivery rate and sees the queue all of them build as its own
//!   window's (the whole window is the group's);
//! - the one-way delay of each member is taken relative to that member's own base
//!   (the receivers' clocks differ, so raw samples of two members cannot be
//!   compared); a member that joins while a queue stands starts its base at its
//!   first sample less the queue the group already measures, so it does not take
//!   that queue for its base (the latecomer problem, inside the group);
//! - the window is divided max-min fairly among the members: one that was
//!   application-limited at its last acknowledgement is given what it had in flight
//!   and two segments more, the others share the rest equally;
//! - the group is application-limited only when all its members are.
//!
//! A newcomer takes its share out of the same window, so joining builds no queue,
//! and the group's slowdowns, yields and reclaims are the same moments for all.
//! Grouping by prefix is the conservative choice: two flows that share a bottleneck
//! but not a prefix stay apart (as before), while flows to one LAN cross the same
//! links from a sender.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::background::{Background, BackgroundConfig, BaseDelay, PathSignal};
use super::{AckSample, Controller, LossSample, MSS_BYTES};
use crate::time::Time;

/// Which bottleneck a peer is behind, as far as a sender can tell: its IPv4 /24 or IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GroupKey {
    V4([u8; 3]),
    V6([u8; 8]),
}

/// The group of a peer address (an IPv4-mapped IPv6 address counts as IPv4).
pub fn group_key(addr: IpAddr) -> GroupKey {
    let addr = match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    };
    match addr {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            GroupKey::V4([o[0], o[1], o[2]])
        }
        IpAddr::V6(v6) => {
            let mut k = [0u8; 8];
            k.copy_from_slice(&v6.octets()[..8]);
            GroupKey::V6(k)
        }
    }
}

/// Background groups of one sender: hands out [`Member`]s.
#[derive(Debug)]
pub struct Groups {
    cfg: BackgroundConfig,
    groups: Mutex<HashMap<GroupKey, Weak<Mutex<Shared>>>>,
}

impl Groups {
    pub fn new(cfg: BackgroundConfig) -> Self {
        Self {
            cfg,
            groups: Mutex::new(HashMap::new()),
        }
    }

    /// A controller for a new background session to `peer`, sharing the window of the
    /// sessions to the same group.
    pub fn member(&self, peer: IpAddr) -> Member {
        let key = group_key(peer);
        let mut groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        // Groups whose members all ended are gone: forget them as the map is used.
        groups.retain(|_, g| g.strong_count() > 0);
        let shared = match groups.get(&key).and_then(Weak::upgrade) {
            Some(g) => g,
            None => {
                let g = Arc::new(Mutex::new(Shared::new(Background::new(self.cfg.clone()))));
                groups.insert(key, Arc::downgrade(&g));
                g
            }
        };
        let id = {
            let mut s = lock(&shared);
            let id = s.next_id;
            s.next_id += 1;
            s.members.push(MemberState::new(id));
            id
        };
        Member { shared, id }
    }

    /// Groups with at least one member.
    pub fn len(&self) -> usize {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.values().filter(|g| g.strong_count() > 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Shared {
    cc: Background,
    members: Vec<MemberState>,
    next_id: u64,
    /// When the last egress-monitor sample was handed on (each member gets every sample;
    /// the controller must see it once).
    last_path: Option<Time>,
}

#[derive(Debug)]
struct MemberState {
    id: u64,
    in_flight: u64,
    app_limited: bool,
    /// This member's one-way delay base (its receiver's clock offset plus the path's delay).
    base: BaseDelay,
}

impl MemberState {
    fn new(id: u64) -> Self {
        Self {
            id,
            in_flight: 0,
            app_limited: false,
            base: BaseDelay::default(),
        }
    }

    /// What this member can use of a window: unbounded unless it was application-limited.
    fn demand(&self) -> u64 {
        if self.app_limited {
            self.in_flight + 2 * MSS_BYTES
        } else {
            u64::MAX
        }
    }
}

impl Shared {
    fn new(cc: Background) -> Self {
        Self {
            cc,
            members: Vec::new(),
            next_id: 0,
            last_path: None,
        }
    }

    fn member(&mut self, id: u64) -> Option<&mut MemberState> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Member `id`'s share of the group's window: max-min fair over the members' demands.
    fn share(&self, id: u64) -> u64 {
        let total = self.cc.window();
        let mut demands: Vec<(u64, u64)> = self.members.iter().map(|m| (m.demand(), m.id)).collect();
        demands.sort_unstable();
        let (mut left, mut n) = (total, demands.len() as u64);
        for (demand, member) in demands {
            let fair = left / n.max(1);
            if demand >= fair {
                // This member and every one after it want at least the fair share of what is left.
                break;
            }
            if member == id {
                return demand.max(MSS_BYTES);
            }
            left -= demand;
            n -= 1;
        }
        (left / n.max(1)).max(MSS_BYTES)
    }
}

/// One background session's controller, a member of its peer's group (see the module).
#[derive(Debug)]
pub struct Member {
    shared: Arc<Mutex<Shared>>,
    id: u64,
}

impl Member {
    /// Sessions in this member's group (itself included).
    pub fn group_size(&self) -> usize {
        lock(&self.shared).members.len()
    }

    /// The group's whole window.
    pub fn group_window(&self) -> u64 {
        lock(&self.shared).cc.window()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        lock(&self.shared).members.retain(|m| m.id != self.id);
    }
}

impl Controller for Member {
    fn name(&self) -> &'static str {
        "background"
    }

    fn on_sent(&mut self, now: Time, bytes: u64) {
        let mut s = lock(&self.shared);
        if let Some(m) = s.member(self.id) {
            m.in_flight += bytes;
        }
        s.cc.on_sent(now, bytes);
    }

    fn on_ack(&mut self, now: Time, ack: &AckSample) {
        let mut s = lock(&self.shared);
        let group_queue = s.cc.queue_owd_us().max(0);
        let others_measured = s.members.iter().any(|m| m.id != self.id && m.base.base_us().is_some());
        let Some(m) = s.member(self.id) else { return };
        m.in_flight = ack.in_flight;
        m.app_limited = ack.app_limited;
        let owd = ack.one_way_delay_us.map(|owd| {
            if m.base.base_us().is_none() && others_measured {
                // Joining a group whose queue is known: the first sample is that much above this
                // member's base.
                m.base.record(now, owd - group_queue);
            }
            m.base.record(now, owd);
            owd - m.base.base_us().unwrap_or(owd)
        });
        let app_limited = s.members.iter().all(|m| m.app_limited);
        let in_flight = s.members.iter().map(|m| m.in_flight).sum();
        s.cc.on_ack(
            now,
            &AckSample {
                one_way_delay_us: owd,
                in_flight,
                app_limited,
                ..*ack
            },
        );
    }

    fn on_loss(&mut self, now: Time, loss: &LossSample) {
        let mut s = lock(&self.shared);
        if let Some(m) = s.member(self.id) {
            m.in_flight = m.in_flight.saturating_sub(loss.lost_bytes);
        }
        s.cc.on_loss(now, loss);
    }

    fn on_path(&mut self, now: Time, signal: &PathSignal) {
        let mut s = lock(&self.shared);
        if s.last_path != Some(now) {
            s.last_path = Some(now);
            s.cc.on_path(now, signal);
        }
    }

    fn window(&self) -> u64 {
        lock(&self.shared).share(self.id)
    }

    fn pacing_rate(&self, srtt: Duration) -> Option<u64> {
        let s = lock(&self.shared);
        let total = s.cc.window().max(1);
        let share = s.share(self.id);
        s.cc.pacing_rate(srtt)
            .map(|r| ((r as u128 * share as u128 / total as u128) as u64).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    fn ack(owd_us: i64, bytes: u64, in_flight: u64, app_limited: bool) -> AckSample {
        AckSample {
            acked_bytes: bytes,
            rtt: Some(Duration::from_millis(30)),
            srtt: Duration::from_millis(30),
            min_rtt: Duration::from_millis(30),
            one_way_delay_us: Some(owd_us),
            in_flight,
            app_limited,
        }
    }

    #[test]
    fn peers_of_one_lan_share_a_group_and_other_lans_do_not() {
        assert_eq!(group_key(ip("10.64.0.11")), group_key(ip("10.64.0.12")));
        assert_ne!(group_key(ip("10.64.0.11")), group_key(ip("10.64.1.11")));
        assert_eq!(group_key(ip("::ffff:10.64.0.11")), group_key(ip("10.64.0.13")));
        assert_eq!(group_key(ip("2001:db8:1:2::5")), group_key(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(group_key(ip("2001:db8:1:2::5")), group_key(ip("2001:db8:1:3::5")));
        let groups = Groups::new(BackgroundConfig::default());
        let (a, b, c) = (
            groups.member(ip("10.64.0.11")),
            groups.member(ip("10.64.0.12")),
            groups.member(ip("10.65.0.11")),
        );
        assert_eq!((a.group_size(), c.group_size()), (2, 1));
        assert_eq!(groups.len(), 2);
        drop((a, b));
        assert_eq!(groups.len(), 1, "a group whose sessions all ended is gone");
        drop(c);
        assert!(groups.is_empty());
    }

    #[test]
    fn the_window_is_shared_max_min_fairly() {
        let groups = Groups::new(BackgroundConfig::default());
        let mut members: Vec<Member> = (11..14).map(|h| groups.member(ip(&format!("10.64.0.{h}")))).collect();
        // Grow the group's window with the first member's acks on an empty queue.
        for t in 0..400u64 {
            let now = Time::from_micros(t * 1000);
            members[0].on_sent(now, MSS_BYTES);
            members[0].on_ack(now, &ack(5_000, MSS_BYTES, 0, false));
        }
        let total = members[0].group_window();
        assert!(total > 30 * MSS_BYTES, "group window {total}");
        let shares: Vec<u64> = members.iter().map(|m| m.window()).collect();
        for s in &shares {
            assert!(s.abs_diff(total / 3) <= 1, "equal shares of {total}: {shares:?}");
        }
        // One member has little to send: it keeps what it uses, the others share the rest.
        let now = Time::from_micros(400_000);
        members[2].on_ack(now, &ack(5_000, MSS_BYTES, MSS_BYTES, true));
        let total = members[0].group_window();
        let small = members[2].window();
        assert_eq!(small, 3 * MSS_BYTES);
        let (a, b) = (members[0].window(), members[1].window());
        assert_eq!(a, b);
        assert!(a.abs_diff((total - small) / 2) <= 1, "{a} of {total} less {small}");
        // Pacing follows the share.
        let srtt = Duration::from_millis(30);
        let (pa, psmall) = (
            members[0].pacing_rate(srtt).expect("paced"),
            members[2].pacing_rate(srtt).expect("paced"),
        );
        assert!(pa > 3 * psmall, "pacing {pa} vs {psmall}");
    }

    #[test]
    fn a_member_that_joins_a_standing_queue_does_not_take_it_for_its_base() {
        // Receivers' clocks differ: member a's samples carry +1 s, member b's -5 s.
        let groups = Groups::new(BackgroundConfig::default());
        let mut a = groups.member(ip("10.64.0.11"));
        let (off_a, off_b) = (1_000_000i64, -5_000_000i64);
        let mut t = 0u64;
        let step = |m: &mut Member, owd: i64, t: &mut u64| {
            let now = Time::from_micros(*t * 1000);
            m.on_sent(now, MSS_BYTES);
            m.on_ack(now, &ack(owd, MSS_BYTES, 0, false));
            *t += 1;
        };
        for _ in 0..200 {
            step(&mut a, off_a, &mut t);
        }
        // A queue of 2 ms stands (below the 3 ms target: nobody cuts).
        for _ in 0..50 {
            step(&mut a, off_a + 2_000, &mut t);
        }
        let queue = |m: &Member| lock(&m.shared).cc.queue_owd_us();
        assert_eq!(queue(&a), 2_000);
        // b joins into that queue; its samples (with its own offset) interleave with a's.
        let mut b = groups.member(ip("10.64.0.12"));
        for _ in 0..20 {
            step(&mut b, off_b + 2_000, &mut t);
            step(&mut a, off_a + 2_000, &mut t);
        }
        assert_eq!(queue(&a), 2_000, "the newcomer's first sample is not its base");
        // The queue drains: both see it.
        for _ in 0..20 {
            step(&mut b, off_b, &mut t);
            step(&mut a, off_a, &mut t);
        }
        assert_eq!(queue(&a), 0);
    }
}
