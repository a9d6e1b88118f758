//! The leader's decision, pure: the registered nodes (their ports, roles, groups and
//! partners, what they hold) and the definitions in, who holds each group out. The
//! placement core's node-level half ([`vip_placement::place_nodes`]) picks a node per
//! *unit* (a virtual server with its groups, or a group of its own): home, standby, the
//! node's failover group, its partner, anywhere, in priority order; a node serves a unit
//! when it has an operative port for every one of its groups. Which adapters of that node
//! answer is the node's own placement.
//!
//! A group never has two holders: it moves from a live holder in two steps (the leader
//! asks it to let go by naming no owner, the holder stops answering and says so in its
//! record, then the leader names the new owner), and from a holder that is gone only once
//! the caller has proved it silent.

use std::{collections::HashMap, str::FromStr};

use vip_placement::{self as placement, Subnet};

use crate::records::{AssignRecord, Defs, GroupAssign, Health, NodeHealth, NodeRecord, Role};

/// A registered node as the leader sees it.
#[derive(Debug, Clone)]
pub struct NodeState<'a> {
    pub incarnation: u64,
    pub record: &'a NodeRecord,
    /// Registered, in the member list, heard from, and not cut off: it can hold groups.
    pub alive: bool,
    /// Registered but not alive yet (not in the member list, or not heard from): the
    /// groups whose home it is wait for it rather than start elsewhere.
    pub joining: bool,
}

/// What became of a group's current holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// Alive: it holds the group (or may at any moment) until its record says otherwise.
    Live { holding: bool },
    /// Proved silent: the group may move; the new owner waits `wait_ms` first.
    Gone { wait_ms: u64 },
    /// Not alive, but not proved silent yet: the group stays where it is.
    Unknown,
}

pub struct Input<'a> {
    pub defs: &'a Defs,
    pub defs_rev: i64,
    /// Registered nodes by name.
    pub nodes: &'a [(&'a str, NodeState<'a>)],
    pub previous: &'a AssignRecord,
    /// The status of a group's holder (name, incarnation, group address).
    pub holder: &'a dyn Fn(&str, u64, std::net::IpAddr) -> Holder,
    /// Whether a group never placed may still wait for its home node, which has not
    /// registered yet (a cluster starting up): the caller bounds how long.
    pub waits: &'a dyn Fn(std::net::IpAddr) -> bool,
    pub now: f64,
    /// A `cluster rebalance` is under way: units go home and the load is levelled.
    pub rebalance: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub groups: Vec<GroupAssign>,
    pub nodes: Vec<NodeHealth>,
    /// Groups given to a new owner in this decision: (group, from, to).
    pub moved: Vec<(usize, Option<String>, String)>,
    /// Groups a live holder is asked to let go of.
    pub released: Vec<usize>,
}

