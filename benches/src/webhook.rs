//! End-to-end webhook benchmarks: the `hermes` binary on a private Postgres,
//! driven by signed 1 KB sms webhooks.
//!
//! - `webhook_e2e`: a closed loop over many connections for a fixed time to a
//!   source stored raw: committed 202s per second, p50/p99 of the 202s,
//!   counts by status, and the standalone Postgres limit for the same rows
//!   measured in the same run (COPY of the same 1 KB jsonb event rows into the
//!   same table, one connection, no load on the host), just before and just
//!   after the loop, each started (as the loop is) after a `CHECKPOINT`,
//!   with `ratio` = accepted_per_sec ÷ their mean. Also the CPU each part
//!   (host, Postgres, load generator) spent per event, the machine's busy
//!   cores, and `lost`: 202s whose event is not stored
//!   (checked after the loop, outside its measured time). `webhook_e2e_bare`:
//!   the same loop against the bare server
//!   ([`bare_webhook`](crate::bare_webhook): signature, JSON check, one
//!   group-committed `COPY`, nothing else), the floor a store-then-202
//!   design has on this machine; its 202s name no event id, so its `lost`
//!   goes by delivery id alone. `webhook_e2e_normalized`: the host again, to
//!   an SMS source, whose events also resolve parties, conversations and
//!   messages.
//! - `webhook_e2e_latency`: an open loop at a fraction of the measured
//!   capacity: p50/p99 of the 202s below saturation, against the target
//!   `batch_timeout_ms + 25`.
//! - `webhook_e2e_http_only`: the same closed loop to a source the host does
//!   not have (404 before the body is verified): requests/s and CPU per
//!   request of HTTP and the load generator alone, the floor under every
//!   stored event.
//! - `webhook_overload`: an open loop offering twice the capacity to a host
//!   with a small ingest buffer: the 503 share, the host's peak RSS (and its
//!   RSS over time), and `lost`: events answered 202 that are not stored
//!   under the id their 202 named.
//!
//! A command fails (exits non-zero, naming the fault) right after printing a
//! line that shows one: a request without a usable answer (`errors`), a 202
//! that said duplicate, a lost event, or a status a loop should not get (the
//! e2e closed loops expect only 202s, the HTTP-only loop only 404s).
//!
//! The host runs as a subprocess — the release binary next to `hermes-bench`
//! (`target/release/hermes`, built by `cargo build --release -p hermes-host`),
//! or `--hermes-bin` — so its RSS is its own. Load generator, host and
//! Postgres share the machine's cores.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use hermes_adapters::postgres::local::{Durability, LocalPostgres};
use hermes_adapters::sandbox::webhook_sender::{
    self, AcceptedEvent, SenderConfig, Snapshot, Stats,
};
use hermes_adapters::webhook::{Encoding, Scheme, Secret, Verifier, body_sha256_hex};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::bench_cluster;
use crate::copy_text::push_field;
use crate::report::{
    MachineCpu, cpu_secs_of, cpu_secs_of_tree, emit, machine_cpu, peak_rss_mb_of,
    reset_peak_rss_of, round3, rss_mb_of,
};

/// The signing secret of the benchmark's source (benchmark-only).
const SECRET: &str = "hermes-bench-secret";
/// The signature header of the benchmark's source.
const HEADER: &str = "x-provider-signature-256";
/// Rows per COPY (one transaction each) of the standalone Postgres limit.
const COPY_CHUNK: usize = 5_000;
/// How long the standalone Postgres limit is measured.
const LIMIT_SECS: f64 = 4.0;
/// Warm-up before a measured run (connections, caches, Postgres buffers).
const WARMUP: Duration = Duration::from_secs(1);

/// Options shared by the webhook benchmarks.
#[derive(Debug, Clone)]
pub struct Options {
    /// Measured seconds of load.
    pub secs: u64,
    /// Connections of the closed loop.
    pub connections: usize,
    /// Requests in flight per connection: 1 is HTTP/1.1; more multiplexes
    /// HTTP/2 streams (for `webhook-e2e`).
    pub streams: usize,
    /// The `hermes` binary; default: `hermes` next to this executable.
    pub hermes_bin: Option<PathBuf>,
    /// Run Postgres without fsync (faster, not crash-safe). Default: durable.
    pub relaxed: bool,
    /// Extra `[webhooks]` TOML lines for the host (tuning experiments).
    pub webhooks: Vec<String>,
}

