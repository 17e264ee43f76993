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

    /// `future`'s output, or `None` when SIGTERM or SIGINT comes first (then
    /// `future` is dropped): how a command stops cleanly in the middle of
    /// something, e.g. startup, which may run `initdb` for the private
    /// cluster.
    pub async fn unless<F: Future>(&mut self, future: F) -> Option<F::Output> {
        tokio::select! {
            output = future => Some(output),
            () = self.received() => None,
        }
    }

    /// From now on, another SIGTERM or SIGINT ends the process at once, with
    /// the status of a death by that signal (128 + its number), for when a
    /// graceful shutdown takes longer than its user will wait (a database
    /// that stopped answering, a long drain deadline).
    pub fn exit_on_another(self) {
        let Self {
            mut terminate,
            mut interrupt,
        } = self;
        tokio::spawn(async move {
            let (name, kind) = tokio::select! {
                _ = interrupt.recv() => ("SIGINT", SignalKind::interrupt()),
                _ = terminate.recv() => ("SIGTERM", SignalKind::terminate()),
            };
            tracing::warn!("{name} received again: exiting without finishing the shutdown");
            std::process::exit(128 + kind.as_raw_value());
        });
    }
}
