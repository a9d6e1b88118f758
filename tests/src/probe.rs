//! Failover measurement from a client's point of view: a UDP echo service on the nodes, a
//! prober that sends to the VIP every few hundred microseconds and sees when the replies
//! stop and resume, and a capture of the address announcements on the client's wire.
//!
//! Sockets are created inside their namespace with [`NetNs::run`] and then served from
//! ordinary threads: a socket stays in the namespace it was created in.

use std::{
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use vip_packet::{parse_arp, parse_nd, Mac, ND_NEIGHBOR_ADVERT, ND_OPT_TARGET_LL, NA_FLAG_SOLICITED};

use crate::{
    netns::NetNs,
    rawsock::RawSocket,
    topo::{Client, VIP4},
};
use vip_packet::Arp;

/// How often blocking loops look at their stop flag.
const POLL: Duration = Duration::from_millis(20);

/// Nanoseconds on CLOCK_REALTIME, the clock of the kernel's SO_TIMESTAMPNS stamps.
pub fn realtime_ns() -> u64 {
    let mut ts: libc::timespec = unsafe { zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setopt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: libc::c_int) -> io::Result<()> {
    let p = &val as *const libc::c_int as *const libc::c_void;
    cvt(unsafe { libc::setsockopt(fd, level, name, p, size_of::<libc::c_int>() as u32) }).map(drop)
}

fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match a {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as u16;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as u16;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A UDP socket bound to `addr`, IPv6 ones v6-only (std cannot set that before binding,
/// and a dual-stack `[::]` would take the IPv4 port too).
fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let fam = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    let fd = cvt(unsafe { libc::socket(fam, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if addr.is_ipv6() {
        setopt(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (ss, len) = sockaddr(addr);
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) })?;
    Ok(UdpSocket::from(fd))
}

/// Control-message buffer, aligned for `cmsghdr`.
type Cmsgs = [u64; 16];

/// UDP echo on `0.0.0.0:port` and `[::]:port` in a namespace, until dropped. Replies leave
/// from the address the request was sent to (IP_PKTINFO), so a client talking to a VIP
/// hears back from the VIP and not from the node's primary address.
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl EchoServer {
    pub fn start(ns: &NetNs, port: u16) -> io::Result<EchoServer> {
        let (v4, v6) = ns.run(|| -> io::Result<_> {
            let v4 = bind_udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?;
            let v6 = bind_udp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))?;
            setopt(v4.as_raw_fd(), libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
            setopt(v6.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
            Ok((v4, v6))
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (st, sv) = (stop.clone(), served.clone());
        let thread = std::thread::spawn(move || {
            let mut pfds = [v4.as_raw_fd(), v6.as_raw_fd()].map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
            while !st.load(Ordering::Relaxed) {
                if unsafe { libc::poll(pfds.as_mut_ptr(), 2, POLL.as_millis() as i32) } <= 0 {
                    continue;
                }
                for p in &pfds {
                    if p.revents & libc::POLLIN != 0 {
                        while echo_one(p.fd) {
                            sv.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Ok(EchoServer { stop, served, thread: Some(thread) })
    }

    /// Datagrams echoed so far: tells which node is serving.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

/// Echoes one waiting datagram on `fd`; false when none was waiting.
fn echo_one(fd: RawFd) -> bool {
    let mut buf = [0u8; 2048];
    let mut peer: libc::sockaddr_storage = unsafe { zeroed() };
    let mut cbuf: Cmsgs = [0; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut peer as *mut libc::sockaddr_storage).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_storage>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<Cmsgs>();
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return false;
    }
    // Keep only the pktinfo, rewritten to say "send from the address you were asked at".
    let mut out: Cmsgs = [0; 16];
    let mut outlen = 0;
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let d = libc::CMSG_DATA(c);
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            let data: Option<Vec<u8>> = if level == libc::IPPROTO_IP && kind == libc::IP_PKTINFO {
                let mut pi: libc::in_pktinfo = std::ptr::read_unaligned(d.cast());
                pi.ipi_spec_dst = pi.ipi_addr;
                pi.ipi_ifindex = 0;
                Some(std::slice::from_raw_parts((&pi as *const libc::in_pktinfo).cast(), size_of::<libc::in_pktinfo>()).to_vec())
            } else if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_PKTINFO {
                let mut pi: libc::in6_pktinfo = std::ptr::read_unaligned(d.cast());
                pi.ipi6_ifindex = 0;
                Some(std::slice::from_raw_parts((&pi as *const libc::in6_pktinfo).cast(), size_of::<libc::in6_pktinfo>()).to_vec())
            } else {
                None
            };
            if let Some(data) = data {
                let o = out.as_mut_ptr().cast::<libc::cmsghdr>();
                (*o).cmsg_level = level;
                (*o).cmsg_type = kind;
                (*o).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
                std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(o), data.len());
                outlen = libc::CMSG_SPACE(data.len() as u32) as usize;
                break;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let mut reply = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: n as usize };
    msg.msg_iov = &mut reply;
    msg.msg_control = if outlen == 0 { std::ptr::null_mut() } else { out.as_mut_ptr().cast() };
    msg.msg_controllen = outlen;
    msg.msg_flags = 0;
    // A lost reply is the prober's business to count; nothing to do about it here.
    unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT) };
    true
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One probe: when it left and, if it was answered, when the reply came back.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub seq: u64,
    pub sent: Instant,
    pub received: Option<Instant>,
}

/// Sends a numbered UDP datagram to a target every `interval` from a client namespace and
/// records when each reply arrives (user-space CLOCK_MONOTONIC stamps).
pub struct Prober {
    stop: Arc<AtomicBool>,
    sender: JoinHandle<Vec<Instant>>,
    receiver: JoinHandle<Vec<(u64, Instant)>>,
    receiving: Arc<AtomicBool>,
}

impl Prober {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_micros(500);
    /// How long [`Prober::stop`] keeps listening after the last probe: replies in flight.
    const DRAIN: Duration = Duration::from_millis(100);

    pub fn start(ns: &NetNs, target: SocketAddr, interval: Duration) -> io::Result<Prober> {
        let sock = ns.run(|| -> io::Result<_> {
            let any: SocketAddr = if target.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
            let s = UdpSocket::bind(any)?;
            s.connect(target)?;
            s.set_read_timeout(Some(POLL))?;
            Ok(s)
        })?;
        let rx = sock.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let receiving = Arc::new(AtomicBool::new(true));
        let base = Instant::now();
        let st = stop.clone();
        let sender = std::thread::spawn(move || {
            // Default 50 µs timer slack would be a tenth of the interval.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
            let mut sent = Vec::with_capacity(1 << 16);
            let mut next = Instant::now();
            while !st.load(Ordering::Relaxed) {
                let now = Instant::now();
                if next > now {
                    std::thread::sleep(next - now);
                }
                let t = Instant::now();
                let mut p = [0u8; 16];
                p[..8].copy_from_slice(&(sent.len() as u64).to_be_bytes());
                p[8..].copy_from_slice(&((t - base).as_nanos() as u64).to_be_bytes());
                // Errors (ICMP unreachable reported on a connected socket) just mean "no reply".
                let _ = sock.send(&p);
                sent.push(t);
                // Keep the schedule, but after a stall restart it rather than send a burst.
                next = (next + interval).max(t);
            }
            sent
        });
        let rcv = receiving.clone();
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::with_capacity(1 << 16);
            let mut buf = [0u8; 64];
            while rcv.load(Ordering::Relaxed) {
                if let Ok(16) = rx.recv(&mut buf) {
                    got.push((u64::from_be_bytes(buf[..8].try_into().unwrap()), Instant::now()));
                }
            }
            got
        });
        Ok(Prober { stop, sender, receiver, receiving })
    }

    /// Stops sending, waits for late replies, and returns every probe in order.
    pub fn stop(self) -> Vec<Probe> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.sender.join().expect("prober sender");
        std::thread::sleep(Self::DRAIN);
        self.receiving.store(false, Ordering::Relaxed);
        let got = self.receiver.join().expect("prober receiver");
        let mut probes: Vec<Probe> = sent.into_iter().enumerate().map(|(i, sent)| Probe { seq: i as u64, sent, received: None }).collect();
        for (seq, at) in got {
            if let Some(p) = probes.get_mut(seq as usize) {
                p.received.get_or_insert(at);
            }
        }
        probes
    }
}

/// The longest silence between consecutive replies, from the last reply before `around`
/// (or from `around` itself when there was none) to the end of the records; `None` when
/// no reply came at or after `around`, i.e. the service never came back.
pub fn outage(records: &[Probe], around: Instant) -> Option<Duration> {
    let mut rx: Vec<Instant> = records.iter().filter_map(|p| p.received).collect();
    rx.sort_unstable();
    let first_after = rx.partition_point(|&t| t < around);
    if first_after == rx.len() {
        return None;
    }
    let start = first_after.checked_sub(1).map_or(around, |i| rx[i]);
    std::iter::once(start).chain(rx[first_after..].iter().copied()).collect::<Vec<_>>().windows(2).map(|w| w[1] - w[0]).max()
}

/// Probes that got no reply.
pub fn lost(records: &[Probe]) -> usize {
    records.iter().filter(|p| p.received.is_none()).count()
}

/// A gratuitous ARP or unsolicited Neighbor Advertisement seen on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// Kernel receive time, CLOCK_REALTIME nanoseconds.
    pub at_ns: u64,
    pub ip: IpAddr,
    /// The MAC announced for `ip`.
    pub mac: Mac,
}

/// Records, on a client's interface, every gratuitous ARP (sender IP == target IP == a
/// watched address; request or reply) and every unsolicited NA (target a watched address,
/// solicited flag clear), with the kernel's receive timestamp. Stops when dropped.
pub struct WireWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Announcement>>>,
    thread: Option<JoinHandle<()>>,
}

impl WireWatch {
    pub fn start(ns: &NetNs, iface: &str, vips: &[IpAddr]) -> io::Result<WireWatch> {
        // RawSocket keeps its descriptor private and has no recvmsg, and the timestamps come
        // as control messages: hence a socket of our own.
        let fd = ns.run(|| open_stamped(iface))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(vec![]));
        let (st, sn, vips) = (stop.clone(), seen.clone(), vips.to_vec());
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                let Some((n, at_ns)) = recv_stamped(&fd, &mut buf) else { continue };
                if let Some((ip, mac)) = announcement(&buf[..n]).filter(|(ip, _)| vips.contains(ip)) {
                    sn.lock().unwrap().push(Announcement { at_ns, ip, mac });
                }
            }
        });
        Ok(WireWatch { stop, seen, thread: Some(thread) })
    }

    /// Everything recorded so far, in arrival order.
    pub fn seen(&self) -> Vec<Announcement> {
        self.seen.lock().unwrap().clone()
    }

    /// The first announcement at or after `t_realtime_ns`: how long after it, and the MAC.
    pub fn first_after(&self, t_realtime_ns: u64) -> Option<(u64, Mac)> {
        self.seen.lock().unwrap().iter().find(|a| a.at_ns >= t_realtime_ns).map(|a| (a.at_ns - t_realtime_ns, a.mac))
    }

    /// [`WireWatch::first_after`], waiting up to `timeout` for it to happen.
    pub fn wait_first_after(&self, t_realtime_ns: u64, timeout: Duration) -> Option<(u64, Mac)> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.first_after(t_realtime_ns);
            if r.is_some() || Instant::now() >= deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for WireWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The address a frame announces and the MAC it announces for it, if it is a gratuitous
/// ARP or an unsolicited NA.
fn announcement(f: &[u8]) -> Option<(IpAddr, Mac)> {
    if let Some(a) = parse_arp(f) {
        return (a.spa == a.tpa && (a.op == 1 || a.op == 2)).then_some((IpAddr::V4(a.spa), a.sha));
    }
    let nd = parse_nd(f)?;
    if nd.icmp_type != ND_NEIGHBOR_ADVERT || nd.flags & NA_FLAG_SOLICITED != 0 {
        return None;
    }
    // The target link-layer option is what a neighbour cache takes; fall back to the source.
    let mac = nd.options.iter().find(|(t, v)| *t == ND_OPT_TARGET_LL && v.len() >= 6).map_or(nd.eth_src, |(_, v)| v[..6].try_into().unwrap());
    Some((IpAddr::V6(nd.target), mac))
}

/// AF_PACKET socket on `iface` (in the calling thread's namespace), all protocols, with
/// kernel receive timestamps and a receive timeout so its reader can notice a stop.
fn open_stamped(iface: &str) -> io::Result<OwnedFd> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    let proto = (libc::ETH_P_ALL as u16).to_be();
    let fd = cvt(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto as i32) })?;
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    cvt(unsafe { libc::bind(fd.as_raw_fd(), (&sll as *const libc::sockaddr_ll).cast(), size_of::<libc::sockaddr_ll>() as u32) })?;
    setopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)?;
    let tv = libc::timeval { tv_sec: 0, tv_usec: POLL.as_micros() as libc::suseconds_t };
    let tvp = (&tv as *const libc::timeval).cast();
    cvt(unsafe { libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, tvp, size_of::<libc::timeval>() as u32) })?;
    Ok(fd)
}

