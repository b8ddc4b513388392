//! The controller binary: configuration, logging, leader election, then the reconcilers.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use ferry_controller::config::Config;
use ferry_controller::context::{Context, Identity};
use ferry_controller::leader::Election;

/// Ferry's DataUpload / DataDownload controller.
#[derive(Debug, Parser)]
#[command(name = "ferry-controller", version)]
struct Args {
    /// Configuration file (YAML); defaults apply when absent.
    #[arg(long, env = "FERRY_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, env = "FERRY_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: std::net::SocketAddr,
    /// Namespace of the leader-election Lease (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferry-system")]
    lease_namespace: String,
    /// Skip leader election (a single replica, or running outside the cluster).
    #[arg(long)]
    no_leader_election: bool,
    /// Human-readable logs instead of JSON.
    #[arg(long)]
    text_logs: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let filter = tracing_subscriber::EnvFilter::try_from_env("FERRY_LOG")
        .unwrap_or_else(|_| "info,kube=warn".into());
    if args.text_logs {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    } else {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    }
    let config = match &args.config {
        Some(p) => Config::from_yaml(
            &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        )?,
        None => Config::default(),
    };
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let identity = Identity {
        node: std::env::var("NODE_NAME").unwrap_or_default(),
        pod: std::env::var("POD_NAME")
            .unwrap_or_else(|_| format!("ferry-controller-{}", std::process::id())),
    };
    let ctx = Arc::new(Context::new(client.clone(), config, identity.clone()));
    let metrics = tokio::spawn(ferry_controller::metrics::serve(
        args.metrics_addr,
        ctx.metrics.clone(),
    ));
    if args.no_leader_election {
        ferry_controller::run(ctx).await;
    } else {
        let election = Election {
            namespace: args.lease_namespace,
            name: "ferry-controller".into(),
            holder: identity.pod,
            duration: Duration::from_secs(15),
        };
        election.acquire(&client).await;
        tokio::select! {
            // The controllers stop on SIGTERM or SIGINT, after the reconciles in flight.
            _ = ferry_controller::run(ctx) => election.release(&client).await,
            _ = election.hold(&client) => {
                metrics.abort();
                anyhow::bail!("lost leadership; exiting so a follower takes over");
            }
        }
    }
    metrics.abort();
    Ok(())
}
