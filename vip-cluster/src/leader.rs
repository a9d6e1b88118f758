//! The leader's decision, pure: the registered nodes (their ports, roles, what they hold)
//! and the definitions in, who holds each group out. The placement core decides at the
//! node level here exactly as it does at the adapter level on one node: every node's
//! ports are adapters, a node's health is its [`vip_placement::Node::up`], and a group is
//! one VIP of the core whose takeover `stay`s (a recovered node takes nothing back unless
//! the group says `rebalance`).
//!
//! A group never has two holders: it moves from a live holder in two steps (the leader
//! asks it to let go by naming no owner, the holder stops answering and says so in its
//! record, then the leader names the new owner), and from a holder that is gone only once
//! the caller has proved it silent.

use std::{collections::HashMap, str::FromStr, sync::Arc};

use vip_placement::{self as placement, bit, slots, Assignment, Placement, Run, Slot, Subnet};

use crate::records::{AssignRecord, Defs, GroupAssign, Health, Mode, NodeHealth, NodeRecord, Role};

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

fn mode(m: Mode) -> placement::Mode {
    match m {
        Mode::All => placement::Mode::All,
        Mode::Primary => placement::Mode::Primary,
        Mode::Spread => placement::Mode::Spread,
    }
}

pub fn decide(input: &Input) -> Decision {
    let Input { defs, defs_rev, nodes, previous, holder, waits, now } = *input;
    // Standby nodes first: their ports come first among takers (seed 003).
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by_key(|&i| (nodes[i].1.record.role != Role::Standby, nodes[i].0));
    let pnodes: Vec<placement::Node> =
        order.iter().map(|&i| placement::Node { name: nodes[i].0.to_string(), up: nodes[i].1.alive && !nodes[i].1.record.fenced }).collect();
    let mut adapters = vec![];
    let mut port_of: Vec<(usize, String)> = vec![];
    for (ni, &i) in order.iter().enumerate() {
        for p in &nodes[i].1.record.ports {
            if adapters.len() >= placement::MAX_SLOTS {
                break;
            }
            adapters.push(placement::Adapter {
                name: format!("{}/{}", nodes[i].0, p.name),
                node: ni,
                up: p.up,
                weight: p.weight.max(1),
                load: 0.0,
                max_vips: None,
                vlans: p.vlans.clone(),
                subnets: p.subnets.iter().filter_map(|s| Subnet::from_str(s).ok()).collect(),
            });
            port_of.push((ni, p.name.clone()));
        }
    }
    let node_index = |name: &str| pnodes.iter().position(|n| n.name == name);
    let named = |ni: usize, names: &[String]| -> Vec<Slot> {
        port_of.iter().enumerate().filter(|(_, (n, p))| *n == ni && (names.is_empty() || names.contains(p))).map(|(s, _)| s as Slot).collect()
    };

    // The previous holder of each group, matched by first address.
    let prev_of: HashMap<std::net::IpAddr, &GroupAssign> = previous.groups.iter().map(|g| (g.address, g)).collect();
    let current: Vec<Option<&GroupAssign>> = defs.groups.iter().map(|g| prev_of.get(&g.address).copied()).collect();

    // Groups without a node of their own live where they are, or start on the active node
    // holding the fewest.
    let mut held_count: HashMap<&str, usize> = HashMap::new();
    for c in current.iter().flatten() {
        if let Some(o) = &c.owner {
            *held_count.entry(o.as_str()).or_default() += 1;
        }
    }
    let mut vips = vec![];
    for (gi, g) in defs.groups.iter().enumerate() {
        let home = match &g.node {
            Some(n) => node_index(n),
            None => match current[gi].and_then(|c| c.owner.as_deref()) {
                Some(o) => node_index(o),
                None => {
                    let pick = pnodes
                        .iter()
                        .enumerate()
                        .filter(|(ni, n)| n.up && nodes[order[*ni]].1.record.role == Role::Active)
                        .min_by_key(|(_, n)| (held_count.get(n.name.as_str()).copied().unwrap_or(0), n.name.clone()))
                        .map(|(ni, _)| ni);
                    if let Some(ni) = pick {
                        *held_count.entry(nodes[order[ni]].0).or_default() += 1;
                    }
                    pick
                }
            },
        };
        let homes: Arc<[Slot]> = home.map_or(vec![], |ni| named(ni, &g.adapters)).into();
        let takers = (!g.adapters.is_empty()).then(|| (0..pnodes.len()).flat_map(|ni| named(ni, &g.adapters)).collect::<Arc<[Slot]>>());
        vips.push(placement::Vip {
            addr: g.address,
            vlan: g.vlan,
            homes,
            mode: mode(g.mode),
            failover: g.failover,
            rebalance: g.rebalance,
            stay: !g.rebalance,
            takers,
        });
    }
    let classes = placement::classify(&vips, 0..vips.len() as u32, &adapters);

    // The assignment in force, as the core would have made it: a group held by a node
    // other than its home is a takeover by that node's fit adapters.
    let owner_node = |gi: usize| current[gi].and_then(|c| c.owner.as_deref()).and_then(node_index);
    let mut prev = Assignment { classes: vec![Placement::default(); classes.len()], heirs: vec![None; adapters.len()], up: 0 };
    for (ci, c) in classes.list.iter().enumerate() {
        let home_mask = c.key.home_mask();
        let mut runs: Vec<Run> = vec![];
        for (pos, &gi) in c.members.iter().enumerate() {
            let (allowed, away) = match owner_node(gi as usize) {
                Some(ni) => {
                    let on: u64 = port_of.iter().enumerate().filter(|(_, (n, _))| *n == ni).fold(0, |m, (s, _)| m | bit(s as Slot));
                    if on & home_mask != 0 {
                        (on & home_mask, false)
                    } else {
                        (on & c.key.fit, true)
                    }
                }
                None => (0, false),
            };
            match runs.last_mut() {
                Some(r) if r.allowed == allowed && r.away == away => r.len += 1,
                _ => runs.push(Run { start: pos as u32, len: 1, allowed, away, stranded: allowed == 0, buckets: None }),
            }
        }
        prev.classes[ci].runs = runs;
    }
    let d = placement::place(&placement::Input { nodes: &pnodes, adapters: &adapters, classes: &classes, previous: &prev });

    let mut out = Decision { groups: vec![], nodes: vec![], moved: vec![], released: vec![] };
    for (gi, g) in defs.groups.iter().enumerate() {
        let (ci, pos) = classes.of_vip[gi];
        let run = d.assignment.classes[ci as usize].run_at(pos);
        let want: Option<usize> = run.filter(|r| !r.stranded && r.allowed != 0).and_then(|r| slots(r.allowed).next()).map(|s| port_of[s as usize].0);
        let want_name = want.map(|ni| nodes[order[ni]].0.to_string());
        let want_inc = want.map_or(0, |ni| nodes[order[ni]].1.incarnation);
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
        let home_joining = g.node.as_deref().is_some_and(|h| match nodes.iter().find(|(n, _)| *n == h) {
            Some((_, st)) => st.joining,
            // Not registered: never seen in the cluster, and still within the wait.
            None => !previous.nodes.iter().any(|x| x.name == h) && waits(g.address),
        });
        let ga = match cur {
            // Never placed, and its node is on its way: it waits for it.
            None if home_joining => GroupAssign { address: g.address, owner: None, incarnation: 0, from: None, wait_ms: 0 },
            None => {
                if let Some(w) = &want_name {
                    out.moved.push((gi, None, w.clone()));
                }
                give(None, 0)
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
                    Holder::Gone { wait_ms } => {
                        if let Some(w) = &want_name {
                            out.moved.push((gi, Some(name.clone()), w.clone()));
                        }
                        give(Some(name), wait_ms)
                    }
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
        } else if !st.alive {
            Health::Failed
        } else if matches!(was.get(name).map(|h| h.health), Some(Health::Failed | Health::Recovered | Health::Down)) && !holds.contains_key(name) {
            Health::Recovered
        } else if st.record.role == Role::Standby && !holds.contains_key(name) {
            // A standby node that took something over is active (seed 003).
            Health::Standby
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
pub fn record(d: &Decision, leader: &str, term: i64, defs_rev: i64, now: f64) -> AssignRecord {
    AssignRecord { leader: leader.into(), term, defs: defs_rev, groups: d.groups.clone(), nodes: d.nodes.clone(), at: now }
}

#[cfg(test)]
mod tests {
    //! The leader's decision, scenario by scenario: nodes (role, ports, alive, what they
    //! hold), the previous assignment, and who holds each group after.
    use super::*;
    use crate::records::{GroupDef, PortRecord};

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
        decide(&Input { defs: &s.defs, defs_rev: 1, nodes: &nodes, previous: &s.previous, holder: &holder, waits: &|_| true, now: 0.0 })
    }

    fn owners(d: &Decision) -> Vec<Option<&str>> {
        d.groups.iter().map(|g| g.owner.as_deref()).collect()
    }

    fn defs(groups: Vec<GroupDef>) -> Defs {
        Defs { source: String::new(), groups }
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
        let s = Scn { alive: vec![(true, false), (true, false)], previous: record(&d, "n0", 1, 1, 0.0), ..s };
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
        let d2 = run(&Scn { previous: record(&d, "n0", 1, 1, 0.0), ..base() });
        assert_eq!(owners(&d2), [None], "given away while n1 still holds it");
        // n1 let go (its record no longer holds it): now n0.
        let mut s = base();
        s.records[1].holding.clear();
        s.previous = record(&d, "n0", 1, 1, 0.0);
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
}