/// Next frame that arrived (not one this host sent) and its kernel receive time; `None`
/// on timeout.
fn recv_stamped(fd: &OwnedFd, buf: &mut [u8]) -> Option<(usize, u64)> {
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    let mut cbuf: Cmsgs = [0; 16];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut sll as *mut libc::sockaddr_ll).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_ll>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = size_of::<Cmsgs>();
    let n = unsafe { libc::recvmsg(fd.as_raw_fd(), &mut msg, 0) };
    if n < 0 || sll.sll_pkttype == libc::PACKET_OUTGOING {
        return None;
    }
    let mut at = None;
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                at = Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    // Without a kernel stamp (should not happen), the user-space time is the best left.
    Some((n as usize, at.unwrap_or_else(realtime_ns)))
}

/// One answer for a VIP seen on a client's wire: an ARP reply (to our requests or to
/// anyone's) or a gratuitous ARP, with its kernel receive time and the MAC it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub at_ns: u64,
    pub mac: Mac,
    pub gratuitous: bool,
}

/// Asks for an IPv4 VIP every `interval` from a client (broadcast ARP requests) and records
/// every answer for it on that client's wire: who answers the VIP, over time. Two nodes
/// answering one VIP show up here as answers from both within one interval, or as the old
/// owner answering again after the new one started.
pub struct ArpWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Answer>>>,
    threads: Vec<JoinHandle<()>>,
}

