//! Placement across nodes: which node holds each *unit* (a virtual server with its VIP
//! groups, or a group of its own), the cluster leader's question. Pure, like the rest of
//! the core: nodes, units, who holds what now and which node can serve which unit in;
//! an owner per unit out, with the rule that chose it.
//!
//! The rules, in order, for a unit that cannot stay where it is:
//!
//! 1. **Home** (its `node`), when that node is up and can serve it.
//! 2. A unit whose node failed and that must not migrate (`migrate = false`, seed 004)
//!    stays down with its node.
//! 3. **Standby** (seed 003): when a node fails, one idle standby node takes over all of
//!    it (every unit of the failed node that it can serve goes to the same standby).
//! 4. **Group** (seed 000): a node in the same failover group as the one it leaves, other
//!    than that node's pair partner, the least loaded first.
//! 5. **Partner**: the pair partner of the node it leaves.
//! 6. **Anywhere**: any other active node, the least loaded first; a standby node that
//!    already holds something comes last.
//!
//! Units are placed in priority order (highest first, seed 004), so when nodes are short
//! the important ones are served first, and the node that takes over acquires them in
//! that order. Load is the sum of the `weight`s of the units a node holds.
//!
//! A unit stays where it is while its node is up and can serve it (sticky: a recovered
//! node takes nothing back), unless it is marked `rebalance` and its home is back, or the
//! operator asked for a rebalance: then units go home and the rest is levelled, moving
//! as few units as it can.

/// A node as placement sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterNode {
    pub name: String,
    /// Alive and answering (not failed, not left).
    pub up: bool,
    /// `role = "standby"`: holds nothing while all is well.
    pub standby: bool,
    /// Its failover group and pair partner (seed 000), by name.
    pub group: Option<String>,
    pub partner: Option<String>,
}

/// A virtual server, or a VIP group that belongs to none: what moves as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub name: String,
    /// Its home node (index into the nodes).
    pub home: Option<usize>,
    /// Higher first.
    pub priority: i32,
    /// Moves to another node when its node fails.
    pub migrate: bool,
    /// Goes back home when its home returns.
    pub rebalance: bool,
    pub weight: u32,
}

impl Default for Unit {
    fn default() -> Self {
        Unit { name: String::new(), home: None, priority: 0, migrate: true, rebalance: false, weight: 1 }
    }
}

/// Why a unit is where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Its node is up and can serve it.
    Stays,
    Home,
    Standby,
    Group,
    Partner,
    Anywhere,
    /// Moved to even the load (a rebalance).
    Levelled,
    /// Its node failed and it must not migrate.
    DownWithNode,
    /// No node that is up can serve it.
    Nowhere,
}

pub struct NodesInput<'a> {
    pub nodes: &'a [ClusterNode],
    pub units: &'a [Unit],
    /// The node holding each unit now.
    pub current: &'a [Option<usize>],
    /// Whether node `n` can serve unit `u` (an operative port for every one of its VIPs).
    pub fits: &'a dyn Fn(usize, usize) -> bool,
    /// The operator asked for a rebalance.
    pub rebalance: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodesDecision {
    pub owner: Vec<Option<usize>>,
    pub rule: Vec<Rule>,
    /// Units in the order they were placed (priority, then their order in the input).
    pub order: Vec<usize>,
}

impl NodesDecision {
    /// The sum of the weights each node holds.
    pub fn loads(&self, units: &[Unit], nodes: usize) -> Vec<u64> {
        let mut l = vec![0u64; nodes];
        for (u, o) in self.owner.iter().enumerate() {
            if let Some(n) = o {
                l[*n] += units[u].weight as u64;
            }
        }
        l
    }
}

