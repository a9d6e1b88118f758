//! Scenario tables for the placement core, in the style of Pacemaker's scheduler
//! regression files and CTDB's takeover tests: each file under `tests/scenarios/` is a
//! state in and the expected placement out, then steps (an adapter fails, returns, its
//! load or addresses change) each with what must hold afterwards. The format is described
//! in `tests/scenarios/README.md`.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
};

use vip_placement::{
    bit, classify, diff, place, slots, Adapter, Assignment, Classes, Input, Mode, Node, Reason, Slot, Subnet, Vip,
    BUCKETS, NO_SLOT,
};

#[derive(Default)]
struct Scn {
    adapters: Vec<Adapter>,
    nodes: Vec<Node>,
    vips: Vec<Vip>,
    steps: Vec<Step>,
}

#[derive(Default)]
struct Step {
    line: usize,
    changes: Vec<Change>,
    expects: Vec<Expect>,
}

enum Change {
    Up(Slot, bool),
    Load(Slot, f64),
    Subnets(Slot, Vec<Subnet>),
    Node(usize, bool),
}

#[derive(Default, Clone)]
struct VipExpect {
    answering: u64,
    away: bool,
    stranded: bool,
    buckets: Option<Vec<(Slot, usize)>>,
    kept: Option<usize>,
    /// Spread clients to move, counted per (from, to).
    moves: Option<Vec<(Slot, Slot, usize)>>,
}

enum Expect {
    Vip { line: usize, vips: Vec<u32>, want: VipExpect },
    Heir { line: usize, adapter: Slot, heir: Option<Slot> },
    Refuse { vips: Vec<u32>, adapter: Option<Slot>, reason: String },
    Changed { line: usize, vips: Vec<u32> },
}

fn err<T>(file: &str, line: usize, msg: impl std::fmt::Display) -> Result<T, String> {
    Err(format!("{file}:{line}: {msg}"))
}

/// `a.b.c.d` or `a.b.c.d-e` (the last octet, or last IPv6 group, running to `e`).
fn addr_range(s: &str) -> Result<Vec<IpAddr>, String> {
    let (first, last) = match s.rsplit_once('-') {
        Some((a, b)) => (a, Some(b)),
        None => (s, None),
    };
    let first: IpAddr = first.parse().map_err(|_| format!("{s:?} is not an address or range"))?;
    let Some(last) = last else { return Ok(vec![first]) };
    let mut out = vec![];
    match first {
        IpAddr::V4(a) => {
            let o = a.octets();
            let end: u8 = last.parse().map_err(|_| format!("bad range end in {s:?}"))?;
            for x in o[3]..=end {
                out.push(IpAddr::from([o[0], o[1], o[2], x]));
            }
        }
        IpAddr::V6(a) => {
            let g = a.segments();
            let end = u16::from_str_radix(last, 16).map_err(|_| format!("bad range end in {s:?}"))?;
            for x in g[7]..=end {
                let mut h = g;
                h[7] = x;
                out.push(IpAddr::from(h));
            }
        }
    }
    Ok(out)
}

fn yes(s: &str) -> Result<bool, String> {
    match s {
        "yes" | "up" => Ok(true),
        "no" | "down" => Ok(false),
        _ => Err(format!("{s:?}: expected yes/no or up/down")),
    }
}

