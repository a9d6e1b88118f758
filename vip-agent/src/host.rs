//! Changes the agent makes to the host outside BPF, recorded so they can be undone: a
//! local route per VIP, sysctls, RX VLAN offload, and MACs added to adapters' unicast
//! filters (MAC move). The record is also written to a state file so that an agent
//! restarted after SIGKILL still restores what the host had originally.

use std::{
    collections::HashSet,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::Subnet,
    netlink::{NetlinkError, Rtnl},
};

/// Per-adapter sysctls and the values the agent needs.
/// - arp_ignore=1: the kernel answers ARP only for addresses on the receiving adapter, so
///   a VIP on `lo` is answered by the data plane alone.
/// - arp_announce=2: the kernel's own ARP requests use the adapter's address, never a VIP.
/// - ignore_routes_with_linkdown=1: replies do not go out of an adapter that lost carrier.
pub const HOST_SYSCTLS: &[(&str, &str)] = &[
    // The kernel takes the larger of `all` and the device's value: without these, VLAN
    // sub-devices and adapters the agent does not manage would still answer for VIPs.
    ("ipv4/conf/all/arp_ignore", "1"),
    ("ipv4/conf/all/arp_announce", "2"),
];

/// Only with IPv6 VIPs: an IPv6 VIP held by a local route (not an address) can be bound
/// to, and used as the source of a UDP reply (IPV6_PKTINFO), only with this. IPv4 needs
/// nothing: the kernel takes the local table as proof of a local address.
pub const IPV6_SYSCTLS: &[(&str, &str)] = &[("ipv6/ip_nonlocal_bind", "1")];

