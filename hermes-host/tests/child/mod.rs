//! Shared by the tests that run the `hermes` binary as a child process: its
//! working directory and signals.

use std::path::PathBuf;

use tokio::process::Child;

/// The test binaries' temporary directory (no `hermes.toml` in it).
pub fn tmp_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// Sends `signal` (`libc::SIGTERM`, `libc::SIGINT`) to `child`, which must
/// not have been reaped yet, with kill(2) itself: no `kill` program needed.
pub fn send_signal(child: &Child, signal: libc::c_int) {
    // `id()` is `None` once the child was reaped; until then its pid cannot
    // be reused by another process.
    let pid = child.id().expect("the child has not been reaped");
    let pid = libc::pid_t::try_from(pid).expect("a pid fits in pid_t");
    // SAFETY: kill(2) takes two integers and touches no memory of this
    // process; the pid is our unreaped child's, so it names that process.
    let sent = unsafe { libc::kill(pid, signal) };
    assert_eq!(
        sent,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}
