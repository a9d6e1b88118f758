//! The agent's threads and how they talk.
//!
//! - The **event loop** owns the [`Agent`]. It runs at real-time priority (SCHED_FIFO 10,
//!   sleeping in `poll` otherwise) and waits on the link-event socket, its inbox and the
//!   straggler ring. Carrier changes come first: every turn drains the link socket before
//!   anything else, and long operations look at it between batches. No lock is shared:
//!   everything else sends it a message.
//! - The **host watcher** follows address and route changes on a socket of its own:
//!   drain, wait a moment for the rest of the burst, read the host once, classify the
//!   VIPs again off the event loop, and send the result only if the adapters' subnets
//!   changed. The agent's own VIP routes never reach it (a socket filter drops them).
//! - **Housekeeping** samples the traffic counters, reads the client table in batches,
//!   ages it, and sends the event loop a fresh client index.
//! - The **announcer** sends frames ([`crate::announce`]); the control socket and the
//!   metrics listener run on the main thread's runtime and ask the loop for a snapshot.
//! - With `[agent] ebpf_log`, a thread passes the data plane's own log records on; the
//!   **clock** thread keeps the data plane's clock word ticking for the whole process.
//!
//! A live reload ends one agent with its event loop and helpers (they see `stop`) and
//! starts the next on a new inbox ([`CurrentInbox`]). Otherwise a helper thread that ends
//! or panics is fatal: the process logs it and exits with an error, leaving the data
//! plane answering (pinned), for systemd or an operator to start it again, which adopts
//! everything.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

use vip_placement::Classes;

use crate::{
    agent::{Agent, ClientIndex, NetlinkHost},
    config::Subnet,
    dataplane::Counters,
    netlink::{HostEvents, NetlinkError, Rtnl},
    status::Snapshot,
};

/// What the event loop is asked to do.
pub enum Msg {
    /// A status snapshot, for the control socket or the metrics listener.
    Status(tokio::sync::oneshot::Sender<Snapshot>),
    /// The adapters' takeover subnets changed; the VIPs classified anew against them.
    Reclassified { subnets: Vec<Vec<Subnet>>, classes: Arc<Classes>, generation: u64 },
    /// Traffic per slot and the client table, as just read.
    Housekeeping { traffic: Vec<vip_common::Traffic>, clients: Arc<ClientIndex>, at: Instant },
    /// The announcer sent the first frame of a tagged job.
    Sent { tag: u64, ifindex: u32, at: Instant },
    /// Stop: restore the host, or (`hand_over`) leave everything for a successor.
    Stop { hand_over: bool },
    /// A live reload: end, leaving everything as it is, and hand back the history for
    /// the agent that adopts the data plane with the new config.
    Yield,
    /// A helper thread died.
    Fatal(String),
    /// The cluster runtime: hold exactly these groups of the cluster's VIPs (by first
    /// address); `done` once the data plane answers accordingly.
    ClusterHold { defs: Arc<vip_cluster::records::Defs>, held: Vec<std::net::IpAddr>, done: Box<dyn FnOnce() + Send> },
}

/// The VIPs and which are active, shared with the host watcher (which classifies off the
/// event loop) with a generation that says which set a classification was made for.
pub type VipSet = Arc<std::sync::Mutex<(u64, Arc<Vec<vip_placement::Vip>>, Arc<Vec<bool>>)>>;

/// The event loop's inbox: a channel and an eventfd that wakes its `poll`.
#[derive(Clone)]
pub struct Inbox {
    tx: mpsc::Sender<Msg>,
    efd: Arc<OwnedFd>,
}

/// The inbox of the agent in charge, for the control socket and the metrics listener: a
/// live reload replaces the agent, and its inbox with it.
#[derive(Clone)]
pub struct CurrentInbox(Arc<std::sync::RwLock<Inbox>>);

impl CurrentInbox {
    pub fn new(i: Inbox) -> CurrentInbox {
        CurrentInbox(Arc::new(std::sync::RwLock::new(i)))
    }