impl ArpWatch {
    pub fn start(ns: &NetNs, iface: &str, mac: Mac, ip: Ipv4Addr, vip: Ipv4Addr, interval: Duration) -> io::Result<ArpWatch> {
        let rx = ns.run(|| open_stamped(iface))?;
        let tx = ns.run(|| open_stamped(iface))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(vec![]));
        let (st, sn) = (stop.clone(), seen.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                let Some((n, at_ns)) = recv_stamped(&rx, &mut buf) else { continue };
                let Some(a) = parse_arp(&buf[..n]) else { continue };
                if a.spa != vip {
                    continue;
                }
                let gratuitous = a.spa == a.tpa;
                if a.op == 2 || gratuitous {
                    sn.lock().unwrap().push(Answer { at_ns, mac: a.sha, gratuitous });
                }
            }
        });
        let st = stop.clone();
        let frame = vip_packet::Arp::request(mac, ip, vip).to_bytes();
        let sender = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                unsafe { libc::send(tx.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
                std::thread::sleep(interval);
            }
        });
        Ok(ArpWatch { stop, seen, threads: vec![reader, sender] })
    }

    pub fn seen(&self) -> Vec<Answer> {
        let mut v = self.seen.lock().unwrap().clone();
        v.sort_by_key(|a| a.at_ns);
        v
    }

    /// The first answer at or after `t` (realtime ns) from a MAC that `pick` accepts.
    pub fn first_from(&self, t: u64, pick: impl Fn(Mac) -> bool) -> Option<Answer> {
        self.seen().into_iter().find(|a| a.at_ns >= t && pick(a.mac))
    }
}

