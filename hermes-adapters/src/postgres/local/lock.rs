//! The `flock` with which starts of one cluster take turns.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{LocalPostgresError, READY_TIMEOUT, START_ATTEMPTS, io_err};

/// Takes an exclusive `flock` on the directory `dir`, held until the returned
/// file is dropped (and not passed on to the commands run meanwhile: the file
/// is close-on-exec). Another start of the same cluster holds it for as long
/// as its start takes: waiting for it is logged, and given up after
/// [`LOCK_WAIT`]. On a file system without `flock`, goes on without it.
pub(super) fn lock_dir(dir: &Path) -> Result<Option<File>, LocalPostgresError> {
    let file = File::open(dir).map_err(io_err("opening", dir))?;
    let started = Instant::now();
    let mut logged = false;
    loop {
        // SAFETY: flock only takes a descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(Some(file));
        }
        let error = io::Error::last_os_error();
        match error.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock if started.elapsed() < LOCK_WAIT => {
                if !logged {
                    tracing::info!(dir = %dir.display(), "another process is starting this cluster; waiting for it");
                    logged = true;
                }
                std::thread::sleep(LOCK_POLL);
            }
            io::ErrorKind::WouldBlock => {
                return Err(io_err("locking", dir)(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "another process has been starting this cluster for {} s",
                        LOCK_WAIT.as_secs()
                    ),
                )));
            }
            _ => {
                tracing::warn!(dir = %dir.display(), %error, "cannot lock the data directory; starting without the lock");
                return Ok(None);
            }
        }
    }
}

/// How long a start waits for another start of the same cluster: longer
/// than every attempt of one start ([`START_ATTEMPTS`] × [`READY_TIMEOUT`]).
const LOCK_WAIT: Duration =
    Duration::from_secs(READY_TIMEOUT.as_secs() * (START_ATTEMPTS as u64 + 1));

/// How often a start waiting for the lock tries it again.
const LOCK_POLL: Duration = Duration::from_millis(20);
