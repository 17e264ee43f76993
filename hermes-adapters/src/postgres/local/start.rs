//! The blocking part of a start: the binaries and the user to run them as,
//! the cluster made if missing (under the data directory's lock), then its
//! server reused or started.

use std::io;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::files::log_tail;
use super::init::{init_in_place, init_staged, make_traversable};
use super::lock::lock_dir;
use super::runner::{Runner, run};
use super::server::{ServerState, remove_stale_pid_file};
use super::settings::{last_port, write_hermes_conf};
use super::{
    LocalPostgres, LocalPostgresConfig, LocalPostgresError, SERVER_LOG, START_ATTEMPTS, io_err,
};

/// The blocking part of a start: binaries, user, init, start or reuse. The
/// cluster it hands back is running, not yet known to accept connections.
pub(super) fn start_blocking(
    config: &LocalPostgresConfig,
) -> Result<LocalPostgres, LocalPostgresError> {
    let data_dir = absolute(&config.data_dir)?;
    let runner = Runner::detect(&data_dir)?;
    let parent = data_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    std::fs::create_dir_all(&parent).map_err(io_err("creating", &parent))?;
    if let Some(run_as) = &runner.run_as {
        make_traversable(&parent, run_as)?;
    }

    if !data_dir.exists() {
        init_staged(&runner, &data_dir, &parent)?;
    }
    // Held until this start returns: no other start of this directory looks
    // at it meanwhile, so it sees no cluster half-made in place, and a stale
    // postmaster.pid is removed only while it is the one found stale.
    let _lock = lock_dir(&data_dir)?;
    if !data_dir.join("PG_VERSION").exists() {
        init_in_place(&runner, &data_dir)?;
    } else if let Some(run_as) = &runner.run_as {
        let meta = std::fs::metadata(&data_dir).map_err(io_err("reading", &data_dir))?;
        // Root's own directory (made by an older version) is adopted;
        // another user's is not.
        if meta.uid() != run_as.uid && meta.uid() != 0 {
            return Err(LocalPostgresError::OwnedByAnotherUser {
                path: data_dir,
                owner: meta.uid(),
                run_as: run_as.user.clone(),
            });
        }
        if meta.uid() != run_as.uid {
            let mut cmd = Command::new("chown");
            cmd.arg("-R")
                .arg(format!("{}:{}", run_as.uid, run_as.gid))
                .arg(&data_dir);
            run(cmd)?;
        }
    }

    let mut last_error = String::new();
    for attempt in 1..=START_ATTEMPTS {
        match runner.server_state(&data_dir)? {
            ServerState::Running(running) => {
                tracing::info!(data_dir = %data_dir.display(), port = running.port, "reusing the running private PostgreSQL");
                return Ok(LocalPostgres {
                    data_dir,
                    server: running,
                    config: config.clone(),
                    reused: true,
                    runner,
                });
            }
            ServerState::Stale { pid, port } => remove_stale_pid_file(&data_dir, pid, port)?,
            ServerState::NotRunning => {}
        }
        let port =
            port_for(&data_dir, attempt).map_err(io_err("choosing a free port for", &data_dir))?;
        write_hermes_conf(&data_dir, port, config, &runner)?;
        tracing::info!(data_dir = %data_dir.display(), port, "starting a private PostgreSQL");
        let mut cmd = runner.command("pg_ctl");
        cmd.arg("start")
            .arg("-D")
            .arg(&data_dir)
            .arg("-l")
            .arg(data_dir.join(SERVER_LOG))
            .args(["-w", "-t", "60", "-s"]);
        match run(cmd) {
            Ok(_) => {
                // Read the port back from postmaster.pid: if another process
                // rewrote hermes.conf meanwhile, the server listens on its port.
                if let ServerState::Running(running) = runner.server_state(&data_dir)? {
                    return Ok(LocalPostgres {
                        data_dir,
                        server: running,
                        config: config.clone(),
                        reused: false,
                        runner,
                    });
                }
                last_error = "pg_ctl start succeeded but the server is not running".into();
            }
            Err(e) => {
                tracing::debug!(attempt, error = %e, "pg_ctl start failed; retrying");
                last_error = e.to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(200 * u64::from(attempt)));
    }
    Err(LocalPostgresError::NotReady {
        log_tail: log_tail(&data_dir),
        data_dir,
        reason: last_error,
    })
}

/// The port to start on: at the first attempt, the one the cluster last
/// used while nothing else listens on it, so that its URL stays the same
/// across restarts (and clients holding it find the server again); else any
/// free port.
fn port_for(data_dir: &Path, attempt: u32) -> io::Result<u16> {
    if attempt == 1
        && let Some(port) = last_port(data_dir)
        && port != 0
        && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
    {
        return Ok(port);
    }
    free_port()
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// `path`, resolved against the current directory when relative.
pub(super) fn absolute(path: &Path) -> Result<PathBuf, LocalPostgresError> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir().map_err(io_err("resolving", path))?;
    Ok(cwd.join(path))
}
