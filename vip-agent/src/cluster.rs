//! The agent's side of the cluster (issue 11): it gives the cluster runtime
//! ([`vip_cluster::node`]) the data plane's answering deadline and the node's ports, and
//! holds the groups of cluster VIPs the leader gives this node.
//!
//! Cluster VIPs are the tail of the agent's VIP list, after the node's own. All of the
//! cluster's VIPs are there; only the held ones are active (classified, placed on the
//! node's adapters, in the data plane's map and the host's routes). Their map entries
//! carry `VIP_CLUSTER`: the data plane answers them only before the deadline in `FENCE`,
//! which the cluster runtime keeps moving forward while a majority of peers (or etcd)
//! vouches for this node. Port failures among a group's adapters are handled here, by
//! the node's own placement, in microseconds; the cluster moves a group only when this
//! node has no adapter left for it.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use vip_cluster::{
    node::{Agent as ClusterAgent, Handle, Port},
    records::{Defs, Mode},
};
use vip_common::{VIP_CLUSTER, VIP_SPREAD};
use vip_placement::{self as placement, Slot};

use crate::{
    agent::{vip_key, Agent, Health, VipSpec},
    announce::Job,
    dataplane::Fence,
    runtime::{Inbox, Msg},
};

/// What the cluster runtime calls: the deadline goes straight to shared memory; holding
/// goes through the event loop's inbox.
pub struct Glue {
    pub fence: Fence,
    pub inbox: Inbox,
}

impl ClusterAgent for Glue {
    fn deadline(&self, until_ns: u64) {
        self.fence.set(until_ns);
    }

    fn hold(&self, defs: Arc<Defs>, held: Vec<IpAddr>, done: Box<dyn FnOnce() + Send>) {
        self.inbox.send(Msg::ClusterHold { defs, held, done });
    }
}

/// The agent's cluster state.
pub struct ClusterRt {
    pub handle: Handle,
    /// VIPs of the node's own configuration (the head of the VIP list).
    pub local: usize,
    pub defs: Arc<Defs>,
    /// Per group: its first address and its VIPs' range in the VIP list.
    pub groups: Vec<(IpAddr, usize, usize)>,
    pub held: Vec<IpAddr>,
    /// The ports last told to the cluster runtime.
    pub told: Vec<Port>,
}

impl Agent {
    pub fn attach_cluster(&mut self, handle: Handle) {
        let local = self.vips.len();
        self.cluster = Some(ClusterRt { handle, local, defs: Arc::default(), groups: vec![], held: vec![], told: vec![] });
        self.sync_cluster();
    }

    /// Tells the cluster runtime about the node's ports when they changed.
    pub fn sync_cluster(&mut self) {
        let Some(c) = &self.cluster else { return };
        let ports: Vec<Port> = self
            .adapters
            .iter()
            .zip(&self.padapters)
            .map(|(a, p)| Port {
                name: a.name.clone(),
                up: a.health.answers() && a.health != Health::Missing,
                address: p.subnets.iter().find_map(|s| match s.addr {
                    // An address of the adapter's own, not a route's network address.
                    IpAddr::V4(v) if s.prefix < 32 && u32::from(v) & !(u32::MAX << (32 - s.prefix)) != 0 => Some(v),
                    IpAddr::V4(v) if s.prefix == 32 => Some(v),
                    _ => None,
                }),
                subnets: p.subnets.iter().filter(|s| s.prefix > 0).map(|s| network(s).to_string()).collect(),
                vlans: p.vlans.clone(),
                weight: p.weight,
            })
            .collect();
        if ports != c.told {
            c.handle.send(vip_cluster::node::Cmd::Ports(ports.clone()));
            if let Some(c) = &mut self.cluster {
                c.told = ports;
            }
        }
    }

