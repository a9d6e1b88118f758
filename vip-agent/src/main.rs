//! `vip-agent`: run the agent, check a config, or ask a running agent for its status.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use vip_agent::{
    agent::{Agent, NetlinkHost},
    announce::Announcer,
    config::Config,
    control,
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
    /// SIGUSR1 it exits leaving the data plane answering for the next agent to adopt.
    Run {
        /// The TOML config (see docs/configuration.md).
        #[arg(long, short)]
        config: PathBuf,
        /// The built XDP object (`cargo xtask build-ebpf` prints its path).
        #[arg(long, env = "VIP_EBPF_OBJECT")]
        bpf_object: PathBuf,
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
    },
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
    match cli.cmd {
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
        Cmd::Status { config, socket, json } => {
            let socket = match (config, socket) {
                (Some(c), _) => match load_config(&c) {
                    Ok(cfg) => cfg.agent.control_socket,
                    Err(code) => return code,
                },
                (None, Some(s)) => s,
                (None, None) => PathBuf::from("/run/vip-agent.sock"),
            };
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            match rt.block_on(control::query_status(&socket)) {
                Ok(s) if json => {
                    println!("{}", serde_json::to_string_pretty(&s).expect("serialisable"));
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    print!("{}", s.human());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("vip-agent: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Run { config, bpf_object, reload, netns, log_json } => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
            if log_json {
                sub.json().init();
            } else {
                sub.init();
            }
            let cfg = match load_config(&config) {
                Ok(c) => c,
                Err(code) => return code,
            };
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

fn run(cfg: Config, object: PathBuf, reload: bool, netns: Option<String>) -> anyhow::Result<()> {
    // Before any thread exists: every thread the agent starts inherits the namespace.
    if let Some(ns) = &netns {
        enter_netns(ns)?;
    }
    let object = std::fs::read(&object).with_context(|| format!("reading the XDP object {}", object.display()))?;
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
    let _ = std::fs::remove_file(&socket_path);
    let listener = tokio::net::UnixListener::bind(&socket_path).with_context(|| format!("control socket {}", socket_path.display()))?;
    let metrics_listener = match metrics {
        Some(addr) => Some(rt.block_on(tokio::net::TcpListener::bind(addr)).with_context(|| format!("metrics_listen {addr}"))?),
        None => None,
    };
    let links = LinkEvents::open()?;
    let host_events = HostEvents::open()?;
    let (inbox, inbox_rx) = runtime::inbox()?;
    let pin_path = cfg.agent.pin_path.clone();
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
    runtime::supervised("announcer", inbox.clone(), announcer)?;
    let mut agent = match Agent::start(cfg, &object, reload, links, ann, (specs, pvips)) {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    let counters = match vip_agent::dataplane::Counters::open(&pin_path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            if !agent.was_adopted() {
                agent.shutdown();
            }
            return Err(e.into());
        }
    };
    let ring = agent.take_events();
    {
        let names: Vec<String> = agent.cfg().adapters.iter().map(|a| a.name.clone()).collect();
        let (padapters, pvips, active) = agent.placement_inputs();
        let subnets = padapters.iter().map(|a| a.subnets.clone()).collect();
        let inbox2 = inbox.clone();
        let reads = agent.host_reads.clone();
        let watch = runtime::HostWatch {
            events: host_events,
            reads,
            inbox: inbox2,
            names,
            last: subnets,
            adapters: padapters,
            vips: pvips,
            active,
        };
        runtime::supervised("host-watcher", inbox.clone(), move || runtime::host_watcher(watch))?;
        let (counters, inbox2) = (counters.clone(), inbox.clone());
        let slots = agent.cfg().adapters.len();
        let every = Duration::from_millis(steering.load_interval_ms);
        let timeout_ns = steering.client_timeout_s * 1_000_000_000;
        runtime::supervised("housekeeping", inbox.clone(), move || {
            runtime::housekeeping(counters, inbox2, slots, every, timeout_ns)
        })?;
    }
    let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("event-loop".into()).spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runtime::event_loop(agent, inbox_rx, ring)));
        let _ = exit_tx.send(r.unwrap_or_else(|_| Exit::Fatal("the event loop panicked".into())));
    })?;

    let exit = rt.block_on(async {
        tokio::spawn(control::serve_control(listener, inbox.clone(), counters.clone()));
        if let (Some(l), Some(addr)) = (metrics_listener, metrics) {
            tracing::info!(%addr, "metrics listening");
            tokio::spawn(control::serve_metrics(l, inbox.clone(), counters.clone()));
        }
        let hand_over = tokio::select! {
            _ = int.recv() => false,
            _ = term.recv() => false,
            _ = usr1.recv() => true,
            exit = &mut exit_rx => return exit.unwrap_or_else(|_| Exit::Fatal("the event loop ended".into())),
        };
        inbox.send(Msg::Stop { hand_over });
        exit_rx.await.unwrap_or_else(|_| Exit::Fatal("the event loop ended".into()))
    });
    let _ = std::fs::remove_file(&socket_path);
    let mut lock = socket_path.into_os_string();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
    match exit {
        Exit::Stopped | Exit::HandedOver => Ok(()),
        Exit::Fatal(what) => {
            anyhow::bail!("{what}: exiting; the data plane keeps answering as pinned and the next start adopts it")
        }
    }
}
