//! rtnetlink, synchronously: dumps of links, addresses and routes, adding and removing
//! addresses, and a socket subscribed to link events. Blocking sockets on purpose: the
//! link watcher owns a thread, so an event is handled the moment `recv` returns, with no
//! executor wake-up in between.

use std::{
    io,
    net::IpAddr,
    time::Instant,
};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
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

/// An rtnetlink socket for requests.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { sock, seq: 1 })
    }

    /// Sends one request and collects the replies until the dump ends or the ack comes.
    fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> Result<Vec<RouteNetlinkMessage>> {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        self.seq = self.seq.wrapping_add(1);
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut out = vec![];
        let mut rbuf = vec![0u8; 1 << 16];
        loop {
            let n = self.sock.recv(&mut &mut rbuf[..], 0)?;
            let mut off = 0;
            while off < n {
                let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rbuf[off..n])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let len = m.header.length as usize;
                if len == 0 {
                    return Err(NetlinkError::Decode("zero-length message".into()));
                }
                off += (len + 3) & !3;
                if m.header.sequence_number != self.seq {
                    continue;
                }
                match m.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(out),
                            Some(_) => Err(NetlinkError::Refused(e.to_io())),
                        }
                    }
                    NetlinkPayload::InnerMessage(inner) => {
                        out.push(inner);
                        if flags & NLM_F_DUMP == 0 && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    pub fn links(&mut self) -> Result<Vec<Link>> {
        let replies = self.request(RouteNetlinkMessage::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(Link::from_msg(l)),
                _ => None,
            })
            .collect())
    }

    /// Addresses by ifindex.
    pub fn addresses(&mut self) -> Result<Vec<(u32, Subnet)>> {
        let replies = self.request(RouteNetlinkMessage::GetAddress(AddressMessage::default()), NLM_F_DUMP)?;
        let mut out = vec![];
        for m in &replies {
            let RouteNetlinkMessage::NewAddress(a) = m else { continue };
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
            let replies = self.request(RouteNetlinkMessage::GetRoute(req), NLM_F_DUMP)?;
            for m in &replies {
                let RouteNetlinkMessage::NewRoute(r) = m else { continue };
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
        self.request(RouteNetlinkMessage::SetLink(m), NLM_F_ACK).map(|_| ())
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
        let m = Self::address_msg(ifindex, s);
        self.request(RouteNetlinkMessage::NewAddress(m), NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL).map(|_| ())
    }

    pub fn del_address(&mut self, ifindex: u32, s: &Subnet) -> Result<()> {
        let m = Self::address_msg(ifindex, s);
        self.request(RouteNetlinkMessage::DelAddress(m), NLM_F_ACK).map(|_| ())
    }
}

/// A socket subscribed to RTNLGRP_LINK.
pub struct LinkEvents {
    sock: Socket,
    buf: Vec<u8>,
}

const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV6_IFADDR: u32 = 9;

impl LinkEvents {
    pub fn open() -> Result<LinkEvents> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, 0))?;
        sock.add_membership(RTNLGRP_LINK)?;
        sock.add_membership(RTNLGRP_IPV4_IFADDR)?;
        sock.add_membership(RTNLGRP_IPV6_IFADDR)?;
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
