//! The control socket (`vip-agent status`) and the Prometheus metrics listener.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
};

use crate::{
    agent::{fill_counters, Agent},
    dataplane::Counters,
    status::Status,
};

pub type Shared = Arc<Mutex<Agent>>;

/// The agent's status with counters; the lock is held only for the cheap part.
fn full_status(agent: &Shared, counters: &Counters) -> Status {
    let mut s = agent.lock().expect("agent lock").status();
    fill_counters(&mut s, counters);
    s
}

/// Serves `status` requests: one line in, one JSON document out.
pub async fn serve_control(listener: UnixListener, agent: Shared, counters: Arc<Counters>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (agent, counters) = (agent.clone(), counters.clone());
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
                "status" => serde_json::to_string(&full_status(&agent, &counters)).expect("serialisable"),
                other => format!("{{\"error\":\"unknown command {other:?}\"}}"),
            };
            let _ = w.write_all(reply.as_bytes()).await;
            let _ = w.shutdown().await;
        });
    }
}

/// Serves the metrics in Prometheus text format on any path.
pub async fn serve_metrics(listener: TcpListener, agent: Shared, counters: Arc<Counters>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else { continue };
        let (agent, counters) = (agent.clone(), counters.clone());
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
            let body = full_status(&agent, &counters).prometheus();
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
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(serde_json::from_str(&out)?)
}
