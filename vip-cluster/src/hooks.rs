//! Takeover hooks (seeds 003 and 004): executables from the node's own configuration,
//! never from etcd, run for a virtual server in a fixed order: `acquire` before its VIPs
//! are answered on this node (mount its file systems, start its programs), `release`
//! after they stopped being answered, and `check` every so often while it is held (its
//! failure moves the server, as seed 004's lost storage does).
//!
//! Each runs with a timeout (killed at it, with its process group), its output goes to the
//! log line by line, and its result is kept for `cluster status`. It gets the server, the
//! node, the cluster and the server's addresses in its environment. The runtime's
//! real-time priority is dropped in the child: a hook is ordinary work.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::io::{AsyncBufReadExt, BufReader};

/// One virtual server's hooks on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    pub acquire: Option<PathBuf>,
    pub release: Option<PathBuf>,
    pub check: Option<PathBuf>,
    /// Each run is killed after this long (and counts as failed).
    pub timeout: Duration,
    /// How often `check` runs while the server is held here.
    pub check_every: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Hook {
    Acquire,
    Release,
    Check,
}

impl Hook {
    pub fn name(self) -> &'static str {
        match self {
            Hook::Acquire => "acquire",
            Hook::Release => "release",
            Hook::Check => "check",
        }
    }

    pub fn path(self, h: &Hooks) -> Option<&Path> {
        match self {
            Hook::Acquire => h.acquire.as_deref(),
            Hook::Release => h.release.as_deref(),
            Hook::Check => h.check.as_deref(),
        }
    }
}

/// How one run went (for `cluster status` and the log).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HookRun {
    pub server: String,
    pub hook: Hook,
    pub ok: bool,
    /// "exit 0", "exit 3", "killed at its timeout (5000 ms)", "cannot start: ...".
    pub outcome: String,
    pub ms: f64,
    /// Unix time it ended.
    pub at: f64,
    /// The last lines it wrote (stdout and stderr), at most [`OUTPUT_KEPT`] bytes.
    pub output: String,
}

pub const OUTPUT_KEPT: usize = 512;

/// What a hook is told, in its environment.
pub struct Context<'a> {
    pub cluster: &'a str,
    pub node: &'a str,
    pub server: &'a str,
    pub addresses: &'a [String],
}

