//! A stderr that cannot be written (a full disk, here `/dev/full`; a closed
//! pipe) loses lines but does not turn the process's exit into a panic.

mod child;

use std::fs::OpenOptions;
use std::process::Stdio;
use std::time::Duration;

#[tokio::test]
async fn an_error_on_an_unwritable_stderr_still_exits_1() {
    let full = OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let status = child::hermes(&["serve", "--config", "/nonexistent/hermes.toml"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::from(full))
        .status();
    let status = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("hermes exits at once")
        .expect("run the hermes binary");
    // 101 is Rust's exit code for a panic.
    assert_eq!(status.code(), Some(1), "{status}");
}