pub fn place_nodes(input: &NodesInput) -> NodesDecision {
    let NodesInput { nodes, units, current, fits, rebalance } = *input;
    let up = |n: usize| nodes[n].up;
    let serves = |n: usize, u: usize| up(n) && fits(n, u);
    let home_back = |u: usize| units[u].home.filter(|&h| serves(h, u));
    let mut owner: Vec<Option<usize>> = vec![None; units.len()];
    let mut rule = vec![Rule::Nowhere; units.len()];
    let mut load = vec![0u64; nodes.len()];
    let mut order: Vec<usize> = (0..units.len()).collect();
    order.sort_by_key(|&u| (std::cmp::Reverse(units[u].priority), u));

    // Units that stay put, first, so that the others see the load they make.
    let mut todo = vec![];
    for &u in &order {
        let stay = current[u].filter(|&n| serves(n, u)).filter(|&n| {
            let go_home = (units[u].rebalance || rebalance) && home_back(u).is_some_and(|h| h != n);
            // A rebalance empties the standby nodes of what has a better place.
            let off_standby = rebalance && nodes[n].standby;
            !go_home && !off_standby
        });
        match stay {
            Some(n) => {
                owner[u] = Some(n);
                rule[u] = Rule::Stays;
                load[n] += units[u].weight as u64;
            }
            None => todo.push(u),
        }
    }

    // The standby node taking over each failed node, in this decision.
    let mut standby_for: Vec<(usize, usize)> = vec![];
    for u in todo.iter().copied() {
        let from = current[u].or(units[u].home);
        let failed = from.is_some_and(|f| !up(f));
        let pick = |cands: &mut dyn Iterator<Item = usize>, load: &[u64]| cands.filter(|&n| serves(n, u)).min_by_key(|&n| (load[n], n));
        let (n, r) = if let Some(h) = home_back(u) {
            (Some(h), Rule::Home)
        } else if failed && !units[u].migrate {
            (None, Rule::DownWithNode)
        } else if let Some(f) = from {
            let fnode = &nodes[f];
            let partner = fnode.partner.as_deref().and_then(|p| nodes.iter().position(|x| x.name == p));
            let standby = failed
                .then(|| {
                    let taken = standby_for.iter().find(|(of, _)| *of == f).map(|(_, s)| *s).filter(|&s| serves(s, u));
                    taken.or_else(|| (0..nodes.len()).find(|&s| nodes[s].standby && load[s] == 0 && serves(s, u)))
                })
                .flatten();
            if let Some(s) = standby {
                if !standby_for.iter().any(|(of, _)| *of == f) {
                    standby_for.push((f, s));
                }
                (Some(s), Rule::Standby)
            } else if let Some(n) = fnode.group.as_ref().and_then(|g| {
                pick(&mut (0..nodes.len()).filter(|&n| n != f && Some(n) != partner && !nodes[n].standby && nodes[n].group.as_ref() == Some(g)), &load)
            }) {
                (Some(n), Rule::Group)
            } else if let Some(p) = partner.filter(|&p| serves(p, u)) {
                (Some(p), Rule::Partner)
            } else if let Some(n) = pick(&mut (0..nodes.len()).filter(|&n| n != f && !nodes[n].standby), &load) {
                (Some(n), Rule::Anywhere)
            } else if let Some(n) = pick(&mut (0..nodes.len()).filter(|&n| n != f && nodes[n].standby), &load) {
                (Some(n), Rule::Anywhere)
            } else {
                (None, Rule::Nowhere)
            }
        } else {
            // Never placed and no home: the least loaded active node.
            match pick(&mut (0..nodes.len()).filter(|&n| !nodes[n].standby), &load) {
                Some(n) => (Some(n), Rule::Anywhere),
                None => (None, Rule::Nowhere),
            }
        };
        owner[u] = n;
        rule[u] = r;
        if let Some(n) = n {
            load[n] += units[u].weight as u64;
        }
    }

    if rebalance {
        level(nodes, units, &mut owner, &mut rule, &mut load, &serves);
    }
    NodesDecision { owner, rule, order }
}

/// Evens the load over the active nodes that are up: moves, from the most loaded node
/// that has a unit to give to a less loaded one, the unit whose weight is nearest half
/// their difference (so the spread shrinks as much as one move can), until no move
/// narrows any gap. Units at home, and units that must not migrate, stay. Each move
/// lowers the sum of squared loads, so it ends.
fn level(nodes: &[ClusterNode], units: &[Unit], owner: &mut [Option<usize>], rule: &mut [Rule], load: &mut [u64], serves: &dyn Fn(usize, usize) -> bool) {
    let active: Vec<usize> = (0..nodes.len()).filter(|&n| nodes[n].up && !nodes[n].standby).collect();
    if active.len() < 2 {
        return;
    }
    loop {
        let mut sources = active.clone();
        sources.sort_by_key(|&n| (std::cmp::Reverse(load[n]), n));
        let best = sources.iter().find_map(|&hi| {
            let gap = |to: usize| load[hi].saturating_sub(load[to]);
            let mut best: Option<(u64, usize, usize)> = None;
            for (u, unit) in units.iter().enumerate() {
                let w = unit.weight as u64;
                if owner[u] != Some(hi) || unit.home == Some(hi) || !unit.migrate || w == 0 {
                    continue;
                }
                // The least loaded node that can serve it, where the move narrows the gap.
                let Some(to) = active.iter().copied().filter(|&n| n != hi && serves(n, u) && w < gap(n)).min_by_key(|&n| (load[n], n)) else {
                    continue;
                };
                let miss = (2 * w).abs_diff(gap(to));
                if best.is_none_or(|(m, bu, _)| (miss, u) < (m, bu)) {
                    best = Some((miss, u, to));
                }
            }
            best.map(|(_, u, to)| (hi, u, to))
        });
        let Some((hi, u, to)) = best else { return };
        let w = units[u].weight as u64;
        load[hi] -= w;
        load[to] += w;
        owner[u] = Some(to);
        rule[u] = Rule::Levelled;
    }
}