/// Runs `hook` of `hooks` (a success when there is none).
pub async fn run(hook: Hook, hooks: &Hooks, cx: &Context<'_>) -> HookRun {
    let started = Instant::now();
    let done = |ok: bool, outcome: String, output: String| HookRun {
        server: cx.server.to_string(),
        hook,
        ok,
        outcome,
        ms: started.elapsed().as_secs_f64() * 1e3,
        at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64()),
        output,
    };
    let Some(path) = hook.path(hooks) else { return done(true, "none".into(), String::new()) };
    let mut cmd = tokio::process::Command::new(path);
    cmd.env("VIP_HOOK", hook.name())
        .env("VIP_CLUSTER", cx.cluster)
        .env("VIP_NODE", cx.node)
        .env("VIP_SERVER", cx.server)
        .env("VIP_ADDRESSES", cx.addresses.join(" "))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: between fork and exec the child only makes async-signal-safe calls: its own
    // scheduling policy (back from the runtime's SCHED_FIFO) and a process group of its
    // own (so a timeout kills what it started too).
    unsafe {
        cmd.pre_exec(|| {
            let p = libc::sched_param { sched_priority: 0 };
            libc::sched_setscheduler(0, libc::SCHED_OTHER, &p);
            libc::setpgid(0, 0);
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return done(false, format!("cannot start {}: {e}", path.display()), String::new()),
    };
    let pid = child.id();
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let tag = format!("{} {}", cx.server, hook.name());
    let collect = async move {
        let mut kept = String::new();
        let lines = |l: String, kept: &mut String| {
            tracing::info!(hook = %tag, "hook: {l}");
            kept.push_str(&l);
            kept.push('\n');
            if kept.len() > 2 * OUTPUT_KEPT {
                let cut = kept.len() - OUTPUT_KEPT;
                let cut = (cut..kept.len()).find(|&i| kept.is_char_boundary(i)).unwrap_or(kept.len());
                kept.drain(..cut);
            }
        };
        let mut a = out.map(|o| BufReader::new(o).lines());
        let mut b = err.map(|e| BufReader::new(e).lines());
        loop {
            tokio::select! {
                l = async { a.as_mut().unwrap().next_line().await }, if a.is_some() => match l {
                    Ok(Some(l)) => lines(l, &mut kept),
                    _ => a = None,
                },
                l = async { b.as_mut().unwrap().next_line().await }, if b.is_some() => match l {
                    Ok(Some(l)) => lines(l, &mut kept),
                    _ => b = None,
                },
                else => break,
            }
        }
        kept
    };
    let waited = tokio::time::timeout(hooks.timeout, async {
        let (status, output) = tokio::join!(child.wait(), collect);
        (status, output)
    })
    .await;
    let tail = |s: String| if s.len() > OUTPUT_KEPT { s[s.len() - OUTPUT_KEPT..].to_string() } else { s };
    match waited {
        Ok((Ok(st), output)) if st.success() => done(true, "exit 0".into(), tail(output)),
        Ok((Ok(st), output)) => {
            let outcome = match st.code() {
                Some(c) => format!("exit {c}"),
                None => format!("killed by signal {}", std::os::unix::process::ExitStatusExt::signal(&st).unwrap_or(0)),
            };
            done(false, outcome, tail(output))
        }
        Ok((Err(e), output)) => done(false, format!("wait failed: {e}"), tail(output)),
        Err(_) => {
            // The whole process group: a hook's children go with it.
            if let Some(pid) = pid {
                // SAFETY: a signal to the group this hook leads.
                unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
            }
            let _ = child.kill().await;
            done(false, format!("killed at its timeout ({} ms)", hooks.timeout.as_millis()), String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    fn hooks(acquire: Option<PathBuf>, timeout_ms: u64) -> Hooks {
        Hooks { acquire, release: None, check: None, timeout: Duration::from_millis(timeout_ms), check_every: Duration::from_secs(1) }
    }

    fn go(h: &Hooks) -> HookRun {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let addrs = vec!["192.0.2.70".to_string(), "192.0.2.71".to_string()];
        rt.block_on(run(Hook::Acquire, h, &Context { cluster: "c", node: "n1", server: "db", addresses: &addrs }))
    }

    #[test]
    fn a_hook_gets_its_context_and_its_output_is_kept() {
        let d = std::env::temp_dir().join(format!("vip-hooks-{}-a", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let p = script(&d, "ok", "echo \"$VIP_HOOK $VIP_SERVER on $VIP_NODE of $VIP_CLUSTER: $VIP_ADDRESSES\"; echo to-stderr >&2");
        let r = go(&hooks(Some(p), 5000));
        assert!(r.ok, "{r:?}");
        assert_eq!(r.outcome, "exit 0");
        assert!(r.output.contains("acquire db on n1 of c: 192.0.2.70 192.0.2.71"), "{r:?}");
        assert!(r.output.contains("to-stderr"), "{r:?}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn failures_say_why() {
        let d = std::env::temp_dir().join(format!("vip-hooks-{}-b", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let r = go(&hooks(Some(script(&d, "fails", "echo no storage; exit 3")), 5000));
        assert!(!r.ok);
        assert_eq!(r.outcome, "exit 3");
        assert!(r.output.contains("no storage"));
        let r = go(&hooks(Some(d.join("missing")), 5000));
        assert!(!r.ok && r.outcome.starts_with("cannot start"), "{r:?}");
        // No hook at all: nothing to fail.
        assert!(go(&hooks(None, 5000)).ok);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_hung_hook_is_killed_at_its_timeout_with_its_children() {
        let d = std::env::temp_dir().join(format!("vip-hooks-{}-c", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let marker = d.join("child-pid");
        let p = script(&d, "hangs", &format!("sleep 30 & echo $! > {}; wait", marker.display()));
        let t = Instant::now();
        let r = go(&hooks(Some(p), 300));
        assert!(!r.ok);
        assert_eq!(r.outcome, "killed at its timeout (300 ms)");
        assert!(t.elapsed() < Duration::from_secs(5), "waited {:?}", t.elapsed());
        // The sleep it started is gone too.
        std::thread::sleep(Duration::from_millis(100));
        let pid: i32 = std::fs::read_to_string(&marker).unwrap().trim().parse().unwrap();
        // SAFETY: signal 0 only asks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0 && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ");
        assert!(!alive, "the hook's child {pid} outlived the timeout");
        let _ = std::fs::remove_dir_all(&d);
    }
}