    /// The cluster runtime's order: hold exactly the groups of `defs` in `held`. Stops
    /// answering those no longer held before it returns; starts answering the new ones.
    pub fn cluster_hold(&mut self, defs: Arc<Defs>, held: Vec<IpAddr>) {
        let Some(c) = &self.cluster else { return };
        if self.stopping {
            return;
        }
        if !Arc::ptr_eq(&c.defs, &defs) && *c.defs != *defs {
            self.set_defs(defs.clone());
        } else if let Some(c) = &mut self.cluster {
            c.defs = defs;
        }
        let Some(c) = &self.cluster else { return };
        let held_set: HashSet<IpAddr> = held.iter().copied().collect();
        let was: HashSet<IpAddr> = c.held.iter().copied().collect();
        let mut active = (*self.active).clone();
        let mut dropped = vec![];
        let mut gained = vec![];
        for &(first, start, len) in &c.groups {
            let on = held_set.contains(&first);
            for (i, a) in active.iter_mut().enumerate().skip(start).take(len) {
                if *a && !on {
                    dropped.push(i);
                }
                if !*a && on {
                    gained.push(i);
                }
                *a = on;
            }
        }
        if dropped.is_empty() && gained.is_empty() {
            if let Some(c) = &mut self.cluster {
                c.held = held;
            }
            return;
        }
        // Stop answering first: out of the data plane's map, then off the host.
        if !dropped.is_empty() {
            let keys: Vec<_> = dropped.iter().map(|&i| self.vips[i].key).collect();
            if let Err(e) = self.dp.remove_vips(&keys) {
                tracing::error!(error = %e, "cluster VIPs not removed from the data plane");
            }
            for &i in &dropped {
                self.vip_policy[i] = u32::MAX;
            }
        }
        self.active = Arc::new(active);
        self.publish_vips();
        self.reclassify(None);
        self.set_host_routes();
        let n_gained = gained.len();
        // Spread groups announce nothing in a reclassification: a group that arrives from
        // another node is announced by its busiest adapter here.
        self.announce_arrivals(&gained);
        tracing::info!(
            held = held_set.len(),
            gained_groups = held_set.difference(&was).count(),
            released_groups = was.difference(&held_set).count(),
            gained_vips = n_gained,
            released_vips = dropped.len(),
            "cluster VIPs held"
        );
        if let Some(c) = &mut self.cluster {
            c.held = held;
        }
    }

    /// New definitions: the cluster tail of the VIP list is rebuilt, nothing held (the
    /// groups still held are taken again right after, by address).
    fn set_defs(&mut self, defs: Arc<Defs>) {
        let Some(c) = &self.cluster else { return };
        let local = c.local;
        // Whatever the old tail answered leaves the map first.
        let old: Vec<_> = (local..self.vips.len()).filter(|&i| self.active[i]).map(|i| self.vips[i].key).collect();
        if !old.is_empty() {
            if let Err(e) = self.dp.remove_vips(&old) {
                tracing::error!(error = %e, "cluster VIPs not removed from the data plane");
            }
        }
        let mut specs: Vec<VipSpec> = self.vips[..local].to_vec();
        let mut pvips: Vec<placement::Vip> = self.pvips[..local].to_vec();
        let mut groups = vec![];
        for g in &defs.groups {
            // Its adapters here: those named, or every adapter that reaches its subnet.
            let homes: Arc<[Slot]> = self
                .padapters
                .iter()
                .enumerate()
                .filter(|(_, a)| if g.adapters.is_empty() { a.subnets.iter().any(|s| s.contains(&g.address)) } else { g.adapters.contains(&a.name) })
                .map(|(i, _)| i as Slot)
                .collect();
            let mode = match g.mode {
                Mode::All => placement::Mode::All,
                Mode::Primary => placement::Mode::Primary,
                Mode::Spread => placement::Mode::Spread,
            };
            let flags = VIP_CLUSTER | if mode == placement::Mode::Spread { VIP_SPREAD } else { 0 };
            let start = specs.len();
            for addr in g.addresses() {
                specs.push(VipSpec { addr, vlan: g.vlan, key: vip_key(&addr, g.vlan), flags, table: u32::MAX });
                pvips.push(placement::Vip {
                    addr,
                    vlan: g.vlan,
                    homes: homes.clone(),
                    mode,
                    // Among this node's own adapters, a group moves like any VIP; the
                    // cluster moves it to another node only when none is left here.
                    failover: g.adapters.is_empty(),
                    rebalance: g.rebalance,
                    stay: false,
                    takers: None,
                });
            }
            groups.push((g.address, start, specs.len() - start));
        }
        let n = specs.len();
        self.by_key = specs.iter().enumerate().map(|(i, v)| (v.key, i as u32)).collect();
        let mut active = self.active[..local].to_vec();
        active.resize(n, false);
        self.active = Arc::new(active);
        self.vip_policy.truncate(local);
        self.vip_policy.resize(n, u32::MAX);
        self.vips = Arc::new(specs);
        self.pvips = Arc::new(pvips);
        if let Some(c) = &mut self.cluster {
            c.defs = defs;
            c.groups = groups;
            c.held.clear();
        }
        self.ann.send(Job::Addresses(self.vips.clone()));
        self.publish_vips();
        self.reclassify(None);
        self.set_host_routes();
        tracing::info!(groups = self.cluster.as_ref().map_or(0, |c| c.groups.len()), vips = n - local, "cluster definitions read");
    }

