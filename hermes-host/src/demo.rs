//! `hermes demo`: serves on the embedded defaults and drives signed webhook
//! traffic at itself (valid SMS and email events, redeliveries, malformed
//! payloads and forged signatures), printing live progress and a summary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hermes_adapters::sandbox::webhook_sender::{self, BodyFn, SenderConfig, Snapshot, Stats};
use hermes_adapters::webhook::{Secret, Verifier};
use sqlx::PgPool;

use crate::config::{Config, Normalize, SourceConfig};
use crate::server::{RunningServer, Server};
use crate::shutdown::Signals;

/// What `hermes demo` was asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long; `None` runs until SIGINT/SIGTERM.
    pub duration: Option<Duration>,
    /// Connections driving valid SMS traffic as fast as the host answers.
    pub connections: usize,
}

/// The demo's traffic: one stream per kind of sender.
struct Traffic {
    sms: Arc<Stats>,
    email: Arc<Stats>,
    forged: Arc<Stats>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The source the demo sends SMS webhooks (valid and forged) to.
const SMS_SOURCE: &str = "sms";
/// The source the demo sends emails to.
const EMAIL_SOURCE: &str = "email";

/// Runs the demo. SIGINT or SIGTERM stops it at any point: during startup it
/// returns at once; later the senders stop, the summary is printed and the
/// server shuts down gracefully, as at the end of `--duration`. Once the
/// server is up it is shut down before any return, error or not.
pub async fn run(config: Config, options: DemoOptions) -> anyhow::Result<()> {
    let mut signals = Signals::listen().context("cannot listen for SIGTERM and SIGINT")?;
    let config = with_demo_sources(config);
    check_sources(&config)?;
    let Some(server) = signals.unless(start(config)).await else {
        println!("hermes demo: stopped during startup");
        return Ok(());
    };
    let server = server?;
    println!(
        "hermes demo: serving on {} (Postgres: {})",
        server.url(),
        server.database().url()
    );
    let demo = send_and_report(&server, &options, &mut signals).await;
    signals.exit_on_another();
    let report = server.shutdown().await;
    println!(
        "hermes demo: stopped{}",
        if report.forced {
            " (drain deadline passed)"
        } else {
            ""
        }
    );
    demo
}

/// Sends until `--duration` passes or a signal comes, then prints the summary.
async fn send_and_report(
    server: &RunningServer,
    options: &DemoOptions,
    signals: &mut Signals,
) -> anyhow::Result<()> {
    match options.duration {
        Some(duration) => println!("hermes demo: sending signed webhooks for {duration:?}\n"),
        None => println!("hermes demo: sending signed webhooks until Ctrl-C\n"),
    }
    let traffic = drive(server, options)?;
    let started = Instant::now();
    let ended = signals.unless(async {
        match options.duration {
            Some(duration) => tokio::time::sleep(duration).await,
            None => std::future::pending().await,
        }
    });
    tokio::pin!(ended);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    let mut previous = 0;
    loop {
        tokio::select! {
            _ = &mut ended => break,
            _ = ticker.tick() => {
                let accepted = accepted(&traffic.sms.snapshot()) + accepted(&traffic.email.snapshot());
                let in_flight = server.ingest().pipeline().in_flight();
                print_progress(started.elapsed(), accepted - previous, in_flight, &traffic);
                previous = accepted;
            }
        }
    }
    stop_traffic(traffic.stop, traffic.tasks).await;
    // Every 202 counted was committed before it was sent. A request abandoned
    // at the end may still commit after the count below, so Postgres can
    // come to hold a few more events than the run says it had accepted.
    let elapsed = started.elapsed();
    let pool = server.database().pool();
    summary(elapsed, &traffic.sms, &traffic.email, &traffic.forged, pool).await
}

/// How long requests already in flight when the demo ends get to be answered
/// (and counted) before the senders are dropped. The senders' own request
/// time-out is 30 s: waiting for it would hold `--duration 2s` with
/// thousands of connections open for half a minute.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(2);

/// Stops the senders: no request is sent after this is called; those in
/// flight get [`IN_FLIGHT_GRACE`] to be answered, then the sender tasks are
/// aborted (dropping their requests, which the summary reports as
/// abandoned). Returns once every sender task has ended; aborting one drops
/// its workers, so the counters stop moving (a worker mid-poll on another
/// thread may record one last answer).
async fn stop_traffic(stop: Arc<AtomicBool>, mut tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    let answered = tokio::time::timeout(IN_FLIGHT_GRACE, async {
        for task in &mut tasks {
            let _ = task.await;
        }
    })
    .await;
    if answered.is_err() {
        for task in &tasks {
            task.abort();
        }
        for task in tasks {
            let _ = task.await;
        }
    }
}

/// Fails, before anything starts, when configured sources lack one the demo
/// sends to, saying which and how to fix it.
fn check_sources(config: &Config) -> anyhow::Result<()> {
    let names: Vec<&str> = config
        .webhooks
        .sources
        .iter()
        .map(|source| source.name.as_str())
        .collect();
    let missing: Vec<String> = [SMS_SOURCE, EMAIL_SOURCE]
        .into_iter()
        .filter(|needed| !names.contains(needed))
        .map(|needed| format!("\"{needed}\""))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let configured = names
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ");
    anyhow::bail!(
        "the demo sends SMS webhooks to a source named \"{SMS_SOURCE}\" and emails to one named \
         \"{EMAIL_SOURCE}\"; the configured [[webhooks.sources]] ({configured}) lack {}. Add \
         what is missing (normalize = \"sms\" for SMS, \"email\" for emails), or give the demo a \
         configuration without [[webhooks.sources]] (another --config, or run it outside the \
         directory holding hermes.toml), and it adds both with fresh secrets",
        missing.join(" and ")
    )
}

/// Adds an SMS and an email source with fresh secrets, unless sources are configured.
fn with_demo_sources(mut config: Config) -> Config {
    if config.webhooks.sources.is_empty() {
        let sms_secret = hex_secret();
        let mut sms =
            SourceConfig::new(SMS_SOURCE, "hmac-sha256", &[&sms_secret]).normalize(Normalize::Sms);
        sms.header = Some("x-provider-signature-256".into());
        sms.prefix = Some("sha256=".into());
        let email_secret = format!("whsec_{}", base64_secret());
        let email = SourceConfig::new(EMAIL_SOURCE, "standard-webhooks", &[&email_secret])
            .normalize(Normalize::Email);
        config.webhooks.sources = vec![sms, email];
    }
    config
}

fn hex_secret() -> String {
    hex::encode(rand::random::<[u8; 24]>())
}

fn base64_secret() -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>())
}

