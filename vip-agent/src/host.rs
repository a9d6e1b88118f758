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
    /// The prefixes the agent holds as local routes (table local, dev lo, proto 86): the
    /// fewest aligned prefixes covering exactly the VIPs ([`cover`]).
    #[serde(default, with = "prefixes_as_text")]
    pub routes: Vec<Subnet>,
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

/// Prefixes in the state file as `ADDR/LEN` text.
mod prefixes_as_text {
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::config::Subnet;

    pub fn serialize<S: Serializer>(v: &[Subnet], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|p| p.to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Subnet>, D::Error> {
        let v: Vec<String> = Vec::deserialize(d)?;
        v.iter().map(|t| t.parse().map_err(serde::de::Error::custom)).collect()
    }
}

pub struct Host {
    pub changes: HostChanges,
    state_file: PathBuf,
    /// The record of a previous agent is gone although its pins are here: what the
    /// sysctls read now may be that agent's values, so the kernel's defaults are recorded
    /// as the originals instead.
    assume_defaults: bool,
}

/// What every sysctl the agent sets is on a kernel nobody changed.
const SYSCTL_DEFAULT: &str = "0";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "{path}: the record of this host's changes is unreadable ({why}); it is what lets the agent undo \
         them. Fix it, or run `vip-agent cleanup` to undo them from the kernel's defaults"
    )]
    Corrupt { path: String, why: String },
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// The fewest aligned prefixes whose union is exactly `addrs` (either family). A range of
/// N consecutive VIPs becomes at most about 2 log2(N) routes: 100,000 VIPs in two ranges
/// are a few dozen routes, so adding them takes microseconds and the kernel's walks of
/// its routing tables (IPv6 walks every route on every carrier change) stay short.
pub fn cover(addrs: &[IpAddr]) -> Vec<Subnet> {
    let mut out = vec![];
    for v6 in [false, true] {
        let width: u32 = if v6 { 128 } else { 32 };
        let mut xs: Vec<u128> = addrs
            .iter()
            .filter(|a| a.is_ipv6() == v6)
            .map(|a| match a {
                IpAddr::V4(a) => u32::from(*a) as u128,
                IpAddr::V6(a) => u128::from(*a),
            })
            .collect();
        xs.sort_unstable();
        xs.dedup();
        let mut i = 0;
        while i < xs.len() {
            let mut j = i;
            while j + 1 < xs.len() && xs[j + 1] == xs[j] + 1 {
                j += 1;
            }
            // [lo, hi] consecutive: cut into aligned power-of-two blocks.
            let (mut lo, hi) = (xs[i], xs[j]);
            loop {
                let align = if lo == 0 { width } else { lo.trailing_zeros().min(width) };
                let mut bits = align;
                while bits > 0 && (bits >= 128 || lo + ((1u128 << bits) - 1) > hi) {
                    bits -= 1;
                }
                let addr = if v6 { IpAddr::V6(lo.into()) } else { IpAddr::V4((lo as u32).into()) };
                out.push(Subnet { addr, prefix: (width - bits) as u8 });
                let size = 1u128 << bits;
                if hi - lo < size {
                    break;
                }
                lo += size;
                if lo > hi {
                    break;
                }
            }
            i = j + 1;
        }
    }
    out
}

/// Every sysctl the agent sets, on every device there is, back to the kernel's default.
fn reset_sysctls_to_defaults() {
    let devs: Vec<String> = fs::read_dir("/proc/sys/net/ipv4/conf")
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    for dev in devs.iter().filter(|d| *d != "default") {
        for (template, _) in ADAPTER_SYSCTLS.iter().chain(HOST_SYSCTLS) {
            let p = sysctl_path(template, dev);
            if p.exists() && (template.contains("{}") || dev == "all") {
                let _ = fs::write(&p, SYSCTL_DEFAULT);
            }
        }
    }
    for (template, _) in IPV6_SYSCTLS {
        let _ = fs::write(sysctl_path(template, ""), SYSCTL_DEFAULT);
    }
}

fn sysctl_path(template: &str, dev: &str) -> PathBuf {
    Path::new("/proc/sys/net").join(template.replace("{}", dev))
}

