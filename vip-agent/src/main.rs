//! `vip-agent`: run the agent, check a config, or ask a running agent for its status.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use vip_agent::{
    agent::{Agent, NetlinkHost},
    announce::Announcer,
    config::Config,
    control,
    dataplane::Counters,
    netlink::{HostEvents, LinkEvents, Rtnl},
    runtime::{self, Exit, Msg},
    ConfigInvalid,
};

/// Keeps virtual IP addresses reachable across adapter and link failures: an XDP data
/// plane answers ARP and neighbor solicitations on every healthy adapter, and the agent
/// rewrites its maps and announces moved addresses within microseconds of a failure.
#[derive(Parser)]
#[command(name = "vip-agent", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent until SIGINT or SIGTERM, then take back everything it changed. On
    /// SIGUSR1 it exits leaving the data plane answering for the next agent to adopt. On
    /// SIGHUP it reloads the config live, as `vip-agent reload` does, and logs the result.
    Run {
        /// The TOML config (see docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Another XDP object than the one built into this binary (for development).
        #[arg(long, env = "VIP_EBPF_OBJECT")]
        bpf_object: Option<PathBuf>,
        /// Replace the program of pinned attachments a previous agent left (an upgrade)
        /// instead of adopting them as they are.
        #[arg(long)]
        reload: bool,
        /// Run in this network namespace (a name under /run/netns).
        #[arg(long)]
        netns: Option<String>,
        /// Log as JSON lines instead of text.
        #[arg(long)]
        log_json: bool,
    },
    /// Validate a config against this host without changing anything. Exit code 2 on
    /// any error in the config, each naming the file, line and key (1 if the host cannot
    /// be read).
    Check {
        #[arg(long, short)]
        config: PathBuf,
        /// Check against this network namespace (a name under /run/netns).
        #[arg(long)]
        netns: Option<String>,
    },
    /// The cluster (a `[cluster]` table in the config): its definitions and its status.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Undo what an agent changed on this host when no agent will run again (it was
    /// killed, its package is being removed): its recorded routes, addresses and sysctls
    /// (the kernel's defaults when the record is unreadable), and its pins, which detaches
    /// its programs. Refuses while an agent runs. Needs no config: the defaults, or the
    /// paths of --config.
    Cleanup {
        /// The config whose control_socket and pin_path to clean up after.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Run in this network namespace (a name under /run/netns).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Apply the edited config file to the running agent, live: VIPs and adapters added,
    /// removed or changed while every VIP in both versions keeps being answered. A file
    /// with an error changes nothing (exit code 2, naming the file, line and key); so does
    /// a change only a restart can apply (control_socket, pin_path, metrics_listen,
    /// xdp_mode, [steering] egress, a [cluster] table) (exit code 1).
    Reload {
        /// The agent's config (its control_socket is used; the agent re-reads its own).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket [default: /run/vip-agent.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), generated from these very definitions.
    Manpage,
    /// Show a running agent's adapters, VIPs, recent failovers and refusals.
    Status {
        /// The agent's config (its control_socket is used).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket [default: /run/vip-agent.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
        /// Only this VIP (its group, adapters, clients and refusals).
        #[arg(long)]
        vip: Option<std::net::IpAddr>,
        /// Only this adapter (the VIPs it answers, its clients, failovers and refusals).
        #[arg(long)]
        adapter: Option<String>,
        /// Show it again every this many seconds until interrupted.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Check a definitions file (the cluster's [[vip]] groups) and write it to etcd, where
    /// every node reads it and acts on it without a restart. Exit code 2 on any error in
    /// the file, each naming the file, line and key; nothing is written then.
    Apply {
        /// The definitions (see docs/cluster.md).
        file: PathBuf,
        /// A node's config: its [cluster] table says which cluster and where etcd is.
        #[arg(long, short)]
        config: PathBuf,
        /// Check only.
        #[arg(long)]
        dry_run: bool,
    },
    /// Ask the leader to even the load: units (virtual servers, and groups of their own)
    /// whose home node is up go home, standby nodes give back what has a better place,
    /// and the rest is levelled over the active nodes by weight, moving as few as it can.
    /// Each move is a handover (the holder lets go first).
    Rebalance {
        /// A node's config: its [cluster] table says which cluster and where etcd is.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The cluster as the local agent sees it: leader, nodes and their health, where each
    /// group of VIPs is answered, recent takeovers with their timings.
    Status {
        /// The agent's config (its control_socket is used).
        #[arg(long, short, conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The control socket [default: /run/vip-agent.sock].
        #[arg(long)]
        socket: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// `vip-agent cluster apply`.
fn cluster_apply(file: &std::path::Path, config: &std::path::Path, dry_run: bool) -> ExitCode {
    let cc = match cluster_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}:0: cannot read the file: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let defs = match vip_agent::config::parse_defs(file, &text) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let vips: u64 = defs.groups.iter().map(|g| g.count as u64).sum();
    if dry_run {
        println!("{}: ok ({} groups, {vips} VIPs, {} virtual servers)", file.display(), defs.groups.len(), defs.servers.len());
        return ExitCode::SUCCESS;
    }
    match etcd_put(&cc, |k| k.defs(), vip_cluster::store::encode(&defs)) {
        Ok(rev) => {
            println!(
                "{}: applied to cluster {} ({} groups, {vips} VIPs, {} virtual servers) at revision {rev}",
                file.display(),
                cc.name,
                defs.groups.len(),
                defs.servers.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vip-agent: writing to etcd: {e}");
            ExitCode::from(1)
        }
    }
}

/// `vip-agent cluster rebalance`: a request the leader carries out (its revision is the
/// request's identity; the assignment records the last one done).
fn cluster_rebalance(config: &std::path::Path) -> ExitCode {
    let cc = match cluster_config(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let who = format!("{{\"by\":{:?},\"at\":{}}}", cc.node, std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()));
    match etcd_put(&cc, |k| k.rebalance(), who.into_bytes()) {
        Ok(rev) => {
            println!("rebalance requested in cluster {} at revision {rev}; `vip-agent cluster status` shows the moves", cc.name);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vip-agent: writing to etcd: {e}");
            ExitCode::from(1)
        }
    }
}

/// The `[cluster]` table of a node's config (exit 2 when there is none).
fn cluster_config(config: &std::path::Path) -> Result<vip_agent::config::ClusterConfig, ExitCode> {
    let cfg = load_config(config)?;
    cfg.cluster.ok_or_else(|| {
        eprintln!("{}: no [cluster] table: this node is not in a cluster", config.display());
        ExitCode::from(2)
    })
}

/// One put to the cluster's etcd; the revision it made.
fn etcd_put(cc: &vip_agent::config::ClusterConfig, key: impl FnOnce(&vip_cluster::store::Keys) -> String, value: Vec<u8>) -> Result<i64, vip_cluster::store::StoreError> {
    let eps = cluster_endpoints(cc);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let key = key(&vip_cluster::store::Keys::new(&cc.name));
    rt.block_on(async {
        let mut c = vip_cluster::store::connect(&eps).await?;
        let r = c.put(key, value, None).await?;
        Ok(r.header().map_or(0, |h| h.revision()))
    })
}

fn cluster_endpoints(cc: &vip_agent::config::ClusterConfig) -> vip_cluster::store::Endpoints {
    let s = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());
    vip_cluster::store::Endpoints {
        urls: cc.endpoints.clone(),
        ca: s(&cc.ca),
        cert: s(&cc.cert),
        key: s(&cc.key),
        timeout: Duration::from_millis(cc.request_timeout_ms),
    }
}

fn control_socket(config: Option<PathBuf>, socket: Option<PathBuf>) -> Result<PathBuf, ExitCode> {
    Ok(match (config, socket) {
        (Some(c), _) => load_config(&c)?.agent.control_socket,
        (None, Some(s)) => s,
        (None, None) => PathBuf::from("/run/vip-agent.sock"),
    })
}

fn enter_netns(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{name}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("entering {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.cmd, Cmd::Run { .. }) {
        // A command's output piped into `head` ends quietly when the pipe closes, as a
        // Unix tool's does (Rust ignores SIGPIPE and println! would panic instead). The
        // agent itself keeps ignoring it: a closed client socket must not kill it.
        // SAFETY: restores the default action of one signal before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.cmd {
        Cmd::Cleanup { config, netns } => {
            let (socket, pin) = match &config {
                Some(c) => match load_config(c) {
                    Ok(cfg) => (cfg.agent.control_socket.clone(), cfg.agent.pin_path.clone()),
                    Err(code) => return code,
                },
                None => (PathBuf::from("/run/vip-agent.sock"), PathBuf::from("/sys/fs/bpf/vip")),
            };
            match cleanup(&socket, &pin, netns.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("vip-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "vip-agent", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::Manpage => match clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("vip-agent: {e}");
                ExitCode::from(1)
            }
        },
        Cmd::Check { config, netns } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let host = netns
                .as_deref()
                .map_or(Ok(()), enter_netns)
                .and_then(|()| NetlinkHost::read(&mut Rtnl::open()?));
            let host = match host {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("vip-agent: reading the host: {e:#}");
                    return ExitCode::from(1);
                }
            };
            match cfg.validate_host(&host) {
                Ok(()) => {
                    println!("{}: ok ({} adapters, {} VIPs)", config.display(), cfg.adapters.len(), cfg.all_vips.len());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Reload { config, socket } => {
            let socket = match control_socket(config, socket) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            match rt.block_on(control::request_reload(&socket)) {
                Ok(r) if r.ok => {
                    println!("reloaded: {}", r.message);
                    ExitCode::SUCCESS
                }
                Ok(r) => {
                    eprintln!("{}", r.message);
                    eprintln!("vip-agent: reload refused; the agent runs as before");
                    ExitCode::from(if r.invalid { 2 } else { 1 })
                }
                Err(e) => {
                    eprintln!("vip-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Cluster { cmd: ClusterCmd::Apply { file, config, dry_run } } => cluster_apply(&file, &config, dry_run),
        Cmd::Cluster { cmd: ClusterCmd::Rebalance { config } } => cluster_rebalance(&config),
        Cmd::Cluster { cmd: ClusterCmd::Status { config, socket, json } } => {
            let socket = match control_socket(config, socket) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            match rt.block_on(control::query_cluster(&socket)) {
                Ok(s) if json => {
                    println!("{}", serde_json::to_string_pretty(&s).expect("serialisable"));
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    print!("{}", vip_agent::status::cluster_human(&s));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vip-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Status { config, socket, json, vip, adapter, watch } => {
            let socket = match control_socket(config, socket) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            loop {
                match rt.block_on(control::query_status(&socket)) {
                    Ok(s) => {
                        let s = s.filtered(vip, adapter.as_deref());
                        if watch.is_some() && !json {
                            // Home and clear, as `watch` does.
                            print!("\x1b[H\x1b[2J");
                        }
                        if json {
                            println!("{}", serde_json::to_string_pretty(&s).expect("serialisable"));
                        } else {
                            print!("{}", s.human());
                        }
                    }
                    Err(e) => {
                        eprintln!("vip-agent: {e:#}");
                        return ExitCode::from(1);
                    }
                }
                match watch {
                    Some(secs) if secs > 0.0 => std::thread::sleep(Duration::from_secs_f64(secs)),
                    _ => return ExitCode::SUCCESS,
                }
            }
        }
        Cmd::Run { config, bpf_object, reload, netns, log_json } => {
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let env = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
            let mut filter = tracing_subscriber::EnvFilter::try_new(&env).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            // `[agent] ebpf_log` asks for the data plane's records: they pass the filter
            // at that level unless RUST_LOG says otherwise for them.
            let level = ["off", "error", "warn", "info", "debug", "trace"][cfg.agent.ebpf_log as usize];
            if cfg.agent.ebpf_log != vip_agent::config::EbpfLog::Off && !env.contains("vip_ebpf") {
                if let Ok(d) = format!("vip_ebpf={level}").parse() {
                    filter = filter.add_directive(d);
                }
            }
            let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
            if log_json {
                sub.json().init();
            } else {
                sub.init();
            }
            match run(cfg, bpf_object, reload, netns) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.downcast_ref::<ConfigInvalid>().is_some() => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// One agent per control socket: a second one would take over the first one's socket and
/// state file. The lock is released when the process exits, however it exits.
fn lock_instance(socket: &std::path::Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let mut p = socket.as_os_str().to_owned();
    p.push(".lock");
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&p).with_context(|| format!("opening {p:?}"))?;
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!("another vip-agent is running with control socket {}", socket.display());
    }
    Ok(f)
}

/// `vip-agent cleanup`.
fn cleanup(socket: &std::path::Path, pin: &std::path::Path, netns: Option<&str>) -> anyhow::Result<()> {
    if let Some(ns) = netns {
        enter_netns(ns)?;
    }
    let _lock = lock_instance(socket).context("an agent is running: stop it (it undoes its own changes) instead")?;
    let mut state = socket.as_os_str().to_owned();
    state.push(".state.json");
    let mut rtnl = Rtnl::open()?;
    let had = vip_agent::host::Host::undo_recorded(PathBuf::from(&state), &mut rtnl)?;
    println!("{}: {}", PathBuf::from(&state).display(), if had { "host changes undone" } else { "no host changes recorded" });
    // The pins: removing the links detaches the programs; the maps go with the last user.
    let mut removed = 0;
    if let Ok(rd) = std::fs::read_dir(pin) {
        for e in rd.flatten() {
            std::fs::remove_file(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            removed += 1;
        }
        std::fs::remove_dir(pin).with_context(|| format!("removing {}", pin.display()))?;
    }
    println!("{}: {removed} pins removed", pin.display());
    let mut lock = socket.as_os_str().to_owned();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
    Ok(())
}

/// The XDP object built with this binary (see build.rs); empty when built without one.
static EMBEDDED_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/vip.o"));

fn run(cfg: Config, object: Option<PathBuf>, reload: bool, netns: Option<String>) -> anyhow::Result<()> {
    // Before any thread exists: every thread the agent starts inherits the namespace.
    if let Some(ns) = &netns {
        enter_netns(ns)?;
    }
    let object = match &object {
        Some(p) => std::fs::read(p).with_context(|| format!("reading the XDP object {}", p.display()))?,
        None if EMBEDDED_OBJECT.is_empty() => anyhow::bail!("this vip-agent was built without its XDP object (build it with `cargo xtask`): pass --bpf-object"),
        None => EMBEDDED_OBJECT.to_vec(),
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let socket_path = cfg.agent.control_socket.clone();
    let metrics = cfg.agent.metrics_listen;
    let _guard = rt.enter();
    // Everything that can fail without touching the host comes first: the instance lock,
    // the signal handlers (a SIGTERM during start-up must still restore the host), the
    // control socket and the metrics listener, and the event subscriptions (before the
    // first dump, so no change between the two is missed).
    let _lock = lock_instance(&socket_path)?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let _ = std::fs::remove_file(&socket_path);
    let listener = tokio::net::UnixListener::bind(&socket_path).with_context(|| format!("control socket {}", socket_path.display()))?;
    let metrics_listener = match metrics {
        Some(addr) => Some(rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("metrics_listen {addr}"))?),
        None => None,
    };
    let pin_path = cfg.agent.pin_path.clone();
    let (mut agent, launched) = launch(cfg.clone(), &object, reload)?;
    let counters = match vip_agent::dataplane::Counters::open(&pin_path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            if !agent.was_adopted() {
                agent.shutdown();
            }
            return Err(e.into());
        }
    };
    // The cluster: silent until it proves this node holds anything.
    // Leaving waits for the release hooks (they may run together): at most all their timeouts.
    let cfg_release_ms: u64 =
        agent.cfg().cluster.as_ref().map_or(0, |c| c.hooks.iter().filter(|h| h.release.is_some()).map(|h| h.timeout_ms).sum());
    let cluster = match agent.cfg().cluster.clone() {
        Some(cc) => match start_cluster(&cc, &pin_path, &launched.inbox) {
            Ok(h) => {
                agent.attach_cluster(h.clone());
                tracing::info!(cluster = %cc.name, node = %cc.node, "cluster runtime started");
                Some(h)
            }
            Err(e) => {
                if !agent.was_adopted() {
                    agent.shutdown();
                }
                return Err(e.context("starting the cluster runtime"));
            }
        },
        None => None,
    };
    // The data plane's clock: ticking before the event loop runs, never stopped.
    match vip_agent::dataplane::Fence::open(&pin_path) {
        Ok(f) => {
            f.set_clock(vip_agent::agent::monotonic_ns());
            std::thread::Builder::new().name("clock".into()).spawn(move || runtime::clock(f))?;
        }
        Err(e) => {
            if !agent.was_adopted() {
                agent.shutdown();
            }
            return Err(e.into());
        }
    }
    let current = runtime::CurrentInbox::new(launched.inbox.clone());
    let mut gen = spawn_generation(agent, launched, &counters)?;
    let mut cfg = cfg;
    // systemd (Type=notify): ready now, the maps written and the first announcements
    // queued by Agent::start, every thread running. Outside systemd this does nothing.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "telling systemd we are ready");
    }
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<control::ReloadReply>>(4);

    let exit = rt.block_on(async {
        tokio::spawn(control::serve_control(listener, current.clone(), counters.clone(), cluster.clone(), reload_tx));
        if let (Some(l), Some(addr)) = (metrics_listener, metrics) {
            tracing::info!(%addr, "metrics listening");
            tokio::spawn(control::serve_metrics(l, current.clone(), counters.clone(), cluster.clone()));
        }
        let hand_over = loop {
            let asked = tokio::select! {
                _ = int.recv() => break false,
                _ = term.recv() => break false,
                _ = usr1.recv() => break true,
                _ = hup.recv() => None,
                Some(r) = reload_rx.recv() => Some(r),
                exit = &mut gen.exit_rx => return exit.unwrap_or_else(|_| Exit::Fatal("the event loop ended".into())),
            };
            let reply = match reload_live(&mut gen, &mut cfg, &object, &counters, &current).await {
                Ok(reply) => reply,
                // The agent could not go on (see `reload`): the data plane answers as pinned.
                Err(exit) => return exit,
            };
            if reply.ok {
                tracing::info!("reload: {}", reply.message);
            } else {
                tracing::error!("reload refused: {}", reply.message);
            }
            if let Some(tx) = asked {
                let _ = tx.send(reply);
            }
        };
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        if let (Some(h), false) = (cluster.clone(), hand_over) {
            // "System down" (seed 003): silent at once, then the cluster is told, so the
            // node's VIPs move without waiting for anyone to notice.
            // Leaving waits for the virtual servers' `release` hooks too (each bounded).
            let release_ms = cfg_release_ms;
            let _ = tokio::task::spawn_blocking(move || h.leave(Duration::from_millis(1000 + release_ms))).await;
        }
        gen.inbox.send(Msg::Stop { hand_over });
        (&mut gen.exit_rx).await.unwrap_or_else(|_| Exit::Fatal("the event loop ended".into()))
    });
    gen.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    // Left answering (a hand-over, a fatal error): the data plane reads the kernel's clock
    // again rather than a clock that no longer ticks.
    if let Ok(f) = vip_agent::dataplane::Fence::open(&pin_path) {
        f.set_clock(0);
    }
    let _ = std::fs::remove_file(&socket_path);
    let mut lock = socket_path.into_os_string();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
    match exit {
        Exit::Stopped | Exit::HandedOver | Exit::Yielded(_) => Ok(()),
        Exit::Fatal(what) => {
            anyhow::bail!("{what}: exiting; the data plane keeps answering as pinned and the next start adopts it")
        }
    }
}

/// An agent started and what its threads need (see [`spawn_generation`]).
struct Launched {
    inbox: runtime::Inbox,
    inbox_rx: runtime::InboxRx,
    host_events: HostEvents,
    steering: vip_agent::config::SteeringConfig,
}

/// One agent and its threads; a live reload replaces it.
struct Generation {
    inbox: runtime::Inbox,
    exit_rx: tokio::sync::oneshot::Receiver<Exit>,
    /// Tells its helper threads (host watcher, housekeeping) to end.
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Starts an agent (loading or adopting the data plane) with its announcer, and the
/// subscriptions its threads need, opened before the host is read.
fn launch(cfg: Config, object: &[u8], reload: bool) -> anyhow::Result<(Agent, Launched)> {
    let links = LinkEvents::open()?;
    let host_events = HostEvents::open()?;
    let (inbox, inbox_rx) = runtime::inbox()?;
    let steering = cfg.steering.clone();
    let (specs, pvips) = vip_agent::agent::vip_specs(&cfg);
    let (specs, pvips) = (Arc::new(specs), Arc::new(pvips));
    let a = &cfg.announce;
    let sent_to = inbox.clone();
    let (ann, announcer) = Announcer::new(
        a.count,
        Duration::from_millis(a.interval_ms),
        a.max_per_second,
        specs.clone(),
        Box::new(move |tag, ifindex, at| {
            sent_to.send(Msg::Sent { tag, ifindex, at });
        }),
    );
    // The announcer ends with the agent (its channel closes) and says so to this
    // agent's inbox only.
    runtime::supervised("announcer", inbox.clone(), announcer)?;
    let agent = Agent::start(cfg, object, reload, links, ann, (specs, pvips))?;
    Ok((agent, Launched { inbox, inbox_rx, host_events, steering }))
}

/// The agent's threads: host watcher, housekeeping, and the event loop that owns it.
fn spawn_generation(mut agent: Agent, l: Launched, counters: &Arc<Counters>) -> anyhow::Result<Generation> {
    let Launched { inbox, inbox_rx, host_events, steering } = l;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ring = agent.take_events();
    let names: Vec<String> = agent.cfg().adapters.iter().map(|a| a.name.clone()).collect();
    let (padapters, vipset) = agent.placement_inputs();
    let subnets = padapters.iter().map(|a| a.subnets.clone()).collect();
    let reads = agent.host_reads.clone();
    let watch = runtime::HostWatch {
        events: host_events,
        reads,
        inbox: inbox.clone(),
        names,
        last: subnets,
        adapters: padapters,
        vipset,
        stop: stop.clone(),
    };
    runtime::supervised("host-watcher", inbox.clone(), move || runtime::host_watcher(watch))?;
    let (counters, inbox2, stop2) = (counters.clone(), inbox.clone(), stop.clone());
    let slots = agent.cfg().adapters.len();
    let every = Duration::from_millis(steering.load_interval_ms);
    let timeout_ns = steering.client_timeout_s * 1_000_000_000;
    runtime::supervised("housekeeping", inbox.clone(), move || {
        runtime::housekeeping(counters, inbox2, slots, every, timeout_ns, stop2)
    })?;
    if let Some(logs) = agent.take_logs() {
        let stop = stop.clone();
        runtime::supervised("ebpf-log", inbox.clone(), move || runtime::ebpf_logs(logs, stop))?;
    }
    let (exit_tx, exit_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("event-loop".into()).spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime::event_loop(agent, inbox_rx, ring)));
        let _ = exit_tx.send(r.unwrap_or_else(|_| Exit::Fatal("the event loop panicked".into())));
    })?;
    Ok(Generation { inbox, exit_rx, stop })
}

fn start_cluster(cc: &vip_agent::config::ClusterConfig, pin_path: &std::path::Path, inbox: &runtime::Inbox) -> anyhow::Result<vip_cluster::node::Handle> {
    let fence = vip_agent::dataplane::Fence::open(pin_path)?;
    fence.set(0);
    let glue = vip_agent::cluster::Glue { fence, inbox: inbox.clone() };
    let ms = Duration::from_millis;
    let ccfg = vip_cluster::node::Config {
        cluster: cc.name.clone(),
        node: cc.node.clone(),
        role: cc.role,
        endpoints: cluster_endpoints(cc),
        heartbeat: ms(cc.heartbeat_ms),
        suspect: ms(cc.suspect_ms),
        fence: ms(cc.fence_ms),
        lease_ttl_s: cc.lease_ttl_s as i64,
        port: cc.port,
        group: cc.group.clone(),
        partner: cc.partner.clone(),
        hooks: cc
            .hooks
            .iter()
            .map(|h| {
                let hooks = vip_cluster::hooks::Hooks {
                    acquire: h.acquire.clone(),
                    release: h.release.clone(),
                    check: h.check.clone(),
                    timeout: ms(h.timeout_ms),
                    check_every: ms(h.check_interval_ms),
                };
                (h.server.clone(), hooks)
            })
            .collect(),
    };
    Ok(vip_cluster::node::start(ccfg, glue)?)
}

/// A live reload (SIGHUP or `vip-agent reload`). The file is read and checked, against
/// the running config (settings only a restart can change) and against the host; a bad
/// one changes nothing and says why. A good one replaces the agent: the running one ends
/// leaving the data plane as it is (as a hand-over does), and a new one adopts it with
/// the new config, which writes only the difference: VIPs and adapters no longer
/// configured are taken out, new ones are probed and put in, and every VIP in both keeps
/// its map entry throughout (re-pointed in one write when its policy changes), so it
/// never misses an answer. `Err` only when no agent could be started again.
async fn reload_live(
    gen: &mut Generation,
    cfg: &mut Config,
    object: &[u8],
    counters: &Arc<Counters>,
    current: &runtime::CurrentInbox,
) -> Result<control::ReloadReply, Exit> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
    let reply = match checked_reload(cfg) {
        Err(reply) => reply,
        Ok(next) => {
            let summary = vip_agent::config::reload_summary(cfg, &next);
            match replace(gen, cfg, next, object, counters, current).await? {
                Ok(()) => control::ReloadReply { ok: true, invalid: false, message: summary },
                Err(e) => control::ReloadReply { ok: false, invalid: false, message: e },
            }
        }
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    Ok(reply)
}

/// The new config, if it can be applied live.
fn checked_reload(cfg: &Config) -> Result<Config, control::ReloadReply> {
    let invalid = |message: String| control::ReloadReply { ok: false, invalid: true, message: format!("nothing changed:\n{message}") };
    let next = Config::load(&cfg.path).map_err(|e| invalid(e.to_string()))?;
    if let Some(what) = vip_agent::config::restart_only_changes(cfg, &next) {
        return Err(control::ReloadReply {
            ok: false,
            invalid: false,
            message: format!("{}: {what}; restart the agent to apply it (nothing changed)", cfg.path.display()),
        });
    }
    let host = NetlinkHost::read(&mut Rtnl::open().map_err(|e| invalid(format!("reading the host: {e}")))?)
        .map_err(|e| control::ReloadReply { ok: false, invalid: false, message: format!("reading the host: {e:#}") })?;
    next.validate_host(&host).map_err(|e| invalid(e.to_string()))?;
    Ok(next)
}

/// Ends the running agent and starts one with `next`. When the new one cannot start, the
/// previous config is started again (`Ok(Err(why))`); when neither can, `Err`.
async fn replace(
    gen: &mut Generation,
    cfg: &mut Config,
    next: Config,
    object: &[u8],
    counters: &Arc<Counters>,
    current: &runtime::CurrentInbox,
) -> Result<Result<(), String>, Exit> {
    gen.inbox.send(Msg::Yield);
    let history = match (&mut gen.exit_rx).await {
        Ok(Exit::Yielded(h)) => h,
        Ok(other) => return Err(other),
        Err(_) => return Err(Exit::Fatal("the event loop ended".into())),
    };
    gen.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let t0 = std::time::Instant::now();
    let (agent, launched, outcome) = match launch(next.clone(), object, false) {
        Ok((a, l)) => {
            *cfg = next;
            (a, l, Ok(()))
        }
        Err(e) => {
            tracing::error!("reload: the new config could not be applied ({e:#}); going back to the previous one");
            match launch(cfg.clone(), object, false) {
                Ok((a, l)) => (a, l, Err(format!("the new config could not be applied ({e:#}); the previous config is in force again"))),
                Err(e2) => return Err(Exit::Fatal(format!("reload failed ({e:#}) and the previous config could not be restarted ({e2:#})"))),
            }
        }
    };
    let mut agent = agent;
    agent.resume(*history);
    current.set(launched.inbox.clone());
    *gen = spawn_generation(agent, launched, counters).map_err(|e| Exit::Fatal(format!("reload: {e:#}")))?;
    tracing::info!(ms = t0.elapsed().as_millis() as u64, "reload: the new agent runs");
    Ok(outcome)
}
