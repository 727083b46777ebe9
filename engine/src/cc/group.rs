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
//!   compared), and the queue the controller hears is the greatest of the
//!   members' latest samples taken in the last half round trip (the controller
//!   filters the noise out of these as out of one flow's samples): on one
//!   bottleneck they agree; a member behind a slower hop of its own
//!   (one agent on Wi-Fi) sees more, and the group heeds it, as its own controller
//!   did; a member that joined while a queue stood took it for its base and reads
//!   low, so the others' reading stands (until a slowdown drains the queue and it
//!   sees the true base);
//! - the window is divided max-min fairly among the members: one that was
//!   application-limited at its last acknowledgement (a new one, until its first)
//!   claims what it had in flight and two segments more, one whose peer stopped
//!   answering (a probe timeout) what it has in flight, the others share the rest
//!   equally, and what nobody claims is shared out equally (the shares add up to
//!   the window);
//! - the group is application-limited only when all its members are; a member's
//!   probe timeouts are its own peer's trouble, not the link's, and reach the
//!   controller only when every member is in them.
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
            s.refresh();
            id
        };
        Member { shared, id }
    }

    /// Groups with at least one member.
    #[cfg(test)]
    fn live(&self) -> usize {
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        groups.values().filter(|g| g.strong_count() > 0).count()
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
    /// Max-min fair level: a member's share is its demand, at most this (recomputed
    /// whenever the window or a demand may have changed), plus `spare`: an equal part of
    /// what no member claims.
    level: u64,
    spare: u64,
}

#[derive(Debug)]
struct MemberState {
    id: u64,
    /// Bytes in flight at the last acknowledgement.
    in_flight: u64,
    app_limited: bool,
    /// Its peer stopped answering (a probe timeout since the last acknowledgement).
    stalled: bool,
    /// This member's one-way delay base (its receiver's clock offset plus the path's delay).
    base: BaseDelay,
    /// Its latest queue sample: when, and the one-way delay over its base (µs).
    sample: Option<(Time, i64)>,
}

impl MemberState {
    fn new(id: u64) -> Self {
        Self {
            id,
            in_flight: 0,
            // Until its first acknowledgement, a session uses a couple of segments (its
            // fetcher is still validating it): its share is not held for it meanwhile.
            app_limited: true,
            stalled: false,
            base: BaseDelay::default(),
            sample: None,
        }
    }

    /// What this member can use of a window.
    fn demand(&self) -> u64 {
        if self.stalled {
            self.in_flight
        } else if self.app_limited {
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
            level: u64::MAX,
            spare: 0,
        }
    }

    fn member(&mut self, id: u64) -> Option<&mut MemberState> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Recompute the fair level after the window or a demand changed.
    fn refresh(&mut self) {
        let mut demands: Vec<u64> = self.members.iter().map(MemberState::demand).collect();
        demands.sort_unstable();
        let window = self.cc.window();
        let (mut left, mut n) = (window, demands.len() as u64);
        self.level = u64::MAX;
        for &demand in &demands {
            let fair = left / n;
            if demand >= fair {
                // This member and every one after it want at least the fair share of what is left.
                self.level = fair;
                break;
            }
            left -= demand;
            n -= 1;
        }
        // What nobody claims is shared out equally: the shares always add up to the window (a
        // lone session that ran out of requests for a moment keeps its window, as it would
        // with a controller of its own).
        let given: u64 = demands.iter().map(|&d| d.min(self.level)).fold(0, u64::saturating_add);
        self.spare = window.saturating_sub(given) / (demands.len() as u64).max(1);
    }

    /// Member `id`'s share of the window (at least a segment, so that it makes progress).
    fn share(&self, id: u64) -> u64 {
        let demand = self.members.iter().find(|m| m.id == id).map_or(0, MemberState::demand);
        (demand.min(self.level) + self.spare).max(MSS_BYTES)
    }
}