fn parse(file: &str, text: &str) -> Result<Scn, String> {
    let mut scn = Scn::default();
    let mut section = "";
    let mut header: Vec<String> = vec![];
    let mut step = Step::default();
    let mut vip_of: HashMap<IpAddr, u32> = HashMap::new();
    let lines: Vec<(usize, &str)> =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim_end())).collect();
    let slot = |scn: &Scn, name: &str| -> Option<Slot> { scn.adapters.iter().position(|a| a.name == name).map(|i| i as Slot) };
    for (n, raw) in lines {
        if raw.trim().is_empty() {
            continue;
        }
        let indented = raw.starts_with(' ');
        let words: Vec<&str> = raw.split_whitespace().collect();
        if !indented {
            match words[0] {
                "adapters" | "nodes" | "vips" if words.len() == 1 => {
                    section = if words[0] == "adapters" { "adapters" } else if words[0] == "nodes" { "nodes" } else { "vips" };
                    header.clear();
                }
                "expect" => section = "expect",
                "step" => {
                    scn.steps.push(std::mem::take(&mut step));
                    step.line = n;
                    section = "";
                    let rest = words[1..].join(" ");
                    for change in rest.split(", ").map(str::trim).filter(|c| !c.is_empty()) {
                        let w: Vec<&str> = change.split_whitespace().collect();
                        let c = match w.as_slice() {
                            ["node", name, state] => {
                                let i = scn.nodes.iter().position(|x| x.name == *name);
                                let Some(i) = i else { return err(file, n, format!("no node {name}")) };
                                Change::Node(i, yes(state).map_err(|e| format!("{file}:{n}: {e}"))?)
                            }
                            [name, state] if !state.contains('=') => {
                                let Some(s) = slot(&scn, name) else { return err(file, n, format!("no adapter {name}")) };
                                Change::Up(s, yes(state).map_err(|e| format!("{file}:{n}: {e}"))?)
                            }
                            [name, kv] => {
                                let Some(s) = slot(&scn, name) else { return err(file, n, format!("no adapter {name}")) };
                                match kv.split_once('=') {
                                    Some(("load", v)) => Change::Load(s, v.parse().map_err(|_| format!("{file}:{n}: bad load"))?),
                                    Some(("subnets", v)) => Change::Subnets(s, subnets(v).map_err(|e| format!("{file}:{n}: {e}"))?),
                                    _ => return err(file, n, format!("unknown change {change:?}")),
                                }
                            }
                            _ => return err(file, n, format!("unknown change {change:?}")),
                        };
                        step.changes.push(c);
                    }
                }
                other => return err(file, n, format!("unknown section {other:?}")),
            }
            continue;
        }
        match section {
            "adapters" | "nodes" | "vips" if header.is_empty() => header = words.iter().map(|w| w.to_string()).collect(),
            "nodes" => {
                let col = |k: &str| header.iter().position(|h| h == k).map(|i| words[i]);
                let name = col("name").ok_or_else(|| format!("{file}:{n}: nodes need a name"))?.to_string();
                let up = col("up").map_or(Ok(true), yes).map_err(|e| format!("{file}:{n}: {e}"))?;
                scn.nodes.push(Node { name, up });
            }
            "adapters" => {
                if words.len() != header.len() {
                    return err(file, n, "a row needs one value per column");
                }
                let col = |k: &str| header.iter().position(|h| h == k).map(|i| words[i]).filter(|v| *v != "-");
                let node = match col("node") {
                    None => 0,
                    Some(name) => scn.nodes.iter().position(|x| x.name == name).ok_or_else(|| format!("{file}:{n}: no node {name}"))?,
                };
                let e = |e: String| format!("{file}:{n}: {e}");
                scn.adapters.push(Adapter {
                    name: col("name").ok_or_else(|| e("adapters need a name".into()))?.to_string(),
                    node,
                    up: col("up").map_or(Ok(true), yes).map_err(e)?,
                    weight: col("weight").map_or(Ok(1), |v| v.parse()).map_err(|_| format!("{file}:{n}: bad weight"))?,
                    load: col("load").map_or(Ok(0.0), |v| v.parse()).map_err(|_| format!("{file}:{n}: bad load"))?,
                    max_vips: col("max_vips").map(|v| v.parse()).transpose().map_err(|_| format!("{file}:{n}: bad max_vips"))?,
                    vlans: col("vlans").map_or(Ok(vec![]), |v| v.split(',').map(|x| x.parse()).collect()).map_err(|_| format!("{file}:{n}: bad vlans"))?,
                    subnets: col("subnets").map_or(Ok(vec![]), subnets).map_err(|e| format!("{file}:{n}: {e}"))?,
                });
            }
            "vips" => {
                if words.len() != header.len() {
                    return err(file, n, "a row needs one value per column");
                }
                let col = |k: &str| header.iter().position(|h| h == k).map(|i| words[i]).filter(|v| *v != "-");
                let e = |m: &str| format!("{file}:{n}: {m}");
                let mut homes = vec![];
                for h in col("homes").ok_or_else(|| e("vips need homes"))?.split(',') {
                    homes.push(slot(&scn, h).ok_or_else(|| e(&format!("no adapter {h}")))?);
                }
                let mode = match col("mode").unwrap_or("spread") {
                    "all" => Mode::All,
                    "primary" => Mode::Primary,
                    "spread" => Mode::Spread,
                    m => return err(file, n, format!("unknown mode {m}")),
                };
                let failover = col("failover").map_or(Ok(true), yes).map_err(|x| e(&x))?;
                let rebalance = col("rebalance").map_or(Ok(false), yes).map_err(|x| e(&x))?;
                let vlan = col("vlan").map_or(Ok(0), |v| v.parse()).map_err(|_| e("bad vlan"))?;
                let stay = col("stay").map_or(Ok(false), yes).map_err(|x| e(&x))?;
                let takers = match col("takers") {
                    None => None,
                    Some(t) => {
                        let mut v = vec![];
                        for a in t.split(',') {
                            v.push(slot(&scn, a).ok_or_else(|| e(&format!("no adapter {a}")))?);
                        }
                        Some(v.into())
                    }
                };
                let addrs = addr_range(col("address").ok_or_else(|| e("vips need an address"))?).map_err(|x| e(&x))?;
                for addr in addrs {
                    if vip_of.insert(addr, scn.vips.len() as u32).is_some() {
                        return err(file, n, format!("{addr} twice"));
                    }
                    scn.vips.push(Vip { addr, vlan, homes: homes.clone().into(), mode, failover, rebalance, stay, takers: takers.clone() });
                }
            }
            "expect" => {
                let e = |m: String| format!("{file}:{n}: {m}");
                let vips_of = |s: &str| -> Result<Vec<u32>, String> {
                    addr_range(s)?
                        .into_iter()
                        .map(|a| vip_of.get(&a).copied().ok_or_else(|| format!("{a} is not a VIP of this scenario")))
                        .collect()
                };
                let adapters_of = |s: &str| -> Result<u64, String> {
                    if s == "-" {
                        return Ok(0);
                    }
                    s.split(',').try_fold(0u64, |m, a| slot(&scn, a).map(|x| m | bit(x)).ok_or_else(|| format!("no adapter {a}")))
                };
                let x = match words[0] {
                    "heir" if words.len() == 3 => Expect::Heir {
                        line: n,
                        adapter: slot(&scn, words[1]).ok_or_else(|| e(format!("no adapter {}", words[1])))?,
                        heir: if words[2] == "-" { None } else { Some(slot(&scn, words[2]).ok_or_else(|| e(format!("no adapter {}", words[2])))?) },
                    },
                    "refuse" if words.len() >= 4 => Expect::Refuse {
                        vips: vips_of(words[1]).map_err(e)?,
                        adapter: if words[2] == "-" { None } else { Some(slot(&scn, words[2]).ok_or_else(|| e(format!("no adapter {}", words[2])))?) },
                        reason: words[3..].join(" "),
                    },
                    "changed" => Expect::Changed {
                        line: n,
                        vips: if words[1..] == ["none"] {
                            vec![]
                        } else {
                            let mut v = vec![];
                            for w in &words[1..] {
                                v.extend(vips_of(w).map_err(e)?);
                            }
                            v
                        },
                    },
                    _ => {
                        let vips = vips_of(words[0]).map_err(e)?;
                        let mut want = VipExpect {
                            answering: adapters_of(words.get(1).ok_or_else(|| e("expected adapters".into()))?).map_err(e)?,
                            ..Default::default()
                        };
                        let mut i = 2;
                        while i < words.len() {
                            match words[i] {
                                "away" => want.away = true,
                                "stranded" => want.stranded = true,
                                "kept" => {
                                    i += 1;
                                    want.kept = Some(words.get(i).and_then(|v| v.parse().ok()).ok_or_else(|| e("kept N".into()))?);
                                }
                                "moves" => {
                                    let mut m = vec![];
                                    while let Some((ft, c)) = words.get(i + 1).and_then(|w| w.split_once(':')) {
                                        let (f, t) = ft.split_once('>').ok_or_else(|| e(format!("moves FROM>TO:N, not {ft}")))?;
                                        let f = slot(&scn, f).ok_or_else(|| e(format!("no adapter {f}")))?;
                                        let t = slot(&scn, t).ok_or_else(|| e(format!("no adapter {t}")))?;
                                        m.push((f, t, c.parse().map_err(|_| e(format!("bad count {c}")))?));
                                        i += 1;
                                    }
                                    want.moves = Some(m);
                                }
                                "buckets" => {
                                    let mut b = vec![];
                                    while let Some((a, c)) = words.get(i + 1).and_then(|w| w.split_once(':')) {
                                        let s = slot(&scn, a).ok_or_else(|| e(format!("no adapter {a}")))?;
                                        b.push((s, c.parse().map_err(|_| e(format!("bad count {c}")))?));
                                        i += 1;
                                    }
                                    want.buckets = Some(b);
                                }
                                w => return err(file, n, format!("unknown expectation {w:?}")),
                            }
                            i += 1;
                        }
                        Expect::Vip { line: n, vips, want }
                    }
                };
                step.expects.push(x);
            }
            _ => return err(file, n, "indented line outside a section"),
        }
    }
    scn.steps.push(step);
    if scn.nodes.is_empty() {
        scn.nodes.push(Node { name: "node".into(), up: true });
    }
    Ok(scn)
}

