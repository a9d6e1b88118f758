//! The Debian package, installed as an operator installs it (issue 13): `dpkg -i` of the
//! .deb `cargo xtask package` built (`cargo xtask test` builds it and passes `VIP_DEB`),
//! the unit checked by `systemd-analyze verify`, the shipped config accepted by the
//! installed binary's `check` on a node with its adapters, the installed binary running a
//! lab from /etc/vip/agent.toml with exactly the capabilities its unit grants (a live
//! reload by SIGHUP and by the unit's ExecReload command applies an edited VIP list
//! without a lost answer; a cable pull still fails over), and the package removed and
//! purged without a trace.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use vip_tests::{
    agentproc::TempDir,
    netns::{veth, NetNs},
    root_or_skip,
    probe::{arp_answers, ArpLoop},
    topo::{poke, wait_neigh, Lab, VIP4},
};

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    out
}

/// Purges the package however the test ends (it was not installed before: checked).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "vip-agent"]).stdout(Stdio::null()).status();
    }
}

fn unit_path() -> PathBuf {
    ["/lib/systemd/system/vip-agent.service", "/usr/lib/systemd/system/vip-agent.service"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("the package installs vip-agent.service")
}

/// The unit's CapabilityBoundingSet, as setpriv's `--bounding-set` argument.
fn unit_caps(unit: &Path) -> String {
    let text = std::fs::read_to_string(unit).unwrap();
    let line = text.lines().find(|l| l.starts_with("CapabilityBoundingSet=")).expect("the unit bounds its capabilities");
    let caps: Vec<String> =
        line["CapabilityBoundingSet=".len()..].split_whitespace().map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase())).collect();
    assert!(!caps.is_empty() && !caps.iter().any(|c| c == "+sys_admin"), "{line}");
    format!("-all,{}", caps.join(","))
}