/// One background session's controller, a member of its peer's group (see the module).
#[derive(Debug)]
pub struct Member {
    shared: Arc<Mutex<Shared>>,
    id: u64,
}

#[cfg(test)]
impl Member {
    /// Sessions in this member's group (itself included).
    fn group_size(&self) -> usize {
        lock(&self.shared).members.len()
    }

    /// The group's whole window.
    fn group_window(&self) -> u64 {
        lock(&self.shared).cc.window()
    }

    /// The queue the group's controller believes in.
    fn group_queue_delay(&self) -> Duration {
        lock(&self.shared).cc.queue_delay()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let mut s = lock(&self.shared);
        s.members.retain(|m| m.id != self.id);
        s.refresh();
    }
}

impl Controller for Member {
    fn name(&self) -> &'static str {
        "background"
    }

    fn on_sent(&mut self, now: Time, bytes: u64) {
        lock(&self.shared).cc.on_sent(now, bytes);
    }

    fn on_ack(&mut self, now: Time, ack: &AckSample) {
        let mut s = lock(&self.shared);
        let Some(m) = s.member(self.id) else { return };
        m.in_flight = ack.in_flight;
        m.app_limited = ack.app_limited;
        m.stalled = false;
        if let Some(owd) = ack.one_way_delay_us {
            m.base.record(now, owd);
            m.sample = Some((now, owd - m.base.base_us().unwrap_or(owd)));
        }
        // The queue is the greatest any member measured lately (each over its own base; the
        // controller filters the noise out of these as out of one flow's samples).
        let fresh = ack.srtt / 2;
        let queue = ack.one_way_delay_us.and_then(|_| {
            s.members
                .iter()
                .filter_map(|m| m.sample)
                .filter(|&(t, _)| now.since(t) <= fresh)
                .map(|(_, q)| q)
                .max()
        });
        let app_limited = s.members.iter().all(|m| m.app_limited);
        let in_flight = s.members.iter().map(|m| m.in_flight).sum();
        s.cc.on_ack(
            now,
            &AckSample {
                one_way_delay_us: queue,
                in_flight,
                app_limited,
                ..*ack
            },
        );
        s.refresh();
    }

    fn on_loss(&mut self, now: Time, loss: &LossSample) {
        let mut s = lock(&self.shared);
        if loss.timeout {
            if let Some(m) = s.member(self.id) {
                m.stalled = true;
            }
            if !s.members.iter().all(|m| m.stalled) {
                // Its peer stopped answering while the others' acknowledgements still come:
                // the link is not what lost them.
                s.refresh();
                return;
            }
        }
        s.cc.on_loss(now, loss);
        s.refresh();
    }

    fn on_path(&mut self, now: Time, signal: &PathSignal) {
        let mut s = lock(&self.shared);
        if s.last_path != Some(now) {
            s.last_path = Some(now);
            s.cc.on_path(now, signal);
            s.refresh();
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
        assert_eq!(groups.live(), 2);
        drop((a, b));
        assert_eq!(groups.live(), 1, "a group whose sessions all ended is gone");
        drop(c);
        assert_eq!(groups.live(), 0);
    }

    /// One acknowledged segment a ms for `member`, with `owd` its one-way delay sample.
    fn step(m: &mut Member, t: &mut u64, owd: i64) {
        let now = Time::from_micros(*t * 1000);
        m.on_sent(now, MSS_BYTES);
        m.on_ack(now, &ack(owd, MSS_BYTES, 4 * MSS_BYTES, false));
        *t += 1;
    }

    fn three(groups: &Groups) -> Vec<Member> {
        (11..14).map(|h| groups.member(ip(&format!("10.64.0.{h}")))).collect()
    }

    #[test]
    fn the_window_is_shared_max_min_fairly() {
        let groups = Groups::new(BackgroundConfig::default());
        let mut members = three(&groups);
        // Until its first acknowledgement a member is given a couple of segments only.
        assert!(members[1].window() <= 2 * MSS_BYTES);
        let mut t = 0;
        for _ in 0..200 {
            for m in members.iter_mut() {
                step(m, &mut t, 5_000);
            }
        }
        let total = members[0].group_window();
        assert!(total > 30 * MSS_BYTES, "group window {total}");
        let shares: Vec<u64> = members.iter().map(|m| m.window()).collect();
        for s in &shares {
            assert!(s.abs_diff(total / 3) <= 1, "equal shares of {total}: {shares:?}");
        }
        // One member has little to send: it keeps what it uses, the others share the rest.
        let now = Time::from_micros(t * 1000);
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
        // A member that ends gives its share back.
        members.pop();
        assert!(members[0].window().abs_diff(total / 2) <= 1);
    }

    #[test]
    fn a_member_whose_peer_stops_answering_holds_no_share_and_cuts_nothing() {
        let groups = Groups::new(BackgroundConfig::default());
        let mut members = three(&groups);
        let mut t = 0;
        for _ in 0..200 {
            for m in members.iter_mut() {
                step(m, &mut t, 5_000);
            }
        }
        let total = members[0].group_window();
        let now = Time::from_micros(t * 1000);
        let timeout = LossSample {
            lost_bytes: 4 * MSS_BYTES,
            largest_lost_sent: now,
            timeout: true,
        };
        members[2].on_loss(now, &timeout);
        members[2].on_loss(now + Duration::from_millis(500), &timeout);
        assert_eq!(
            members[0].group_window(),
            total,
            "one peer's timeouts are not the link's"
        );
        assert_eq!(
            members[2].window(),
            4 * MSS_BYTES,
            "it keeps what is in flight, no more"
        );
        assert!(members[0].window().abs_diff((total - 4 * MSS_BYTES) / 2) <= 1);
        // When every member's peer times out, it is the link.
        members[0].on_loss(now, &timeout);
        members[1].on_loss(now, &timeout);
        assert!(members[0].group_window() < total);
    }

    #[test]
    fn the_group_queue_is_the_greatest_a_member_measures() {
        // Receivers' clocks differ: member a's samples carry +1 s, b's -5 s, c's +7 s.
        let groups = Groups::new(BackgroundConfig::default());
        let mut m = three(&groups);
        let off = [1_000_000i64, -5_000_000, 7_000_000];
        let mut t = 0;
        for _ in 0..100 {
            for (i, x) in m.iter_mut().enumerate() {
                step(x, &mut t, off[i]);
            }
        }
        assert_eq!(m[0].group_queue_delay(), Duration::ZERO);
        // A queue of 2 ms (below the 3 ms target: nobody cuts) stands on c's path only
        // (a slower hop of its own): the group heeds it, the others' empty queues do not hide it.
        for _ in 0..20 {
            for (i, x) in m.iter_mut().enumerate() {
                let q = if i == 2 { 2_000 } else { 0 };
                step(x, &mut t, off[i] + q);
            }
        }
        assert_eq!(m[0].group_queue_delay(), Duration::from_millis(2));
        // A newcomer joins into a standing 2 ms queue and takes it for its base (it reads
        // 0): the others' reading stands.
        for _ in 0..20 {
            for (i, x) in m.iter_mut().enumerate() {
                step(x, &mut t, off[i] + 2_000);
            }
        }
        let mut late = groups.member(ip("10.64.0.20"));
        for _ in 0..20 {
            step(&mut late, &mut t, -3_000_000 + 2_000);
            for (i, x) in m.iter_mut().enumerate() {
                step(x, &mut t, off[i] + 2_000);
            }
        }
        assert_eq!(m[0].group_queue_delay(), Duration::from_millis(2));
        // The queue drains: all see it.
        for _ in 0..20 {
            step(&mut late, &mut t, -3_000_000);
            for (i, x) in m.iter_mut().enumerate() {
                step(x, &mut t, off[i]);
            }
        }
        assert_eq!(m[0].group_queue_delay(), Duration::ZERO);
    }
}
