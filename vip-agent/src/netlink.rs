//! rtnetlink, synchronously: dumps of links, addresses and routes, adding and removing
//! addresses, and a socket subscribed to link events. Blocking sockets on purpose: the
//! link watcher owns a thread, so an event is handled the moment `recv` returns, with no
//! executor wake-up in between.

use std::{
    io,
    net::IpAddr,
    time::Instant,
};

use futures::TryStreamExt;
use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    neighbour::{NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::config::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("netlink: {0}")]
    Decode(String),
    #[error("netlink request refused: {0}")]
    Refused(io::Error),
}

type Result<T> = std::result::Result<T, NetlinkError>;

/// One link as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// Administratively up and with carrier (IFF_UP and IFF_LOWER_UP).
    pub running: bool,
    /// The lower device of a VLAN or macvlan (IFLA_LINK), if any.
    pub lower: Option<u32>,
}

impl Link {
    fn from_msg(m: &LinkMessage) -> Link {
        let mut l = Link {
            ifindex: m.header.index,
            name: String::new(),
            mac: None,
            running: m.header.flags.contains(LinkFlags::Up) && m.header.flags.contains(LinkFlags::LowerUp),
            lower: None,
        };
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => l.name = n.clone(),
                LinkAttribute::Address(b) if b.len() == 6 => l.mac = Some(b[..6].try_into().unwrap()),
                LinkAttribute::Link(i) => l.lower = Some(*i),
                _ => {}
            }
        }
        // A veth's IFLA_LINK names its peer, in another namespace: not a lower device here.
        if m.attributes.iter().any(|a| matches!(a, LinkAttribute::LinkNetNsId(_))) {
            l.lower = None;
        }
        l
    }
}

/// A change the link watcher reacts to.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// RTM_NEWLINK: a link appeared or changed (carrier, flags, name).
    Changed(Link),
    /// RTM_DELLINK.
    Removed { ifindex: u32, name: String },
    /// RTM_NEWADDR / RTM_DELADDR: some interface's addresses changed (which adapters
    /// are in which subnets, for takeover checks).
    Addresses,
}

/// Requests to the kernel's routing netlink. The slow path (dumps of links, addresses and
/// routes; address, link and neighbour changes) goes through the `rtnetlink` crate, whose
/// connection runs on a thread of its own (callers are synchronous, on threads that must
/// not wait on an executor). The VIPs' local routes, up to 100,000 at a start, go through
/// a socket of our own in batches of 256 requests per send: measured against `rtnetlink`
/// in `cargo xtask bench netlink` (docs/design.md).
pub struct Rtnl {
    handle: rtnetlink::Handle,
    sock: Socket,
    seq: u32,
}

/// Runs a request future of the `rtnetlink` handle to completion on the calling thread
/// (the connection itself runs on its own thread).
fn wait<T>(f: impl std::future::Future<Output = std::result::Result<T, rtnetlink::Error>>) -> Result<T> {
    futures::executor::block_on(f).map_err(from_rtnetlink)
}

