//! Embeds the XDP object when `cargo xtask` built it and said where (VIP_EBPF_OBJECT).
//! A plain `cargo build` stays on stable without nightly or bpf-linker; such an agent can
//! still check configs and read status but refuses to start the data plane.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(vip_ebpf_embedded)");
    println!("cargo::rerun-if-env-changed=VIP_EBPF_OBJECT");
    if let Ok(path) = std::env::var("VIP_EBPF_OBJECT") {
        println!("cargo::rerun-if-changed={path}");
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("vip.bpf.o");
        std::fs::copy(&path, &out).unwrap_or_else(|e| panic!("copying {path}: {e}"));
        println!("cargo::rustc-cfg=vip_ebpf_embedded");
    }
}
