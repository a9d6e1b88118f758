//! `cargo xtask bench dataplane`: the XDP data plane's cost per frame beside an empty
//! program, and ARP answers per second on veth against the kernel's own ARP, variants
//! interleaved in one run. `cargo xtask bench failover`: cable pulls with the agent
//! against keepalived's VRRP. Each prints a Markdown report; `--write FILE` puts it in FILE.

use std::{
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions, XdpMode};
use clap::{Parser, Subcommand};
use vip_common::decision;
use vip_packet::Arp;
use vip_tests::{
    bench::{dist, machine, ns, write_section, Dist},
    fixtures::{table, Arrival, TableEnv},
    load_dataplane,
    rawsock::RawSocket,
    topo::{Lab, VIP4},
};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    Dataplane {
        #[arg(long)]
        quick: bool,
        /// Only the per-frame costs (BPF_PROG_TEST_RUN), not the veth answers per second.
        #[arg(long)]
        frames_only: bool,
        /// Write the report into this Markdown file (its `dataplane` section).
        #[arg(long)]
        write: Option<String>,
    },
    Failover {
        /// Cable pulls with the agent.
        #[arg(long, default_value_t = 200)]
        pulls: usize,
        /// Cable pulls with keepalived at advert_int 1 (each takes several seconds).
        #[arg(long, default_value_t = 20)]
        ka_pulls: usize,
        /// Cable pulls with keepalived at its smallest advert_int.
        #[arg(long, default_value_t = 100)]
        ka_min_pulls: usize,
        /// Write the report into this Markdown file (its `failover` section).
        #[arg(long)]
        write: Option<String>,
    },
    Cluster {
        /// Node kills on the cluster lab at the default timing (and half as many at a tight one).
        #[arg(long, default_value_t = 120)]
        kills: usize,
        /// Node failures with keepalived at advert_int 1 (each takes several seconds).
        #[arg(long, default_value_t = 20)]
        ka_pulls: usize,
        /// Node failures with keepalived at its smallest advert_int.
        #[arg(long, default_value_t = 100)]
        ka_min_pulls: usize,
        /// Write the report into this Markdown file (its `cluster` section) and the plot beside it.
        #[arg(long)]
        write: Option<String>,
    },
    Steering {
        #[arg(long)]
        quick: bool,
        /// Write the report into this Markdown file (its `steering` section).
        #[arg(long)]
        write: Option<String>,
    },
    Crates {
        /// Rounds per variant.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Write the report into this Markdown file (its `crates` section).
        #[arg(long)]
        write: Option<String>,
    },
    Scale {
        /// VIP counts, one agent each, in one run.
        #[arg(long, value_delimiter = ',', default_values_t = [3, 1_000, 10_000, 100_000])]
        sizes: Vec<usize>,
        /// Cable pulls per size (after the first, 1 s after ready).
        #[arg(long, default_value_t = 60)]
        pulls: usize,
        /// Write the report into this Markdown file (its `scale` section) and the plot beside it.
        #[arg(long)]
        write: Option<String>,
    },
}

