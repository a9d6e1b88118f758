//! Shared machinery for vip's root-only tests and benchmarks: network namespace guards,
//! veth topologies, raw packet sockets, and loading the built XDP object.
pub mod agentproc;
pub mod bench;
pub mod crates_bench;
pub mod cluster;
pub mod cluster_bench;
pub mod failover;
pub mod fixtures;
pub mod netns;
pub mod rawsock;
pub mod steering;
pub mod topo;
pub mod keepalived;
pub mod probe;
pub mod scale;

use std::path::PathBuf;

use vip_agent::dataplane::Dataplane;

/// True when running as root. A test that needs root and does not have it reports itself
/// as skipped (a line starting with `SKIPPED:` that `cargo xtask test` counts) unless
/// `VIP_NO_SKIP` is set, which `cargo xtask test` does whenever it runs as root and CI sets
/// too: there nothing may be skipped.
#[must_use]
pub fn root_or_skip(test: &str) -> bool {
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("VIP_NO_SKIP").is_some() || std::env::var_os("CI").is_some() {
        panic!("{test}: needs root, and skipping is not allowed here (VIP_NO_SKIP/CI)");
    }
    eprintln!("SKIPPED: {test}: needs root (network namespaces, XDP)");
    false
}

/// Where `cargo xtask` put the built XDP object.
pub fn object_path() -> PathBuf {
    match std::env::var_os("VIP_EBPF_OBJECT") {
        Some(p) => PathBuf::from(p),
        None => panic!("VIP_EBPF_OBJECT is not set: run the tests with `cargo xtask test`"),
    }
}

/// Loads the data plane from the built object; panics with the verifier's words if the
/// kernel refuses it (that is a failure, never a skip).
pub fn load_dataplane() -> Dataplane {
    let path = object_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    Dataplane::load(&bytes).unwrap_or_else(|e| panic!("loading {}: {e:?}", path.display()))
}

/// Runs a command, panicking with its output when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lower-case hex of a frame, for assertion messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