impl Drop for ArpWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Moments two owners answered one VIP, from a capture: answers from two different owners
/// (as `owner` maps a MAC) closer together than `interval`, and any owner answering again
/// after another one had started answering. Returns a description of each.
pub fn overlaps(answers: &[Answer], interval: Duration, owner: impl Fn(Mac) -> Option<usize>) -> Vec<String> {
    let mut out = vec![];
    let mut order: Vec<usize> = vec![];
    let mut last: Option<(u64, usize)> = None;
    for a in answers {
        let Some(o) = owner(a.mac) else { continue };
        if let Some((t, p)) = last {
            if p != o && a.at_ns.saturating_sub(t) < interval.as_nanos() as u64 {
                out.push(format!("owners {p} and {o} answered {} µs apart", (a.at_ns - t) / 1000));
            }
        }
        if order.last() != Some(&o) {
            if order.contains(&o) {
                out.push(format!("owner {o} answered again at {} after {:?} took over", a.at_ns, order.last()));
            }
            order.push(o);
        }
        last = Some((a.at_ns, o));
    }
    out
}

/// Counts, from a client, broadcast ARP requests for a VIP that got no answer, one
/// request every 2 ms, until stopped.
pub struct ArpLoop {
    stop: Arc<AtomicBool>,
    unanswered: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl ArpLoop {
    pub fn start(c: &Client) -> ArpLoop {
        Self::start_for(c, VIP4)
    }

    pub fn start_for(c: &Client, vip: std::net::Ipv4Addr) -> ArpLoop {
        let sock = c.ns.run(|| RawSocket::open(&c.iface).unwrap());
        let (stop, unanswered, sent) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (st, un, se) = (stop.clone(), unanswered.clone(), sent.clone());
        let (mac, ip) = (c.mac, c.ip4);
        let thread = std::thread::spawn(move || {
            let req = Arp::request(mac, ip, vip).to_bytes();
            while !st.load(Ordering::Relaxed) {
                sock.send(&req).unwrap();
                se.fetch_add(1, Ordering::Relaxed);
                let got = sock.collect(Duration::from_millis(2), |f| {
                    vip_packet::parse_arp(f).filter(|a| a.op == 2 && a.spa == vip && a.tha == mac).map(|_| ())
                });
                if got.is_empty() {
                    un.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        ArpLoop { stop, unanswered, sent, thread }
    }

    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap();
        (self.sent.load(Ordering::Relaxed), self.unanswered.load(Ordering::Relaxed))
    }
}


/// The MACs that answer one broadcast ARP request from `c` for `vip` within 100 ms.
pub fn arp_answers(c: &Client, vip: std::net::Ipv4Addr) -> Vec<Mac> {
    let sock = c.ns.run(|| RawSocket::open(&c.iface).unwrap());
    sock.send(&Arp::request(c.mac, c.ip4, vip).to_bytes()).unwrap();
    let mut got = sock.collect(Duration::from_millis(100), |f| {
        vip_packet::parse_arp(f).filter(|a| a.op == 2 && a.spa == vip && a.tha == c.mac).map(|a| a.sha)
    });
    got.sort();
    got.dedup();
    got
}

