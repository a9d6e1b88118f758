//! vip-agent: owns the XDP data plane's maps.
pub mod dataplane;
