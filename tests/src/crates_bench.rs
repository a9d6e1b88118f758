//! `cargo xtask bench crates`: the design's crates beside the hand-written code the agent
//! keeps where a crate would be slower, in one run, variants interleaved round by round.
//!
//! - **Netlink**: the VIPs' local routes (100,000 at a start) added and removed by the
//!   agent's batched socket (256 requests per send, acks read as they come) and by
//!   `rtnetlink` (each route a request of its own, 256 in flight), at 3 and 100,000 routes;
//!   and the `rtnetlink` dumps the agent now makes (links, addresses, routes) with 100,000
//!   local routes in the table.
//! - **Metrics**: the Prometheus exposition, encoded by `prometheus-client` at each scrape,
//!   at 3, 1,024 (the most with per-VIP series) and 100,000 VIPs (groups only).

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use futures::StreamExt;
use vip_agent::{config::Subnet, netlink::Rtnl};

use crate::{
    bench::{dist, Dist},
    netns::NetNs,
};

fn prefixes(n: usize) -> Vec<Subnet> {
    (0..n).map(|i| Subnet { addr: IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i as u32)), prefix: 32 }).collect()
}

/// `rtnetlink`'s way: one request per route, `in_flight` at a time.
fn with_rtnetlink(rt: &tokio::runtime::Runtime, handle: &rtnetlink::Handle, lo: u32, ps: &[Subnet], add: bool, in_flight: usize) -> usize {
    rt.block_on(async {
        let reqs = ps.iter().map(|p| {
            let m = Rtnl::local_route_msg(lo, p);
            let h = handle.clone();
            async move {
                if add {
                    h.route().add(m).execute().await
                } else {
                    h.route().del(m).execute().await
                }
            }
        });
        futures::stream::iter(reqs).buffer_unordered(in_flight).filter(|r| futures::future::ready(r.is_ok())).count().await
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn row(name: &str, d: &Dist) -> String {
    format!("| {name} | {:.2} | {:.2} | {:.2} |\n", d.median, d.min, d.max)
}

pub fn run(rounds: usize) -> String {
    let ns = NetNs::new("nlb");
    ns.ip(&["link", "set", "lo", "up"]);
    let lo = ns.ifindex("lo");
    let report = ns.run(|| {
        let mut rtnl = Rtnl::open().expect("netlink");
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build().expect("runtime");
        let (conn, handle, _) = {
            let _in = rt.enter();
            rtnetlink::new_connection().expect("rtnetlink")
        };
        rt.spawn(conn);
        let mut s = String::from(
            "### Netlink: the VIPs' local routes, batched socket against `rtnetlink`\n\n\
             Milliseconds to add (then to remove) every VIP's local route in a fresh namespace; the\n\
             agent's batched socket (256 requests per send) beside `rtnetlink` (one request each,\n\
             256 in flight); variants alternating, round by round.\n\n\
             | routes, variant, step | median ms | min | max |\n|---|---|---|---|\n",
        );
        let mut ratios = vec![];
        for n in [3usize, 100_000] {
            let ps = prefixes(n);
            let (mut ba, mut bd, mut ra, mut rd) = (vec![], vec![], vec![], vec![]);
            for _ in 0..rounds {
                let t = Instant::now();
                let ok = rtnl.add_local_routes(lo, &ps).expect("batch add");
                ba.push(ms(t.elapsed()));
                assert!(ok.iter().all(|r| r.is_ok()), "batch add failed");
                let t = Instant::now();
                rtnl.del_local_routes(lo, &ps).expect("batch del");
                bd.push(ms(t.elapsed()));
                let t = Instant::now();
                assert_eq!(with_rtnetlink(&rt, &handle, lo, &ps, true, 256), n, "rtnetlink add failed");
                ra.push(ms(t.elapsed()));
                let t = Instant::now();
                assert_eq!(with_rtnetlink(&rt, &handle, lo, &ps, false, 256), n, "rtnetlink del failed");
                rd.push(ms(t.elapsed()));
            }
            let (ba, bd, ra, rd) = (dist(ba), dist(bd), dist(ra), dist(rd));
            s += &row(&format!("{n}, batched socket, add"), &ba);
            s += &row(&format!("{n}, rtnetlink, add"), &ra);
            s += &row(&format!("{n}, batched socket, remove"), &bd);
            s += &row(&format!("{n}, rtnetlink, remove"), &rd);
            ratios.push((n, ra.median / ba.median, rd.median / bd.median));
        }
        s += "\n";
        for (n, a, d) in ratios {
            s += &format!("At {n} routes `rtnetlink` takes **{a:.2}x** the batched socket's time to add them and **{d:.2}x** to remove them.\n");
        }
        // The dumps the agent makes through rtnetlink (at start and after each address
        // change), with 100,000 VIP routes in the local table.
        let ps = prefixes(100_000);
        rtnl.add_local_routes(lo, &ps).expect("batch add");
        let (mut l, mut a, mut r) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            let t = Instant::now();
            rtnl.links().expect("links");
            l.push(ms(t.elapsed()));
            let t = Instant::now();
            rtnl.addresses().expect("addresses");
            a.push(ms(t.elapsed()));
            let t = Instant::now();
            rtnl.routes().expect("routes");
            r.push(ms(t.elapsed()));
        }
        rtnl.del_local_routes(lo, &ps).expect("batch del");
        s += "\nThe agent's dumps through `rtnetlink`, 100,000 VIP routes in the local table (the\n\
              route dump asks the kernel for the main table only, with strict checking on):\n\n| dump | median ms | min | max |\n|---|---|---|---|\n";
        s += &row("links", &dist(l));
        s += &row("addresses", &dist(a));
        s += &row("routes (both families)", &dist(r));
        s
    });
    format!("## The design's crates (`cargo xtask bench crates`)\n\nMachine: {}\n\n{report}\n{}", crate::bench::machine(), metrics(rounds))
}

/// A status as a scrape sees it: `n` VIPs on 3 adapters, in groups of 1,000.
fn status(n: usize) -> vip_agent::status::Status {
    let adapters: Vec<serde_json::Value> = (0..3)
        .map(|i| serde_json::json!({"name": format!("eth{i}"), "ifindex": i + 2, "mac": null, "slot": i, "state": "up", "since": 0.0, "vips": n, "max_vips": null}))
        .collect();
    let vips: Vec<serde_json::Value> = (0..n)
        .map(|i| {
            let a = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i as u32);
            serde_json::json!({"address": a.to_string(), "vlan": 0, "id": i, "state": "active", "failover": true,
                "answering": ["eth0", "eth1", "eth2"], "answers": i * 7})
        })
        .collect();
    let groups: Vec<serde_json::Value> = (0..n.div_ceil(1000))
        .map(|g| serde_json::json!({"first": format!("g{g}a"), "last": format!("g{g}b"), "count": 1000, "vlan": 0, "mode": "spread",
            "adapters": ["eth0", "eth1", "eth2"], "answering": ["eth0", "eth1", "eth2"], "away": false, "stranded": false}))
        .collect();
    let decisions: Vec<(String, u64)> = (0..30).map(|d| (format!("decision_{d}"), d * 1000)).collect();
    serde_json::from_value(serde_json::json!({
        "config": "/etc/vip/agent.toml", "pin_path": "/sys/fs/bpf/vip", "started": 0.0, "adopted": false,
        "adapters": adapters, "vips": vips, "groups": groups, "failovers": [], "refusals": [], "decisions": decisions,
        "announcements_sent": 5, "announcements_queued": 0,
        "maps_written": {"counts": [1, 2, 3], "sum_ns": 1000, "count": 6}, "first_announcement": {"counts": [], "sum_ns": 0, "count": 0}
    }))
    .expect("a status")
}

fn metrics(rounds: usize) -> String {
    let mut s = String::from(
        "### Metrics: the Prometheus exposition by `prometheus-client`\n\n\
         Time to encode one scrape from a status (the agent does it on a blocking thread of its\n\
         control runtime, never on the event loop), and the bytes sent.\n\n\
         | VIPs | median ms | min | max | bytes |\n|---|---|---|---|---|\n",
    );
    for n in [3usize, 1024, 100_000] {
        let st = std::sync::Arc::new(status(n));
        let mut t = vec![];
        let mut bytes = 0;
        for _ in 0..rounds.max(5) {
            let st = st.clone();
            let t0 = Instant::now();
            bytes = vip_agent::metrics::encode(st, None).len();
            t.push(ms(t0.elapsed()));
        }
        let d = dist(t);
        s += &format!("| {n} | {:.3} | {:.3} | {:.3} | {bytes} |\n", d.median, d.min, d.max);
    }
    s
}
