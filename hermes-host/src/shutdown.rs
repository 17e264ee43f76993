//! Waiting for SIGTERM or SIGINT.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// SIGTERM and SIGINT, caught from the moment [`listen`](Signals::listen)
/// returns: a signal during startup (migrations, the private cluster's start)
/// is then a clean stop rather than the default, death by signal.
pub struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Installs the handlers.
    pub fn listen() -> std::io::Result<Self> {
        Ok(Self {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves on the first SIGTERM or SIGINT since [`listen`](Signals::listen).
    pub async fn received(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => tracing::info!("SIGINT received: shutting down"),
            _ = self.terminate.recv() => tracing::info!("SIGTERM received: shutting down"),
        }
    }
}
