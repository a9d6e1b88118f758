//! `vip-agent`: run the agent, check a config, or ask a running agent for its status.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Instant,
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::Notify;
use vip_agent::{
    agent::{Agent, NetlinkHost, Timer},
    config::Config,
    control::{self, Shared},
    netlink::{LinkEvent, LinkEvents, NetlinkError, Rtnl},
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
                    println!("{}: ok ({} adapters, {} VIPs)", config.display(), cfg.adapters.len(), cfg.vips.len());
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

/// Runs the calling thread (the link watcher) under SCHED_FIFO, so a busy CPU cannot
/// delay a failover behind ordinary work; the thread sleeps in recv otherwise.
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    if unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!("link watcher runs without real-time priority (SCHED_FIFO refused)");
    }
}

fn spawn_timers(rt: &tokio::runtime::Handle, agent: &Shared, notify: &Arc<Notify>, timers: Vec<Timer>) {
    for t in timers {
        let (agent, notify) = (agent.clone(), notify.clone());
        rt.spawn(async move {
            tokio::time::sleep(t.after).await;
            agent.lock().expect("agent lock").on_timer(&t);
            notify.notify_one();
        });
    }
}

/// Reads straggler events from the data plane's ring buffer and has the agent correct
/// each client.
async fn serve_stragglers(ring: aya::maps::RingBuf<aya::maps::MapData>, agent: Shared, notify: Arc<Notify>) {
    // SAFETY: the ring buffer owns its fd and is moved into the AsyncFd, which keeps it
    // open for as long as it is registered.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) } {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "straggler events cannot be polled; no corrections will be sent");
            return;
        }
    };
    let size = std::mem::size_of::<vip_common::Straggler>();
    loop {
        let Ok(mut guard) = fd.readable_mut().await else { return };
        let ring = guard.get_inner_mut();
        let mut evs = vec![];
        while let Some(item) = ring.next() {
            if item.len() >= size {
                evs.push(bytemuck::pod_read_unaligned::<vip_common::Straggler>(&item[..size]));
            }
        }
        guard.clear_ready();
        if !evs.is_empty() {
            let mut a = agent.lock().expect("agent lock");
            for e in &evs {
                a.on_straggler(e);
            }
        }
        notify.notify_one();
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
    // control socket and the metrics listener, and the link event subscription (before
    // the first dump, so no change between the two is missed).
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
    let mut events = LinkEvents::open()?;
    let pin_path = cfg.agent.pin_path.clone();
    let steering = cfg.steering.clone();
    let agent = match Agent::start(cfg, &object, reload) {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&socket_path);
            return Err(e);
        }
    };
    let counters = match vip_agent::dataplane::Counters::open(&pin_path) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            let mut a = agent;
            if !a.was_adopted() {
                a.shutdown();
            }
            return Err(e.into());
        }
    };
    let mut agent = agent;
    let stragglers = agent.take_events();
    let agent: Shared = Arc::new(Mutex::new(agent));
    let notify = Arc::new(Notify::new());

    // The link watcher: a thread of its own, so an event is acted on as soon as recv returns.
    {
        let (agent, notify, handle) = (agent.clone(), notify.clone(), rt.handle().clone());
        let mut rtnl = Rtnl::open().ok();
        std::thread::Builder::new().name("link-watcher".into()).spawn(move || {
            realtime_priority();
            loop {
            let timers = match events.recv() {
                Ok((at, evs)) => {
                    let timers = {
                        let mut a = agent.lock().expect("agent lock");
                        evs.iter().flat_map(|e| a.on_event(e, at)).collect::<Vec<_>>()
                    };
                    if evs.iter().any(|e| matches!(e, LinkEvent::Addresses)) {
                        // Dumped without the lock: failovers never wait for it.
                        match rtnl.as_mut().map(NetlinkHost::read) {
                            Some(Ok(nh)) => agent.lock().expect("agent lock").update_subnets(&nh),
                            Some(Err(e)) => tracing::warn!(error = %e, "could not re-read addresses"),
                            None => {}
                        }
                    }
                    timers
                }
                Err(NetlinkError::Io(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("link events were lost; re-reading all links");
                    agent.lock().expect("agent lock").resync()
                }
                Err(e) => {
                    tracing::error!(error = %e, "link watcher");
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    vec![]
                }
            };
            spawn_timers(&handle, &agent, &notify, timers);
            notify.notify_one();
            }
        })?;
    }

    let handover = rt.block_on(async {
        // Announcement rounds after the first, paced per adapter.
        {
            let (agent, notify) = (agent.clone(), notify.clone());
            tokio::spawn(async move {
                loop {
                    let next = agent.lock().expect("agent lock").pump();
                    match next {
                        Some(t) => {
                            tokio::select! {
                                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(t.max(Instant::now()))) => {}
                                _ = notify.notified() => {}
                            }
                        }
                        None => notify.notified().await,
                    }
                }
            });
        }
        // Load sampling (seed 004) and client-table ageing; the table is read without the
        // agent's lock.
        {
            let (agent, counters) = (agent.clone(), counters.clone());
            let every = std::time::Duration::from_millis(steering.load_interval_ms);
            let timeout_ns = steering.client_timeout_s * 1_000_000_000;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let t = counters.traffic_all();
                    agent.lock().expect("agent lock").update_load(&t, Instant::now());
                    let aged = counters.age_flows(vip_agent::agent::monotonic_ns(), timeout_ns);
                    if aged > 0 {
                        tracing::debug!(aged, "clients aged out of the table");
                    }
                }
            });
        }
        if let Some(ring) = stragglers {
            tokio::spawn(serve_stragglers(ring, agent.clone(), notify.clone()));
        }
        tokio::spawn(control::serve_control(listener, agent.clone(), counters.clone()));
        if let (Some(l), Some(addr)) = (metrics_listener, metrics) {
            tracing::info!(%addr, "metrics listening");
            tokio::spawn(control::serve_metrics(l, agent.clone(), counters.clone()));
        }
        tokio::select! {
            _ = int.recv() => false,
            _ = term.recv() => false,
            _ = usr1.recv() => true,
        }
    });
    if handover {
        // For a successor (an upgrade): the pinned program and maps keep answering and the
        // host keeps its changes; the next agent adopts them.
        let mut a = agent.lock().expect("agent lock");
        a.stopping = true;
        tracing::info!("exiting on SIGUSR1; the data plane stays in place for the next agent");
    } else {
        tracing::info!("stopping");
        agent.lock().expect("agent lock").shutdown();
    }
    let _ = std::fs::remove_file(&socket_path);
    let mut lock = socket_path.into_os_string();
    lock.push(".lock");
    let _ = std::fs::remove_file(lock);
    Ok(())
}