/// `hermes-bench webhook-e2e`: prints `webhook_e2e` (raw events: the same
/// rows as the Postgres limit), `webhook_e2e_normalized` (SMS events resolved
/// into parties, conversations and messages), `webhook_e2e_latency` and
/// `webhook_e2e_http_only`.
pub fn run_e2e(options: &Options) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let bench = Bench::setup(options).await?;
        // The machine's speed drifts (a shared VM): the limit is measured
        // before and after each closed loop, and its ratio uses their mean.
        let mut limit_before = bench.pg_copy_limit().await?;
        let host = bench
            .start_host("e2e", &options.webhooks.join("\n"))
            .await?;
        let cpu = CpuMeter {
            host: host.pid(),
            postmaster: Some(bench.pg.pid()),
        };
        let bare = bench.start_bare().await?;
        let run = format!("e2e-{}", std::process::id());
        let mut raw_per_sec = 0.0;
        for (bench_name, server, source) in [
            ("webhook_e2e", &host, RAW_SOURCE),
            ("webhook_e2e_bare", &bare, RAW_SOURCE),
            ("webhook_e2e_normalized", &host, SMS_SOURCE),
        ] {
            let cpu = CpuMeter {
                host: server.pid(),
                ..cpu
            };
            // Every loop writes into empty tables, as the limit does.
            bench.empty_tables().await?;
            let (closed, stats, secs, used) = closed_loop(
                server,
                &cpu,
                source,
                options,
                &format!("{run}-{bench_name}"),
            )
            .await?;
            let limit_after = bench.pg_copy_limit().await?;
            let limit = (limit_before + limit_after) / 2.0;
            let lost = bench
                .count_not_stored(&stats.accepted(), server.event_ids)
                .await?;
            let accepted = closed.statuses.get(&202).copied().unwrap_or(0);
            let accepted_per_sec = accepted as f64 / secs;
            if bench_name == "webhook_e2e" {
                raw_per_sec = accepted_per_sec;
            }
            emit(&json!({
                "bench": bench_name,
                "source_normalize": if source == RAW_SOURCE { "none" } else { "sms" },
                "secs": round3(secs),
                "connections": options.connections,
                "streams_per_connection": options.streams,
                "accepted": accepted,
                "accepted_per_sec": accepted_per_sec.round(),
                "p50_ms": round3(closed.p50_ms),
                "p99_ms": round3(closed.p99_ms),
                "statuses": statuses(&closed),
                "errors": closed.errors,
                "lost": lost,
                "pg_copy_rows_per_sec": limit.round(),
                "pg_copy_rows_per_sec_before": limit_before.round(),
                "pg_copy_rows_per_sec_after": limit_after.round(),
                "ratio": round3(accepted_per_sec / limit),
                "durable": bench.durable,
                "host_peak_rss_mb": round3(peak_rss_mb_of(server.pid())),
                "cpu_us_per_event": used.per_event_us(accepted),
                "busy_cores": round3(used.machine.busy / secs),
                "steal_cores": round3(used.machine.steal / secs),
            }));
            check_answers(bench_name, &closed, lost, Some(202))?;
            limit_before = limit_after;
        }
        bare.stop().await;

        // Below saturation: half the measured raw capacity, open loop.
        let rate = ((raw_per_sec * 0.5) as u64).max(1);
        let started = Instant::now();
        let (open, _) = drive(
            &host,
            RAW_SOURCE,
            options.connections,
            options.streams,
            Duration::from_secs(options.secs),
            Some(rate),
            &format!("{run}-latency"),
        )
        .await?;
        let batch_timeout_ms = batch_timeout_ms(&options.webhooks);
        let secs = started.elapsed().as_secs_f64();
        let open_accepted = open.statuses.get(&202).copied().unwrap_or(0);
        emit(&json!({
            "bench": "webhook_e2e_latency",
            "secs": round3(secs),
            "offered_per_sec": rate,
            "sent_per_sec": (open.sent as f64 / secs).round(),
            "accepted_per_sec": (open_accepted as f64 / secs).round(),
            "p50_ms": round3(open.p50_ms),
            "p99_ms": round3(open.p99_ms),
            "p99_target_ms": batch_timeout_ms + 25,
            "longest_answer_ms": round3(open.longest_answer_ms),
            "statuses": statuses(&open),
            "errors": open.errors,
        }));
        check_answers("webhook_e2e_latency", &open, 0, None)?;

        // The floor under every stored event: the same closed loop to a
        // source the host does not have, answered 404 before the body is
        // verified, so no hashing, no pipeline and no Postgres.
        // Postgres has no part in a 404: not metered.
        let http_cpu = CpuMeter {
            postmaster: None,
            ..cpu
        };
        let (floor, _, secs, used) = closed_loop(
            &host,
            &http_cpu,
            UNKNOWN_SOURCE,
            options,
            &format!("{run}-404"),
        )
        .await?;
        let answered: u64 = floor.statuses.values().sum();
        emit(&json!({
            "bench": "webhook_e2e_http_only",
            "secs": round3(secs),
            "connections": options.connections,
            "requests_per_sec": (answered as f64 / secs).round(),
            "statuses": statuses(&floor),
            "errors": floor.errors,
            "cpu_us_per_request": used.per_event_us(answered),
            "busy_cores": round3(used.machine.busy / secs),
            "steal_cores": round3(used.machine.steal / secs),
        }));
        check_answers("webhook_e2e_http_only", &floor, 0, Some(404))?;
        host.stop().await;
        Ok(())
    })
}

