//! `cargo xtask run`: a lab in network namespaces. A switch (Linux bridge), a node with 3
//! adapters, 3 clients, and the real agent on the node with `examples/lab.toml`. Shows
//! which adapter each client resolved each VIP to, pulls a cable and plugs it back on a
//! timer, and prints the agent's status and each failover's timings until interrupted;
//! then stops the agent and removes the lab. With `--cluster`, the cluster lab instead
//! (see `cluster.rs`).

mod cluster;

use std::{
    net::UdpSocket,
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use vip_tests::{
    agentproc::{AgentFiles, AgentProc},
    load_dataplane,
    topo::Lab,
};

#[derive(Parser)]
#[command(about = "vip lab: the agent on a node with 3 adapters and 3 clients, in network namespaces")]
struct Cli {
    /// The cluster lab instead: etcd (3 members), 3 nodes with 2 client adapters and a
    /// cluster adapter each, 3 clients; the node holding the first group is killed (cables pulled,
    /// agent SIGKILLed) every --kill-every seconds and comes back as long after.
    #[arg(long)]
    cluster: bool,
    /// With --cluster: the cluster definitions to apply (node names n0..n2, adapters eth0
    /// and eth1, addresses in 192.0.2.0/24 outside .10-.89 and .150-.179).
    #[arg(long, default_value = "examples/cluster-defs.toml")]
    defs: PathBuf,
    /// With --cluster: kill a node, and bring it back, every this many seconds (0: never).
    #[arg(long, default_value_t = 10)]
    kill_every: u64,
    /// The agent's config; its adapters must be vip0..vip2 (the lab's).
    #[arg(long, default_value = "examples/lab.toml")]
    config: PathBuf,
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Pull vip1's cable, and plug it back, every this many seconds (0: never).
    #[arg(long, default_value_t = 8)]
    pull_every: u64,
}

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    let cli = Cli::parse();
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if cli.cluster {
        let o = cluster::Opts { defs: &cli.defs, duration: cli.duration, kill_every: cli.kill_every };
        if let Err(e) = cluster::run(o) {
            eprintln!("vip-lab: {e}");
            std::process::exit(1);
        }
        return;
    }
    let lab = Lab::bridged(3, 3);
    // A veth delivers XDP_TX frames only to a peer with an XDP program; a switch port
    // would need nothing.
    let mut peers = load_dataplane();
    lab.attach_peers(&mut peers);
    let files = AgentFiles::for_config(&cli.config);
    let agent = AgentProc::start(&lab.node, &files, &[]);
    println!(
        "lab up: node {} with adapters {}; agent log {}",
        lab.node.name,
        lab.adapters.iter().map(|a| format!("{} ({})", a.name, vip_packet::mac_str(&a.mac))).collect::<Vec<_>>().join(", "),
        files.log.display()
    );
    let vips: Vec<String> = agent.status().vips.iter().map(|v| v.address.clone()).collect();
    show_resolution(&lab, &vips);
    print!("{}", agent.status().human());

    let start = Instant::now();
    let mut seen = 0;
    let mut pulled = false;
    let mut tick = 0u64;
    while !STOP.load(Ordering::Relaxed) && (cli.duration == 0 || start.elapsed() < Duration::from_secs(cli.duration)) {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        let Some(s) = agent.try_status() else {
            println!("agent is gone; log:\n{}", agent.log_text());
            break;
        };
        let states: Vec<String> = s.adapters.iter().map(|a| format!("{} {}", a.name, a.state)).collect();
        let answering: Vec<String> = s.vips.iter().map(|v| format!("{} -> [{}]", v.address, v.answering.join(","))).collect();
        println!("[{tick:>4}s] {}  |  {}", states.join(", "), answering.join("  "));
        for f in &s.failovers[seen.min(s.failovers.len())..] {
            println!(
                "       failover: {} {} ({} VIPs) event -> maps written {:.1} µs, -> first announcement {}, announced from {}",
                f.adapter,
                f.kind,
                f.vips,
                f.maps_written_ns as f64 / 1e3,
                f.first_announcement_ns.map_or("-".into(), |n| format!("{:.1} µs", n as f64 / 1e3)),
                if f.announced_from.is_empty() { "-".into() } else { f.announced_from.join(",") }
            );
        }
        seen = s.failovers.len();
        if cli.pull_every > 0 && tick.is_multiple_of(cli.pull_every) {
            pulled = !pulled;
            if pulled {
                println!("==> pulling vip1's cable (switch port {} down)", lab.adapters[1].peer);
                lab.pull(1);
            } else {
                println!("==> plugging vip1's cable back in");
                lab.plug(1);
            }
            std::thread::sleep(Duration::from_millis(100));
            show_resolution(&lab, &vips);
        }
    }
    println!("stopping the agent and removing the lab");
    let st = agent.stop();
    if !st.success() {
        eprintln!("agent exited with {st}");
    }
}

/// Prints the adapter each client's kernel uses for each VIP now (resolving it first if
/// the client has no entry yet).
fn show_resolution(lab: &Lab, vips: &[String]) {
    for c in &lab.clients {
        let mut line = format!("  {}:", c.ns.name);
        for vip in vips {
            let entry = |c: &vip_tests::topo::Client| c.ns.ip(&["neigh", "show", vip]);
            if !entry(c).contains("lladdr") {
                let (target, bind) = if vip.contains(':') { (format!("[{vip}]:9"), "[::]:0") } else { (format!("{vip}:9"), "0.0.0.0:0") };
                c.ns.run(|| UdpSocket::bind(bind).and_then(|s| s.send_to(b"lab", target.as_str())).map(|_| ()).ok());
                std::thread::sleep(Duration::from_millis(30));
            }
            let out = entry(c);
            let mac = out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).unwrap_or("unresolved").to_string();
            let adapter = lab.adapters.iter().find(|a| vip_packet::mac_str(&a.mac) == mac).map(|a| a.name.clone()).unwrap_or_else(|| "-".into());
            line.push_str(&format!("  {vip} -> {adapter}"));
        }
        println!("{line}");
    }
}