pub fn decide(input: &Input) -> Decision {
    let Input { defs, defs_rev, nodes, previous, holder, waits, now, rebalance } = *input;
    // The nodes for placement, in the order given (the caller sorts them by name), then
    // the holders of the previous assignment that are no longer registered (down: a unit
    // leaving one of them is leaving a failed node).
    let mut cnodes: Vec<placement::ClusterNode> = nodes
        .iter()
        .map(|(name, st)| placement::ClusterNode {
            name: name.to_string(),
            up: st.alive && !st.record.fenced,
            standby: st.record.role == Role::Standby,
            group: st.record.group.clone(),
            partner: st.record.partner.clone(),
        })
        .collect();
    for g in &previous.groups {
        for name in g.owner.iter().chain(g.from.iter()) {
            if !cnodes.iter().any(|n| n.name == *name) {
                cnodes.push(placement::ClusterNode { name: name.clone(), up: false, ..Default::default() });
            }
        }
    }
    let cnodes = cnodes;
    let node_index = |name: &str| cnodes.iter().position(|n| n.name == name);

    // Units: each virtual server with its groups, then each group of its own.
    let mut units: Vec<placement::Unit> = vec![];
    let mut unit_groups: Vec<Vec<usize>> = vec![];
    let mut unit_of = vec![0usize; defs.groups.len()];
    for s in &defs.servers {
        let members: Vec<usize> = (0..defs.groups.len()).filter(|&gi| defs.groups[gi].server.as_deref() == Some(s.name.as_str())).collect();
        for &gi in &members {
            unit_of[gi] = units.len();
        }
        units.push(placement::Unit {
            name: s.name.clone(),
            home: s.node.as_deref().and_then(node_index),
            priority: s.priority,
            migrate: s.migrate,
            rebalance: s.rebalance,
            weight: s.weight,
        });
        unit_groups.push(members);
    }
    for (gi, g) in defs.groups.iter().enumerate() {
        if g.server.as_ref().is_some_and(|s| defs.servers.iter().any(|x| x.name == *s)) {
            continue;
        }
        unit_of[gi] = units.len();
        units.push(placement::Unit {
            name: g.address.to_string(),
            home: g.node.as_deref().and_then(node_index),
            priority: 0,
            migrate: g.failover,
            rebalance: g.rebalance,
            weight: g.weight,
        });
        unit_groups.push(vec![gi]);
    }
    // A group's home: its server's, or its own.
    let home_of = |gi: usize| -> Option<&str> {
        let g = &defs.groups[gi];
        match g.server.as_ref().and_then(|s| defs.servers.iter().find(|x| x.name == *s)) {
            Some(s) => s.node.as_deref(),
            None => g.node.as_deref(),
        }
    };

    // The previous holder of each group, matched by first address; a unit is where its
    // first held group is (a holder letting go still counts as holding it).
    let prev_of: HashMap<std::net::IpAddr, &GroupAssign> = previous.groups.iter().map(|g| (g.address, g)).collect();
    let current: Vec<Option<&GroupAssign>> = defs.groups.iter().map(|g| prev_of.get(&g.address).copied()).collect();
    let unit_current: Vec<Option<usize>> = unit_groups
        .iter()
        .map(|gs| gs.iter().find_map(|&gi| current[gi].and_then(|c| c.owner.as_deref().or(c.from.as_deref())).and_then(node_index)))
        .collect();

    // A node can serve a unit when it has an operative port for each of its groups: up,
    // reaching the group's subnet, named in its `adapters` (if any), carrying its VLAN.
    // A group that must not fail over fits only its home.
    let port_fits = |p: &crate::records::PortRecord, g: &crate::records::GroupDef| {
        p.up && (g.adapters.is_empty() || g.adapters.contains(&p.name))
            && (g.vlan == 0 || p.vlans.contains(&g.vlan))
            && p.subnets.iter().filter_map(|s| Subnet::from_str(s).ok()).any(|s| s.contains(&g.address))
    };
    // Units are the servers first, in order: unit `u` is a server while `u` is below their count.
    let is_server = |u: usize| u < defs.servers.len();
    let fits = |n: usize, u: usize| -> bool {
        if n >= nodes.len() {
            return false;
        }
        // A virtual server that failed on a node (a hook said so) is not given back to it.
        if is_server(u) && nodes[n].1.record.failed.contains(&units[u].name) {
            return false;
        }
        unit_groups[u].iter().all(|&gi| {
            let g = &defs.groups[gi];
            let own_only = g.server.is_none() && !g.failover;
            (!own_only || home_of(gi) == Some(nodes[n].0)) && nodes[n].1.record.ports.iter().any(|p| port_fits(p, g))
        })
    };
    let placed = placement::place_nodes(&placement::NodesInput { nodes: &cnodes, units: &units, current: &unit_current, fits: &fits, rebalance });

    let mut out = Decision { groups: vec![], nodes: vec![], moved: vec![], released: vec![] };
    for (gi, g) in defs.groups.iter().enumerate() {
        let want: Option<usize> = placed.owner[unit_of[gi]].filter(|&n| n < nodes.len());
        let want_name = want.map(|ni| nodes[ni].0.to_string());
        let want_inc = want.map_or(0, |ni| nodes[ni].1.incarnation);
        // A release under way (no owner, a holder letting go): the holder is consulted
        // as if it still owned the group.
        let cur = current[gi].filter(|c| c.owner.is_some() || c.from.is_some());
        let keep = |c: &GroupAssign| GroupAssign { address: g.address, owner: c.owner.clone(), incarnation: c.incarnation, from: c.from.clone(), wait_ms: c.wait_ms };
        let give = |from: Option<String>, wait_ms: u64| GroupAssign {
            address: g.address,
            owner: want_name.clone(),
            incarnation: want_inc,
            from,
            wait_ms,
        };
        let home_joining = home_of(gi).is_some_and(|h| match nodes.iter().find(|(n, _)| *n == h) {
            Some((_, st)) => st.joining,
            // Not registered: never seen in the cluster, and still within the wait.
            None => !previous.nodes.iter().any(|x| x.name == h) && waits(g.address),
        });
        // A group nobody holds keeps the wait its last holder called for (counted again
        // from whenever it is given: later is only safer).
        let wait_left = current[gi].map_or(0, |c| c.wait_ms);
        let ga = match cur {
            // Never placed, and its node is on its way: it waits for it.
            None if home_joining => GroupAssign { address: g.address, owner: None, incarnation: 0, from: None, wait_ms: wait_left },
            None => {
                if let Some(w) = &want_name {
                    out.moved.push((gi, None, w.clone()));
                }
                give(None, wait_left)
            }
            Some(c) if c.owner.is_some() && c.owner == want_name && c.incarnation == want_inc => keep(c),
            Some(c) => {
                let name = c.owner.clone().or_else(|| c.from.clone()).unwrap_or_default();
                match holder(&name, c.incarnation, g.address) {
                    Holder::Live { holding: true } => {
                        out.released.push(gi);
                        GroupAssign { address: g.address, owner: None, incarnation: c.incarnation, from: Some(name), wait_ms: 0 }
                    }
                    Holder::Live { holding: false } => {
                        if let Some(w) = &want_name {
                            out.moved.push((gi, Some(name.clone()), w.clone()));
                        }
                        give(Some(name), 0)
                    }
                    Holder::Gone { wait_ms } => match &want_name {
                        Some(w) => {
                            out.moved.push((gi, Some(name.clone()), w.clone()));
                            give(Some(name), wait_ms)
                        }
                        // Nobody takes it (it stays down with its node, or no node can
                        // serve it): its holder is proved silent, so nobody holds it now.
                        None => GroupAssign { address: g.address, owner: None, incarnation: 0, from: None, wait_ms },
                    },
                    Holder::Unknown => keep(c),
                    // (A release whose holder is gone or let go falls under the arms above.)
                }
            }
        };
        out.groups.push(ga);
    }

    // Health (seed 003).
    let was: HashMap<&str, &NodeHealth> = previous.nodes.iter().map(|h| (h.name.as_str(), h)).collect();
    let holds: HashMap<&str, usize> = out.groups.iter().filter_map(|g| g.owner.as_deref()).fold(HashMap::new(), |mut m, o| {
        *m.entry(o).or_default() += 1;
        m
    });
    for (name, st) in nodes {
        let health = if st.record.fenced {
            Health::Down
        } else if !st.alive && st.joining && !was.contains_key(name) {
            // Never seen before: joining, not failed (status shows it as joining).
            continue;
        } else if !st.alive {
            Health::Failed
        } else if st.record.role == Role::Standby && !holds.contains_key(name) {
            // A standby node that took something over is active (seed 003); one that
            // holds nothing is a standby, whatever happened to it before.
            Health::Standby
        } else if matches!(was.get(name).map(|h| h.health), Some(Health::Failed | Health::Recovered | Health::Down)) && !holds.contains_key(name) {
            Health::Recovered
        } else {
            Health::Active
        };
        let since = was.get(name).filter(|h| h.health == health).map_or(now, |h| h.since);
        out.nodes.push(NodeHealth { name: name.to_string(), health, since });
    }
    // Nodes no longer registered stay listed as failed (or down, if they left).
    for h in &previous.nodes {
        if !nodes.iter().any(|(n, _)| *n == h.name) {
            let health = if h.health == Health::Down { Health::Down } else { Health::Failed };
            let since = if h.health == health { h.since } else { now };
            out.nodes.push(NodeHealth { name: h.name.clone(), health, since });
        }
    }
    out.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    let _ = defs_rev;
    out
}