/// Starts the host; if the configured port is in use, on a free one instead
/// (any other failure to listen is an error).
async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let configured = config.http.listen;
    let server = Server::start_on_a_free_port_if_taken(config).await?;
    if configured.port() != 0 && server.local_addr().port() != configured.port() {
        println!("hermes demo: {configured} is in use, taking a free port");
    }
    Ok(server)
}

fn drive(server: &RunningServer, options: &DemoOptions) -> anyhow::Result<Traffic> {
    let run = format!("demo-{}", hex::encode(rand::random::<[u8; 4]>()));
    let source = |name: &str| {
        server
            .sources()
            .get(name)
            .with_context(|| format!("the demo needs a source named {name:?}"))
    };
    let (sms_source, email_source) = (source(SMS_SOURCE)?, source(EMAIL_SOURCE)?);
    let sms_verifier = Arc::new(sms_source.verifier().clone());
    let email_verifier = Arc::new(email_source.verifier().clone());
    let forged_verifier = Arc::new(Verifier::new(
        sms_verifier.scheme().clone(),
        vec![Secret::from("not-the-secret")],
    )?);
    let url = |source: &str| format!("{}/webhooks/{source}", server.url());
    let forever = Duration::from_secs(365 * 24 * 3600);
    let stop = Arc::new(AtomicBool::new(false));

    let sms_run = run.clone();
    let senders = [
        SenderConfig {
            url: url(SMS_SOURCE),
            verifier: sms_verifier,
            connections: options.connections,
            streams_per_connection: 1,
            duration: forever,
            rate_per_sec: None,
            body: Arc::new(move |n| webhook_sender::sms_body(n, &sms_run)),
        },
        SenderConfig {
            url: url(EMAIL_SOURCE),
            verifier: email_verifier,
            connections: 4,
            streams_per_connection: 1,
            duration: forever,
            rate_per_sec: Some(100),
            body: email_bodies(run.clone()),
        },
        SenderConfig {
            url: url(SMS_SOURCE),
            verifier: forged_verifier,
            connections: 1,
            streams_per_connection: 1,
            duration: forever,
            rate_per_sec: Some(5),
            body: Arc::new(move |n| webhook_sender::sms_body(n, &format!("{run}-forged"))),
        },
    ];
    let stats = [Stats::new(), Stats::new(), Stats::new()];
    let tasks = senders
        .into_iter()
        .zip(stats.iter().cloned())
        .map(|(sender, stats)| {
            let stop = stop.clone();
            tokio::spawn(async move {
                if let Err(error) = webhook_sender::run(sender, stats, stop).await {
                    tracing::error!(%error, "a demo sender stopped");
                }
            })
        })
        .collect();
    let [sms, email, forged] = stats;
    Ok(Traffic {
        sms,
        email,
        forged,
        stop,
        tasks,
    })
}