    pub fn get(&self) -> Inbox {
        match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn set(&self, i: Inbox) {
        match self.0.write() {
            Ok(mut g) => *g = i,
            Err(p) => *p.into_inner() = i,
        }
    }
}

pub struct InboxRx {
    rx: mpsc::Receiver<Msg>,
    efd: Arc<OwnedFd>,
}

pub fn inbox() -> std::io::Result<(Inbox, InboxRx)> {
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let efd = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let (tx, rx) = mpsc::channel();
    Ok((Inbox { tx, efd: efd.clone() }, InboxRx { rx, efd }))
}

impl Inbox {
    pub fn send(&self, m: Msg) -> bool {
        if self.tx.send(m).is_err() {
            return false;
        }
        let one: u64 = 1;
        unsafe { libc::write(self.efd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
        true
    }
}

/// Runs the calling thread under SCHED_FIFO, so a busy CPU cannot delay a failover
/// behind ordinary work; the thread sleeps in `poll` otherwise.
fn realtime_priority() {
    let param = libc::sched_param { sched_priority: 10 };
    if unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) } != 0 {
        tracing::warn!("event loop runs without real-time priority (SCHED_FIFO refused)");
    }
}

/// How the event loop ended.
pub enum Exit {
    Stopped,
    HandedOver,
    /// Ended for a live reload (see [`Msg::Yield`]).
    Yielded(Box<crate::agent::History>),
    Fatal(String),
}

/// The event loop. Returns when asked to stop (having restored the host or not), or when
/// a helper died.
pub fn event_loop(mut agent: Agent, inbox: InboxRx, mut ring: Option<aya::maps::RingBuf<aya::maps::MapData>>) -> Exit {
    realtime_priority();
    let link_fd = agent.links.as_raw_fd();
    let ring_fd = ring.as_ref().map(|r| r.as_raw_fd());
    let size = std::mem::size_of::<vip_common::Straggler>();
    loop {
        // 1. Carrier first: everything queued on the link socket, and what a long
        //    operation deferred.
        loop {
            while let Some((at, ev)) = agent.deferred.pop_front() {
                agent.on_event(&ev, at);
            }
            match agent.links.try_recv() {
                Ok(Some((at, evs))) => {
                    for ev in &evs {
                        agent.urgent(ev);
                    }
                    for ev in &evs {
                        agent.on_event(ev, at);
                    }
                }
                Ok(None) => break,
                Err(NetlinkError::Io(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    tracing::warn!("link events were lost; re-reading all links");
                    agent.resync();
                }
                Err(e) => {
                    tracing::error!(error = %e, "link socket");
                    break;
                }
            }
        }
        // 2. Timers.
        agent.run_timers(Instant::now());
        // 3. Messages.
        while let Ok(m) = inbox.rx.try_recv() {
            match m {
                Msg::Status(reply) => {
                    let _ = reply.send(agent.snapshot());
                }
                Msg::Reclassified { subnets, classes, generation } => agent.on_reclassified(subnets, classes, generation),
                Msg::ClusterHold { defs, held, done } => {
                    agent.cluster_hold(defs, held);
                    done();
                }
                Msg::Housekeeping { traffic, clients, at } => agent.on_housekeeping(&traffic, clients, at),
                Msg::Sent { tag, ifindex, at } => agent.on_sent(tag, ifindex, at),
                Msg::Stop { hand_over } => {
                    return if hand_over {
                        agent.stopping = true;
                        tracing::info!("exiting on SIGUSR1; the data plane stays in place for the next agent");
                        Exit::HandedOver
                    } else {
                        tracing::info!("stopping");
                        agent.shutdown();
                        Exit::Stopped
                    };
                }
                Msg::Yield => return Exit::Yielded(Box::new(agent.into_history())),
                Msg::Fatal(what) => return Exit::Fatal(what),
            }
        }
        // 4. Stragglers.
        if let Some(r) = ring.as_mut() {
            let mut evs = vec![];
            while let Some(item) = r.next() {
                if item.len() >= size {
                    evs.push(bytemuck::pod_read_unaligned::<vip_common::Straggler>(&item[..size]));
                }
            }
            for e in &evs {
                agent.on_straggler(e);
            }
        }
        // 5. Idle: prepare the decisions a carrier change would need.
        agent.prepare();
        if !agent.deferred.is_empty() {
            continue;
        }
        // 6. Sleep until something happens.
        let mut fds = vec![
            libc::pollfd { fd: link_fd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: inbox.efd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        if let Some(fd) = ring_fd {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        let timeout = agent.next_timer().map_or(-1, |t| {
            let d = t.saturating_duration_since(Instant::now());
            d.as_millis().min(i32::MAX as u128) as i32 + if d.subsec_micros() % 1000 > 0 { 1 } else { 0 }
        });
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if fds[1].revents != 0 {
            let mut buf = 0u64;
            unsafe { libc::read(inbox.efd.as_raw_fd(), &mut buf as *mut u64 as *mut libc::c_void, 8) };
        }
    }
}

/// Runs `f` on a named thread; its end (or panic) is reported to the event loop as fatal.
pub fn supervised<F>(name: &str, inbox: Inbox, f: F) -> std::io::Result<()>
where
    F: FnOnce() + Send + 'static,
{
    let n = name.to_string();
    std::thread::Builder::new().name(n.clone()).spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let what = match r {
            Ok(()) => format!("the {n} thread ended"),
            Err(_) => format!("the {n} thread panicked"),
        };
        inbox.send(Msg::Fatal(what));
    })?;
    Ok(())
}

/// What the host watcher works with.
pub struct HostWatch {
    pub events: HostEvents,
    /// Counts its re-reads (for status).
    pub reads: Arc<std::sync::atomic::AtomicU64>,
    pub inbox: Inbox,
    /// The adapters' names, and their takeover subnets as the agent started with.
    pub names: Vec<String>,
    pub last: Vec<Vec<Subnet>>,
    /// What classification needs.
    pub adapters: Vec<vip_placement::Adapter>,
    pub vipset: VipSet,
    /// Set when the agent it serves was replaced (a live reload).
    pub stop: Arc<std::sync::atomic::AtomicBool>,
}

/// The host watcher (see the module doc).
pub fn host_watcher(w: HostWatch) {
    let HostWatch { mut events, reads, inbox, names, mut last, mut adapters, vipset, stop } = w;
    let mut rtnl = match Rtnl::open() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "host watcher: no netlink socket");
            return;
        }
    };
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match events.wait_and_drain() {
            // Nothing within the socket's timeout: look at `stop` again.
            Ok(0) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "host watcher");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        }
        // The rest of a burst (an address and its routes) comes within a few ms.
        std::thread::sleep(Duration::from_millis(20));
        let _ = events.drain();
        reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nh = match NetlinkHost::read(&mut rtnl) {
            Ok(nh) => nh,
            Err(e) => {
                tracing::warn!(error = %e, "could not re-read addresses");
                continue;
            }
        };
        let now = nh.subnets_of(&names);
        if now == last {
            continue;
        }
        for (a, (old, new)) in names.iter().zip(last.iter().zip(&now)) {
            if old != new {
                let shown: Vec<String> = new.iter().map(|s| s.to_string()).collect();
                tracing::info!(adapter = %a, subnets = ?shown, "adapter addresses changed");
            }
        }
        for (a, s) in adapters.iter_mut().zip(&now) {
            a.subnets = s.clone();
        }
        let (generation, vips, active) = match vipset.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let ids = active.iter().enumerate().filter(|(_, a)| **a).map(|(i, _)| i as u32);
        let classes = Arc::new(vip_placement::classify(&vips, ids, &adapters));
        last = now.clone();
        if !inbox.send(Msg::Reclassified { subnets: now, classes, generation }) {
            return;
        }
    }
}

