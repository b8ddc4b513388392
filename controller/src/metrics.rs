//! A minimal HTTP endpoint: `/metrics` (Prometheus text) and `/healthz`.

use std::sync::Arc;

use ferry_proto::velero::{DataDownload, DataUpload};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::context::Context;
use crate::cr::MoverCr;

async fn gauges(ctx: &Context) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    let lp = ListParams::default();
    let (du, dd): (Api<DataUpload>, Api<DataDownload>) = (ctx.watched(), ctx.watched());
    let mut counts = std::collections::BTreeMap::<(String, String), u64>::new();
    if let Ok(l) = du.list(&lp).await {
        for d in l
            .items
            .iter()
            .filter(|d| ctx.config.mover(d.datamover()).is_some())
        {
            *counts
                .entry(("DataUpload".into(), format!("{:?}", d.phase())))
                .or_default() += 1;
        }
    }
    if let Ok(l) = dd.list(&lp).await {
        for d in l
            .items
            .iter()
            .filter(|d| ctx.config.mover(d.datamover()).is_some())
        {
            *counts
                .entry(("DataDownload".into(), format!("{:?}", d.phase())))
                .or_default() += 1;
        }
    }
    for ((k, p), n) in counts {
        out.push((
            "ferry_crs".to_string(),
            format!("kind=\"{k}\",phase=\"{p}\""),
            n as f64,
        ));
    }
    let pods: Api<Pod> = ctx.watched();
    let sel = format!(
        "{}={},{}=mover",
        ferry_proto::labels::MANAGED_BY,
        ferry_proto::labels::MANAGED_BY_VALUE,
        ferry_proto::labels::COMPONENT
    );
    if let Ok(l) = pods.list(&ListParams::default().labels(&sel)).await {
        let active = l
            .items
            .iter()
            .filter(|p| {
                !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .count();
        out.push((
            "ferry_active_mover_pods".into(),
            String::new(),
            active as f64,
        ));
    }
    out
}

/// Serves until the listener fails.
pub async fn serve(addr: std::net::SocketAddr, ctx: Arc<Context>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint");
    loop {
        let (mut sock, _) = listener.accept().await?;
        let ctx = ctx.clone();
        tokio::spawn(async move {
            // Read the request head (up to 8 KiB) before answering, so the client's writes all land.
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            while buf.len() < 8192 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let req = String::from_utf8_lossy(&buf);
            let body = if req.starts_with("GET /metrics") {
                ctx.metrics.render(&gauges(&ctx).await)
            } else {
                "ok\n".to_string()
            };
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
