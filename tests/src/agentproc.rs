//! The real `vip-agent` binary as a child process in a lab's node namespace, with its own
//! config, control socket and pin directory, stopped (SIGTERM) when the guard drops.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use vip_agent::status::Status;

use crate::netns::NetNs;

/// The agent binary `cargo xtask test` built.
pub fn agent_bin() -> PathBuf {
    match std::env::var_os("VIP_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => panic!("VIP_AGENT_BIN is not set: run the tests with `cargo xtask test`"),
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("vipt{}-{n}-{tag}", std::process::id()));
        // A directory kept by an earlier run (VIP_KEEP_LOG) of a process with the same pid
        // must not leak into this one (an etcd data directory would bring back its keys).
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("VIP_KEEP_LOG").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Paths one agent uses, unique per test so agents never share pins or sockets.
pub struct AgentFiles {
    pub dir: TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_path: PathBuf,
    pub log: PathBuf,
}

impl AgentFiles {
    pub fn new(tag: &str) -> AgentFiles {
        let dir = TempDir::new(tag);
        let name = dir.0.file_name().unwrap().to_string_lossy().into_owned();
        AgentFiles {
            config: dir.0.join("agent.toml"),
            socket: dir.0.join("agent.sock"),
            pin_path: Path::new("/sys/fs/bpf").join(name),
            log: dir.0.join("agent.log"),
            dir,
        }
    }

    /// Files for an existing config (its control socket and pin path as it says).
    pub fn for_config(config: &Path) -> AgentFiles {
        let cfg = vip_agent::config::Config::load(config).unwrap_or_else(|e| panic!("{e}"));
        let dir = TempDir::new("lab");
        AgentFiles {
            config: config.to_path_buf(),
            socket: cfg.agent.control_socket,
            pin_path: cfg.agent.pin_path,
            log: dir.0.join("agent.log"),
            dir,
        }
    }

    /// Writes a config: `[agent]` (with this test's socket and pins, plus `agent_extra`
    /// lines), then `body` (the `[announce]`, `[probe]`, `[[adapter]]` and `[[vip]]` tables).
    pub fn write(&self, agent_extra: &str, body: &str) {
        let text = format!(
            "[agent]\ncontrol_socket = \"{}\"\npin_path = \"{}\"\n{agent_extra}\n{body}",
            self.socket.display(),
            self.pin_path.display()
        );
        std::fs::write(&self.config, text).expect("writing config");
    }
}

impl Drop for AgentFiles {
    fn drop(&mut self) {
        // A test that failed half-way may leave pins behind; they would pin maps forever.
        if let Ok(rd) = std::fs::read_dir(&self.pin_path) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let _ = std::fs::remove_dir(&self.pin_path);
    }
}

pub struct AgentProc {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl AgentProc {
    /// Starts `vip-agent run` in `ns` and waits until its control socket answers.
    pub fn start(ns: &NetNs, files: &AgentFiles, extra: &[&str]) -> AgentProc {
        let p = Self::spawn(ns, files, extra);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if p.try_status().is_some() {
                return p;
            }
            if Instant::now() > deadline {
                panic!("agent did not come up; log:\n{}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `vip-agent run` with the XDP object built into the binary (no
    /// `--bpf-object`, no `VIP_EBPF_OBJECT`), as an operator runs it, and waits for it.
    pub fn start_self_contained(ns: &NetNs, files: &AgentFiles) -> AgentProc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&files.log).expect("log");
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--config"]).arg(&files.config).args(["--netns", &ns.name]).env_remove("VIP_EBPF_OBJECT");
        cmd.env("RUST_LOG", "info").env("NO_COLOR", "1").stdout(Stdio::null()).stderr(log);
        let p = AgentProc { child: cmd.spawn().expect("spawning vip-agent"), socket: files.socket.clone(), log: files.log.clone() };
        let deadline = Instant::now() + Duration::from_secs(15);
        while p.try_status().is_none() {
            assert!(Instant::now() < deadline, "agent did not come up; log:\n{}", p.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Starts `vip-agent run` without waiting for it.
    pub fn spawn(ns: &NetNs, files: &AgentFiles, extra: &[&str]) -> AgentProc {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&files.log).expect("log");
        let mut cmd = Command::new(agent_bin());
        cmd.args(["run", "--config"]).arg(&files.config).args(["--netns", &ns.name]).args(extra);
        cmd.env("RUST_LOG", std::env::var("VIP_TEST_LOG").unwrap_or_else(|_| "info".into())).env("NO_COLOR", "1").stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawning vip-agent");
        AgentProc { child, socket: files.socket.clone(), log: files.log.clone() }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn try_status(&self) -> Option<Status> {
        let mut s = UnixStream::connect(&self.socket).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"status\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        serde_json::from_str(&out).ok()
    }

    pub fn status(&self) -> Status {
        self.try_status().unwrap_or_else(|| panic!("no status from the agent; log:\n{}", self.log_text()))
    }

    /// Polls the status until `f` holds, or panics after `timeout` with the last status.
    pub fn wait_for(&self, what: &str, timeout: Duration, f: impl Fn(&Status) -> bool) -> Status {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status();
            if f(&s) {
                return s;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; status:\n{}\nlog:\n{}", s.human(), self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let st = wait_timeout(&mut self.child, Duration::from_secs(10));
        std::mem::forget(self);
        st
    }

    /// SIGUSR1: the agent exits and leaves the data plane in place for a successor.
    pub fn hand_over(mut self) -> ExitStatus {
        self.signal(libc::SIGUSR1);
        let st = wait_timeout(&mut self.child, Duration::from_secs(10));
        std::mem::forget(self);
        st
    }

    /// SIGKILL: the agent gets no chance to clean up.
    pub fn kill(mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {timeout:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