/// Housekeeping (see the module doc), every `every`.
pub fn housekeeping(
    counters: Arc<Counters>,
    inbox: Inbox,
    slots: usize,
    every: Duration,
    timeout_ns: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    loop {
        std::thread::sleep(every);
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let traffic = counters.traffic_all(slots);
        let now = crate::agent::monotonic_ns();
        let mut flows = counters.flows();
        let old: Vec<vip_common::FlowKey> =
            flows.iter().filter(|(_, f)| now.saturating_sub(f.seen_ns) > timeout_ns).map(|(k, _)| *k).collect();
        if !old.is_empty() {
            let aged = counters.remove_flows(&old);
            tracing::debug!(aged, "clients aged out of the table");
            let gone: std::collections::HashSet<vip_common::FlowKey> = old.into_iter().collect();
            flows.retain(|(k, _)| !gone.contains(k));
        }
        let clients = Arc::new(ClientIndex::build(flows, crate::status::CLIENTS_SHOWN));
        if !inbox.send(Msg::Housekeeping { traffic, clients, at: Instant::now() }) {
            return;
        }
    }
}

/// Passes the data plane's log records on to `tracing` as they come (`[agent] ebpf_log`),
/// until `stop`.
pub fn ebpf_logs(mut logs: crate::dataplane::EbpfLog, stop: Arc<std::sync::atomic::AtomicBool>) {
    let fd = logs.as_raw_fd();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // A second at most, to see `stop`.
        unsafe { libc::poll(&mut pfd, 1, 1000) };
        logs.flush();
    }
}

/// Keeps the data plane's clock (`vip_common::FENCE_CLOCK`) within a tick of
/// CLOCK_MONOTONIC, for as long as the process runs (reloads included).
pub fn clock(fence: crate::dataplane::Fence) {
    let tick = Duration::from_millis(vip_common::CLOCK_TICK_MS);
    loop {
        fence.set_clock(crate::agent::monotonic_ns());
        std::thread::sleep(tick);
    }
}
