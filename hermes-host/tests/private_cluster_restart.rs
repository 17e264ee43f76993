//! A host on its private cluster (no `DATABASE_URL`) starts the cluster again
//! when its server dies: after `kill -9` of the postmaster, webhooks are
//! stored again without restarting the host.

mod child;

use std::process::Stdio;
use std::time::{Duration, Instant};

use child::{exit_within, send_signal, tmp_dir, wait_for_output};
use hermes_adapters::postgres::LocalPostgres;
use hermes_adapters::webhook::Verifier;
use hermes_host::Config;
use hermes_host::webhooks::SourceRegistry;

const CONFIG: &str = r#"
[http]
listen = "127.0.0.1:0"

[[webhooks.sources]]
name = "raw"
scheme = "hmac-sha256"
header = "x-signature"
encoding = "hex"
secrets = ["keeper-test-secret"]
normalize = "none"
"#;

/// POSTs the signed event `n` to `url`'s raw source: its status, or `None`
/// without an answer.
async fn post(client: &reqwest::Client, url: &str, verifier: &Verifier, n: u32) -> Option<u16> {
    let body = format!(r#"{{"n":{n}}}"#);
    let route = format!("{url}/webhooks/raw");
    let reply = child::post_signed(client, &route, verifier, body.as_bytes())
        .await
        .ok()?;
    Some(reply.status().as_u16())
}

#[tokio::test]
async fn a_killed_private_cluster_is_started_again_by_the_host() {
    let dir = tmp_dir().join(format!("keeper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the working directory");
    std::fs::write(dir.join("hermes.toml"), CONFIG).expect("write the config");
    let log = dir.join("hermes.log");
    let mut host = child::hermes(&["serve", "--config", "hermes.toml"], &[])
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("create the log"))
        .spawn()
        .expect("start hermes serve");
    let output = || std::fs::read_to_string(&log).unwrap_or_default();
    let url = wait_for_output(
        &mut host,
        Duration::from_secs(120),
        "the listening address",
        output,
        |text| {
            let rest = text.split("hermes: listening on ").nth(1)?;
            Some(rest.split_whitespace().next()?.to_owned())
        },
    )
    .await;
    let config = Config::from_toml_str(CONFIG).expect("config");
    let sources = SourceRegistry::from_config(&config.webhooks, None).expect("sources");
    let verifier = sources.get("raw").expect("raw source").verifier().clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    assert_eq!(post(&client, &url, &verifier, 0).await, Some(202));

    let pid_file = dir.join(".hermes/pg/postmaster.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .expect("postmaster.pid")
        .lines()
        .next()
        .and_then(|line| line.trim().parse().ok())
        .expect("a pid");
    // SAFETY: kill(2) on the private cluster's postmaster, which this test's host started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    // The host notices within its check interval and starts the cluster
    // again (backends of the old one may still answer meanwhile: they exit
    // once they notice their postmaster is gone).
    wait_for_output(
        &mut host,
        Duration::from_secs(60),
        "the cluster started again",
        output,
        |text| {
            text.contains("the private PostgreSQL runs again")
                .then_some(())
        },
    )
    .await;
    // Then webhooks are stored again: 503s at most until the writer's
    // circuit breaker finds the database back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 1;
    loop {
        match post(&client, &url, &verifier, n).await {
            Some(202) => break,
            Some(503) | None if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            other => panic!("answer {other:?} after the restart:\n{}", output()),
        }
        n += 1;
    }

    send_signal(&host, libc::SIGTERM);
    let status = exit_within(&mut host, Duration::from_secs(30), output).await;
    assert!(status.success(), "{status}");
    // The cluster outlives the host: stop it (reused, then stopped).
    let cluster = LocalPostgres::start(dir.join(".hermes/pg"), "hermes")
        .await
        .expect("reuse the cluster");
    cluster.stop().await.expect("stop the cluster");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
