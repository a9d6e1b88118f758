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
    runtime::{Inbox, Msg},
    status::{build, Status},
};

/// The status with counters, built off the event loop.
async fn full_status(inbox: &Inbox, counters: &Arc<Counters>) -> Option<Status> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    if !inbox.send(Msg::Status(tx)) {
        return None;
    }
    let snap = rx.await.ok()?;
    let counters = counters.clone();
    tokio::task::spawn_blocking(move || build(snap, &counters)).await.ok()
}

/// Serves `status` requests: one line in, one JSON document out.
pub async fn serve_control(listener: UnixListener, inbox: Inbox, counters: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (inbox, counters) = (inbox.clone(), counters.clone());
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            // One short command line; anything longer or slower is not a client of ours.
            let mut r = BufReader::new(r.take(256));
            match tokio::time::timeout(std::time::Duration::from_secs(5), r.read_line(&mut line)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let reply = match line.trim() {
                "status" => match full_status(&inbox, &counters).await {
                    Some(s) => tokio::task::spawn_blocking(move || serde_json::to_vec(&s).expect("serialisable"))
                        .await
                        .unwrap_or_default(),
                    None => b"{\"error\":\"the agent is stopping\"}".to_vec(),
                },
                other => format!("{{\"error\":\"unknown command {other:?}\"}}").into_bytes(),
            };
            let _ = w.write_all(&reply).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Serves the metrics in Prometheus text format on any path.
pub async fn serve_metrics(listener: TcpListener, inbox: Inbox, counters: Arc<Counters>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (inbox, counters) = (inbox.clone(), counters.clone());
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
            let Some(s) = full_status(&inbox, &counters).await else { return };
            let body = s.prometheus();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

/// The client side of `vip-agent status`.
pub async fn query_status(socket: &Path) -> anyhow::Result<Status> {
    let mut s = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to {}: {e} (is the agent running?)", socket.display()))?;
    s.write_all(b"status\n").await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    Ok(serde_json::from_slice(&out)?)
}