#[test]
fn the_package_installs_runs_with_its_unit_s_capabilities_and_purges() {
    if !root_or_skip("the_package_installs_runs_with_its_unit_s_capabilities_and_purges") {
        return;
    }
    let deb = std::env::var("VIP_DEB").expect("VIP_DEB is not set: run the tests with `cargo xtask test` (it builds the package)");
    let before = Command::new("dpkg-query").args(["-W", "-f=${Status}", "vip-agent"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&before.stdout).contains("installed"),
        "a vip-agent package is already installed here; this test installs and purges its own"
    );
    let _purge = Installed;
    run(Command::new("dpkg").args(["-i", &deb]));

    // What it installed.
    let bin = Path::new("/usr/bin/vip-agent");
    assert!(bin.exists());
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "vip-agent"]));
    assert!(String::from_utf8_lossy(&conffiles.stdout).contains("/etc/vip/agent.toml"), "not a conffile");
    for f in [
        "/etc/vip/agent.toml",
        "/usr/share/bash-completion/completions/vip-agent",
        "/usr/share/zsh/vendor-completions/_vip-agent",
        "/usr/share/fish/vendor_completions.d/vip-agent.fish",
        "/usr/share/doc/vip-agent/configuration.md",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    let man = run(Command::new("sh").args(["-c", "zcat /usr/share/man/man1/vip-agent.1.gz"]));
    assert!(String::from_utf8_lossy(&man.stdout).contains(".TH vip-agent 1"), "not a man page");
    let unit = unit_path();
    // The man page is checked above (`man` itself need not be installed here).
    run(Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&unit));
    let version = run(Command::new(bin).arg("--version"));
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("vip-agent "));

    // The shipped config, on a node with its adapters (eth0, eth1): the installed check
    // accepts it.
    let node = NetNs::new("pkg");
    let sw = NetNs::new("pkgsw");
    for (i, dev) in ["eth0", "eth1"].iter().enumerate() {
        veth(&node, dev, &format!("02:00:00:00:0a:0{i}"), &sw, &format!("p{i}"), &format!("02:00:00:00:0b:0{i}"));
    }
    node.ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"]);
    node.ip(&["addr", "add", "192.0.2.3/24", "dev", "eth1"]);
    run(Command::new(bin).args(["check", "--config", "/etc/vip/agent.toml", "--netns", &node.name]));
    drop((node, sw));

    // The installed binary on the lab, with only the unit's capabilities (root's uid, as
    // the unit runs it). Pins on a bpffs of the test's own (under `ip netns exec`, /sys is
    // the namespace's, and the agent must not need to mount one).
    let caps = unit_caps(&unit);
    let dir = TempDir::new("pkgcaps");
    let bpffs = dir.0.join("bpf");
    std::fs::create_dir_all(&bpffs).unwrap();
    run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&bpffs));
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(bpffs.clone());
    let lab = Lab::bridged(3, 1);
    let mut dp = vip_tests::load_dataplane();
    lab.attach_peers(&mut dp);
    let socket = dir.0.join("agent.sock");
    // The operator's file, edited for the lab (the conffile: `dpkg -r` must keep it).
    let config = PathBuf::from("/etc/vip/agent.toml");
    let lab_config = |extra_vip: &str| {
        format!(
            "[agent]\ncontrol_socket = \"{}\"\npin_path = \"{}\"\n[announce]\ncount = 2\ninterval_ms = 50\n[probe]\nenabled = false\n{}\
             [[vip]]\naddress = \"{VIP4}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n{extra_vip}",
            socket.display(),
            bpffs.join("vip").display(),
            lab.adapter_tables_with("move_mac = false\n")
        )
    };
    std::fs::write(&config, lab_config("")).unwrap();
    let log = std::fs::File::create(dir.0.join("agent.log")).unwrap();
    // As systemd runs a Type=notify service: READY=1 must come once it answers.
    let notify_path = dir.0.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut agent = Command::new("ip")
        .args(["netns", "exec", &lab.node.name, "setpriv", &format!("--bounding-set={caps}"), "--"])
        .arg(bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("no READY=1 from the agent");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1", "the first notification");
    let log_text = || std::fs::read_to_string(dir.0.join("agent.log")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !socket.exists() || Command::new(bin).args(["status", "--socket"]).arg(&socket).output().is_ok_and(|o| !o.status.success()) {
        assert!(Instant::now() < deadline && agent.try_wait().unwrap().is_none(), "the agent did not come up with {caps}:\n{}", log_text());
        std::thread::sleep(Duration::from_millis(50));
    }
    // It said READY only once it answers: the control socket answers now without waiting.
    // Its effective capabilities are the unit's, not root's.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.id())).unwrap_or_default();
    let eff = status.lines().find(|l| l.starts_with("CapEff:")).map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string());
    assert!(eff.is_some_and(|e| e != "000001ffffffffff" && e != "0000003fffffffff"), "the agent runs with full root: {status}");
    // `systemctl reload` (ExecReload: SIGHUP) with one more VIP in the file: applied live
    // with the unit's capabilities, systemd told RELOADING=1 then READY=1, and the VIP
    // that was there answers every request meanwhile.
    let c = &lab.clients[0];
    let added = std::net::Ipv4Addr::new(192, 0, 2, 30);
    assert!(arp_answers(c, added).is_empty());
    let arp = ArpLoop::start_for(c, VIP4);
    std::thread::sleep(Duration::from_millis(200));
    std::fs::write(&config, lab_config(&format!("[[vip]]\naddress = \"{added}/24\"\nadapters = [\"vip0\", \"vip1\", \"vip2\"]\nmode = \"all\"\n"))).unwrap();
    // SAFETY: SIGHUP to the agent this test started.
    unsafe { libc::kill(agent.id() as i32, libc::SIGHUP) };
    let n = notify.recv(&mut buf).expect("no RELOADING=1 from the agent");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "RELOADING=1");
    let n = notify.recv(&mut buf).expect("no READY=1 after the reload");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    std::thread::sleep(Duration::from_millis(200));
    let (sent, unanswered) = arp.finish();
    assert!(log_text().contains("reload: VIPs: 1 added, 0 removed, 0 changed, 1 unchanged"), "{}", log_text());
    assert_eq!(arp_answers(c, added).len(), 3, "the VIP added by the reload is not answered on the three adapters");
    assert!(sent > 100, "only {sent} requests sent");
    assert_eq!(unanswered, 0, "{unanswered} of {sent} requests unanswered across the reload");
    // The unit's ExecReload, as `systemctl reload` runs it: the added VIP goes again.
    std::fs::write(&config, lab_config("")).unwrap();
    let exec_reload = std::fs::read_to_string(&unit).unwrap();
    let exec_reload = exec_reload.lines().find_map(|l| l.strip_prefix("ExecReload=")).expect("the unit has ExecReload");
    let argv: Vec<&str> = exec_reload.split_whitespace().collect();
    let out = run(Command::new(argv[0]).args(&argv[1..]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 removed"), "{out:?}");
    for want in ["RELOADING=1", "READY=1"] {
        let n = notify.recv(&mut buf).expect("no notification for the second reload");
        assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), want);
    }
    assert!(arp_answers(c, added).is_empty(), "the VIP taken out by the reload is still answered");
    // A cable pull still fails over: the client resolves the VIP to another adapter.
    let ip: IpAddr = VIP4.into();
    poke(c, ip);
    let m = wait_neigh(c, ip, "resolving", Duration::from_secs(2), |m| lab.adapters.iter().any(|a| a.mac == m));
    let j = lab.adapters.iter().position(|a| a.mac == m).unwrap();
    lab.pull(j);
    let m2 = wait_neigh(c, ip, "moving", Duration::from_secs(2), |m2| m2 != m && lab.adapters.iter().any(|a| a.mac == m2));
    assert_ne!(m2, m);
    assert!(log_text().contains("failover"), "{}", log_text());
    // SAFETY: SIGTERM to the agent this test started.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let n = notify.recv(&mut buf).expect("no STOPPING=1 from the agent");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let st = agent.wait().unwrap();
    assert!(st.success(), "the agent with the unit's capabilities did not stop cleanly: {st}\n{}", log_text());
    drop(dp);
    drop(lab);

    // Removed: the binary goes, the edited config stays; purged: nothing left.
    run(Command::new("dpkg").args(["-r", "vip-agent"]));
    assert!(!bin.exists() && !unit.exists(), "the binary or the unit is still there after dpkg -r");
    assert!(Path::new("/etc/vip/agent.toml").exists(), "dpkg -r removed the conffile");
    run(Command::new("dpkg").args(["--purge", "vip-agent"]));
    assert!(!Path::new("/etc/vip/agent.toml").exists(), "dpkg --purge left the conffile");
}
