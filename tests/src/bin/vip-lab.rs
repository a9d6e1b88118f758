//! `cargo xtask run`: a lab in network namespaces. A switch (Linux bridge), a node with 3
//! adapters answering for the VIPs through the XDP data plane, and 3 clients. Shows which
//! adapter each client's kernel resolved each VIP to, marks an adapter down and up again
//! on a timer, and prints the data plane's counters until interrupted; then removes the lab.

use std::{
    net::UdpSocket,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use clap::Parser;
use vip_common::{decision, ADAPTER_DOWN, ADAPTER_UP};
use vip_tests::{
    load_dataplane,
    topo::{Lab, VIP4, VIP6},
};

#[derive(Parser)]
#[command(about = "vip lab: a node with 3 adapters and 3 clients in network namespaces")]
struct Cli {
    /// Stop after this many seconds (0: run until Ctrl-C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Mark adapter vip1 down, then up again, every this many seconds (0: never).
    #[arg(long, default_value_t = 10)]
    flap_every: u64,
    /// XDP attach mode: native or skb.
    #[arg(long, default_value = "native")]
    mode: String,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() {
    let cli = Cli::parse();
    let mode = match cli.mode.as_str() {
        "native" => XdpMode::Driver,
        "skb" => XdpMode::Skb,
        m => {
            eprintln!("--mode must be native or skb, not {m}");
            std::process::exit(2);
        }
    };
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let lab = Lab::bridged(3, 3);
    let mut dp = load_dataplane();
    lab.start_dataplane(&mut dp, mode);
    println!("lab up: node {} with adapters {}", lab.node.name, lab.adapters.iter().map(|a| format!("{} ({})", a.name, vip_packet::mac_str(&a.mac))).collect::<Vec<_>>().join(", "));
    println!("VIPs {VIP4} and {VIP6}; clients {}", lab.clients.iter().map(|c| c.ns.name.as_str()).collect::<Vec<_>>().join(", "));
    show_resolution(&lab);

    let start = Instant::now();
    let mut last = dp.decisions().expect("counters");
    let mut down = false;
    let mut next_flap = cli.flap_every;
    let mut tick = 0u64;
    while !STOP.load(Ordering::Relaxed) && (cli.duration == 0 || start.elapsed() < Duration::from_secs(cli.duration)) {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        let now = dp.decisions().expect("counters");
        let changed: Vec<String> = (0..now.len())
            .filter(|&i| now[i] != last[i])
            .map(|i| format!("{}+{}", decision::NAMES[i], now[i] - last[i]))
            .collect();
        let answers: Vec<String> = lab
            .adapters
            .iter()
            .map(|a| format!("{}: {}", a.name, dp.answers(0, a.slot).unwrap_or(0) + dp.answers(1, a.slot).unwrap_or(0)))
            .collect();
        println!("[{tick:>4}s] answers per adapter {{{}}}  last second: {}", answers.join(", "), if changed.is_empty() { "-".into() } else { changed.join(" ") });
        last = now;
        if cli.flap_every > 0 && tick >= next_flap {
            next_flap += cli.flap_every;
            down = !down;
            let a = &lab.adapters[1];
            lab.set_adapter_state(&mut dp, a, if down { ADAPTER_DOWN } else { ADAPTER_UP });
            println!("==> adapter {} marked {} in the data plane", a.name, if down { "DOWN" } else { "UP" });
            show_resolution(&lab);
        }
    }
    println!("removing the lab");
}

/// Has each client's own kernel resolve both VIPs afresh and prints the adapter chosen.
fn show_resolution(lab: &Lab) {
    for c in &lab.clients {
        let mut line = format!("  {}:", c.ns.name);
        for (vip, target, bind) in [(VIP4.to_string(), format!("{VIP4}:9"), "0.0.0.0:0"), (VIP6.to_string(), format!("[{VIP6}]:9"), "[::]:0")] {
            let _ = std::process::Command::new("ip").args(["-n", &c.ns.name, "neigh", "flush", "to", &vip]).status();
            c.ns.run(|| UdpSocket::bind(bind).and_then(|s| s.send_to(b"lab", target.as_str())).map(|_| ()).ok());
            std::thread::sleep(Duration::from_millis(50));
            let out = c.ns.ip(&["neigh", "show", &vip]);
            let mac = out.split_whitespace().skip_while(|w| *w != "lladdr").nth(1).unwrap_or("unresolved").to_string();
            let adapter = lab.adapters.iter().find(|a| vip_packet::mac_str(&a.mac) == mac).map(|a| a.name.clone()).unwrap_or_else(|| "-".into());
            line.push_str(&format!("  {vip} -> {mac} ({adapter})"));
        }
        println!("{line}");
    }
}
