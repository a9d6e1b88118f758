//! A named network namespace that is removed when its guard drops.

use std::{
    fs::File,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::run;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates `vipt<pid>-<n><tag>` with its loopback up. Names stay unique across
    /// concurrently running test binaries.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("vipt{}-{}{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed), tag);
        run("ip", &["netns", "add", &name]);
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        // Test hosts are seconds old: without this their link-local addresses would still
        // be tentative, and a kernel with no usable link-local address sends no Neighbor
        // Solicitations (it waits for DAD). Long-running hosts never see that.
        for k in ["all", "default"] {
            ns.exec("sh", &["-c", &format!("echo 0 > /proc/sys/net/ipv6/conf/{k}/accept_dad")]);
        }
        ns
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec <ns> cmd ...`
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Frames the kernel dropped on transmit on `iface` (`ip -s link`'s TX dropped; on a
    /// veth, frames its peer's queue had no room for).
    pub fn tx_dropped(&self, iface: &str) -> u64 {
        let out = self.exec("cat", &[&format!("/sys/class/net/{iface}/statistics/tx_dropped")]);
        out.trim().parse().unwrap_or_else(|_| panic!("{iface}: tx_dropped unreadable: {out:?}"))
    }

    /// Runs `f` on a thread that has entered this namespace (namespaces are per thread,
    /// so the caller's own thread is never moved).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let file = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!("setns {path}: {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// ifindex of `dev` inside this namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        self.exec("cat", &[&format!("/sys/class/net/{dev}/ifindex")]).trim().parse().expect("ifindex")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veths (and their peers elsewhere).
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Creates a veth pair `a` in `ns_a` and `b` in `ns_b`, both up, with the given MACs.
pub fn veth(ns_a: &NetNs, a: &str, mac_a: &str, ns_b: &NetNs, b: &str, mac_b: &str) {
    // Create in ns_a, then move the peer: names only need to be unique per namespace.
    ns_a.ip(&["link", "add", a, "address", mac_a, "type", "veth", "peer", "name", b, "address", mac_b, "netns", &ns_b.name]);
    ns_a.ip(&["link", "set", a, "up"]);
    ns_b.ip(&["link", "set", b, "up"]);
}
