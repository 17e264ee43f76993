//! Shared by the tests that run the `hermes` binary as a child process: how
//! it is started, its working directory, signals, waiting on its output, a
//! database that never answers, and signed deliveries to it.

// Each test uses only some of these.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use hermes_adapters::webhook::Verifier;

use tokio::process::{Child, Command};

/// The variables of the host that a child sees only when a test sets them.
const HOST_ENV: [&str; 4] = [
    "RUST_LOG",
    "HERMES_LOG_FORMAT",
    "DATABASE_URL",
    "HERMES_LISTEN",
];

/// `hermes args…` in [`tmp_dir`] (no `hermes.toml` there), with `env` set,
/// none of the host's own variables inherited otherwise (`RUST_LOG` among
/// them: unset unless `env` sets it), stdin closed, and killed when dropped.
pub fn hermes(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_hermes"));
    command.args(args).current_dir(tmp_dir());
    for name in HOST_ENV {
        command.env_remove(name);
    }
    command
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `hermes args…`, set up as [`hermes`] does, to its end: its exit
/// status and output. Panics if it is still running after `limit`.
pub async fn run_to_end(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let output = hermes(args, env).output();
    tokio::time::timeout(limit, output)
        .await
        .unwrap_or_else(|_| panic!("hermes {args:?} still running after {limit:?}"))
        .expect("run the hermes binary")
}

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

/// A "database" that accepts connections and never answers: startup hangs
/// in the connect. Its URL, and the task holding the connections.
pub async fn silent_database() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    (format!("postgres://hermes@{address}/hermes"), silent)
}

/// Polls `text()` (the child's output so far) every 20 ms until `find` finds
/// something in it, and returns that. Panics, showing the output, if `child`
/// exits first or `limit` passes; `what` names what was awaited.
pub async fn wait_for_output<T>(
    child: &mut Child,
    limit: Duration,
    what: &str,
    text: impl Fn() -> String,
    find: impl Fn(&str) -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let output = text();
        if let Some(found) = find(&output) {
            return found;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("hermes exited ({status}) before {what}:\n{output}");
        }
        assert!(
            Instant::now() < deadline,
            "no {what} in {limit:?}:\n{output}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How `child` exited, within `limit`; panics showing `output()` if it is
/// still running then.
pub async fn exit_within(
    child: &mut Child,
    limit: Duration,
    output: impl Fn() -> String,
) -> std::process::ExitStatus {
    match tokio::time::timeout(limit, child.wait()).await {
        Ok(status) => status.expect("wait for hermes"),
        Err(_) => panic!("hermes still running after {limit:?}:\n{}", output()),
    }
}

/// POSTs the JSON `body` to the webhook route `url`, signed now by
/// `verifier` as its provider would.
pub async fn post_signed(
    client: &reqwest::Client,
    url: &str,
    verifier: &Verifier,
    body: &[u8],
) -> reqwest::Result<reqwest::Response> {
    let headers = verifier.sign(body, url, "", SystemTime::now());
    client
        .post(url)
        .headers(headers)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
}