fn subnets(v: &str) -> Result<Vec<Subnet>, String> {
    if v == "-" {
        return Ok(vec![]);
    }
    v.split(',').map(|s| s.parse()).collect()
}

fn reason_word(r: &Reason) -> String {
    match r {
        Reason::Vlan(v) => format!("vlan {v}"),
        Reason::Subnet => "subnet".into(),
        Reason::MaxVips(n) => format!("max_vips {n}"),
        Reason::NoOtherAdapter => "no-adapter".into(),
    }
}

fn names(scn: &Scn, mask: u64) -> String {
    if mask == 0 {
        return "-".into();
    }
    slots(mask).map(|s| scn.adapters[s as usize].name.as_str()).collect::<Vec<_>>().join(",")
}

fn counts(b: &[Slot; BUCKETS]) -> Vec<(Slot, usize)> {
    let mut c: Vec<(Slot, usize)> = vec![];
    for &s in b.iter().filter(|&&s| s != NO_SLOT) {
        match c.iter_mut().find(|x| x.0 == s) {
            Some(x) => x.1 += 1,
            None => c.push((s, 1)),
        }
    }
    c.sort();
    c
}

/// Runs a scenario; returns its failures.
fn run(file: &str, scn: &mut Scn) -> Vec<String> {
    let mut fails = vec![];
    let all: Vec<u32> = (0..scn.vips.len() as u32).collect();
    let mut classes: Classes = classify(&scn.vips, all.iter().copied(), &scn.adapters);
    let mut prev = Assignment::default();
    let steps = std::mem::take(&mut scn.steps);
    for step in &steps {
        let mut reclassify = false;
        for c in &step.changes {
            match c {
                Change::Up(s, u) => scn.adapters[*s as usize].up = *u,
                Change::Load(s, l) => scn.adapters[*s as usize].load = *l,
                Change::Node(i, u) => scn.nodes[*i].up = *u,
                Change::Subnets(s, v) => {
                    scn.adapters[*s as usize].subnets = v.clone();
                    reclassify = true;
                }
            }
        }
        if reclassify {
            let next = classify(&scn.vips, all.iter().copied(), &scn.adapters);
            prev = prev.carry(&classes, &next);
            classes = next;
        }
        let d = place(&Input { nodes: &scn.nodes, adapters: &scn.adapters, classes: &classes, previous: &prev });
        // Deterministic: the same input gives the same decision.
        let again = place(&Input { nodes: &scn.nodes, adapters: &scn.adapters, classes: &classes, previous: &prev });
        if again != d {
            fails.push(format!("{file}:{}: two runs on the same input differ", step.line));
        }
        let a = &d.assignment;
        let changes = diff(&prev, a);
        let mut covered = vec![false; scn.vips.len()];
        let mut want_refusals: Option<BTreeSet<(u32, String, String)>> = Some(BTreeSet::new());
        for x in &step.expects {
            match x {
                Expect::Vip { line, vips, want } => {
                    for &v in vips {
                        covered[v as usize] = true;
                        let addr = scn.vips[v as usize].addr;
                        let Some(r) = a.run_of(&classes, v) else {
                            fails.push(format!("{file}:{line}: {addr}: not placed"));
                            continue;
                        };
                        let got = VipExpect {
                            answering: r.allowed & a.up,
                            away: r.away,
                            stranded: r.stranded,
                            buckets: r.buckets.as_deref().map(counts),
                            kept: None,
                            moves: None,
                        };
                        let mut bad = vec![];
                        if got.answering != want.answering {
                            bad.push(format!("answered by {} (want {})", names(scn, got.answering), names(scn, want.answering)));
                        }
                        if got.away != want.away {
                            bad.push(format!("away {} (want {})", got.away, want.away));
                        }
                        if got.stranded != want.stranded {
                            bad.push(format!("stranded {} (want {})", got.stranded, want.stranded));
                        }
                        if let Some(wb) = &want.buckets {
                            let mut wb = wb.clone();
                            wb.sort();
                            if got.buckets.as_ref() != Some(&wb) {
                                let show = |b: &[(Slot, usize)]| {
                                    b.iter().map(|(s, n)| format!("{}:{n}", scn.adapters[*s as usize].name)).collect::<Vec<_>>().join(" ")
                                };
                                bad.push(format!("buckets {} (want {})", got.buckets.as_deref().map_or("none".into(), show), show(&wb)));
                            }
                        }
                        if let Some(k) = want.kept {
                            let old = prev.run_of(&classes, v).and_then(|r| r.buckets.clone());
                            let kept = match (old.as_deref(), r.buckets.as_deref()) {
                                (Some(o), Some(n)) => (0..BUCKETS).filter(|&b| o[b] == n[b]).count(),
                                _ => 0,
                            };
                            if kept != k {
                                bad.push(format!("kept {kept} buckets (want {k})"));
                            }
                        }
                        if let Some(wm) = &want.moves {
                            let (c, pos) = classes.of_vip[v as usize];
                            let rebalance = classes.list[c as usize].key.rebalance;
                            let mut got: Vec<(Slot, Slot, usize)> = vec![];
                            for s in changes.segments.iter().filter(|s| s.class == c && s.start <= pos && pos < s.start + s.len) {
                                for (_, f, t) in s.client_moves(rebalance) {
                                    match got.iter_mut().find(|x| x.0 == f && x.1 == t) {
                                        Some(x) => x.2 += 1,
                                        None => got.push((f, t, 1)),
                                    }
                                }
                            }
                            got.sort();
                            let mut wm = wm.clone();
                            wm.sort();
                            if got != wm {
                                let show = |m: &[(Slot, Slot, usize)]| {
                                    m.iter()
                                        .map(|(f, t, n)| format!("{}>{}:{n}", scn.adapters[*f as usize].name, scn.adapters[*t as usize].name))
                                        .collect::<Vec<_>>()
                                        .join(" ")
                                };
                                bad.push(format!("moves [{}] (want [{}])", show(&got), show(&wm)));
                            }
                        }
                        if !bad.is_empty() {
                            fails.push(format!("{file}:{line}: {addr}: {}", bad.join("; ")));
                        }
                    }
                }
                Expect::Heir { line, adapter, heir } => {
                    let got = a.heirs.get(*adapter as usize).copied().flatten();
                    if got != *heir {
                        let n = |h: Option<Slot>| h.map_or("-".to_string(), |s| scn.adapters[s as usize].name.clone());
                        fails.push(format!("{file}:{line}: heir of {}: {} (want {})", n(Some(*adapter)), n(got), n(*heir)));
                    }
                }
                Expect::Refuse { vips, adapter, reason, .. } => {
                    let a = adapter.map_or("-".to_string(), |s| scn.adapters[s as usize].name.clone());
                    for &v in vips {
                        want_refusals.get_or_insert_with(BTreeSet::new).insert((v, a.clone(), reason.clone()));
                    }
                }
                Expect::Changed { line, vips } => {
                    let mut got = BTreeSet::new();
                    for s in &changes.segments {
                        let members = &classes.list[s.class as usize].members;
                        got.extend(members[s.start as usize..(s.start + s.len) as usize].iter().copied());
                    }
                    let want: BTreeSet<u32> = vips.iter().copied().collect();
                    if got != want {
                        let show = |s: &BTreeSet<u32>| s.iter().map(|v| scn.vips[*v as usize].addr.to_string()).collect::<Vec<_>>().join(" ");
                        fails.push(format!("{file}:{line}: changed {} (want {})", show(&got), show(&want)));
                    }
                }
            }
        }
        for (v, c) in covered.iter().enumerate() {
            if !c {
                fails.push(format!("{file}:{}: step does not say where {} goes", step.line, scn.vips[v].addr));
            }
        }
        let mut got_refusals = BTreeSet::new();
        for r in &d.refusals {
            let members = &classes.list[r.class as usize].members;
            let a = r.adapter.map_or("-".to_string(), |s| scn.adapters[s as usize].name.clone());
            for &v in &members[r.start as usize..(r.start + r.len) as usize] {
                got_refusals.insert((v, a.clone(), reason_word(&r.reason)));
            }
        }
        if let Some(want) = want_refusals {
            let show = |s: &BTreeSet<(u32, String, String)>| {
                s.iter().map(|(v, a, r)| format!("{} {a} {r}", scn.vips[*v as usize].addr)).collect::<Vec<_>>().join("; ")
            };
            if want != got_refusals {
                fails.push(format!("{file}:{}: refusals [{}] (want [{}])", step.line, show(&got_refusals), show(&want)));
            }
        }
        prev = d.assignment;
    }
    fails
}

#[test]
fn scenarios() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let mut files: Vec<_> = std::fs::read_dir(&dir).expect("scenario dir").flatten().map(|e| e.path()).collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "scn"));
    files.sort();
    let mut fails = vec![];
    for p in &files {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(p).expect("read");
        match parse(&name, &text) {
            Ok(mut scn) => fails.extend(run(&name, &mut scn)),
            Err(e) => fails.push(e),
        }
    }
    println!("{} scenarios", files.len());
    assert!(fails.is_empty(), "{} failures:\n{}", fails.len(), fails.join("\n"));
    assert!(files.len() >= 30, "only {} scenarios", files.len());
}