fn from_rtnetlink(e: rtnetlink::Error) -> NetlinkError {
    match e {
        rtnetlink::Error::NetlinkError(m) => NetlinkError::Refused(m.to_io()),
        other => NetlinkError::Decode(other.to_string()),
    }
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        use std::os::fd::AsRawFd;
        // The crate's connection: its socket is made here (in this thread's network
        // namespace) and served by a thread that ends when the handle is dropped.
        let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        let (mut conn, handle, _) = {
            let _in = rt.enter();
            rtnetlink::new_connection()?
        };
        // Strict checking: a dump's header filters in the kernel (the route dump asks for
        // the main table only, not the 100,000 VIP routes of the local table).
        {
            use netlink_sys::AsyncSocket;
            conn.socket_mut().socket_mut().set_netlink_get_strict_chk(true)?;
        }
        std::thread::Builder::new().name("netlink".into()).spawn(move || rt.block_on(conn))?;
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // Room for a batch's acks; acks without a copy of the request; and never a wait
        // without end on a reply the kernel did not send.
        let _ = sock.set_rx_buf_sz(4 << 20);
        let fd = sock.as_raw_fd();
        let one: libc::c_int = 1;
        const SOL_NETLINK: libc::c_int = 270;
        const NETLINK_CAP_ACK: libc::c_int = 10;
        let tv = libc::timeval { tv_sec: 10, tv_usec: 0 };
        unsafe {
            libc::setsockopt(fd, SOL_NETLINK, NETLINK_CAP_ACK, &one as *const _ as *const libc::c_void, 4);
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const _ as *const libc::c_void,
                size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Rtnl { handle, sock, seq: 1 })
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let msgs: Vec<LinkMessage> = wait(self.handle.link().get().execute().try_collect())?;
        Ok(msgs.iter().map(Link::from_msg).collect())
    }

    /// Addresses by ifindex.
    pub fn addresses(&mut self) -> Result<Vec<(u32, Subnet)>> {
        let msgs: Vec<AddressMessage> = wait(self.handle.address().get().execute().try_collect())?;
        let mut out = vec![];
        for a in &msgs {
            // IFA_LOCAL is the interface's own address on point-to-point links; IFA_ADDRESS otherwise.
            let local = a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                a.attributes.iter().find_map(|x| match x {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push((a.header.index, Subnet { addr, prefix: a.header.prefix_len }));
            }
        }
        Ok(out)
    }

    /// Unicast routes of the main table, by output ifindex.
    pub fn routes(&mut self) -> Result<Vec<(u32, Subnet)>> {
        let mut out = vec![];
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut req = RouteMessage::default();
            req.header.address_family = family;
            req.header.table = RouteHeader::RT_TABLE_MAIN;
            let msgs: Vec<RouteMessage> = wait(self.handle.route().get(req).execute().try_collect())?;
            for r in &msgs {
                let table = r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                });
                if r.header.kind != RouteType::Unicast || table.unwrap_or(r.header.table as u32) != RouteHeader::RT_TABLE_MAIN as u32 {
                    continue;
                }
                let mut oif = None;
                let mut dst = None;
                for a in &r.attributes {
                    match a {
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
                        RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
                        _ => {}
                    }
                }
                let dst = dst.unwrap_or(match family {
                    AddressFamily::Inet => IpAddr::V4(0.into()),
                    _ => IpAddr::V6(0u128.into()),
                });
                if let Some(oif) = oif {
                    out.push((oif, Subnet { addr: dst, prefix: r.header.destination_prefix_length }));
                }
            }
        }
        Ok(out)
    }

    /// Sets a link administratively up or down (what `ip link set DEV up|down` does).
    pub fn set_link_up(&mut self, ifindex: u32, up: bool) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = ifindex;
        m.header.flags = if up { LinkFlags::Up } else { LinkFlags::empty() };
        m.header.change_mask = LinkFlags::Up;
        wait(self.handle.link().set(m).execute())
    }

    fn address_msg(ifindex: u32, s: &Subnet) -> AddressMessage {
        let mut m = AddressMessage::default();
        m.header.family = match s.addr {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.prefix_len = s.prefix;
        m.header.index = ifindex;
        m.attributes.push(AddressAttribute::Local(s.addr));
        m.attributes.push(AddressAttribute::Address(s.addr));
        m
    }

    /// Adds an address; fails with EEXIST if it is already there.
    pub fn add_address(&mut self, ifindex: u32, s: &Subnet) -> Result<()> {
        wait(self.handle.address().add(ifindex, s.addr, s.prefix).execute())
    }

    pub fn del_address(&mut self, ifindex: u32, s: &Subnet) -> Result<()> {
        wait(self.handle.address().del(Self::address_msg(ifindex, s)).execute())
    }

    /// A route of type `local` for a prefix of VIPs in the local table, through `lo`: the
    /// host takes its addresses as its own (traffic to them is delivered, sockets bind to
    /// them, replies leave from them) without holding them on an interface (adding
    /// addresses is O(n) each in the kernel). Tagged with [`VIP_ROUTE_PROTOCOL`].
    pub fn local_route_msg(lo: u32, p: &Subnet) -> RouteMessage {
        let mut m = RouteMessage::default();
        let prefix = p.prefix;
        let (family, dst) = match p.addr {
            IpAddr::V4(a) => (AddressFamily::Inet, RouteAddress::Inet(a)),
            IpAddr::V6(a) => (AddressFamily::Inet6, RouteAddress::Inet6(a)),
        };
        m.header.address_family = family;
        m.header.destination_prefix_length = prefix;
        m.header.table = RT_TABLE_LOCAL;
        m.header.protocol = RouteProtocol::Other(VIP_ROUTE_PROTOCOL);
        m.header.scope = RouteScope::Host;
        m.header.kind = RouteType::Local;
        m.attributes.push(RouteAttribute::Destination(dst));
        m.attributes.push(RouteAttribute::Oif(lo));
        m
    }

    /// Adds a local route for each prefix (batched: many messages per send). One result
    /// per prefix; EEXIST comes back as an error for the caller to judge.
    pub fn add_local_routes(&mut self, lo: u32, prefixes: &[Subnet]) -> Result<Vec<std::result::Result<(), io::Error>>> {
        let msgs = prefixes.iter().map(|p| RouteNetlinkMessage::NewRoute(Self::local_route_msg(lo, p))).collect();
        self.batch(msgs, NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Removes these local routes (batched). One result per prefix.
    pub fn del_local_routes(&mut self, lo: u32, prefixes: &[Subnet]) -> Result<Vec<std::result::Result<(), io::Error>>> {
        let msgs = prefixes.iter().map(|p| RouteNetlinkMessage::DelRoute(Self::local_route_msg(lo, p))).collect();
        self.batch(msgs, NLM_F_ACK)
    }

    /// Adds (or removes) `mac` to the unicast address filter of `ifindex` (what `bridge fdb
    /// add MAC dev DEV self permanent` does): a NIC then receives frames sent to a MAC that
    /// moved to it. Devices without a filter go promiscuous instead (the kernel's choice).
    pub fn set_unicast_filter(&mut self, ifindex: u32, mac: [u8; 6], add: bool) -> Result<()> {
        let r = if add {
            wait(self.handle.neighbours().add_bridge(ifindex, &mac).state(NeighbourState::Permanent).flags(NeighbourFlags::Own).execute())
        } else {
            let mut m = NeighbourMessage::default();
            m.header.family = AddressFamily::Bridge;
            m.header.ifindex = ifindex;
            m.header.state = NeighbourState::Permanent;
            m.header.flags = NeighbourFlags::Own;
            m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            wait(self.handle.neighbours().del(m).execute())
        };
        match r {
            Err(NetlinkError::Refused(e)) if add && e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(NetlinkError::Refused(e)) if !add && e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Forgets the neighbour entries of `ifindex` that are still resolving or have failed
    /// (both families), so the next packet to each asks again at once instead of after the
    /// kernel's retransmit time (a second). Returns how many went.
    pub fn flush_unresolved(&mut self, ifindex: u32) -> Result<usize> {
        let mut msgs: Vec<NeighbourMessage> = vec![];
        for f in [AddressFamily::Inet, AddressFamily::Inet6] {
            msgs.extend(wait(self.handle.neighbours().get().set_address_family(f).execute().try_collect::<Vec<_>>())?);
        }
        let mut n = 0;
        for nb in msgs {
            if nb.header.ifindex != ifindex
                || !matches!(nb.header.family, AddressFamily::Inet | AddressFamily::Inet6)
                || !matches!(nb.header.state, NeighbourState::Incomplete | NeighbourState::Failed)
            {
                continue;
            }
            let mut del = NeighbourMessage::default();
            del.header = nb.header.clone();
            del.attributes = nb.attributes.iter().filter(|a| matches!(a, NeighbourAttribute::Destination(_))).cloned().collect();
            if wait(self.handle.neighbours().del(del).execute()).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Sends many requests, each acked, a chunk at a time; returns each one's result in
    /// order. Only a socket failure fails the whole batch.
    fn batch(&mut self, msgs: Vec<RouteNetlinkMessage>, flags: u16) -> Result<Vec<std::result::Result<(), io::Error>>> {
        // Small enough that every ack fits the receive buffer (an ack is a whole skb).
        const CHUNK_BYTES: usize = 16 * 1024;
        const CHUNK_MSGS: usize = 256;
        let mut results: Vec<Option<std::result::Result<(), io::Error>>> = (0..msgs.len()).map(|_| None).collect();
        let base = self.seq.wrapping_add(1);
        self.seq = self.seq.wrapping_add(msgs.len() as u32 + 1);
        let mut rbuf = vec![0u8; 1 << 16];
        let mut i = 0;
        while i < msgs.len() {
            let mut buf = Vec::with_capacity(CHUNK_BYTES);
            let first = i;
            while i < msgs.len() {
                let mut header = NetlinkHeader::default();
                header.flags = NLM_F_REQUEST | flags;
                header.sequence_number = base.wrapping_add(i as u32);
                let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msgs[i].clone()));
                req.finalize();
                let n = req.buffer_len();
                if !buf.is_empty() && (buf.len() + n > CHUNK_BYTES || i - first >= CHUNK_MSGS) {
                    break;
                }
                let at = buf.len();
                buf.resize(at + n, 0);
                req.serialize(&mut buf[at..]);
                i += 1;
            }
            self.sock.send(&buf, 0)?;
            let mut pending = i - first;
            while pending > 0 {
                let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
                let mut off = 0;
                while off + 16 <= n {
                    let len = u32::from_ne_bytes(rbuf[off..off + 4].try_into().expect("4 bytes")) as usize;
                    let kind = u16::from_ne_bytes(rbuf[off + 4..off + 6].try_into().expect("2 bytes"));
                    let seq = u32::from_ne_bytes(rbuf[off + 8..off + 12].try_into().expect("4 bytes"));
                    if len < 16 || off + len > n {
                        return Err(NetlinkError::Decode("truncated ack".into()));
                    }
                    let k = seq.wrapping_sub(base) as usize;
                    // NLMSG_ERROR: an i32 error code (0 for an ack) after the header.
                    if kind == 2 && len >= 20 && (first..i).contains(&k) && results[k].is_none() {
                        let code = i32::from_ne_bytes(rbuf[off + 16..off + 20].try_into().expect("4 bytes"));
                        results[k] = Some(if code == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(-code)) });
                        pending -= 1;
                    }
                    off += (len + 3) & !3;
                }
            }
        }
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Err(io::Error::other("no answer")))).collect())
    }
}