/// The assignment record for a decision.
pub fn record(d: &Decision, leader: &str, term: i64, defs_rev: i64, now: f64, rebalanced: i64) -> AssignRecord {
    AssignRecord { leader: leader.into(), term, defs: defs_rev, groups: d.groups.clone(), nodes: d.nodes.clone(), at: now, rebalanced }
}

#[cfg(test)]
mod tests {
    //! The leader's decision, scenario by scenario: nodes (role, ports, alive, what they
    //! hold), the previous assignment, and who holds each group after.
    use super::*;
    use crate::records::{GroupDef, Mode, PortRecord};

    fn node(name: &str, role: Role, ports_up: &[bool], holding: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            role,
            address: String::new(),
            heartbeat: vec![],
            ports: ports_up
                .iter()
                .enumerate()
                .map(|(i, up)| PortRecord { name: format!("eth{i}"), up: *up, subnets: vec!["192.0.2.0/24".into()], vlans: vec![], weight: 1 })
                .collect(),
            fenced: false,
            since: 0.0,
            holding: holding.iter().map(|a| a.parse().unwrap()).collect(),
            replaces: None,
            took: vec![],
            group: None,
            partner: None,
            failed: vec![],
        }
    }

    fn group(addr: &str, home: Option<&str>, rebalance: bool) -> GroupDef {
        GroupDef {
            address: addr.parse().unwrap(),
            prefix: 24,
            count: 1,
            vlan: 0,
            mode: Mode::Spread,
            node: home.map(String::from),
            adapters: vec!["eth0".into(), "eth1".into()],
            failover: true,
            rebalance,
            server: None,
            weight: 1,
        }
    }

    fn assigned(groups: &[(&str, Option<&str>)]) -> AssignRecord {
        AssignRecord {
            groups: groups
                .iter()
                .map(|(a, o)| GroupAssign { address: a.parse().unwrap(), owner: o.map(String::from), incarnation: 1, from: None, wait_ms: 0 })
                .collect(),
            nodes: vec![],
            ..Default::default()
        }
    }

    /// (node, alive, joining) and the records; the holder status from `gone`.
    struct Scn {
        defs: Defs,
        records: Vec<NodeRecord>,
        alive: Vec<(bool, bool)>,
        previous: AssignRecord,
        gone: Vec<(&'static str, u64)>,
        unknown: Vec<&'static str>,
    }

    fn run(s: &Scn) -> Decision {
        let nodes: Vec<(&str, NodeState)> = s
            .records
            .iter()
            .zip(&s.alive)
            .map(|(r, (alive, joining))| (r.name.as_str(), NodeState { incarnation: 1, record: r, alive: *alive, joining: *joining }))
            .collect();
        let holder = |name: &str, _inc: u64, addr: std::net::IpAddr| -> Holder {
            if let Some((_, w)) = s.gone.iter().find(|(n, _)| *n == name) {
                return Holder::Gone { wait_ms: *w };
            }
            if s.unknown.contains(&name) {
                return Holder::Unknown;
            }
            let holding = s.records.iter().any(|r| r.name == name && r.holding.contains(&addr));
            Holder::Live { holding }
        };
        decide(&Input { defs: &s.defs, defs_rev: 1, nodes: &nodes, previous: &s.previous, holder: &holder, waits: &|_| true, now: 0.0, rebalance: false })
    }

    fn owners(d: &Decision) -> Vec<Option<&str>> {
        d.groups.iter().map(|g| g.owner.as_deref()).collect()
    }

    fn defs(groups: Vec<GroupDef>) -> Defs {
        Defs { source: String::new(), groups, servers: vec![] }
    }

    #[test]
    fn groups_start_at_home_and_wait_for_a_joining_home() {
        let s = Scn {
            defs: defs(vec![group("192.0.2.50", Some("n0"), false), group("192.0.2.51", Some("n1"), false), group("192.0.2.52", None, false)]),
            records: vec![node("n0", Role::Active, &[true, true], &[]), node("n1", Role::Active, &[true, true], &[])],
            alive: vec![(true, false), (false, true)],
            previous: AssignRecord::default(),
            gone: vec![],
            unknown: vec![],
        };
        let d = run(&s);
        // n1 joining: its group waits; the homeless group starts on the only active node.
        assert_eq!(owners(&d), [Some("n0"), None, Some("n0")]);
        // n1 alive: it gets its own group.
        let s = Scn { alive: vec![(true, false), (true, false)], previous: record(&d, "n0", 1, 1, 0.0, 0), ..s };
        assert_eq!(owners(&run(&s)), [Some("n0"), Some("n1"), Some("n0")]);
    }

    #[test]
    fn a_dead_node_s_groups_move_once_it_is_proved_silent() {
        let base = || Scn {
            defs: defs(vec![group("192.0.2.50", Some("n0"), false), group("192.0.2.51", Some("n1"), false)]),
            records: vec![node("n0", Role::Active, &[true, true], &["192.0.2.50"]), node("n1", Role::Active, &[true, true], &["192.0.2.51"])],
            alive: vec![(true, false), (false, false)],
            previous: assigned(&[("192.0.2.50", Some("n0")), ("192.0.2.51", Some("n1"))]),
            gone: vec![],
            unknown: vec!["n1"],
        };
        // Not proved silent: it stays (nobody else answers it).
        assert_eq!(owners(&run(&base())), [Some("n0"), Some("n1")]);
        // Cut, and it had answered on etcd's word: moves, the new owner waits.
        let d = run(&Scn { gone: vec![("n1", 83)], unknown: vec![], ..base() });
        assert_eq!(owners(&d), [Some("n0"), Some("n0")]);
        assert_eq!((d.groups[1].from.as_deref(), d.groups[1].wait_ms), (Some("n1"), 83));
        assert_eq!(d.moved, [(1, Some("n1".into()), "n0".into())]);
        assert_eq!(d.nodes.iter().map(|h| (h.name.as_str(), h.health)).collect::<Vec<_>>(), [("n0", Health::Active), ("n1", Health::Failed)]);
    }

    #[test]
    fn a_live_holder_lets_go_before_the_group_moves() {
        // n1 lost both ports: the core moves its group; n1 still holds it.
        let base = || Scn {
            defs: defs(vec![group("192.0.2.51", Some("n1"), false)]),
            records: vec![node("n0", Role::Active, &[true, true], &[]), node("n1", Role::Active, &[false, false], &["192.0.2.51"])],
            alive: vec![(true, false), (true, false)],
            previous: assigned(&[("192.0.2.51", Some("n1"))]),
            gone: vec![],
            unknown: vec![],
        };
        let d = run(&base());
        assert_eq!(owners(&d), [None], "first nobody: n1 must let go");
        assert_eq!(d.released, [0]);
        // Until n1's record says it let go, nobody gets it.
        let d2 = run(&Scn { previous: record(&d, "n0", 1, 1, 0.0, 0), ..base() });
        assert_eq!(owners(&d2), [None], "given away while n1 still holds it");
        // n1 let go (its record no longer holds it): now n0.
        let mut s = base();
        s.records[1].holding.clear();
        s.previous = record(&d, "n0", 1, 1, 0.0, 0);
        let d = run(&s);
        assert_eq!(owners(&d), [Some("n0")]);
        assert_eq!(d.groups[0].wait_ms, 0);
    }

    #[test]
    fn a_recovered_node_takes_nothing_back_unless_rebalance() {
        let s = Scn {
            defs: defs(vec![group("192.0.2.50", Some("n1"), false), group("192.0.2.51", Some("n1"), true)]),
            records: vec![node("n0", Role::Active, &[true, true], &["192.0.2.50", "192.0.2.51"]), node("n1", Role::Active, &[true, true], &[])],
            alive: vec![(true, false), (true, false)],
            previous: AssignRecord {
                nodes: vec![NodeHealth { name: "n1".into(), health: Health::Failed, since: 0.0 }],
                ..assigned(&[("192.0.2.50", Some("n0")), ("192.0.2.51", Some("n0"))])
            },
            gone: vec![],
            unknown: vec![],
        };
        let d = run(&s);
        // The rebalance group is asked back (n0 lets go first); the other stays.
        assert_eq!(owners(&d), [Some("n0"), None]);
        assert_eq!(d.nodes.iter().find(|h| h.name == "n1").unwrap().health, Health::Recovered);
    }

    #[test]
    fn a_standby_node_takes_over_first() {
        let s = Scn {
            defs: defs(vec![group("192.0.2.50", Some("n0"), false)]),
            records: vec![
                node("n0", Role::Active, &[true, true], &["192.0.2.50"]),
                node("n1", Role::Active, &[true, true], &[]),
                node("s1", Role::Standby, &[true, true], &[]),
            ],
            alive: vec![(false, false), (true, false), (true, false)],
            previous: assigned(&[("192.0.2.50", Some("n0"))]),
            gone: vec![("n0", 0)],
            unknown: vec![],
        };
        let d = run(&s);
        assert_eq!(owners(&d), [Some("s1")]);
        // Having taken over, the standby node is active (seed 003).
        assert_eq!(d.nodes.iter().find(|h| h.name == "s1").unwrap().health, Health::Active);
    }

    fn in_group(mut r: NodeRecord, group: &str, partner: &str) -> NodeRecord {
        r.group = Some(group.into());
        r.partner = Some(partner.into());
        r
    }

    #[test]
    fn seed_000_a_port_failure_moves_to_the_group_not_the_partner() {
        // Pairs n0+n2, n1+n3; groups A = n0, n1 and B = n2, n3. n0 loses both ports.
        let s = Scn {
            defs: defs(vec![group("192.0.2.50", Some("n0"), false)]),
            records: vec![
                in_group(node("n0", Role::Active, &[false, false], &[]), "A", "n2"),
                in_group(node("n1", Role::Active, &[true, true], &[]), "A", "n3"),
                in_group(node("n2", Role::Active, &[true, true], &[]), "B", "n0"),
                in_group(node("n3", Role::Active, &[true, true], &[]), "B", "n1"),
            ],
            alive: vec![(true, false); 4],
            previous: assigned(&[("192.0.2.50", Some("n0"))]),
            gone: vec![],
            unknown: vec![],
        };
        assert_eq!(owners(&run(&s)), [Some("n1")]);
        // n1 has no port left either: the partner n2 (the wider rule).
        let mut s2 = Scn { previous: assigned(&[("192.0.2.50", Some("n0"))]), ..s };
        s2.records[1].ports.iter_mut().for_each(|p| p.up = false);
        assert_eq!(owners(&run(&s2)), [Some("n2")]);
    }

    #[test]
    fn seed_004_servers_move_whole_in_priority_order_and_pinned_ones_stay_down() {
        use crate::records::ServerDef;
        let server = |name: &str, priority: i32, migrate: bool| ServerDef {
            name: name.into(),
            node: Some("n0".into()),
            priority,
            migrate,
            rebalance: false,
            weight: 1,
        };
        let mut gs = vec![group("192.0.2.70", None, false), group("192.0.2.71", None, false), group("192.0.2.72", None, false), group("192.0.2.75", None, false)];
        for (g, sv) in gs.iter_mut().zip(["hi", "hi", "lo", "pinned"]) {
            g.node = None;
            g.server = Some(sv.into());
        }
        let all = ["192.0.2.70", "192.0.2.71", "192.0.2.72", "192.0.2.75"];
        let s = Scn {
            defs: Defs { source: String::new(), groups: gs, servers: vec![server("lo", 1, true), server("hi", 9, true), server("pinned", 5, false)] },
            records: vec![
                node("n0", Role::Active, &[true, true], &all),
                node("n1", Role::Active, &[true, true], &[]),
                node("n2", Role::Active, &[true, true], &[]),
            ],
            alive: vec![(false, false), (true, false), (true, false)],
            previous: assigned(&all.iter().map(|a| (*a, Some("n0"))).collect::<Vec<_>>()),
            gone: vec![("n0", 0)],
            unknown: vec![],
        };
        let d = run(&s);
        // hi (both its groups) first to n1, lo to the less loaded n2, pinned down with n0.
        assert_eq!(owners(&d), [Some("n1"), Some("n1"), Some("n2"), None]);
    }

    #[test]
    fn a_rebalance_sends_units_home_and_levels_the_rest() {
        let mut gs: Vec<GroupDef> = (0..4).map(|i| group(&format!("192.0.2.{}", 80 + i), None, false)).collect();
        gs[0].node = Some("n1".into());
        let held: Vec<(String, Option<&str>)> = gs.iter().map(|g| (g.address.to_string(), Some("n0"))).collect();
        let held_ref: Vec<(&str, Option<&str>)> = held.iter().map(|(a, o)| (a.as_str(), *o)).collect();
        let base = || Scn {
            defs: defs(gs.clone()),
            records: vec![node("n0", Role::Active, &[true, true], &["192.0.2.80", "192.0.2.81", "192.0.2.82", "192.0.2.83"]), node("n1", Role::Active, &[true, true], &[])],
            alive: vec![(true, false), (true, false)],
            previous: assigned(&held_ref),
            gone: vec![],
            unknown: vec![],
        };
        // Without a request nothing moves (n1 recovered: it takes nothing back).
        assert_eq!(owners(&run(&base())), [Some("n0"); 4]);
        // With one: .80 home to n1, and one more to level 2 and 2; each a handover (n0
        // lets go first).
        let nodes_ = base();
        let states: Vec<(&str, NodeState)> =
            nodes_.records.iter().map(|r| (r.name.as_str(), NodeState { incarnation: 1, record: r, alive: true, joining: false })).collect();
        let holder = |name: &str, _: u64, addr: std::net::IpAddr| Holder::Live { holding: nodes_.records.iter().any(|r| r.name == name && r.holding.contains(&addr)) };
        let d = decide(&Input { defs: &nodes_.defs, defs_rev: 1, nodes: &states, previous: &nodes_.previous, holder: &holder, waits: &|_| true, now: 0.0, rebalance: true });
        assert_eq!(d.released.len(), 2, "{:?}", owners(&d));
        assert!(d.released.contains(&0));
    }

    #[test]
    fn a_node_no_longer_registered_is_still_what_its_units_leave() {
        // n0's key is gone (cut, or its lease expired): its groups go to the standby whole,
        // not to the least loaded node.
        let s = Scn {
            defs: defs(vec![group("192.0.2.50", Some("n0"), false), group("192.0.2.51", Some("n0"), false)]),
            records: vec![node("n1", Role::Active, &[true, true], &[]), node("s1", Role::Standby, &[true, true], &[])],
            alive: vec![(true, false), (true, false)],
            previous: assigned(&[("192.0.2.50", Some("n0")), ("192.0.2.51", Some("n0"))]),
            gone: vec![("n0", 0)],
            unknown: vec![],
        };
        assert_eq!(owners(&run(&s)), [Some("s1"), Some("s1")]);
    }

    #[test]
    fn seed_004_a_port_failure_moves_a_server_whole_even_a_pinned_one() {
        use crate::records::ServerDef;
        // "db" (migrate = false) has two groups on n0; n0 lives but loses both ports: the
        // server moves whole to n1 (migrate = false is about node failure only).
        let mut gs = vec![group("192.0.2.70", None, false), group("192.0.2.71", None, false)];
        for g in &mut gs {
            g.server = Some("db".into());
        }
        let sv = ServerDef { name: "db".into(), node: Some("n0".into()), priority: 1, migrate: false, rebalance: false, weight: 1 };
        let base = || Scn {
            defs: Defs { source: String::new(), groups: gs.clone(), servers: vec![sv.clone()] },
            records: vec![node("n0", Role::Active, &[false, false], &[]), node("n1", Role::Active, &[true, true], &[])],
            alive: vec![(true, false), (true, false)],
            previous: assigned(&[("192.0.2.70", Some("n0")), ("192.0.2.71", Some("n0"))]),
            gone: vec![],
            unknown: vec![],
        };
        // n0 no longer holds them (it let go when its ports went): both to n1 at once.
        assert_eq!(owners(&run(&base())), [Some("n1"), Some("n1")]);
    }
}
