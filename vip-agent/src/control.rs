//! The control socket (`vip-agent status`) and the Prometheus metrics listener. Both ask
//! the event loop for a snapshot (it answers between events, without building anything)
//! and turn it into a status on a blocking thread of their own.

use std::{path::Path, sync::Arc};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
};

use crate::{
    dataplane::Counters,
    runtime::{CurrentInbox, Inbox, Msg},
    status::{build, write_json, Snapshot, Status, PER_VIP_MAX},
};

async fn snapshot_of(inbox: &Inbox) -> Option<Snapshot> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !inbox.send(Msg::Status(tx)) {
        return None;
    }
    rx.await.ok()
}

/// A snapshot from the agent in charge. A request that reached an agent as a live reload
/// replaced it goes to the next one; None when the process is stopping.
async fn snapshot(current: &CurrentInbox) -> Option<Snapshot> {
    for _ in 0..50 {
        if let Some(s) = snapshot_of(&current.get()).await {
            return Some(s);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    None
}

/// How a live reload went, as `vip-agent reload` is told.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ReloadReply {
    pub ok: bool,
    /// The config itself is wrong (the message names the file, line and key).
    #[serde(default)]
    pub invalid: bool,
    pub message: String,
}

/// Asks the main thread for a live reload; the reply comes when it is done.
pub type ReloadRequests = tokio::sync::mpsc::Sender<tokio::sync::oneshot::Sender<ReloadReply>>;

/// Serves `status`, `cluster` and `reload` requests: one line in, one JSON document out.
pub async fn serve_control(
    listener: UnixListener,
    current: CurrentInbox,
    counters: Arc<Counters>,
    cluster: Option<vip_cluster::node::Handle>,
    reloads: ReloadRequests,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (current, counters, cluster, reloads) = (current.clone(), counters.clone(), cluster.clone(), reloads.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            let mut line = String::new();
            // One short command line; anything longer or slower is not a client of ours.
            let read = {
                let mut r = BufReader::new((&mut stream).take(256));
                tokio::time::timeout(std::time::Duration::from_secs(5), r.read_line(&mut line)).await
            };
            if !matches!(read, Ok(Ok(_))) {
                return;
            }
            match line.trim() {
                "status" => {
                    let Some(snap) = snapshot(&current).await else {
                        let _ = stream.write_all(b"{\"error\":\"the agent is stopping\"}").await;
                        return;
                    };
                    // Streamed from a blocking thread: the document is built as it is sent.
                    let Ok(std) = stream.into_std() else { return };
                    let _ = tokio::task::spawn_blocking(move || {
                        let _ = std.set_nonblocking(false);
                        let _ = std.set_write_timeout(Some(std::time::Duration::from_secs(30)));
                        let _ = write_json(&snap, &counters, &std);
                        let _ = std.shutdown(std::net::Shutdown::Write);
                    })
                    .await;
                }
                "cluster" => {
                    let Some(h) = cluster else {
                        let _ = stream.write_all(b"{\"error\":\"this agent is not in a cluster (no [cluster] table)\"}").await;
                        return;
                    };
                    let st = tokio::task::spawn_blocking(move || h.status(std::time::Duration::from_secs(2))).await.ok().flatten();
                    let body = match st {
                        Some(st) => serde_json::to_vec(&st).unwrap_or_default(),
                        None => b"{\"error\":\"the cluster runtime did not answer\"}".to_vec(),
                    };
                    let _ = stream.write_all(&body).await;
                    let _ = stream.shutdown().await;
                }
                "reload" => {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    let reply = match reloads.send(tx).await {
                        Ok(()) => rx.await.ok(),
                        Err(_) => None,
                    };
                    let reply = reply.unwrap_or(ReloadReply { ok: false, invalid: false, message: "the agent is stopping".into() });
                    let _ = stream.write_all(&serde_json::to_vec(&reply).unwrap_or_default()).await;
                    let _ = stream.shutdown().await;
                }
                other => {
                    let _ = stream.write_all(format!("{{\"error\":\"unknown command {other:?}\"}}").as_bytes()).await;
                    let _ = stream.shutdown().await;
                }
            }
        });
    }
}

/// Serves the metrics in Prometheus text format on any path.
pub async fn serve_metrics(listener: TcpListener, current: CurrentInbox, counters: Arc<Counters>, cluster: Option<vip_cluster::node::Handle>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (current, counters, cluster) = (current.clone(), counters.clone(), cluster.clone());
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            // The request itself does not matter; read until the end of its headers.
            let mut seen = Vec::new();
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") && seen.len() < 8192 {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let Some(snap) = snapshot(&current).await else { return };
            let per_vip = snap.vips.len() <= PER_VIP_MAX;
            let Ok(body) = tokio::task::spawn_blocking(move || {
                let st = cluster.and_then(|h| h.status(std::time::Duration::from_secs(1)));
                crate::metrics::encode(Arc::new(build(snap, &counters, per_vip)), st)
            })
            .await
            else {
                return;
            };
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                crate::metrics::CONTENT_TYPE,
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// One request on the control socket and its JSON answer (an `{"error": ...}` answer
/// becomes the error).
async fn request<T: serde::de::DeserializeOwned>(socket: &Path, command: &str) -> anyhow::Result<T> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e} (is the agent running?)", socket.display()))?;
    s.write_all(format!("{command}\n").as_bytes()).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    if let Ok(serde_json::Value::Object(e)) = serde_json::from_slice::<serde_json::Value>(&out) {
        if let Some(msg) = e.get("error").and_then(|m| m.as_str()) {
            anyhow::bail!("the agent says: {msg}");
        }
    }
    Ok(serde_json::from_slice(&out)?)
}

/// The client side of `vip-agent cluster status`.
pub async fn query_cluster(socket: &Path) -> anyhow::Result<vip_cluster::node::ClusterStatus> {
    request(socket, "cluster").await
}

/// The client side of `vip-agent status`.
pub async fn query_status(socket: &Path) -> anyhow::Result<Status> {
    request(socket, "status").await
}

/// The client side of `vip-agent reload`: the reply comes once the reload is done.
pub async fn request_reload(socket: &Path) -> anyhow::Result<ReloadReply> {
    request(socket, "reload").await
}