pub const ADAPTER_SYSCTLS: &[(&str, &str)] = &[
    ("ipv4/conf/{}/arp_ignore", "1"),
    ("ipv4/conf/{}/arp_announce", "2"),
    ("ipv4/conf/{}/ignore_routes_with_linkdown", "1"),
    ("ipv6/conf/{}/ignore_routes_with_linkdown", "1"),
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SavedSysctl {
    pub path: PathBuf,
    pub original: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AddedAddress {
    pub ifindex: u32,
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

/// What the agent changed, in the order it changed it.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HostChanges {
    pub sysctls: Vec<SavedSysctl>,
    /// VIP addresses on `lo` (what agents before local routes did): removed on restore.
    #[serde(default)]
    pub addresses: Vec<AddedAddress>,
    /// The loopback's ifindex, the device of every VIP route.
    #[serde(default)]
    pub lo: u32,
    /// VIPs the agent holds as local routes (table local, dev lo, proto 86).
    #[serde(default)]
    pub routes: Vec<IpAddr>,
    /// Adapters whose RX VLAN offload the agent turned off (it was on).
    #[serde(default)]
    pub rxvlan_off: Vec<String>,
    /// (ifindex, MAC) added to an adapter's unicast filter for a MAC that moved to it.
    #[serde(default)]
    pub unicast: Vec<(u32, [u8; 6])>,
}

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GFLAGS: u32 = 0x25;
const ETHTOOL_SFLAGS: u32 = 0x26;
const ETH_FLAG_RXVLAN: u32 = 1 << 8;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

#[repr(C)]
struct IfreqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut EthtoolValue,
}

/// Reads (`set` None) or sets the RX VLAN offload flag of `dev` (SIOCETHTOOL, as
/// `ethtool -K dev rxvlan on|off`). Returns the flag as it was.
fn rxvlan(dev: &str, set: Option<bool>) -> std::io::Result<bool> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if dev.len() >= libc::IFNAMSIZ {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut v = EthtoolValue { cmd: ETHTOOL_GFLAGS, data: 0 };
    let mut ifr = IfreqData { name: [0; libc::IFNAMSIZ], data: &mut v };
    ifr.name[..dev.len()].copy_from_slice(dev.as_bytes());
    if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let was = v.data & ETH_FLAG_RXVLAN != 0;
    if let Some(on) = set {
        if on != was {
            v.cmd = ETHTOOL_SFLAGS;
            v.data = if on { v.data | ETH_FLAG_RXVLAN } else { v.data & !ETH_FLAG_RXVLAN };
            ifr.data = &mut v;
            if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut ifr) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(was)
}

pub struct Host {
    pub changes: HostChanges,
    state_file: PathBuf,
    /// `changes.routes` as a set.
    routes: HashSet<IpAddr>,
}

fn sysctl_path(template: &str, dev: &str) -> PathBuf {
    Path::new("/proc/sys/net").join(template.replace("{}", dev))
}

impl Host {
    /// Picks up the record a previous agent left (it was killed), or starts empty.
    pub fn open(state_file: PathBuf) -> Host {
        let changes = fs::read(&state_file)
            .ok()
            .and_then(|b| serde_json::from_slice::<HostChanges>(&b).ok())
            .unwrap_or_default();
        let routes = changes.routes.iter().copied().collect();
        Host { changes, state_file, routes }
    }

    pub fn adopted(&self) -> bool {
        !self.changes.sysctls.is_empty()
            || !self.changes.addresses.is_empty()
            || !self.changes.routes.is_empty()
            || !self.changes.rxvlan_off.is_empty()
    }

    fn save(&self) -> std::io::Result<()> {
        if let Some(dir) = self.state_file.parent() {
            fs::create_dir_all(dir)?;
        }
        let tmp = self.state_file.with_extension("tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(&self.changes).expect("serialisable"))?;
        fs::rename(&tmp, &self.state_file)
    }

    /// Sets the agent's sysctls on `dev`, remembering each original value the first time.
    /// A sysctl the kernel does not have for this device (IPv6 disabled) is left alone.
    pub fn prepare_adapter(&mut self, dev: &str) -> std::io::Result<()> {
        self.set_sysctls(ADAPTER_SYSCTLS, dev)
    }

    /// Turns RX VLAN offload off on an adapter that carries VLANs: a NIC that strips the
    /// 802.1Q tag before XDP runs would make every tagged request look untagged, and the
    /// data plane would never answer a VLAN VIP.
    pub fn disable_rxvlan(&mut self, dev: &str) -> std::io::Result<()> {
        if !rxvlan(dev, None)? {
            return Ok(());
        }
        if !self.changes.rxvlan_off.iter().any(|d| d == dev) {
            self.changes.rxvlan_off.push(dev.to_string());
            self.save()?;
        }
        rxvlan(dev, Some(false)).map(|_| ())
    }

    /// The host-wide sysctls ([`HOST_SYSCTLS`], and [`IPV6_SYSCTLS`] with IPv6 VIPs).
    pub fn prepare_host(&mut self, ipv6: bool) -> std::io::Result<()> {
        self.set_sysctls(HOST_SYSCTLS, "")?;
        if ipv6 {
            self.set_sysctls(IPV6_SYSCTLS, "")?;
        }
        Ok(())
    }

    fn set_sysctls(&mut self, list: &[(&str, &str)], dev: &str) -> std::io::Result<()> {
        for (template, value) in list {
            let path = sysctl_path(template, dev);
            let Ok(current) = fs::read_to_string(&path) else { continue };
            let current = current.trim().to_string();
            if !self.changes.sysctls.iter().any(|s| s.path == path) {
                self.changes.sysctls.push(SavedSysctl { path: path.clone(), original: current.clone() });
                self.save()?;
            }
            if current != *value {
                fs::write(&path, value)?;
            }
        }
        Ok(())
    }

    /// Makes the host take these VIPs as its own: a local route each (see
    /// [`Rtnl::add_local_routes`]), in batches. The record is written first, so a SIGKILL
    /// between the two cannot leave a route nobody will remove. A route that was already
    /// there and is not in the record belongs to the operator: it is used, and left in
    /// place at the end.
    pub fn add_vips(&mut self, rtnl: &mut Rtnl, lo: u32, addrs: &[IpAddr]) -> Result<(), NetlinkError> {
        let new: Vec<IpAddr> = addrs.iter().copied().filter(|a| !self.routes.contains(a)).collect();
        if new.is_empty() {
            return Ok(());
        }
        self.changes.lo = lo;
        self.changes.routes.extend(&new);
        self.routes.extend(&new);
        self.save().map_err(NetlinkError::Io)?;
        let results = rtnl.add_local_routes(lo, &new)?;
        let mut first_err = None;
        let mut not_ours = HashSet::new();
        for (a, r) in new.iter().zip(results) {
            match r {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    tracing::info!(addr = %a, "VIP already a local route; using it and leaving it there");
                    not_ours.insert(*a);
                }
                Err(e) => {
                    not_ours.insert(*a);
                    first_err.get_or_insert(NetlinkError::Refused(e));
                }
            }
        }
        if !not_ours.is_empty() {
            self.changes.routes.retain(|a| !not_ours.contains(a));
            self.routes.retain(|a| !not_ours.contains(a));
            let _ = self.save();
        }
        first_err.map_or(Ok(()), Err)
    }

    /// VIPs this agent holds on the host that are not in `keep` (gone from the config), and
    /// addresses on `lo` an older agent left.
    pub fn stale_vips(&self, keep: &HashSet<IpAddr>) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self.changes.routes.iter().copied().filter(|a| !keep.contains(a)).collect();
        v.extend(self.changes.addresses.iter().map(|a| a.addr));
        v
    }

    pub fn remove_vips(&mut self, rtnl: &mut Rtnl, addrs: &[IpAddr]) -> Result<(), NetlinkError> {
        let gone: HashSet<IpAddr> = addrs.iter().copied().collect();
        let old: Vec<AddedAddress> = self.changes.addresses.iter().filter(|a| gone.contains(&a.addr)).cloned().collect();
        self.changes.addresses.retain(|a| !gone.contains(&a.addr));
        let ours: Vec<IpAddr> = addrs.iter().copied().filter(|a| self.routes.contains(a)).collect();
        self.changes.routes.retain(|a| !gone.contains(a));
        self.routes.retain(|a| !gone.contains(a));
        let _ = self.save();
        for a in old {
            rtnl.del_address(a.ifindex, &Subnet { addr: a.addr, prefix: a.prefix })?;
        }
        if !ours.is_empty() {
            rtnl.del_local_routes(self.changes.lo, &ours)?;
        }
        Ok(())
    }

    /// Adds `mac` to (or removes it from) `ifindex`'s unicast filter, recorded.
    pub fn set_unicast(&mut self, rtnl: &mut Rtnl, ifindex: u32, mac: [u8; 6], on: bool) -> Result<(), NetlinkError> {
        let rec = (ifindex, mac);
        let had = self.changes.unicast.contains(&rec);
        if on && !had {
            self.changes.unicast.push(rec);
            self.save().map_err(NetlinkError::Io)?;
        }
        let r = rtnl.set_unicast_filter(ifindex, mac, on);
        if !on && had {
            self.changes.unicast.retain(|x| *x != rec);
            let _ = self.save();
        }
        r
    }

    /// Undoes everything, newest first, and removes the state file. Errors are logged and
    /// the rest is still undone: a half-restored host is worse than a logged warning.
    pub fn restore(&mut self, rtnl: &mut Rtnl) {
        for (ifindex, mac) in self.changes.unicast.drain(..).rev() {
            if let Err(e) = rtnl.set_unicast_filter(ifindex, mac, false) {
                tracing::debug!(ifindex, error = %e, "unicast filter entry not removed");
            }
        }
        let routes: Vec<IpAddr> = self.changes.routes.drain(..).collect();
        self.routes.clear();
        match rtnl.del_local_routes(self.changes.lo, &routes) {
            Ok(results) => {
                let failed = results.iter().filter(|r| r.as_ref().is_err_and(|e| e.raw_os_error() != Some(libc::ESRCH))).count();
                if failed > 0 {
                    tracing::warn!(failed, "some VIP routes could not be removed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not remove the VIP routes"),
        }
        for a in self.changes.addresses.drain(..).rev() {
            if let Err(e) = rtnl.del_address(a.ifindex, &Subnet { addr: a.addr, prefix: a.prefix }) {
                tracing::warn!(addr = %a.addr, error = %e, "could not remove VIP address");
            }
        }
        for dev in self.changes.rxvlan_off.drain(..).rev() {
            if let Err(e) = rxvlan(&dev, Some(true)) {
                tracing::debug!(%dev, error = %e, "rx VLAN offload not restored");
            }
        }
        for s in self.changes.sysctls.drain(..).rev() {
            if let Err(e) = fs::write(&s.path, &s.original) {
                // The adapter may have gone away; there is nothing to restore then.
                tracing::debug!(path = %s.path.display(), error = %e, "sysctl not restored");
            }
        }
        let _ = fs::remove_file(&self.state_file);
    }
}