/// A warm-up, then the measured closed loop on `source`: what it got (and
/// its 202s), how long it ran, and the CPU it took.
async fn closed_loop(
    host: &HostProcess,
    cpu: &CpuMeter,
    source: &str,
    options: &Options,
    run: &str,
) -> anyhow::Result<(Snapshot, Arc<Stats>, f64, CpuUsed)> {
    let warmup = format!("{run}-w");
    drive(
        host,
        source,
        options.connections,
        options.streams,
        WARMUP,
        None,
        &warmup,
    )
    .await?;
    reset_peak_rss_of(host.pid());
    let before = cpu.sample();
    let started = Instant::now();
    let duration = Duration::from_secs(options.secs);
    let (closed, stats) = drive(
        host,
        source,
        options.connections,
        options.streams,
        duration,
        None,
        run,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    Ok((closed, stats, secs, cpu.sample().since(&before)))
}

/// Samples the CPU time of the parts of an end-to-end run, which share the
/// machine's cores.
#[derive(Clone, Copy)]
struct CpuMeter {
    host: u32,
    /// Postgres's postmaster, when Postgres takes part.
    postmaster: Option<u32>,
}

/// CPU seconds used by each part (or, for a sample, used so far).
struct CpuUsed {
    host: f64,
    postgres: Option<f64>,
    load_generator: f64,
    machine: MachineCpu,
}

impl CpuMeter {
    fn sample(&self) -> CpuUsed {
        CpuUsed {
            host: cpu_secs_of(self.host),
            postgres: self.postmaster.map(cpu_secs_of_tree),
            load_generator: cpu_secs_of(std::process::id()),
            machine: machine_cpu(),
        }
    }
}

impl CpuUsed {
    fn since(&self, earlier: &CpuUsed) -> CpuUsed {
        CpuUsed {
            host: self.host - earlier.host,
            postgres: self
                .postgres
                .zip(earlier.postgres)
                .map(|(now, then)| now - then),
            load_generator: self.load_generator - earlier.load_generator,
            machine: self.machine - earlier.machine,
        }
    }

    /// Microseconds of CPU per event of each part metered.
    fn per_event_us(&self, events: u64) -> CpuPerEvent {
        let per_event = |secs: f64| round3(secs * 1e6 / events.max(1) as f64);
        CpuPerEvent {
            host: per_event(self.host),
            postgres: self.postgres.map(per_event),
            load_generator: per_event(self.load_generator),
        }
    }
}

/// Microseconds of CPU per event of each part, as printed; `postgres` only
/// when Postgres was metered.
#[derive(Serialize)]
struct CpuPerEvent {
    host: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    postgres: Option<f64>,
    load_generator: f64,
}

/// `hermes-bench webhook-overload`: prints `webhook_overload`.
pub fn run_overload(
    options: &Options,
    ingest_capacity: usize,
    max_in_flight: usize,
) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let bench = Bench::setup(options).await?;
        let extra = format!(
            "ingest_capacity = {ingest_capacity}\nmax_in_flight = {max_in_flight}\n{}",
            options.webhooks.join("\n")
        );
        let host = bench.start_host("overload", &extra).await?;
        let run = format!("overload-{}", std::process::id());
        // Capacity: a short closed loop over exactly as many connections as
        // the host holds (ingress buffer + pipeline): it stays full, and
        // nothing is refused, so what it commits per second is its capacity.
        let capacity_connections = ingest_capacity + max_in_flight;
        drive(&host, SMS_SOURCE, capacity_connections, 1, WARMUP, None, &format!("{run}-w")).await?;
        let started = Instant::now();
        let (closed, _) = drive(
            &host,
            SMS_SOURCE,
            capacity_connections,
            1,
            Duration::from_secs(3),
            None,
            &format!("{run}-capacity"),
        )
        .await?;
        let capacity =
            closed.statuses.get(&202).copied().unwrap_or(0) as f64 / started.elapsed().as_secs_f64();
        let rss_before = rss_mb_of(host.pid());

        // Twice that, open loop: enough connections that the offered rate
        // holds while accepted requests wait for their commit.
        let rate = ((capacity * 2.0) as u64).max(1);
        let connections = (options.connections * 16).max(512);
        // The overload's own peak, not the capacity loop's.
        reset_peak_rss_of(host.pid());
        let sampler = RssSampler::start(host.pid());
        let started = Instant::now();
        let (overload, stats) = drive(
            &host,
            SMS_SOURCE,
            connections,
            1,
            Duration::from_secs(options.secs),
            Some(rate),
            &run,
        )
        .await?;
        let secs = started.elapsed().as_secs_f64();
        let samples = sampler.stop().await;

        let lost = bench
            .count_not_stored(&stats.accepted(), host.event_ids)
            .await?;
        let answered: u64 = overload.statuses.values().sum();
        let unavailable = overload.statuses.get(&503).copied().unwrap_or(0);
        let accepted = overload.statuses.get(&202).copied().unwrap_or(0);
        let half = samples.len() / 2;
        let max = |s: &[f64]| s.iter().copied().fold(0.0, f64::max);
        emit(&json!({
            "bench": "webhook_overload",
            "secs": round3(secs),
            "connections": connections,
            "ingest_capacity": ingest_capacity,
            "max_in_flight": max_in_flight,
            "capacity_per_sec": capacity.round(),
            "offered_per_sec": rate,
            "sent_per_sec": (overload.sent as f64 / secs).round(),
            "accepted_per_sec": (accepted as f64 / secs).round(),
            "p50_ms": round3(overload.p50_ms),
            "p99_ms": round3(overload.p99_ms),
            "statuses": statuses(&overload),
            "errors": overload.errors,
            "duplicates": overload.duplicates,
            "share_503": round3(if answered == 0 { 0.0 } else { unavailable as f64 / answered as f64 }),
            "lost": lost,
            "rss_before_mb": round3(rss_before),
            "rss_first_half_max_mb": round3(max(&samples[..half])),
            "rss_second_half_max_mb": round3(max(&samples[half..])),
            "peak_rss_mb": round3(peak_rss_mb_of(host.pid())),
            "durable": bench.durable,
        }));
        check_answers("webhook_overload", &overload, lost, None)?;
        host.stop().await;
        Ok(())
    })
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Fails `bench` if its line shows a fault: a request without a usable
/// answer, a 202 that said duplicate, `lost` events (0 where not checked), or
/// a status other than `expected` (when given).
fn check_answers(
    bench: &str,
    snapshot: &Snapshot,
    lost: u64,
    expected: Option<u16>,
) -> anyhow::Result<()> {
    let mut faults = Vec::new();
    if snapshot.errors > 0 {
        faults.push(format!("{} requests got no usable answer", snapshot.errors));
    }
    if snapshot.duplicates > 0 {
        faults.push(format!("{} 202s said duplicate", snapshot.duplicates));
    }
    if lost > 0 {
        faults.push(format!("{lost} events answered 202 are not stored"));
    }
    if let Some(expected) = expected {
        let others: Vec<String> = snapshot
            .statuses
            .iter()
            .filter(|(status, _)| **status != expected)
            .map(|(status, count)| format!("{count} x {status}"))
            .collect();
        if !others.is_empty() {
            faults.push(format!(
                "answers other than {expected}: {}",
                others.join(", ")
            ));
        }
    }
    if faults.is_empty() {
        Ok(())
    } else {
        bail!("{bench} failed: {}", faults.join("; "))
    }
}