fn main() {
    let (quick, frames_only, write) = match Cli::parse().which {
        Which::Dataplane { quick, frames_only, write } => (quick, frames_only, write),
        Which::Cluster { kills, ka_pulls, ka_min_pulls, write } => {
            let report = vip_tests::cluster_bench::run(kills, ka_pulls, ka_min_pulls, write.as_deref());
            println!("{report}");
            if let Some(path) = write {
                write_section(&path, "cluster", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
                println!("written to {path}");
            }
            return;
        }
        Which::Crates { rounds, write } => {
            let report = vip_tests::crates_bench::run(rounds);
            println!("{report}");
            if let Some(path) = write {
                write_section(&path, "crates", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
                println!("written to {path}");
            }
            return;
        }
        Which::Steering { quick, write } => {
            let report = steering_report(quick);
            println!("{report}");
            if let Some(path) = write {
                write_section(&path, "steering", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
                println!("written to {path}");
            }
            return;
        }
        Which::Scale { sizes, pulls, write } => {
            let object = std::fs::read(vip_tests::object_path()).expect("reading the XDP object");
            let results: Vec<_> = sizes.iter().map(|&n| {
                let r = vip_tests::scale::measure(n, pulls, &object);
                eprintln!("{n} VIPs: start-up {:?}, RSS {} KiB, maps {} bytes", r.startup, r.rss_kib, r.map_bytes);
                r
            }).collect();
            let maps = results.last().map(|r| r.maps.clone()).unwrap_or_default();
            let report = vip_tests::scale::report(&results, write.as_deref(), &maps);
            println!("{report}");
            if let Some(path) = write {
                write_section(&path, "scale", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
                println!("written to {path}");
            }
            return;
        }
        Which::Failover { pulls, ka_pulls, ka_min_pulls, write } => {
            let object = std::fs::read(vip_tests::object_path()).expect("reading the XDP object");
            let report = vip_tests::failover::run(pulls, ka_pulls, ka_min_pulls, &object);
            println!("{report}");
            if let Some(path) = write {
                write_section(&path, "failover", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
                println!("written to {path}");
            }
            return;
        }
    };
    let mut report = String::new();
    report.push_str(&format!("## Data plane (`cargo xtask bench dataplane`)\n\nMachine: {}\n\n", machine()));
    report.push_str(&load_time(if quick { 3 } else { 7 }));
    report.push_str(&per_frame(if quick { 2_000 } else { 50_000 }));
    if !frames_only {
        report.push_str(&veth_answers(if quick { 2 } else { 10 }, Duration::from_millis(if quick { 300 } else { 1000 })));
    }
    println!("{report}");
    if let Some(path) = write {
        write_section(&path, "dataplane", report.trim_end()).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        println!("written to {path}");
    }
}

/// How long loading the object takes (the kernel's verifier, mostly): every start and
/// every live reload waits for it.
fn load_time(runs: usize) -> String {
    let bytes = std::fs::read(vip_tests::object_path()).expect("reading the XDP object");
    let times: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let dp = vip_agent::dataplane::Dataplane::load(&bytes).expect("load");
            let ms = t.elapsed().as_secs_f64() * 1e3;
            drop(dp);
            ms
        })
        .collect();
    let d = dist(times);
    format!(
        "Loading the object (maps created, every program verified by the kernel and loaded; a start and a\n\
         live reload wait for it): median {:.0} ms, min {:.0}, max {:.0} ({runs} loads).\n\n",
        d.median, d.min, d.max
    )
}

/// ns per frame through BPF_PROG_TEST_RUN. A hit rewrites the frame in place and the kernel
/// does not restore it between repetitions, so each sample is one run (`repeat = 1`); the
/// kernel's timer around that one run costs the same for every variant, and the empty
/// program shows what it is. Non-mutating cases are also run with `repeat = 1000`, which
/// spreads the timer over many frames.
fn per_frame(samples: usize) -> String {
    let env = TableEnv::new();
    let rows = table();
    let frame = |desc: &str| rows.iter().find(|r| r.desc == desc).unwrap_or_else(|| panic!("no row {desc}")).frame.clone();
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("ARP hit", frame("arp request for a VIP"), true),
        ("ARP miss", frame("arp request for an address not hosted"), false),
        ("NS hit", frame("neighbor solicitation for a VIP"), true),
        ("IPv4 UDP to a VIP (client learned)", frame("IPv4 UDP to a VIP: the client is learned"), false),
        ("IPv4 UDP, not to a VIP", frame("ordinary IPv4 UDP (not to a VIP)"), false),
    ];
    let ifindex = env.ifindex(Arrival::Up);
    let results = env.within(|env| {
        // The same program loaded with its log records on at debug (`[agent] ebpf_log =
        // "debug"`), its ring drained as the agent drains it.
        // The agent keeps the data plane's clock ticking (`FENCE_CLOCK`); so does the bench.
        // One CPU for every sample: a thread that moves between CPUs meets other caches,
        // and the variants' medians wander apart by a step of the clock.
        let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        pin(0, cpus - 1);
        let now = vip_agent::agent::monotonic_ns();
        env.dp.set_clock(now);
        let mut logged = env.logging_dataplane(4);
        logged.set_clock(now);
        let mut logs = logged.take_logs().expect("a log ring");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let drain = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    logs.flush();
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        // 0: vip_xdp; 1: the empty program; 2: vip_xdp logging at debug.
        let run = |which: usize, f: &[u8], repeat: u32| -> Duration {
            let prog = match which {
                0 => env.dp.responder(),
                1 => env.dp.pass_program(),
                _ => logged.responder(),
            }
            .expect("program");
            let mut ctx = [0u8; 24];
            ctx[4..8].copy_from_slice(&(f.len() as u32).to_ne_bytes());
            ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
            let mut out = vec![0u8; 256];
            prog.test_run(TestRunOptions { data_in: Some(f), data_out: Some(&mut out), ctx_in: Some(&ctx), repeat, ..Default::default() })
                .expect("test run")
                .duration
        };
        // Warm up, then interleave: every round runs each case under every program.
        for (_, f, _) in &cases {
            for _ in 0..1000 {
                for w in 0..3 {
                    run(w, f, 1);
                }
            }
        }
        let mut single: Vec<[Vec<f64>; 3]> = vec![[vec![], vec![], vec![]]; cases.len()];
        for _ in 0..samples {
            for (i, (_, f, _)) in cases.iter().enumerate() {
                for (w, samples) in single[i].iter_mut().enumerate() {
                    samples.push(ns(run(w, f, 1)));
                }
            }
        }
        let mut batched: Vec<Option<(Vec<f64>, Vec<f64>)>> = vec![None; cases.len()];
        for _ in 0..(samples / 100).max(20) {
            for (i, (_, f, mutates)) in cases.iter().enumerate() {
                if !mutates {
                    let b = batched[i].get_or_insert((vec![], vec![]));
                    b.0.push(ns(run(0, f, 1000)));
                    b.1.push(ns(run(1, f, 1000)));
                }
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drain.join().expect("log drain");
        (single, batched)
    });
    let (single, batched) = results;
    let listing = env.within(|env| xlated(env.dp.responder().expect("program")));
    let mut s = String::from(
        "### ns per frame through BPF_PROG_TEST_RUN, beside an empty XDP_PASS program\n\n\
         One run per sample (`repeat = 1`: a hit rewrites the frame in place, so repeating it would\n\
         measure the reply instead); variants interleaved round by round. The kernel's clock reads\n\
         around each run are in every figure, the empty program's included.\n\n\
         | frame | vip_xdp median | p99 | empty median | p99 | ratio of medians | extra ns |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let (x, e) = (dist(single[i][0].clone()), dist(single[i][1].clone()));
        s.push_str(&format!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x | {:.0} |\n",
            x.median, x.p99, e.median, e.p99, x.median / e.median, x.median - e.median
        ));
    }
    s.push_str(&format!("\nSamples per cell: {}.\n\n", samples));
    // The same cells as two runs (the first and the second half of the rounds): the
    // clock's steps (about 10 ns here) move a median a whole step, so the means (which
    // average the steps out) are shown beside the medians.
    s.push_str(
        "Repeatability: the rounds split into two runs (first half, second half), ratio to the\n\
         empty program by medians and by means of the middle 90%:\n\n\
         | frame | run 1 medians | run 2 medians | run 1 means | run 2 means | runs differ by (means) |\n\
         |---|---|---|---|---|---|\n",
    );
    // Means of the middle 90% (a scheduler tick in one sample would move a plain mean).
    let mean = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let (lo, hi) = (v.len() / 20, v.len() - v.len() / 20);
        v[lo..hi].iter().sum::<f64>() / (hi - lo).max(1) as f64
    };
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let h = single[i][0].len() / 2;
        let (x, e) = (&single[i][0], &single[i][1]);
        let med = |v: &[f64]| dist(v.to_vec()).median;
        let (m1, m2) = (med(&x[..h]) / med(&e[..h]), med(&x[h..]) / med(&e[h..]));
        let (a1, a2) = (mean(&x[..h]) / mean(&e[..h]), mean(&x[h..]) / mean(&e[h..]));
        s.push_str(&format!(
            "| {name} | {m1:.2}x | {m2:.2}x | {a1:.2}x | {a2:.2}x | {:.1}% |\n",
            (a1 - a2).abs() / a1.min(a2) * 100.0
        ));
    }
    s.push('\n');
    s.push_str(
        "The data plane's log records (aya-log, `[agent] ebpf_log`): the same program loaded with\n\
         the level at `debug` (an answer writes one record to the ring, which a thread drains as the\n\
         agent does; other frames pay the call that finds nothing to say at that level), beside it\n\
         loaded with logging `off` (the default: the verifier removes the logging code):\n\n\
         | frame | off median | debug median | p99 | debug / off |\n|---|---|---|---|---|\n",
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let (x, l) = (dist(single[i][0].clone()), dist(single[i][2].clone()));
        s.push_str(&format!("| {name} | {:.0} | {:.0} | {:.0} | {:.2}x |\n", x.median, l.median, l.p99, l.median / x.median));
    }
    s.push('\n');
    s.push_str(&listing);
    s.push_str(
        "Frames the program does not rewrite, `repeat = 1000` per sample (ns per frame, the clock\n\
         spread over 1000 runs):\n\n| frame | vip_xdp median | empty median | ratio |\n|---|---|---|---|\n",
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        if let Some((x, e)) = &batched[i] {
            let (x, e): (Dist, Dist) = (dist(x.clone()), dist(e.clone()));
            s.push_str(&format!("| {name} | {:.1} | {:.1} | {:.2}x |\n", x.median, e.median, x.median / e.median));
        }
    }
    s.push('\n');
    s
}

/// The program as the kernel runs it (`bpftool prog dump xlated`): instructions per BPF
/// function (the entry point and each `#[inline(never)]` one), in order.
fn xlated(prog: &aya::programs::Xdp) -> String {
    let id = prog.info().expect("program info").id();
    let out = std::process::Command::new("bpftool").args(["prog", "dump", "xlated", "id", &id.to_string()]).output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        _ => return "(bpftool is not installed: no instruction counts)\n\n".into(),
    };
    // The whole listing, for reading beside the figures.
    let _ = std::fs::write("target/vip_xdp.xlated.txt", &text);
    // "   N: (op) ..." per instruction; "call pc+K#bpf_prog_<tag>_F" calls a BPF function
    // at N + 1 + K; "call name#addr" a helper or a map's inlined-away lookup.
    let mut total = 0;
    let mut starts = std::collections::BTreeSet::from([0i64]);
    let mut helpers: std::collections::BTreeMap<String, usize> = Default::default();
    for line in text.lines() {
        let Some((n, rest)) = line.trim_start().split_once(": ") else { continue };
        let Ok(n) = n.parse::<i64>() else { continue };
        total += 1;
        if let Some(call) = rest.strip_prefix("(85) call ") {
            if let Some(k) = call.strip_prefix("pc").and_then(|c| c.split('#').next()).and_then(|k| k.parse::<i64>().ok()) {
                starts.insert(n + 1 + k);
            } else {
                *helpers.entry(call.split('#').next().unwrap_or(call).to_string()).or_default() += 1;
            }
        }
    }
    let sizes: Vec<i64> = starts.iter().zip(starts.iter().skip(1).chain(std::iter::once(&(total as i64)))).map(|(a, b)| b - a).collect();
    let mut s = format!(
        "`vip_xdp` as the kernel runs it (`bpftool prog dump xlated`, the listing in \
         `target/vip_xdp.xlated.txt`): **{total} instructions** in {} BPF functions (sizes in order: {}). \
         Out-of-line calls, by callee (call sites): {}.\n\n",
        sizes.len(),
        sizes.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(", "),
        helpers.iter().map(|(h, n)| format!("`{h}` {n}")).collect::<Vec<_>>().join(", ")
    );
    s.push('\n');
    s
}

