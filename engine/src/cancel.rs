//! Cancellation on SIGTERM or Ctrl-C (SIGINT): the signal asks the running operation, through its
//! [`Progress`], to stop at its next safe point; the operation then fails with [`crate::Error::Canceled`].

use std::sync::Arc;

use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::progress::Progress;

/// Cancels `progress` on SIGTERM or SIGINT while it is alive. Dropping it stops listening; as with any
/// Tokio signal handler, the signals' default action (ending the process) does not come back.
#[derive(Debug)]
#[must_use = "the signals are handled only while the guard lives"]
pub struct CancelOnSignals(JoinHandle<()>);

impl CancelOnSignals {
    /// Starts listening (on the current Tokio runtime).
    pub fn new(progress: Arc<Progress>) -> Self {
        CancelOnSignals(tokio::spawn(async move {
            let name = terminated().await;
            tracing::info!("{name}: canceling at the next safe point");
            progress.cancel();
        }))
    }
}

/// Resolves with the signal's name on the first SIGTERM or SIGINT.
pub async fn terminated() -> &'static str {
    let mut term = signal(SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = async {
            match term.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending().await,
            }
        } => "SIGTERM",
    }
}

impl Drop for CancelOnSignals {
    fn drop(&mut self) {
        self.0.abort();
    }
}