/// Status counts as a JSON object keyed by status code.
fn statuses(snapshot: &Snapshot) -> Value {
    snapshot
        .statuses
        .iter()
        .map(|(status, count)| (status.to_string(), json!(count)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// Sends signed sms webhooks at `host` for `duration`: closed loop when
/// `rate` is `None`, else open loop at `rate` per second.
async fn drive(
    host: &HostProcess,
    source: &str,
    connections: usize,
    streams: usize,
    duration: Duration,
    rate: Option<u64>,
    run: &str,
) -> anyhow::Result<(Snapshot, Arc<Stats>)> {
    let run: Arc<str> = run.into();
    let config = SenderConfig {
        url: format!("{}/webhooks/{source}", host.url),
        verifier: Arc::new(verifier()?),
        connections,
        streams_per_connection: streams,
        duration,
        rate_per_sec: rate,
        body: Arc::new(move |n| webhook_sender::sms_body(n, &run)),
    };
    let stats = Stats::new();
    webhook_sender::run(config, stats.clone(), Arc::new(AtomicBool::new(false)))
        .await
        .context("the webhook sender failed")?;
    Ok((stats.snapshot(), stats))
}

/// The verifier of the benchmark's source (it signs the requests).
pub(crate) fn verifier() -> anyhow::Result<Verifier> {
    let scheme = Scheme::hmac_sha256(HEADER, Some("sha256="), Encoding::Hex)?;
    Ok(Verifier::new(scheme, vec![Secret::new(SECRET)])?)
}

/// The private cluster and the `hermes` binary of one benchmark run.
struct Bench {
    pg: LocalPostgres,
    hermes_bin: PathBuf,
    dir: PathBuf,
    database_url: String,
    /// Whether the cluster runs with `fsync` on (checked at start).
    durable: bool,
}

impl Bench {
    /// Starts (or reuses) the cluster under `target/bench-pg` and creates a
    /// fresh `hermes_bench` database.
    async fn setup(options: &Options) -> anyhow::Result<Self> {
        let hermes_bin = match &options.hermes_bin {
            Some(bin) => bin.clone(),
            None => std::env::current_exe()?.with_file_name("hermes"),
        };
        if !hermes_bin.is_file() {
            bail!(
                "no hermes binary at {}: build it with `cargo build --release -p hermes-host --bin hermes`, \
                 or pass --hermes-bin",
                hermes_bin.display()
            );
        }
        let dir = bench_cluster::bench_dir();
        let durability = if options.relaxed {
            Durability::Relaxed
        } else {
            Durability::Durable
        };
        let pg = bench_cluster::start(durability, "postgres").await?;
        pg.drop_database("hermes_bench").await?;
        pg.create_database("hermes_bench").await?;
        let database_url = pg.url_for("hermes_bench");
        Ok(Self {
            pg,
            hermes_bin,
            dir,
            database_url,
            durable: durability == Durability::Durable,
        })
    }

    /// Starts the host on the benchmark database with `[webhooks]` lines
    /// `extra`, and waits until it is ready.
    async fn start_host(&self, name: &str, extra: &str) -> anyhow::Result<HostProcess> {
        let config = format!(
            "[webhooks]\n{extra}\n\
             [[webhooks.sources]]\nname = \"{SMS_SOURCE}\"\nscheme = \"hmac-sha256\"\n\
             header = \"{HEADER}\"\nprefix = \"sha256=\"\nencoding = \"hex\"\n\
             secrets = [\"{SECRET}\"]\nnormalize = \"sms\"\n\
             [[webhooks.sources]]\nname = \"{RAW_SOURCE}\"\nscheme = \"hmac-sha256\"\n\
             header = \"{HEADER}\"\nprefix = \"sha256=\"\nencoding = \"hex\"\n\
             secrets = [\"{SECRET}\"]\nnormalize = \"none\"\n"
        );
        let config_path = self.dir.join(format!("{name}.toml"));
        std::fs::write(&config_path, &config)
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut command = Command::new(&self.hermes_bin);
        command.arg("serve").arg("--config").arg(&config_path);
        let log = self.dir.join(format!("{name}.log"));
        HostProcess::start(command, &self.database_url, &log, EventIds::Named).await
    }

    /// Starts the bare server (`hermes-bare-webhook`, next to this
    /// executable) on the benchmark database, which the host has migrated.
    async fn start_bare(&self) -> anyhow::Result<HostProcess> {
        let bin = std::env::current_exe()?.with_file_name("hermes-bare-webhook");
        if !bin.is_file() {
            bail!(
                "no bare server at {}: build it with `cargo build --release -p hermes-benches`",
                bin.display()
            );
        }
        let log = self.dir.join("bare.log");
        HostProcess::start(
            Command::new(bin),
            &self.database_url,
            &log,
            EventIds::NotNamed,
        )
        .await
    }

    /// Rows per second that Postgres alone stores of the same 1 KB event rows
    /// on one connection: `COPY` into `webhook_events` (same table,
    /// constraints and indexes, migrated by `hermes migrate`) in transactions
    /// of [`COPY_CHUNK`] rows, for [`LIMIT_SECS`], in its own database.
    ///
    /// Each row's key is its body's hex SHA-256, as the host keys it: keys
    /// spread over the unique index lower the limit by ~16% (measured side
    /// by side) against a counter's, which only ever append to its last page.
    /// The rows are made on another thread while the previous chunk is
    /// copied, so the limit is Postgres's, not the generator's. A
    /// `CHECKPOINT` precedes the timer, as one precedes each loop (see
    /// [`Bench::empty_tables`]): a limit measured after a loop does not pay
    /// the checkpoint that loop's writes owe.
    async fn pg_copy_limit(&self) -> anyhow::Result<f64> {
        let database = "hermes_bench_limit";
        self.pg.drop_database(database).await?;
        self.pg.create_database(database).await?;
        let url = self.pg.url_for(database);
        let status = Command::new(&self.hermes_bin)
            .arg("migrate")
            .env("DATABASE_URL", &url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("cannot run hermes migrate")?;
        if !status.success() {
            bail!("hermes migrate failed ({status}) on {url}");
        }
        let (chunks_tx, mut chunks) = tokio::sync::mpsc::channel(1);
        let generator = tokio::task::spawn_blocking(move || {
            let mut next = 0;
            while chunks_tx.blocking_send(limit_chunk(&mut next)).is_ok() {}
        });
        let mut conn = PgConnection::connect(&url).await?;
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
        let mut rows = 0u64;
        let started = Instant::now();
        while started.elapsed().as_secs_f64() < LIMIT_SECS {
            let chunk = chunks.recv().await.context("the row generator stopped")?;
            rows += copy_events(&mut conn, &chunk).await?;
        }
        let secs = started.elapsed().as_secs_f64();
        drop(chunks);
        generator.await?;
        sqlx::raw_sql("CHECKPOINT").execute(&mut conn).await?;
        conn.close().await?;
        self.pg.drop_database(database).await?;
        Ok(rows as f64 / secs)
    }

    /// Empties the tables the host writes, and checkpoints, so that each loop
    /// starts as the limit does: empty tables, no checkpoint owed.
    async fn empty_tables(&self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&self.database_url).await?;
        // The rows messages name are append-only (triggers refuse removing
        // them); replica mode skips those triggers for this reset.
        sqlx::raw_sql(
            "SET session_replication_role = replica; \
             TRUNCATE webhook_events, message_attachments, messages, conversations, parties, \
             channels, providers; CHECKPOINT",
        )
        .execute(&mut conn)
        .await?;
        conn.close().await?;
        Ok(())
    }

    /// How many of the `accepted` events are not stored. With
    /// [`EventIds::Named`] (the host), each must be stored under the id its
    /// 202 named, and that row must hold the body sent with that delivery id
    /// (its `provider_message_id`): so a 202 that named another event's row
    /// counts, not only one whose row is missing. Without (the bare server,
    /// whose 202s name id 0), some row must hold a body with that delivery
    /// id.
    async fn count_not_stored(
        &self,
        accepted: &[AcceptedEvent],
        event_ids: EventIds,
    ) -> anyhow::Result<u64> {
        let (ids, deliveries): (Vec<i64>, Vec<&str>) = accepted
            .iter()
            .map(|event| (event.event_id, event.delivery_id.as_str()))
            .unzip();
        let mut conn = PgConnection::connect(&self.database_url).await?;
        // With named ids, the stored row must also be the one the
        // 202 named (`id` is the key: at most one row matches).
        let stored: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM unnest($1::bigint[], $2::text[]) AS a(id, delivery)
             WHERE EXISTS (SELECT 1 FROM webhook_events e
                           WHERE e.body->>'provider_message_id' = a.delivery
                             AND (NOT $3 OR e.id = a.id))",
        )
        .bind(&ids)
        .bind(&deliveries)
        .bind(event_ids == EventIds::Named)
        .fetch_one(&mut conn)
        .await?;
        conn.close().await?;
        Ok((accepted.len() as u64).saturating_sub(u64::try_from(stored).unwrap_or(0)))
    }
}

/// The next [`COPY_CHUNK`] rows of the Postgres limit, in `COPY` text
/// format, numbered from `next` on: sms bodies like the load generator's,
/// each keyed as the host keys it (the hex SHA-256 of the body).
fn limit_chunk(next: &mut u64) -> Vec<u8> {
    let mut chunk = Vec::with_capacity(COPY_CHUNK * 1_200);
    let received_at = SystemTime::now();
    for _ in 0..COPY_CHUNK {
        let (_, body) = webhook_sender::sms_body(*next, "limit");
        let key = body_sha256_hex(&body);
        copy_row(&mut chunk, SMS_SOURCE, &key, &body, received_at);
        *next += 1;
    }
    chunk
}

/// Stores `rows` (made by [`copy_row`]) with one `COPY`; returns how many.
pub(crate) async fn copy_events(conn: &mut PgConnection, rows: &[u8]) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(COPY_EVENTS_TEXT).await?;
    copy.send(rows).await?;
    copy.finish().await
}

/// Appends one row of [`COPY_EVENTS_TEXT`] to `rows`; `body` is UTF-8 JSON.
pub(crate) fn copy_row(
    rows: &mut Vec<u8>,
    source: &str,
    key: &str,
    body: &[u8],
    received_at: SystemTime,
) {
    for field in [source.as_bytes(), key.as_bytes(), body] {
        push_field(rows, field);
        rows.push(b'\t');
    }
    // An RFC 3339 time has nothing to escape; writing to a Vec cannot fail.
    let _ = writeln!(rows, "{}", humantime::format_rfc3339_micros(received_at));
}

/// A server subprocess: `hermes serve`, or the bare server.
struct HostProcess {
    child: Child,
    url: String,
    log: PathBuf,
    /// Whether its 202s name the stored event's id.
    event_ids: EventIds,
}

/// Whether a server's 202s name the stored event's id: the host's do, the
/// bare server's say id 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventIds {
    Named,
    NotNamed,
}