/// The local routing table (`RT_TABLE_LOCAL`).
pub const RT_TABLE_LOCAL: u8 = 255;
/// The routing protocol number the agent's VIP routes carry (`ip route show table local
/// proto 86`), so an operator can tell them from the kernel's own.
pub const VIP_ROUTE_PROTOCOL: u8 = 86;

/// A socket subscribed to link events only (RTNLGRP_LINK): carrier changes never queue
/// behind address or route notifications, which have a socket of their own
/// ([`HostEvents`]).
pub struct LinkEvents {
    sock: Socket,
    buf: Vec<u8>,
}

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

impl LinkEvents {
    pub fn open() -> Result<LinkEvents> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, 0))?;
        sock.add_membership(RTNLGRP_LINK)?;
        // A burst of link changes must not overflow the queue while a failover is handled.
        let _ = sock.set_rx_buf_sz(4 << 20);
        Ok(LinkEvents { sock, buf: vec![0u8; 1 << 16] })
    }

    /// Blocks for the next datagram; returns when it arrived (read right after `recv`)
    /// and the link events in it. ENOBUFS (events were lost) is returned as an error so
    /// the caller can resynchronise from a dump.
    pub fn recv(&mut self) -> Result<(Instant, Vec<LinkEvent>)> {
        let n = self.sock.recv(&mut &mut self.buf[..], 0)?;
        let at = Instant::now();
        Ok((at, parse_link_events(&self.buf[..n])))
    }

    /// The next datagram if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Result<Option<(Instant, Vec<LinkEvent>)>> {
        match self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
            Ok(n) => Ok(Some((Instant::now(), parse_link_events(&self.buf[..n])))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.sock.as_raw_fd()
    }
}

