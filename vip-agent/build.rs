//! Embeds the XDP object that `cargo xtask build-ebpf` builds (the one build path; every
//! xtask command builds it before the agent), so the agent is one self-contained file.
//! `VIP_EBPF_EMBED` names another object; without any, the agent is built without one and
//! needs `--bpf-object` (it says so).

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=VIP_EBPF_EMBED");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let object = match std::env::var_os("VIP_EBPF_EMBED") {
        Some(p) => PathBuf::from(p),
        None => manifest.join("../target/bpfel-unknown-none/release/vip"),
    };
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("vip.o");
    match std::fs::read(&object) {
        Ok(bytes) => std::fs::write(&out, bytes).expect("writing the embedded object"),
        Err(_) => {
            println!(
                "cargo:warning=no XDP object at {} (run `cargo xtask build-ebpf`): this vip-agent will need --bpf-object",
                object.display()
            );
            std::fs::write(&out, []).expect("writing the empty object");
        }
    }
}