    /// The host's local routes: every active VIP that is not a virtual server's.
    pub(crate) fn set_host_routes(&mut self) {
        let keep: HashSet<IpAddr> = self
            .vips
            .iter()
            .zip(self.active.iter())
            .filter(|(v, a)| **a && v.flags & vip_common::VIP_VSERVER == 0)
            .map(|(v, _)| v.addr)
            .collect();
        let keep: Vec<IpAddr> = keep.into_iter().collect();
        if let Err(e) = self.host.set_vips(&mut self.rtnl, self.lo, &keep) {
            tracing::error!(error = %e, "VIP routes not updated");
        }
    }

    /// Announces VIPs that just became active here: each class's runs that contain them,
    /// from the answering adapters (`all`, `primary`: reclassification did that already)
    /// or, for `spread`, from the adapter with the most buckets.
    fn announce_arrivals(&mut self, gained: &[usize]) {
        let gained: HashSet<u32> = gained.iter().map(|&i| i as u32).collect();
        let classes = self.classes.clone();
        let up = self.up_mask();
        for (ci, class) in classes.list.iter().enumerate() {
            if class.key.mode != placement::Mode::Spread || !class.members.iter().any(|m| gained.contains(m)) {
                continue;
            }
            let Some(p) = self.assignment.classes.get(ci) else { continue };
            for r in &p.runs {
                let Some(b) = &r.buckets else { continue };
                let mut count = [0u32; placement::MAX_SLOTS];
                for &s in b.iter().filter(|&&s| s != placement::NO_SLOT && up & placement::bit(s) != 0) {
                    count[s as usize] += 1;
                }
                let Some(best) = (0..placement::MAX_SLOTS).filter(|&s| count[s] > 0).max_by_key(|&s| count[s]) else { continue };
                let a = &self.adapters[best];
                let (Some(ifindex), Some(mac)) = (a.ifindex, a.mac) else { continue };
                self.ann.send(Job::Vips { ifindex, mac, classes: classes.clone(), class: ci as u32, start: r.start, len: r.len, tag: None });
            }
        }
    }

    /// The cluster's status, from its runtime (None without a cluster, or if it does not
    /// answer in time).
    pub fn cluster_handle(&self) -> Option<Handle> {
        self.cluster.as_ref().map(|c| c.handle.clone())
    }
}

/// The network address of a subnet (`192.0.2.7/24` -> `192.0.2.0/24`).
fn network(s: &placement::Subnet) -> placement::Subnet {
    let addr = match s.addr {
        IpAddr::V4(v) => {
            let m = if s.prefix == 0 { 0 } else { u32::MAX << (32 - s.prefix.min(32)) };
            IpAddr::V4((u32::from(v) & m).into())
        }
        IpAddr::V6(v) => {
            let m = if s.prefix == 0 { 0 } else { u128::MAX << (128 - s.prefix.min(128) as u32) };
            IpAddr::V6((u128::from(v) & m).into())
        }
    };
    placement::Subnet { addr, prefix: s.prefix }
}
