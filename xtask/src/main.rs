//! `cargo xtask`: set-up, build, run, test and benchmark vip. One function per verb; every
//! external command is printed before it runs; every failure says what was being done.

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// bpf-linker release known to work with the nightly toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the build, the tests, the lab and the benchmarks use: iproute2 and
/// ethtool for the lab; etcd for the cluster; protoc and its well-known types for the etcd
/// client's build; nftables for the cluster tests' partitions; systemd (systemd-analyze,
/// deb-systemd-helper) and util-linux (setpriv) for the package test.
const DEBIAN_PACKAGES: &[&str] =
    &["iproute2", "ethtool", "etcd-server", "protobuf-compiler", "libprotobuf-dev", "nftables", "systemd", "util-linux"];
/// Only `cargo xtask bench failover` and `bench cluster` need it: the comparison runs the real daemon.
const BENCH_PACKAGES: &[&str] = &["keepalived"];
/// `cargo xtask bench dataplane` lists the program as the kernel runs it.
const DATAPLANE_BENCH_PACKAGES: &[&str] = &["bpftool"];
const BPF_TARGET: &str = "bpfel-unknown-none";

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark vip (sets up missing tools itself)")]
struct Cli {
    #[command(subcommand)]
    verb: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Install what is missing: nightly rust-src, bpf-linker (cached), Debian packages.
    Setup,
    /// Build the XDP object (nightly, -Z build-std=core, bpf-linker).
    BuildEbpf,
    /// Run the lab: namespaces with a switch, a node of 3 adapters and 3 clients, the agent
    /// on examples/lab.toml, a cable pulled and plugged back on a timer, live status until
    /// Ctrl-C (`-- lab --help` for its options). With other arguments after `--`, run the
    /// agent itself with them on this host (`-- run --config FILE`, `-- status`).
    Run {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The whole suite: unit tests, then the root-only XDP and namespace tests.
    Test {
        /// Extra arguments for the root-only test binaries (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The Debian package (cargo-deb): the agent with its XDP object built in,
    /// /etc/vip/agent.toml (a conffile), the systemd unit, completions and the man page.
    /// Prints the .deb's path.
    Package,
    /// The fuzz test at depth: random and mutated frames (every packet-table row among the
    /// seeds) through the real XDP program against the independent oracle, `frames` per
    /// seed (the suite runs 120,000 with one seed).
    Fuzz {
        #[arg(long, default_value_t = 1_000_000)]
        frames: usize,
        /// Seeds, one run each (default: the suite's seed and two more).
        #[arg(long, value_delimiter = ',')]
        seeds: Vec<String>,
    },
    /// Benchmarks; results are written to docs/benchmarks.md.
    Bench {
        #[command(subcommand)]
        which: Bench,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum Bench {
    /// ns per frame through BPF_PROG_TEST_RUN beside an empty program, and ARP answers per
    /// second on veth: XDP responder against the kernel.
    Dataplane {
        /// Fewer samples, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
        /// Only the per-frame costs, not the veth answers per second (with --quick).
        #[arg(long, requires = "quick")]
        frames_only: bool,
    },
    /// Cable pulls: the agent (200 pulls) against keepalived's VRRP at advert_int 1 and at
    /// its smallest interval, seen from a client probing every 500 µs.
    Failover {
        /// Fewer pulls, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
    },
    /// Aggregate throughput to one VIP spread over 3 adapters against one adapter (links
    /// shaped alike), and the egress steering program's cost per frame.
    Steering {
        /// Fewer rounds, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
    },
    /// Node kills on the cluster lab (real etcd, 3 nodes; 120 at the default timing, 60 at
    /// a tight one): suspected, decided, answered by the new owner, client outage, overlap;
    /// etcd's request rate at 3 and 16 nodes; keepalived's VRRP in the same run; a table
    /// and a plot (docs/cluster.svg).
    Cluster {
        /// Fewer kills, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
    },
    /// The design's crates beside the hand-written code kept where they would be slower:
    /// the VIPs' local routes by the agent's batched netlink socket and by rtnetlink (3
    /// and 100,000), and the rtnetlink dumps with 100,000 routes in the table.
    Crates {
        /// Fewer rounds, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
    },
    /// 1,000, 10,000 and 100,000 VIPs on one agent: start-up, memory (agent and BPF maps),
    /// event to maps written over 60 cable pulls, clients' outage, status time; a table and
    /// a plot (docs/scale.svg).
    Scale {
        /// Fewer pulls and sizes, for a quick look (the docs are not rewritten).
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("entering {}", root.display()))?;
    match cli.verb {
        Verb::Setup => setup(),
        Verb::BuildEbpf => setup().and_then(|_| build_ebpf().map(|_| ())),
        Verb::Run { args } => run(&args),
        Verb::Test { args } => test(&args),
        Verb::Bench { which } => bench(which),
        Verb::Package => package().map(|deb| println!("{}", deb.display())),
        Verb::Fuzz { frames, seeds } => fuzz(frames, &seeds),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

fn is_root() -> bool {
    // Effective uid from /proc keeps xtask free of libc.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
        .unwrap_or(false)
}

/// Prints and runs a command; fails with its exit status.
fn sh(cmd: &mut Command) -> Result<()> {
    println!("+ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("starting {}", show(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(())
}

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {}", show(cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", show(cmd), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A cargo for the nightly toolchain, without the variables the outer (stable) cargo set.
fn nightly_cargo() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo"]);
    for v in ["RUSTC", "RUSTDOC", "RUSTC_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO", "CARGO_TARGET_DIR"] {
        c.env_remove(v);
    }
    c
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("vip")
}

fn bpf_linker_dir() -> PathBuf {
    cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}"))
}

fn setup() -> Result<()> {
    println!("==> set-up: nightly rust-src");
    let installed = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the `nightly` toolchain is needed for the eBPF build (rustup toolchain install nightly)")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("    rust-src: present");
    } else {
        sh(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }

    println!("==> set-up: bpf-linker {BPF_LINKER_VERSION}");
    let linker = bpf_linker_dir().join("bin/bpf-linker");
    if linker.exists() {
        println!("    {}: present", linker.display());
    } else {
        install_bpf_linker()?;
    }

    println!("==> set-up: Debian packages");
    ensure_packages(DEBIAN_PACKAGES)
}

/// Installs whichever of `packages` are missing (apt-get, as root).
fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|pkg| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", pkg])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
                .unwrap_or(false)
        })
        .copied()
        .collect();
    if missing.is_empty() {
        println!("    all present: {}", packages.join(", "));
    } else if is_root() {
        sh(Command::new("apt-get").arg("update").env("DEBIAN_FRONTEND", "noninteractive"))?;
        sh(Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    } else {
        println!("    missing {missing:?}; not root, so not installing (the root-only tests will be skipped)");
    }
    Ok(())
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM (Debian's LLVM 14 cannot
/// read LLVM 22 bitcode) into the cache folder.
fn install_bpf_linker() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM") && n.ends_with(".so"))
        .with_context(|| format!("no libLLVM*.so in {}", lib_dir.display()))?;
    let llvm = llvm.trim_start_matches("lib").trim_end_matches(".so");
    let major = llvm.trim_start_matches("LLVM-").split(['-', '.']).next().unwrap_or("22");
    let l = lib_dir.display();
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--no-default-features"])
        .args(["--features", &format!("llvm-{major},no-llvm-linking"), "--root"])
        .arg(bpf_linker_dir())
        .env("RUSTFLAGS", format!("-L {l} -l dylib={llvm} -C link-arg=-Wl,-rpath,{l}"));
    for v in ["RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN", "CARGO"] {
        cmd.env_remove(v);
    }
    sh(&mut cmd)
}

/// Builds the XDP object and returns its path.
fn build_ebpf() -> Result<PathBuf> {
    println!("==> build: XDP object");
    let path = format!("{}:{}", bpf_linker_dir().join("bin").display(), std::env::var("PATH").unwrap_or_default());
    sh(nightly_cargo()
        .args(["build", "-p", "vip-ebpf", "--release", "--target", BPF_TARGET, "-Z", "build-std=core"])
        .env("PATH", path))?;
    let obj = workspace_root().join("target").join(BPF_TARGET).join("release/vip");
    if !obj.exists() {
        bail!("the eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Runs a command, echoing its output, and counts the `SKIPPED:` lines tests print.
fn sh_counting_skips(cmd: &mut Command) -> Result<usize> {
    println!("+ {}", show(cmd));
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| show(cmd))?;
    let err = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut skips = 0;
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            if line.starts_with("SKIPPED:") {
                skips += 1;
            }
            eprintln!("{line}");
        }
        skips
    });
    let mut skips = 0;
    for line in BufReader::new(child.stdout.take().expect("piped")).lines().map_while(|l| l.ok()) {
        if line.starts_with("SKIPPED:") {
            skips += 1;
        }
        println!("{line}");
    }
    let status = child.wait()?;
    skips += err_thread.join().unwrap_or(0);
    if !status.success() {
        bail!("{} failed: {status}", show(cmd));
    }
    Ok(skips)
}

/// Builds the agent binary; returns its path.
fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = Command::new("cargo");
    cmd.args(["build", "-p", "vip-agent", "--bin", "vip-agent"]);
    if release {
        cmd.arg("--release");
    }
    sh(&mut cmd)?;
    let bin = workspace_root().join("target").join(if release { "release" } else { "debug" }).join("vip-agent");
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

/// cargo-deb, pinned: installed once into cargo's bin directory.
const CARGO_DEB_VERSION: &str = "3.8.0";

/// Builds the .deb and returns its path.
fn package() -> Result<PathBuf> {
    setup()?;
    build_ebpf()?;
    let agent = build_agent(true)?;
    println!("==> package: completions and man page from the agent's own definitions");
    let out = workspace_root().join("target/package");
    std::fs::create_dir_all(&out)?;
    for (shell, file) in [("bash", "vip-agent.bash"), ("zsh", "_vip-agent"), ("fish", "vip-agent.fish")] {
        let text = output(Command::new(&agent).args(["completions", shell]))?;
        std::fs::write(out.join(file), text)?;
    }
    let man = Command::new(&agent).arg("manpage").output().context("vip-agent manpage")?;
    if !man.status.success() {
        bail!("vip-agent manpage failed");
    }
    let gz = std::fs::File::create(out.join("vip-agent.1.gz"))?;
    let mut gzip = Command::new("gzip").args(["-9n", "-c"]).stdin(Stdio::piped()).stdout(gz).spawn().context("gzip")?;
    gzip.stdin.take().expect("piped").write_all(&man.stdout)?;
    if !gzip.wait()?.success() {
        bail!("gzip failed");
    }
    let have = Command::new("cargo").args(["deb", "--version"]).output().is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION));
    if !have {
        println!("==> set-up: cargo-deb {CARGO_DEB_VERSION}");
        sh(Command::new("cargo").args(["install", "cargo-deb", "--locked", "--version", CARGO_DEB_VERSION]))?;
    }
    println!("==> package: cargo deb");
    let listing = output(Command::new("cargo").args(["deb", "-p", "vip-agent", "--no-build"]).current_dir(workspace_root()))?;
    let deb = listing.lines().rev().map(str::trim).find(|l| l.ends_with(".deb")).map(PathBuf::from).context("cargo deb printed no .deb path")?;
    if !deb.exists() {
        bail!("{} was not written", deb.display());
    }
    Ok(deb)
}

fn fuzz(frames: usize, seeds: &[String]) -> Result<()> {
    setup()?;
    let obj = build_ebpf()?;
    if !is_root() {
        bail!("the fuzz test runs the XDP program through BPF_PROG_TEST_RUN in a namespace: run as root");
    }
    let defaults = ["0x5eed1234abcd0001", "0x0123456789abcdef", "0xfeedfacecafebeef"].map(String::from);
    let seeds = if seeds.is_empty() { &defaults[..] } else { seeds };
    for seed in seeds {
        let n = u64::from_str_radix(seed.trim_start_matches("0x"), if seed.starts_with("0x") { 16 } else { 10 })
            .with_context(|| format!("seed {seed:?} is not a number"))?;
        println!("==> fuzz: {frames} frames, seed {n:#x}");
        sh(Command::new("cargo")
            .args(["test", "--release", "-p", "vip-tests", "--test", "fuzz", "--", "--nocapture"])
            .env("VIP_EBPF_OBJECT", &obj)
            .env("VIP_FUZZ_FRAMES", frames.to_string())
            .env("VIP_FUZZ_SEED", n.to_string())
            .env("VIP_NO_SKIP", "1"))?;
    }
    println!("==> fuzz: {} seeds x {frames} frames, every invariant held", seeds.len());
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    setup()?;
    let obj = build_ebpf()?;
    let agent = build_agent(false)?;
    println!("==> test: unit tests (stable, unprivileged)");
    sh(Command::new("cargo").args(["test", "--workspace", "--exclude", "vip-tests", "--exclude", "vip-ebpf"]))?;
    println!("==> test: XDP and namespace tests (root)");
    let mut cmd = Command::new("cargo");
    cmd.args(["test", "-p", "vip-tests", "--", "--test-threads=1", "--nocapture"]).args(args).env("VIP_EBPF_OBJECT", &obj).env("VIP_AGENT_BIN", &agent);
    if is_root() {
        // The package test installs the .deb as an operator would.
        let deb = package()?;
        cmd.env("VIP_DEB", deb);
    }
    if is_root() {
        // As root nothing has a reason to be skipped: make any skip a failure.
        cmd.env("VIP_NO_SKIP", "1");
    }
    let skipped = sh_counting_skips(&mut cmd)?;
    if skipped > 0 {
        println!("==> {skipped} root-only tests skipped (not root); in CI they all run");
    } else {
        println!("==> all tests ran; none skipped");
    }
    Ok(())
}

/// No arguments: the lab with the agent on `examples/lab.toml`. Arguments: the agent
/// itself on this host's real adapters (`cargo xtask run -- run --config FILE`).
fn run(args: &[String]) -> Result<()> {
    setup()?;
    let obj = build_ebpf()?;
    let agent = build_agent(true)?;
    let lab_args: &[String] = match args.first().map(String::as_str) {
        None => &[],
        Some("lab") => &args[1..],
        Some(_) => {
            println!("==> run: vip-agent {}", args.join(" "));
            return sh(Command::new(&agent).args(args).env("VIP_EBPF_OBJECT", &obj));
        }
    };
    if !is_root() {
        bail!("the lab creates network namespaces and attaches XDP: run as root");
    }
    println!("==> run: lab with the agent on examples/lab.toml (Ctrl-C to stop; the lab is removed on exit)");
    sh(Command::new("cargo")
        .args(["run", "--release", "-p", "vip-tests", "--bin", "vip-lab", "--"])
        .args(lab_args)
        .current_dir(workspace_root())
        .env("VIP_EBPF_OBJECT", &obj)
        .env("VIP_AGENT_BIN", &agent))
}

fn bench(which: Bench) -> Result<()> {
    setup()?;
    let obj = build_ebpf()?;
    if !is_root() {
        bail!("benchmarks load XDP programs and create namespaces: run as root");
    }
    match which {
        Bench::Dataplane { quick, frames_only } => {
            println!("==> set-up: benchmark packages");
            ensure_packages(DATAPLANE_BENCH_PACKAGES)?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "dataplane"]);
            if quick {
                cmd.arg("--quick");
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            if frames_only {
                cmd.arg("--frames-only");
            }
            sh(cmd.env("VIP_EBPF_OBJECT", &obj))
        }
        Bench::Steering { quick } => {
            let agent = build_agent(true)?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "steering"]);
            if quick {
                cmd.arg("--quick");
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            sh(cmd.current_dir(workspace_root()).env("VIP_EBPF_OBJECT", &obj).env("VIP_AGENT_BIN", &agent))
        }
        Bench::Crates { quick } => {
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "crates"]);
            if quick {
                cmd.args(["--rounds", "2"]);
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            sh(cmd.current_dir(workspace_root()).env("VIP_EBPF_OBJECT", &obj))
        }
        Bench::Scale { quick } => {
            let agent = build_agent(true)?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "scale"]);
            if quick {
                cmd.args(["--sizes", "1000,10000", "--pulls", "5"]);
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            sh(cmd.current_dir(workspace_root()).env("VIP_EBPF_OBJECT", &obj).env("VIP_AGENT_BIN", &agent))
        }
        Bench::Cluster { quick } => {
            println!("==> set-up: benchmark packages");
            ensure_packages(BENCH_PACKAGES)?;
            let agent = build_agent(true)?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "cluster"]);
            if quick {
                cmd.args(["--kills", "10", "--ka-pulls", "2", "--ka-min-pulls", "10"]);
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            sh(cmd.current_dir(workspace_root()).env("VIP_EBPF_OBJECT", &obj).env("VIP_AGENT_BIN", &agent))
        }
        Bench::Failover { quick } => {
            println!("==> set-up: benchmark packages");
            ensure_packages(BENCH_PACKAGES)?;
            let agent = build_agent(true)?;
            let mut cmd = Command::new("cargo");
            cmd.args(["run", "--release", "-p", "vip-tests", "--bin", "vip-bench", "--", "failover"]);
            if quick {
                cmd.args(["--pulls", "20", "--ka-pulls", "2", "--ka-min-pulls", "10"]);
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            sh(cmd.current_dir(workspace_root()).env("VIP_EBPF_OBJECT", &obj).env("VIP_AGENT_BIN", &agent))
        }
    }
}