#[cfg(test)]
mod tests {
    //! Scenario tables: a cluster (nodes with their group, partner, role and health), the
    //! units and who holds them, and where each unit goes, with the rule that sent it.
    use super::*;

    /// `spec`: "name[:group][:partner][:standby]", up unless prefixed with '!'.
    fn nodes(spec: &[&str]) -> Vec<ClusterNode> {
        spec.iter()
            .map(|s| {
                let (up, s) = s.strip_prefix('!').map_or((true, *s), |r| (false, r));
                let mut parts = s.split(':');
                let name = parts.next().unwrap().to_string();
                let mut n = ClusterNode { name, up, ..Default::default() };
                for p in parts {
                    if p == "standby" {
                        n.standby = true;
                    } else if let Some(g) = p.strip_prefix("g=") {
                        n.group = Some(g.into());
                    } else if let Some(q) = p.strip_prefix("p=") {
                        n.partner = Some(q.into());
                    }
                }
                n
            })
            .collect()
    }

    fn idx(ns: &[ClusterNode], name: &str) -> usize {
        ns.iter().position(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// (unit, home, priority, migrate, rebalance, weight, current holder)
    type UnitRow = (&'static str, Option<&'static str>, i32, bool, bool, u32, Option<&'static str>);

    struct Case {
        what: &'static str,
        nodes: &'static [&'static str],
        units: &'static [UnitRow],
        /// (node, unit) pairs that do not fit (ports down for that unit's VIPs).
        unfit: &'static [(&'static str, &'static str)],
        rebalance: bool,
        /// Expected (unit, owner, rule).
        want: &'static [(&'static str, Option<&'static str>, Rule)],
    }

    fn check(c: &Case) -> NodesDecision {
        let ns = nodes(c.nodes);
        let units: Vec<Unit> = c
            .units
            .iter()
            .map(|(name, home, priority, migrate, rebalance, weight, _)| Unit {
                name: name.to_string(),
                home: home.map(|h| idx(&ns, h)),
                priority: *priority,
                migrate: *migrate,
                rebalance: *rebalance,
                weight: *weight,
            })
            .collect();
        let current: Vec<Option<usize>> = c.units.iter().map(|u| u.6.map(|h| idx(&ns, h))).collect();
        let fits = |n: usize, u: usize| !c.unfit.iter().any(|(nn, uu)| ns[n].name == *nn && units[u].name == *uu);
        let d = place_nodes(&NodesInput { nodes: &ns, units: &units, current: &current, fits: &fits, rebalance: c.rebalance });
        for (unit, want, rule) in c.want {
            let u = units.iter().position(|x| x.name == *unit).unwrap();
            let got = d.owner[u].map(|n| ns[n].name.as_str());
            assert_eq!((got, d.rule[u]), (*want, *rule), "{}: unit {unit}", c.what);
        }
        d
    }

    const PAIRS: &[&str] = &["a1:g=A:p=b1", "a2:g=A:p=b2", "b1:g=B:p=a1", "b2:g=B:p=a2"];

    #[test]
    fn scenarios() {
        let cases = [
            Case {
                what: "all up: every unit at home",
                nodes: PAIRS,
                units: &[("v1", Some("a1"), 0, true, false, 1, None), ("v2", Some("b2"), 0, true, false, 1, None)],
                unfit: &[],
                rebalance: false,
                want: &[("v1", Some("a1"), Rule::Home), ("v2", Some("b2"), Rule::Home)],
            },
            Case {
                what: "seed 000: a1 loses its ports for v1: same group (a2), not its partner (b1)",
                nodes: PAIRS,
                units: &[("v1", Some("a1"), 0, true, false, 1, Some("a1"))],
                unfit: &[("a1", "v1")],
                rebalance: false,
                want: &[("v1", Some("a2"), Rule::Group)],
            },
            Case {
                what: "seed 000: a2 has no port for v1 either: the partner (the wider rule)",
                nodes: PAIRS,
                units: &[("v1", Some("a1"), 0, true, false, 1, Some("a1"))],
                unfit: &[("a1", "v1"), ("a2", "v1")],
                rebalance: false,
                want: &[("v1", Some("b1"), Rule::Partner)],
            },
            Case {
                what: "seed 000: nor the partner: any node (b2)",
                nodes: PAIRS,
                units: &[("v1", Some("a1"), 0, true, false, 1, Some("a1"))],
                unfit: &[("a1", "v1"), ("a2", "v1"), ("b1", "v1")],
                rebalance: false,
                want: &[("v1", Some("b2"), Rule::Anywhere)],
            },
            Case {
                what: "no node can serve it",
                nodes: &["n0", "n1"],
                units: &[("v1", Some("n0"), 0, true, false, 1, Some("n0"))],
                unfit: &[("n0", "v1"), ("n1", "v1")],
                rebalance: false,
                want: &[("v1", None, Rule::Nowhere)],
            },
            Case {
                what: "node a1 fails: its units go to its group first, least loaded first",
                nodes: &["!a1:g=A:p=b1", "a2:g=A:p=b2", "a3:g=A", "b1:g=B:p=a1", "b2:g=B:p=a2"],
                units: &[
                    ("x", Some("a1"), 0, true, false, 1, Some("a1")),
                    ("y", Some("a1"), 0, true, false, 1, Some("a1")),
                    ("z", Some("a2"), 0, true, false, 1, Some("a2")),
                ],
                unfit: &[],
                rebalance: false,
                want: &[("x", Some("a3"), Rule::Group), ("y", Some("a2"), Rule::Group), ("z", Some("a2"), Rule::Stays)],
            },
            Case {
                what: "seed 003: a standby takes over a failed node whole",
                nodes: &["!n0", "n1", "s0:standby", "s1:standby"],
                units: &[
                    ("x", Some("n0"), 0, true, false, 1, Some("n0")),
                    ("y", Some("n0"), 0, true, false, 5, Some("n0")),
                    ("z", Some("n1"), 0, true, false, 1, Some("n1")),
                ],
                unfit: &[],
                rebalance: false,
                want: &[("x", Some("s0"), Rule::Standby), ("y", Some("s0"), Rule::Standby), ("z", Some("n1"), Rule::Stays)],
            },
            Case {
                what: "seed 003: a second failed node gets the other (idle) standby",
                nodes: &["!n0", "!n1", "n2", "s0:standby", "s1:standby"],
                units: &[("x", Some("n0"), 0, true, false, 1, Some("s0")), ("z", Some("n1"), 0, true, false, 1, Some("n1"))],
                unfit: &[],
                rebalance: false,
                want: &[("x", Some("s0"), Rule::Stays), ("z", Some("s1"), Rule::Standby)],
            },
            Case {
                what: "no idle standby: the group rule, then anywhere",
                nodes: &["!n0", "n1", "s0:standby"],
                units: &[("x", Some("n0"), 0, true, false, 1, Some("n0")), ("w", None, 0, true, false, 1, Some("s0"))],
                unfit: &[],
                rebalance: false,
                want: &[("x", Some("n1"), Rule::Anywhere), ("w", Some("s0"), Rule::Stays)],
            },
            Case {
                what: "a port failure is not a node failure: no standby",
                nodes: &["n0", "n1", "s0:standby"],
                units: &[("x", Some("n0"), 0, true, false, 1, Some("n0"))],
                unfit: &[("n0", "x")],
                rebalance: false,
                want: &[("x", Some("n1"), Rule::Anywhere)],
            },
            Case {
                what: "seed 004: priority order, and migrate = false stays down with its node",
                nodes: &["!n0", "n1", "n2"],
                units: &[
                    ("low", Some("n0"), 1, true, false, 1, Some("n0")),
                    ("high", Some("n0"), 9, true, false, 1, Some("n0")),
                    ("pinned", Some("n0"), 5, false, false, 1, Some("n0")),
                ],
                unfit: &[],
                rebalance: false,
                // high first: n1 (both empty, lower index), then low to the less loaded n2.
                want: &[("high", Some("n1"), Rule::Anywhere), ("low", Some("n2"), Rule::Anywhere), ("pinned", None, Rule::DownWithNode)],
            },
            Case {
                what: "seed 004: migrate = false still moves when its node lives but lost its ports",
                nodes: &["n0", "n1"],
                units: &[("pinned", Some("n0"), 5, false, false, 1, Some("n0"))],
                unfit: &[("n0", "pinned")],
                rebalance: false,
                want: &[("pinned", Some("n1"), Rule::Anywhere)],
            },
            Case {
                what: "a pinned unit comes back up with its node",
                nodes: &["n0", "n1"],
                units: &[("pinned", Some("n0"), 5, false, false, 1, None)],
                unfit: &[],
                rebalance: false,
                want: &[("pinned", Some("n0"), Rule::Home)],
            },
            Case {
                what: "a recovered node takes nothing back ...",
                nodes: &["n0", "n1"],
                units: &[("x", Some("n0"), 0, true, false, 1, Some("n1")), ("y", Some("n0"), 0, true, true, 1, Some("n1"))],
                unfit: &[],
                rebalance: false,
                want: &[("x", Some("n1"), Rule::Stays), ("y", Some("n0"), Rule::Home)],
            },
            Case {
                what: "... until a rebalance: home, and the standby emptied",
                nodes: &["n0", "n1", "s0:standby"],
                units: &[("x", Some("n0"), 0, true, false, 1, Some("n1")), ("w", None, 0, true, false, 1, Some("s0"))],
                unfit: &[],
                rebalance: true,
                want: &[("x", Some("n0"), Rule::Home), ("w", Some("n1"), Rule::Anywhere)],
            },
            Case {
                what: "a rebalance levels homeless units, moving as few as it can",
                nodes: &["n0", "n1", "n2"],
                units: &[
                    ("a", None, 0, true, false, 1, Some("n0")),
                    ("b", None, 0, true, false, 1, Some("n0")),
                    ("c", None, 0, true, false, 1, Some("n0")),
                    ("d", None, 0, true, false, 1, Some("n0")),
                    ("e", None, 0, true, false, 1, Some("n0")),
                    ("f", None, 0, true, false, 1, Some("n0")),
                ],
                unfit: &[],
                rebalance: true,
                want: &[("a", Some("n1"), Rule::Levelled), ("b", Some("n2"), Rule::Levelled), ("c", Some("n1"), Rule::Levelled), ("d", Some("n2"), Rule::Levelled)],
            },
            Case {
                what: "a rebalance moves a heavy unit rather than many light ones",
                nodes: &["n0", "n1"],
                units: &[
                    ("big", None, 0, true, false, 4, Some("n0")),
                    ("s1", None, 0, true, false, 1, Some("n0")),
                    ("s2", None, 0, true, false, 1, Some("n0")),
                    ("s3", None, 0, true, false, 1, Some("n0")),
                    ("s4", None, 0, true, false, 1, Some("n0")),
                ],
                unfit: &[],
                rebalance: true,
                want: &[("big", Some("n1"), Rule::Levelled), ("s1", Some("n0"), Rule::Stays)],
            },
            Case {
                what: "no rebalance without a request: uneven stays uneven",
                nodes: &["n0", "n1"],
                units: &[("a", None, 0, true, false, 1, Some("n0")), ("b", None, 0, true, false, 1, Some("n0"))],
                unfit: &[],
                rebalance: false,
                want: &[("a", Some("n0"), Rule::Stays), ("b", Some("n0"), Rule::Stays)],
            },
            Case {
                what: "a new homeless unit starts on the least loaded active node, never a standby",
                nodes: &["s0:standby", "n0", "n1"],
                units: &[("a", None, 0, true, false, 1, Some("n0")), ("new", None, 0, true, false, 1, None)],
                unfit: &[],
                rebalance: false,
                want: &[("new", Some("n1"), Rule::Anywhere)],
            },
        ];
        for c in &cases {
            check(c);
        }
    }

    #[test]
    fn levelling_ends_balanced_and_never_moves_home_units() {
        // 3 nodes, 30 units of weights 1..=3 piled on n0, 6 of them homed there.
        let ns = nodes(&["n0", "n1", "n2"]);
        let units: Vec<Unit> = (0..30)
            .map(|i| Unit { name: format!("u{i}"), home: (i < 6).then_some(0), weight: 1 + (i % 3) as u32, ..Default::default() })
            .collect();
        let current = vec![Some(0); 30];
        let d = place_nodes(&NodesInput { nodes: &ns, units: &units, current: &current, fits: &|_, _| true, rebalance: true });
        let l = d.loads(&units, 3);
        let total: u64 = units.iter().map(|u| u.weight as u64).sum();
        assert_eq!(l.iter().sum::<u64>(), total);
        assert!(l.iter().max().unwrap() - l.iter().min().unwrap() <= 1, "loads {l:?}");
        for (u, unit) in units.iter().enumerate() {
            if unit.home == Some(0) {
                assert_eq!(d.owner[u], Some(0), "{} left home", unit.name);
            }
        }
        let moved = d.rule.iter().filter(|r| **r == Rule::Levelled).count();
        // 60 units of weight on one node, 40 to move: at most one move per weight-3 unit
        // and a few small ones.
        assert!(moved <= 20, "{moved} moves");
    }
}