/// Emails between a few mailboxes: every 10th is a redelivery of the previous
/// event, every 25th has an invalid address (422).
fn email_bodies(run: String) -> BodyFn {
    Arc::new(move |sent| {
        let n = if sent % 10 == 9 { sent - 1 } else { sent };
        let from = if sent % 25 == 24 {
            "not-an-address".to_owned()
        } else {
            format!("Customer{}@Example.COM", n % 7)
        };
        let id = format!("{run}-email-{n}");
        let body = serde_json::json!({
            "from": from,
            "to": "support@hermes.example",
            "body": format!("email {n}: where is my order?"),
            "timestamp": "2026-11-22T12:00:00Z",
            "provider_message_id": id,
        });
        (id, body.to_string().into_bytes())
    })
}

fn accepted(snapshot: &Snapshot) -> u64 {
    snapshot.statuses.get(&202).copied().unwrap_or(0)
}

/// Requests sent that have neither an answer nor an error: once the senders
/// have ended, those abandoned in flight at the end.
fn unanswered(snapshot: &Snapshot) -> u64 {
    let answered: u64 = snapshot.statuses.values().sum();
    snapshot.sent.saturating_sub(answered + snapshot.errors)
}

/// Counts by status, then requests that got no answer (connection errors,
/// time-outs), if any: `202:10575 401:5 no answer:3`.
fn statuses(snapshots: &[Snapshot]) -> String {
    let mut all = std::collections::BTreeMap::<u16, u64>::new();
    for snapshot in snapshots {
        for (status, count) in &snapshot.statuses {
            *all.entry(*status).or_default() += count;
        }
    }
    let mut counts: Vec<String> = all
        .iter()
        .map(|(status, count)| format!("{status}:{count}"))
        .collect();
    let unanswered: u64 = snapshots.iter().map(|snapshot| snapshot.errors).sum();
    if unanswered > 0 {
        counts.push(format!("no answer:{unanswered}"));
    }
    counts.join(" ")
}

fn print_progress(
    elapsed: Duration,
    accepted_last_second: u64,
    in_flight: usize,
    traffic: &Traffic,
) {
    let sms = traffic.sms.snapshot();
    let snapshots = [
        sms.clone(),
        traffic.email.snapshot(),
        traffic.forged.snapshot(),
    ];
    println!(
        "[{:>4}s] {:>7} events/s  p50 {:>6.1} ms  p99 {:>6.1} ms  in flight {:>4}  {}",
        elapsed.as_secs(),
        accepted_last_second,
        sms.p50_ms,
        sms.p99_ms,
        in_flight,
        statuses(&snapshots)
    );
}

async fn summary(
    elapsed: Duration,
    sms: &Stats,
    email: &Stats,
    forged: &Stats,
    pool: &PgPool,
) -> anyhow::Result<()> {
    let (sms, email, forged) = (sms.snapshot(), email.snapshot(), forged.snapshot());
    let accepted_total = accepted(&sms) + accepted(&email);
    let count = |table: &'static str| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(pool)
            .await
    };
    println!("\nsummary after {:.1} s", elapsed.as_secs_f64());
    println!(
        "  sms     {} sent, {} accepted ({:.0}/s), p50 {:.1} ms, p99 {:.1} ms",
        sms.sent,
        accepted(&sms),
        accepted(&sms) as f64 / elapsed.as_secs_f64(),
        sms.p50_ms,
        sms.p99_ms
    );
    println!(
        "  email   {} sent, {} accepted ({} of them redeliveries, stored once), {} refused as invalid (422)",
        email.sent,
        accepted(&email),
        email.duplicates,
        email.statuses.get(&422).copied().unwrap_or(0)
    );
    println!(
        "  forged  {} sent, {} refused (401)",
        forged.sent,
        forged.statuses.get(&401).copied().unwrap_or(0)
    );
    let abandoned: u64 = [&sms, &email, &forged].into_iter().map(unanswered).sum();
    println!("  by status: {}", statuses(&[sms, email, forged]));
    if abandoned > 0 {
        println!(
            "  abandoned: {abandoned} of the requests sent, still unanswered {:?} after the end",
            IN_FLIGHT_GRACE
        );
    }
    println!(
        "  in Postgres: {} events, {} parties, {} conversations, {} messages ({} accepted this run)",
        count("webhook_events").await?,
        count("parties").await?,
        count("conversations").await?,
        count("messages").await?,
        accepted_total
    );
    Ok(())
}