impl Host {
    /// Picks up the record a previous agent left (it was killed), or starts empty. A
    /// record that cannot be read is refused, never taken as empty: the next agent would
    /// record its predecessor's values as the originals. `after_agent`: a previous agent's
    /// pins are here, so a missing record was lost, not never written.
    pub fn open(state_file: PathBuf, after_agent: bool) -> Result<Host, StateError> {
        let path = state_file.display().to_string();
        let (changes, assume_defaults) = match fs::read(&state_file) {
            Ok(b) => match serde_json::from_slice::<HostChanges>(&b) {
                Ok(c) => (c, false),
                Err(e) => return Err(StateError::Corrupt { path, why: e.to_string() }),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if after_agent {
                    tracing::warn!(
                        state = %path,
                        "a previous agent's pins are here but its record of host changes is not: the sysctls it set will be put back to the kernel's defaults"
                    );
                }
                (HostChanges::default(), after_agent)
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        Ok(Host { changes, state_file, assume_defaults })
    }

    /// Undoes what the record says and removes it (`vip-agent cleanup`).
    pub fn undo_recorded(state_file: PathBuf, rtnl: &mut Rtnl) -> Result<bool, StateError> {
        let path = state_file.display().to_string();
        let mut host = match Host::open(state_file.clone(), false) {
            Ok(h) => h,
            Err(StateError::Corrupt { .. }) => {
                // Unreadable: the agent's sysctls go back to the kernel's defaults on
                // every device, and the record goes.
                tracing::warn!(state = %path, "unreadable record: sysctls put back to the kernel's defaults");
                reset_sysctls_to_defaults();
                let _ = fs::remove_file(&state_file);
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let had = host.adopted();
        host.restore(rtnl);
        let _ = fs::remove_file(&state_file);
        Ok(had)
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
                let original = if self.assume_defaults { SYSCTL_DEFAULT.to_string() } else { current.clone() };
                self.changes.sysctls.push(SavedSysctl { path: path.clone(), original });
                self.save()?;
            }
            if current != *value {
                fs::write(&path, value)?;
            }
        }
        Ok(())
    }

    /// Makes the host take exactly these VIPs as its own: local routes for their
    /// [`cover`] (see [`Rtnl::add_local_routes`]); prefixes it held before and no longer
    /// needs are removed after the new ones are in, so no VIP is ever without a route. The
    /// record is written first, so a SIGKILL between the two cannot leave a route nobody
    /// will remove. A route that was already there and is not in the record belongs to the
    /// operator: it is used, and left in place at the end.
    pub fn set_vips(&mut self, rtnl: &mut Rtnl, lo: u32, addrs: &[IpAddr]) -> Result<(), NetlinkError> {
        let want = cover(addrs);
        let have: HashSet<Subnet> = self.changes.routes.iter().cloned().collect();
        let new: Vec<Subnet> = want.iter().filter(|s| !have.contains(s)).cloned().collect();
        let wanted: HashSet<&Subnet> = want.iter().collect();
        let stale: Vec<Subnet> = self.changes.routes.iter().filter(|s| !wanted.contains(s)).cloned().collect();
        let mut first_err = None;
        if !new.is_empty() {
            self.changes.lo = lo;
            self.changes.routes.extend(new.iter().cloned());
            self.save().map_err(NetlinkError::Io)?;
            let results = rtnl.add_local_routes(lo, &new)?;
            let mut not_ours = HashSet::new();
            for (p, r) in new.iter().zip(results) {
                match r {
                    Ok(()) => {}
                    // A predecessor's pins are here and its record is lost: the route is
                    // most likely its own (proto 86), left by its SIGKILL; it is ours now.
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) && self.assume_defaults => {
                        tracing::info!(prefix = %p, "VIP route already there, left by the previous agent; taken over");
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        tracing::info!(prefix = %p, "VIP route already there; using it and leaving it there");
                        not_ours.insert(p.clone());
                    }
                    Err(e) => {
                        not_ours.insert(p.clone());
                        first_err.get_or_insert(NetlinkError::Refused(e));
                    }
                }
            }
            if !not_ours.is_empty() {
                self.changes.routes.retain(|p| !not_ours.contains(p));
                let _ = self.save();
            }
        }
        if !stale.is_empty() {
            let gone: HashSet<&Subnet> = stale.iter().collect();
            self.changes.routes.retain(|p| !gone.contains(p));
            let _ = self.save();
            rtnl.del_local_routes(self.changes.lo, &stale)?;
        }
        // What agents before local routes left: VIP addresses on lo.
        for a in std::mem::take(&mut self.changes.addresses) {
            let _ = self.save();
            rtnl.del_address(a.ifindex, &Subnet { addr: a.addr, prefix: a.prefix })?;
        }
        first_err.map_or(Ok(()), Err)
    }

    /// The local routes the agent holds.
    pub fn routes(&self) -> &[Subnet] {
        &self.changes.routes
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
        let routes: Vec<Subnet> = self.changes.routes.drain(..).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(first: &str, n: u128) -> Vec<IpAddr> {
        let f: IpAddr = first.parse().unwrap();
        (0..n)
            .map(|i| match f {
                IpAddr::V4(a) => IpAddr::V4(((u32::from(a) as u128 + i) as u32).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) + i).into()),
            })
            .collect()
    }

    /// The cover holds every address and nothing else, aligned, and is small.
    #[test]
    fn cover_is_exact_and_small() {
        let show = |v: &[Subnet]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(show(&cover(&ips("192.0.2.10", 1))), ["192.0.2.10/32"]);
        assert_eq!(show(&cover(&ips("192.0.2.8", 8))), ["192.0.2.8/29"]);
        assert_eq!(show(&cover(&ips("192.0.2.7", 3))), ["192.0.2.7/32", "192.0.2.8/31"]);
        assert_eq!(show(&cover(&ips("0.0.0.0", 2))), ["0.0.0.0/31"]);
        assert_eq!(show(&cover(&ips("255.255.255.254", 2))), ["255.255.255.254/31"]);
        let mut mixed = ips("10.1.0.1", 50_000);
        mixed.extend(ips("2001:db8:1::1", 50_000));
        mixed.extend(ips("10.1.0.1", 10)); // duplicates
        let c = cover(&mixed);
        assert!(c.len() <= 2 * 2 * 17, "{} prefixes", c.len());
        // Exact: every address is in exactly one prefix, and the sizes add up.
        let total: u128 = c.iter().map(|s| 1u128 << ((if s.is_v6() { 128 } else { 32 }) - s.prefix as u32)).sum();
        assert_eq!(total, 100_000);
        for a in mixed.iter().step_by(997) {
            assert_eq!(c.iter().filter(|s| s.contains(a)).count(), 1, "{a}");
        }
        for outside in ["10.1.0.0", "10.1.195.81", "2001:db8:1::", "2001:db8:1::c351"] {
            let a: IpAddr = outside.parse().unwrap();
            assert!(!c.iter().any(|s| s.contains(&a)), "{a} covered");
        }
        // Gaps split runs.
        let mut gap = ips("192.0.2.0", 4);
        gap.remove(2);
        assert_eq!(show(&cover(&gap)), ["192.0.2.0/31", "192.0.2.3/32"]);
    }
}
