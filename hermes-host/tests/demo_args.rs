//! `hermes demo` refuses `--connections` outside 1..=10000 and a zero
//! `--duration` while parsing its arguments: a clear message naming the
//! flag, a non-zero exit, and nothing started (no server, no Postgres).

mod child;

use std::time::Duration;

/// Runs `hermes demo args…` and checks that it fails at once, naming `flag`
/// and saying `why`, before anything starts.
async fn refused(args: &[&str], flag: &str, why: &str) {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    // Argument parsing fails in milliseconds; starting Postgres would not.
    let output = child::run_to_end(&all, &[], Duration::from_secs(10)).await;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        !output.status.success(),
        "hermes {all:?} succeeded: {stdout}{stderr}"
    );
    assert!(
        stderr.contains(flag) && stderr.contains(why),
        "hermes {all:?} should name {flag} and say {why:?}: {stderr}"
    );
    assert!(
        stdout.is_empty() && !stderr.contains("Postgres"),
        "nothing started: {stdout}{stderr}"
    );
}

#[tokio::test]
async fn zero_connections_are_refused() {
    refused(&["--connections", "0"], "--connections", "1..=10000").await;
}

#[tokio::test]
async fn more_than_10000_connections_are_refused() {
    refused(&["--connections", "10001"], "--connections", "1..=10000").await;
    refused(
        &["--connections", "99999999999", "--duration", "1s"],
        "--connections",
        "1..=10000",
    )
    .await;
}

#[tokio::test]
async fn a_zero_duration_is_refused() {
    refused(&["--duration", "0s"], "--duration", "more than 0").await;
    refused(&["--duration", "0"], "--duration", "more than 0").await;
}