/// A socket subscribed to address and route notifications (where VIPs may be taken
/// over), read apart from link events. A socket filter drops notifications about the
/// local table before they are queued: the agent's own VIP routes (100,000 at start)
/// never reach it.
pub struct HostEvents {
    sock: Socket,
    buf: Vec<u8>,
}

impl HostEvents {
    pub fn open() -> Result<HostEvents> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, 0))?;
        attach_local_route_filter(&sock)?;
        for g in [RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV4_ROUTE, RTNLGRP_IPV6_ROUTE] {
            sock.add_membership(g)?;
        }
        let _ = sock.set_rx_buf_sz(1 << 20);
        // Waits end after a second without news, so the watcher can see it is no
        // longer needed (a live reload starts another).
        let tv = libc::timeval { tv_sec: 1, tv_usec: 0 };
        // SAFETY: a valid socket and a timeval of the size given.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error().into());
        }
        Ok(HostEvents { sock, buf: vec![0u8; 1 << 16] })
    }

    /// Reads whatever is queued, without waiting; returns how many datagrams.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        loop {
            match self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(_) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => n += 1,
                Err(_) => return n,
            }
        }
    }

    /// Waits for a notification, then drains whatever else is queued (a burst of changes
    /// is one wake-up). Returns how many datagrams were read; a lost burst (ENOBUFS) also
    /// counts as a change. 0 when nothing came within a second.
    pub fn wait_and_drain(&mut self) -> Result<usize> {
        let mut n = match self.sock.recv(&mut &mut self.buf[..], 0) {
            Ok(_) => 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        loop {
            match self.sock.recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT) {
                Ok(_) => n += 1,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => n += 1,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(n),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;

/// A classic BPF socket filter: drop RTM_NEWROUTE / RTM_DELROUTE of the local table (each
/// notification is a datagram of its own), accept the rest.
fn attach_local_route_filter(sock: &Socket) -> Result<()> {
    use std::os::fd::AsRawFd;
    // `ld h` loads big-endian; the netlink header is in host order.
    let as_loaded = |t: u16| u16::from_be_bytes(t.to_ne_bytes()) as u32;
    let f = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LD_H_ABS: u16 = 0x28;
    const LD_B_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    let prog = [
        f(LD_H_ABS, 0, 0, 4),                                // nlmsg_type
        f(JEQ_K, 2, 0, as_loaded(RTM_NEWROUTE)),             // -> 4
        f(JEQ_K, 1, 0, as_loaded(RTM_DELROUTE)),             // -> 4
        f(RET_K, 0, 0, u32::MAX),                            // anything else: keep
        f(LD_B_ABS, 0, 0, 16 + 4),                           // rtm_table
        f(JEQ_K, 0, 1, RT_TABLE_LOCAL as u32),               // local -> 6, else -> 7
        f(RET_K, 0, 0, 0),
        f(RET_K, 0, 0, u32::MAX),
    ];
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &fprog as *const _ as *const libc::c_void,
            size_of::<libc::sock_fprog>() as u32,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_LINK: u16 = 5;
const IFLA_LINK_NETNSID: u16 = 37;
const IFF_UP: u32 = 0x1;
const IFF_LOWER_UP: u32 = 0x10000;

/// Parses link notifications by hand: only the header and three attributes are needed,
/// and a full decode of every attribute (statistics, AF_SPEC, ...) costs tens of
/// microseconds on the failover path. Anything malformed ends the parse.
pub fn parse_link_events(buf: &[u8]) -> Vec<LinkEvent> {
    let u16_at = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let mut out = vec![];
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32_at(buf, off) as usize;
        if len < 16 || off + len > buf.len() {
            break;
        }
        let kind = u16_at(buf, off + 4);
        let msg = &buf[off + 16..off + len];
        off += (len + 3) & !3;
        if kind == RTM_NEWADDR || kind == RTM_DELADDR {
            if !matches!(out.last(), Some(LinkEvent::Addresses)) {
                out.push(LinkEvent::Addresses);
            }
            continue;
        }
        // Only AF_UNSPEC messages describe the device itself: a bridge port leaving its
        // bridge sends an AF_BRIDGE RTM_DELLINK for a device that still exists.
        if (kind != RTM_NEWLINK && kind != RTM_DELLINK) || msg.len() < 16 || msg[0] != 0 {
            continue;
        }
        let ifindex = u32_at(msg, 4);
        let flags = u32_at(msg, 8);
        let mut l = Link {
            ifindex,
            name: String::new(),
            mac: None,
            running: flags & IFF_UP != 0 && flags & IFF_LOWER_UP != 0,
            lower: None,
        };
        let mut a = 16;
        let mut other_ns = false;
        while a + 4 <= msg.len() {
            let alen = u16_at(msg, a) as usize;
            let atype = u16_at(msg, a + 2) & 0x3fff;
            if alen < 4 || a + alen > msg.len() {
                break;
            }
            let v = &msg[a + 4..a + alen];
            match atype {
                IFLA_IFNAME => l.name = String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap_or(&[])).into_owned(),
                IFLA_ADDRESS if v.len() == 6 => l.mac = Some(v.try_into().unwrap()),
                IFLA_LINK if v.len() == 4 => l.lower = Some(u32_at(v, 0)),
                _ => {}
            }
            if atype == IFLA_LINK_NETNSID {
                other_ns = true;
            }
            a += (alen + 3) & !3;
        }
        if other_ns {
            l.lower = None;
        }
        out.push(if kind == RTM_NEWLINK { LinkEvent::Changed(l) } else { LinkEvent::Removed { ifindex, name: l.name } });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload};

    /// The hand parser agrees with netlink-packet-route on a message it serialises,
    /// and stops cleanly on every truncation.
    #[test]
    fn hand_parser_matches_the_library() {
        let mut m = LinkMessage::default();
        m.header.index = 7;
        m.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        m.attributes.push(LinkAttribute::IfName("vip0".into()));
        m.attributes.push(LinkAttribute::Address(vec![2, 0, 0, 0, 1, 0]));
        m.attributes.push(LinkAttribute::Link(3));
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::NewLink(m.clone())));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        let got = parse_link_events(&buf);
        assert_eq!(got.len(), 1);
        let LinkEvent::Changed(l) = &got[0] else { panic!("{got:?}") };
        assert_eq!(*l, Link::from_msg(&m));
        assert!(l.running && l.name == "vip0" && l.lower == Some(3));
        for cut in 0..buf.len() {
            let _ = parse_link_events(&buf[..cut]);
        }
        m.header.flags = LinkFlags::Up;
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::DelLink(m)));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert!(matches!(&parse_link_events(&buf)[..], [LinkEvent::Removed { ifindex: 7, .. }]));
        let a = Rtnl::address_msg(7, &Subnet { addr: "192.0.2.1".parse().unwrap(), prefix: 24 });
        let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::from(RouteNetlinkMessage::NewAddress(a)));
        nl.finalize();
        let mut buf = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut buf);
        assert!(matches!(&parse_link_events(&buf)[..], [LinkEvent::Addresses]));
    }
}
