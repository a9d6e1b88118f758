//! vip-agent: owns the XDP data plane's maps.
pub mod dataplane;

/// The XDP object built by `cargo xtask`, if this binary was built that way.
#[cfg(vip_ebpf_embedded)]
pub const EMBEDDED_OBJECT: Option<&[u8]> =
    Some(aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vip.bpf.o")));
#[cfg(not(vip_ebpf_embedded))]
pub const EMBEDDED_OBJECT: Option<&[u8]> = None;
