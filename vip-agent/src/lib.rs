//! vip-agent: owns the XDP data plane's maps, watches the adapters, moves and announces
//! virtual IPs.
pub mod agent;
pub mod announce;
pub mod apply;
pub mod bpfsys;
pub mod cluster;
pub mod config;
pub mod conflict;
pub mod control;
pub mod dataplane;
pub mod host;
pub mod metrics;
pub mod netlink;
pub mod packet;
pub mod runtime;
pub mod status;
pub mod viptable;

/// The config does not fit the host (exit code 2, like a config that does not parse).
#[derive(Debug)]
pub struct ConfigInvalid(pub config::ConfigErrors);

impl std::fmt::Display for ConfigInvalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for ConfigInvalid {}