impl HostProcess {
    /// Runs `command` on `database_url`, listening on a free port, its
    /// stderr into `log`, and waits until it is ready; `event_ids`: whether
    /// its 202s name the stored event's id.
    async fn start(
        mut command: Command,
        database_url: &str,
        log: &Path,
        event_ids: EventIds,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log_file = std::fs::File::create(log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let program = command.get_program().to_owned();
        let child = command
            .env("DATABASE_URL", database_url)
            .env("HERMES_LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "RUST_LOG",
                std::env::var(HOST_LOG_ENV).unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("cannot start {}", Path::new(&program).display()))?;
        let mut host = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            log: log.to_owned(),
            event_ids,
        };
        host.wait_ready().await?;
        Ok(host)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "hermes exited ({status}) before it was ready; log {}:\n{}",
                    self.log.display(),
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ready = client
                .get(format!("{}/ready", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                bail!("hermes not ready in 60 s; log {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (graceful: drain and exit), then SIGKILL after 15 s.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The source whose events are normalized as SMS.
const SMS_SOURCE: &str = "sms";

/// The source whose events are stored raw: the same rows as the Postgres limit.
pub(crate) const RAW_SOURCE: &str = "raw";

/// The standalone limit's statement (also the bare server's): text-format
/// rows made by [`copy_row`], run by [`copy_events`].
const COPY_EVENTS_TEXT: &str =
    "COPY webhook_events (source, idempotency_key, body, received_at) FROM STDIN";

/// A source the host does not have (every request to it is answered 404).
const UNKNOWN_SOURCE: &str = "unknown";

/// Environment variable: the host's `RUST_LOG` (default `warn`); its log is
/// written to `target/bench-pg/<bench>.log`.
pub const HOST_LOG_ENV: &str = "HERMES_BENCH_HOST_LOG";

/// The host's `batch_timeout_ms` as set by `--webhooks` lines, else its
/// default.
fn batch_timeout_ms(webhooks: &[String]) -> u64 {
    webhooks
        .iter()
        .find_map(|line| {
            line.trim()
                .strip_prefix("batch_timeout_ms")
                .and_then(|rest| rest.trim().strip_prefix('='))
                .and_then(|value| value.trim().parse().ok())
        })
        .unwrap_or(DEFAULT_BATCH_TIMEOUT_MS)
}

/// The host's default `batch_timeout_ms` (the benchmark config leaves it unset).
const DEFAULT_BATCH_TIMEOUT_MS: u64 = 10;

/// Samples a process's RSS every 250 ms in the background.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<f64>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut interval = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = interval.tick() => samples.push(rss_mb_of(pid)),
                    _ = &mut stopped => return samples,
                }
            }
        });
        Self { stop, task }
    }

    async fn stop(self) -> Vec<f64> {
        let _ = self.stop.send(());
        let mut samples = self.task.await.unwrap_or_default();
        if samples.is_empty() {
            samples.push(0.0);
        }
        samples
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn copy_row_escapes_the_body_for_copy_text_format() {
        let mut rows = Vec::new();
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        copy_row(&mut rows, "raw", "k1", b"{\"a\":\"x\\y\tz\n\"}", at);
        assert_eq!(
            rows,
            b"raw\tk1\t{\"a\":\"x\\\\y\\tz\\n\"}\t2023-11-14T22:13:20.123456Z\n"
        );
    }

    #[test]
    fn answers_fail_on_errors_duplicates_lost_or_unexpected_statuses() {
        let clean = Snapshot {
            statuses: [(202, 10)].into(),
            ..Snapshot::default()
        };
        check_answers("b", &clean, 0, Some(202)).unwrap();
        check_answers("b", &clean, 0, None).unwrap();
        let error = check_answers("b", &clean, 2, Some(202)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "b failed: 2 events answered 202 are not stored"
        );
        let faulty = Snapshot {
            statuses: [(202, 10), (401, 1), (503, 3)].into(),
            errors: 4,
            duplicates: 5,
            ..Snapshot::default()
        };
        let error = check_answers("b", &faulty, 0, Some(202)).unwrap_err();
        assert_eq!(
            error.to_string(),
            "b failed: 4 requests got no usable answer; 5 202s said duplicate; \
             answers other than 202: 1 x 401, 3 x 503"
        );
        let not_found = Snapshot {
            statuses: [(404, 7)].into(),
            ..Snapshot::default()
        };
        check_answers("b", &not_found, 0, Some(404)).unwrap();
        assert!(check_answers("b", &not_found, 0, Some(202)).is_err());
    }

    #[test]
    fn batch_timeout_comes_from_the_webhooks_lines_else_the_default() {
        assert_eq!(batch_timeout_ms(&[]), DEFAULT_BATCH_TIMEOUT_MS);
        let lines = [
            "batch_size = 50".to_owned(),
            " batch_timeout_ms = 3".to_owned(),
        ];
        assert_eq!(batch_timeout_ms(&lines), 3);
    }
}