/// Packets received on `dev` in the calling thread's namespace (/proc/thread-self, since
/// /sys and /proc/self show the process's namespace, not the thread's).
fn rx_packets(dev: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/thread-self/net/dev").expect("net/dev");
    let line = s.lines().find(|l| l.trim_start().starts_with(&format!("{dev}:"))).expect("device in net/dev");
    line.split(':').nth(1).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn pin(pid: i32, cpu: usize) {
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The threaded-NAPI kernel threads of `dev` (named `napi/<dev>-<id>`).
fn napi_threads(dev: &str) -> Vec<i32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim().starts_with(&format!("napi/{dev}-")) {
            out.push(pid);
        }
    }
    out
}

/// CPU time (user and system, in clock ticks) the threads `pids` have used so far.
fn cpu_ticks(pids: &[i32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After the command name in brackets: utime and stime are the 12th and 13th fields.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
            f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)
        })
        .sum()
}

fn ticks_per_second() -> f64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// Pins every threaded-NAPI kernel thread of `dev` to `cpu`.
fn pin_napi(dev: &str, cpu: usize) -> usize {
    let threads = napi_threads(dev);
    for pid in &threads {
        pin(*pid, cpu);
    }
    threads.len()
}

/// ARP answers per second on a veth pair: the XDP responder against the kernel answering
/// the same address configured on the node. The node's receive processing runs in a
/// threaded-NAPI kernel thread pinned to the last CPU; the sender and the client's
/// processing of replies share CPU 0. A sender thread offers requests with sendmmsg for
/// `window`; replies are counted on the client's interface.
fn veth_answers(rounds: usize, window: Duration) -> String {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(cpus >= 2, "the veth benchmark needs two CPUs (responder and sender apart)");
    let responder_cpu = cpus - 1;
    let lab = Lab::point_to_point(1);
    let mut dp = load_dataplane();
    // The client drops what it receives at XDP (a veth needs a program on the peer for
    // XDP_TX frames anyway): its CPU is left to the sender.
    let c = &lab.clients[0];
    c.ns.run(|| dp.attach_sink(&c.iface, XdpMode::Driver).expect("sink"));
    lab.fill_maps(&mut dp);
    let node = &lab.node;
    node.ip(&["addr", "add", &format!("{VIP4}/24"), "dev", "vip0"]);
    // GRO gives the veth a NAPI instance without XDP too, so both variants are received
    // the same way; threaded NAPI lets that work be pinned.
    node.exec("ethtool", &["-K", "vip0", "gro", "on"]);
    node.exec("sh", &["-c", "echo 1 > /sys/class/net/vip0/threaded"]);
    c.ns.exec("sh", &["-c", "echo 1 > /sys/class/net/eth0/threaded"]);
    // A veth hands a frame to its peer's NAPI only if it cannot be segmentation offload
    // (with TSO on the sender's side it goes to the sending CPU's backlog instead, and the
    // kernel variant's work ran on the sender's CPU). Attaching XDP on the node turns the
    // client's TSO off by itself; off for both variants, both are received on CPU 1.
    c.ns.exec("ethtool", &["-K", "eth0", "tso", "off"]);
    let req = Arp::request(c.mac, c.ip4, VIP4).to_bytes();

    // (answers/s, offered/s, answered by XDP, share of the round the node's NAPI thread
    // was on its CPU)
    let measure = |dp: &vip_agent::dataplane::Dataplane| -> (f64, f64, u64, f64) {
        assert!(pin_napi("vip0", responder_cpu) > 0, "no NAPI thread for the node's adapter");
        // The client's NAPI thread only drops frames (`vip_sink`): at real-time priority it
        // runs whenever replies wait, so the scheduler's turns between it and the sender
        // on CPU 0 do not decide how many replies are counted.
        for pid in napi_threads("eth0") {
            pin(pid, 0);
            let param = libc::sched_param { sched_priority: 50 };
            unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) };
        }
        std::thread::sleep(Duration::from_millis(50));
        let before_answered = dp.decisions().unwrap()[decision::ANSWERED_ARP as usize];
        let busy0 = cpu_ticks(&napi_threads("vip0"));
        let (replies, sent, elapsed) = c.ns.run(|| {
            pin(0, 0);
            let sock = RawSocket::open_sender(&c.iface).expect("socket");
            let rx0 = rx_packets(&c.iface);
            let start = Instant::now();
            let mut sent = 0;
            while start.elapsed() < window {
                sent += sock.send_many(&req, 256).expect("send");
            }
            let elapsed = start.elapsed();
            (rx_packets(&c.iface) - rx0, sent, elapsed)
        });
        let answered = dp.decisions().unwrap()[decision::ANSWERED_ARP as usize] - before_answered;
        let secs = elapsed.as_secs_f64();
        let busy = (cpu_ticks(&napi_threads("vip0")) - busy0) as f64 / ticks_per_second() / secs;
        (replies as f64 / secs, sent as f64 / secs, answered, busy)
    };

    type M = (f64, f64, u64, f64);
    // Each variant: the program attached on the node (none: the kernel answers), and
    // whether the responder answers. The third sends every request back unchanged, with
    // no work done: what XDP_TX itself costs here.
    let variants = [(Some(vip_common::names::PROGRAM), true), (None, false), (Some(vip_common::names::BOUNCE_PROGRAM), false)];
    let mut results: [Vec<M>; 3] = Default::default();
    // Round 0 warms every variant up (caches, the neighbour table, the NAPI threads' first
    // placement) and is not counted: first rounds measured up to a third low.
    for round in 0..=rounds {
        for (i, &(program, responds)) in variants.iter().enumerate() {
            let link = program.map(|p| node.run(|| dp.attach_program(p, "vip0", XdpMode::Driver).expect("attach")));
            std::thread::sleep(Duration::from_millis(100));
            let m = measure(&dp);
            assert_eq!(m.2 > 0, responds, "{program:?} on the node: {} answered by the responder", m.2);
            assert!(m.0 > 0.0, "{program:?} on the node: nothing came back");
            if round > 0 {
                results[i].push(m);
            }
            if let (Some(p), Some(l)) = (program, link) {
                dp.detach_program(p, l).expect("detach");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    let [xdp, kernel, bounce] = results;
    let col = |v: &Vec<M>, f: fn(&M) -> f64| dist(v.iter().map(f).collect());
    // Each round's XDP / kernel ratio (the variants alternate within a round).
    let per_round: Vec<f64> = xdp.iter().zip(&kernel).map(|(x, k)| x.0 / k.0).collect();
    let pr = dist(per_round.clone());
    let (xa, ka) = (col(&xdp, |m| m.0), col(&kernel, |m| m.0));
    let (xo, ko) = (col(&xdp, |m| m.1), col(&kernel, |m| m.1));
    // Answers per second of the node's NAPI thread's CPU time: the responder's capacity
    // whether or not the sender kept it busy.
    let per_cpu = |v: &Vec<M>| dist(v.iter().filter(|m| m.3 > 0.0).map(|m| m.0 / m.3).collect());
    let (xc, kc, bc) = (per_cpu(&xdp), per_cpu(&kernel), per_cpu(&bounce));
    let ba = col(&bounce, |m| m.0);
    format!(
        "### ARP answers per second on veth: XDP responder against the kernel\n\n\
         Client namespace wired to the node by one veth pair. The node's receive processing runs\n\
         in a threaded-NAPI kernel thread pinned to CPU {responder_cpu}, in both variants (the client's TSO\n\
         is off: a veth gives frames it could segment to the sending CPU's backlog instead of its\n\
         peer's NAPI; attaching XDP turns it off by itself, so before this was set the kernel\n\
         variant ran on the sender's CPU). One sender thread (CPU 0) offers\n\
         broadcast ARP requests for {VIP4} with sendmmsg (a send-only socket, no queueing\n\
         discipline) for {:.1} s per round, and the client's\n\
         NAPI thread is pinned to CPU 0 as well, at real-time priority; it drops every reply at XDP\n\
         (`vip_sink`), so the client's own processing of replies does not limit the count. Answers are counted on the\n\
         client's interface (a veth counts every frame its XDP program sees). The kernel variant has the address configured on the node's adapter and no XDP\n\
         program there; the XDP variant has the responder attached in native mode (the address\n\
         stays configured). The third variant is `vip_bounce` attached instead: every request\n\
         sent back as it came (a broadcast), no work at all, so it shows what XDP_TX itself costs\n\
         on a veth.\n\
         {rounds} rounds after one not counted, variants alternating. *Busy* is\n\
         the node's NAPI thread's CPU time over the round (clock ticks, about 1%); answers per\n\
         CPU-second divides the answers by it: the responder's capacity, whether or not the\n\
         sender kept it busy.\n\n\
         | variant | answers/s median | min | max | offered requests/s median | busy (median) | answers per CPU-second (median) |\n|---|---|---|---|---|---|---|\n\
         | XDP responder | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.0} |\n\
         | kernel ARP | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.0} |\n\
         | XDP_TX, no work (`vip_bounce`) | {:.0} | {:.0} | {:.0} | {:.0} | {:.0}% | {:.0} |\n\n\
         Ratio XDP / kernel (medians): **{:.2}x** answers per second; per round: {} (lowest {:.2}x).\n\
         Per CPU-second of the responder: **{:.2}x**. XDP_TX with no work against the kernel, per\n\
         CPU-second: {:.2}x; the responder answers {:.0}% as many per CPU-second as it does: on\n\
         a veth the frame's way in and out, not the program, sets the ratio.\n\n\
         Offered is what the sender got through sendmmsg. {}\n",
        window.as_secs_f64(),
        xa.median, xa.min, xa.max, xo.median, col(&xdp, |m| m.3).median * 100.0, xc.median,
        ka.median, ka.min, ka.max, ko.median, col(&kernel, |m| m.3).median * 100.0, kc.median,
        ba.median, ba.min, ba.max, col(&bounce, |m| m.1).median, col(&bounce, |m| m.3).median * 100.0, bc.median,
        xa.median / ka.median,
        per_round.iter().map(|r| format!("{r:.2}x")).collect::<Vec<_>>().join(", "),
        pr.min,
        xc.median / kc.median,
        bc.median / kc.median,
        xc.median / bc.median * 100.0,
        limits((xa.median / xo.median, col(&xdp, |m| m.3).median), (ka.median / ko.median, col(&kernel, |m| m.3).median)),
    )
}

/// What limited each variant, from the share of offered requests it answered and how busy
/// the node's NAPI thread was (medians).
fn limits(xdp: (f64, f64), kernel: (f64, f64)) -> String {
    let say = |name: &str, (share, busy): (f64, f64)| {
        let what = if share < 0.98 {
            format!("answered {:.0}% of what was offered (the rest was dropped on the node)", share * 100.0)
        } else {
            format!("answered {:.0}% of what was offered", share * 100.0)
        };
        let why = if busy >= 0.95 {
            "its CPU was busy throughout: its figure is its own capacity".to_string()
        } else {
            format!("its CPU was busy {:.0}% of the time: its figure is the sender's rate, a lower bound", busy * 100.0)
        };
        format!("The {name} {what}; {why}.")
    };
    format!("{} {}", say("XDP responder", xdp), say("kernel", kernel))
}

fn steering_report(quick: bool) -> String {
    use vip_tests::steering::{egress_cost, throughput, LINK_MBIT};
    let object = std::fs::read(vip_tests::object_path()).expect("reading the XDP object");
    let (rounds, clients, window) = if quick { (1, 6, Duration::from_millis(700)) } else { (5, 12, Duration::from_secs(2)) };
    let t = throughput(rounds, clients, window, &object);
    let (s, o) = (dist(t.spread.clone()), dist(t.one.clone()));
    let mut r = format!("## Steering (`cargo xtask bench steering`)\n\nMachine: {}\n\n", machine());
    r += &format!(
        "### Aggregate throughput to one VIP: spread over 3 adapters against one adapter\n\n\
         {clients} clients on one bridge send 1200-byte UDP datagrams to the VIP as fast as they can; the node \
         counts what arrives for {:.1} s. Each adapter's link is the switch port toward it, shaped to \
         {LINK_MBIT} Mbit/s (tbf), so an adapter is a link of fixed capacity as on a real switch. `spread`: \
         the VIP in spread mode on vip0..vip2 (clients per adapter in round 1: {:?}). `one adapter`: the VIP \
         on vip0 only. {rounds} rounds, the two variants alternating.\n\n\
         | variant | median Mbit/s | min | max | rounds |\n|---|---|---|---|---|\n\
         | spread over 3 adapters | {:.0} | {:.0} | {:.0} | {} |\n| one adapter | {:.0} | {:.0} | {:.0} | {} |\n\n\
         **Ratio of medians: {:.2}x** (the ideal is 3x; with the shares even, as above, the gap is the \
         machine's 2 vCPUs, which both generate and receive the traffic).\n\n",
        window.as_secs_f64(),
        t.shares,
        s.median, s.min, s.max, s.n, o.median, o.min, o.max, o.n,
        s.median / o.median
    );
    let samples = if quick { 30 } else { 300 };
    r += "### Egress steering: ns per frame through BPF_PROG_TEST_RUN, beside an empty TC program\n\n\
          `repeat = 1000` per sample (a steer rewrites the MACs to the same values each time), variants \
          interleaved. The empty program's figure is the test-run harness itself.\n\n\
          | frame | vip_egress median | p99 | empty median | p99 | extra ns (medians) |\n|---|---|---|---|---|---|\n";
    for (name, e, p) in egress_cost(samples) {
        r += &format!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            e.median, e.p99, p.median, p.p99, e.median - p.median
        );
    }
    r
}
