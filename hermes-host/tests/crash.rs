//! The `hermes` binary under signals. `kill -9` during load: every event
//! that was answered 202 (before or after the crash) is stored exactly once,
//! and the restarted host answers redeliveries of committed events with 202,
//! `duplicate: true` and the same id. SIGTERM or SIGINT while the host holds
//! requests whose writes wait for a lock: it refuses new connections at once,
//! keeps running until the writes commit, answers each held request 202 and
//! exits 0 within its drain deadline. SIGTERM amid load: only 202s and 503s,
//! exit 0; SIGTERM during startup: exit 0 too.
//!
//! The real binary runs as a subprocess (on 127.0.0.1:0; the address is read
//! from its log) against a fresh database of the private test cluster; in the
//! kill test several tasks drive signed webhooks at it, the process gets
//! SIGKILL once a few hundred events are committed, a new process starts on
//! the same database, and every request that got no answer or a non-202 is
//! sent again, as a provider would retry it.

mod child;
mod common;

use child::{exit_within, send_signal, silent_database, tmp_dir, wait_for_output};
use common::{SOURCES, lock_events, lock_waiters};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hermes_adapters::webhook::Verifier;
use hermes_host::Config;
use hermes_host::webhooks::SourceRegistry;
use serde_json::Value;
use sqlx::PgPool;
use tokio::process::Child;

/// Concurrent senders.
const SENDERS: usize = 8;
/// Events per sender; far more than are committed before the kill.
const EVENTS_PER_SENDER: usize = 400;
/// The host is killed once this many events were answered 202.
const KILL_AFTER_ACCEPTED: usize = 300;
/// Pre-crash 202s redelivered after the restart.
const REDELIVERED: usize = 100;

/// Small batches written at once: many commits before the kill. The sources
/// are the shared tests' (the load goes to "sms").
const WEBHOOKS: &str = "[webhooks]\nbatch_size = 50\nbatch_timeout_ms = 5\n";

/// What one delivery attempt got back.
#[derive(Debug, Clone, PartialEq)]
enum Answer {
    /// 202 with the event id and the duplicate flag.
    Accepted { id: i64, duplicate: bool },
    /// Any other status.
    Status(u16),
    /// No HTTP answer (connection refused or reset, time-out).
    Unanswered,
}

/// One event: its body, and every answer it got.
struct Event {
    provider_message_id: String,
    body: Vec<u8>,
    answers: Vec<Answer>,
}

impl Event {
    fn new(n: usize) -> Self {
        let provider_message_id = format!("crash-{n}");
        let body = serde_json::json!({
            "from": format!("+1555{:07}", n % 17),
            "to": format!("+1666{:07}", n % 5),
            "body": format!("message {n}"),
            "timestamp": "2024-05-01T12:00:00Z",
            "provider_message_id": provider_message_id,
        });
        Self {
            provider_message_id,
            body: serde_json::to_vec(&body).expect("json"),
            answers: Vec::new(),
        }
    }

    /// The ids of its 202s.
    fn accepted_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.answers.iter().filter_map(|answer| match answer {
            Answer::Accepted { id, .. } => Some(*id),
            _ => None,
        })
    }

    fn was_accepted(&self) -> bool {
        self.accepted_ids().next().is_some()
    }
}

/// A `hermes serve` subprocess.
struct Host {
    child: Child,
    /// `http://127.0.0.1:…`, as the host logged it once listening.
    url: Option<String>,
    log: PathBuf,
}

impl Host {
    /// Starts `hermes serve` against `database_url`, logging at `log_level`,
    /// and waits until `/ready` answers 200.
    async fn start(config: &Path, database_url: &str, name: &str, log_level: &str) -> Self {
        let mut host = Self::spawn(config, database_url, name, log_level);
        host.wait_ready().await;
        host
    }

    /// Starts `hermes serve` on a port the kernel picks (127.0.0.1:0: no
    /// other test can take it in between), logging at `log_level`, without
    /// waiting.
    fn spawn(config: &Path, database_url: &str, name: &str, log_level: &str) -> Self {
        let log = tmp_dir().join(format!("crash-{}-{name}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).expect("create the host log");
        let config = config.to_str().expect("a UTF-8 path");
        let child = child::hermes(
            &["serve", "--config", config, "--log-format", "text"],
            &[
                ("DATABASE_URL", database_url),
                ("HERMES_LISTEN", "127.0.0.1:0"),
                ("RUST_LOG", log_level),
            ],
        )
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .expect("start the hermes binary");
        Self {
            child,
            url: None,
            log,
        }
    }

    /// The host's base URL; known once it is ready.
    fn url(&self) -> &str {
        self.url.as_deref().expect("the host is listening")
    }

    /// Sends `signal` (`libc::SIGTERM`, `libc::SIGINT`).
    fn signal(&self, signal: libc::c_int) {
        send_signal(&self.child, signal);
    }

    /// How the process exited, within `limit`.
    async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let log = &self.log;
        exit_within(&mut self.child, limit, || read_log(log)).await
    }

    /// Waits until the log has the line `needle` is in, complete.
    async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        let log = &self.log;
        wait_for_output(
            &mut self.child,
            limit,
            &format!("{needle:?} logged"),
            || read_log(log),
            |text| {
                text.split_inclusive('\n')
                    .find(|line| line.ends_with('\n') && line.contains(needle))
                    .map(|line| line.trim_end().to_owned())
            },
        )
        .await
    }

    /// Reads the address from `hermes: listening on http://… (Postgres: …)`,
    /// then waits until `/ready` answers 200.
    async fn wait_ready(&mut self) {
        const LISTENING: &str = "hermes: listening on ";
        let line = self.wait_for_line(LISTENING, Duration::from_secs(60)).await;
        let url = line[line.find(LISTENING).expect("found") + LISTENING.len()..]
            .split_whitespace()
            .next()
            .filter(|url| url.starts_with("http://127.0.0.1:"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        self.url = Some(url);
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "hermes exited ({status}) before it was ready:\n{}",
                    self.log_text()
                );
            }
            let ready = client
                .get(format!("{}/ready", self.url()))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().as_u16() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "hermes not ready in 60 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, then reap the process.
    async fn kill_9(&mut self) {
        self.child.kill().await.expect("SIGKILL hermes");
    }

    fn log_text(&self) -> String {
        read_log(&self.log)
    }
}

/// The host's log so far (empty before it exists).
fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Sends `event` once, signed now.
async fn deliver(client: &reqwest::Client, url: &str, verifier: &Verifier, body: &[u8]) -> Answer {
    let Ok(response) = child::post_signed(client, url, verifier, body).await else {
        return Answer::Unanswered;
    };
    let status = response.status().as_u16();
    let Ok(json) = response.json::<Value>().await else {
        return Answer::Unanswered;
    };
    if status != 202 {
        return Answer::Status(status);
    }
    Answer::Accepted {
        id: json["id"].as_i64().expect("a 202 has an id"),
        duplicate: json["duplicate"].as_bool().expect("a 202 has duplicate"),
    }
}

/// Senders driving events at a host, each through its own list in turn, until
/// an event gets no 202: the rest are sent later (after a restart) or never.
struct Load {
    senders: Vec<tokio::task::JoinHandle<Vec<Event>>>,
    accepted: Arc<AtomicUsize>,
}

impl Load {
    fn start(client: &reqwest::Client, route: &str, verifier: &Arc<Verifier>) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let senders = (0..SENDERS)
            .map(|sender| {
                let (client, route, verifier, accepted) = (
                    client.clone(),
                    route.to_owned(),
                    verifier.clone(),
                    accepted.clone(),
                );
                tokio::spawn(async move {
                    let mut events: Vec<Event> = (0..EVENTS_PER_SENDER)
                        .map(|i| Event::new(sender * EVENTS_PER_SENDER + i))
                        .collect();
                    for event in &mut events {
                        let answer = deliver(&client, &route, &verifier, &event.body).await;
                        let took = matches!(answer, Answer::Accepted { .. });
                        event.answers.push(answer);
                        if !took {
                            break;
                        }
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    events
                })
            })
            .collect();
        Self { senders, accepted }
    }

    /// Waits until `KILL_AFTER_ACCEPTED` events got their 202.
    async fn wait_for_202s(&self, host: &Host) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.accepted.load(Ordering::Relaxed) < KILL_AFTER_ACCEPTED {
            assert!(
                Instant::now() < deadline,
                "only {} events accepted in 60 s:\n{}",
                self.accepted.load(Ordering::Relaxed),
                host.log_text()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Every event, with the answers it got, once every sender stopped.
    async fn events(self) -> Vec<Event> {
        let mut events = Vec::new();
        for sender in self.senders {
            events.extend(sender.await.expect("sender task"));
        }
        events
    }
}

/// Sends `event` until it gets a 202, as a provider retries: after no answer
/// or a 503. Any other answer fails the test.
async fn retry_until_accepted(
    client: &reqwest::Client,
    route: &str,
    verifier: &Verifier,
    event: &mut Event,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = deliver(client, route, verifier, &event.body).await;
        let done = matches!(answer, Answer::Accepted { .. });
        let retryable = matches!(answer, Answer::Status(503) | Answer::Unanswered);
        event.answers.push(answer.clone());
        if done {
            return;
        }
        assert!(retryable, "unexpected answer {answer:?}");
        assert!(Instant::now() < deadline, "no 202 in 30 s: {answer:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `WEBHOOKS` and `SOURCES` with `extra` TOML in front for test
/// `name`: its path, the sms source's verifier (to sign with) and an HTTP
/// client.
fn setup(name: &str, extra: &str) -> (PathBuf, Arc<Verifier>, reqwest::Client) {
    let text = format!("{extra}\n{WEBHOOKS}\n{SOURCES}");
    let config_path = tmp_dir().join(format!("crash-{}-{name}.toml", std::process::id()));
    std::fs::write(&config_path, &text).expect("write the config");
    let config = Config::from_toml_str(&text).expect("config parses");
    let sources = SourceRegistry::from_config(&config.webhooks, None).expect("sources");
    let verifier = Arc::new(sources.get("sms").expect("sms source").verifier().clone());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    (config_path, verifier, client)
}

/// A host on a fresh database (test and log named `name`) that a [`Load`]
/// drives, once `KILL_AFTER_ACCEPTED` of its events got their 202.
struct UnderLoad {
    database_url: String,
    config_path: PathBuf,
    verifier: Arc<Verifier>,
    client: reqwest::Client,
    host: Host,
    load: Load,
}

impl UnderLoad {
    async fn start(name: &str) -> Self {
        let database_url = hermes_adapters::postgres::local::test_database().await;
        let (config_path, verifier, client) = setup(name, "");
        let host = Host::start(&config_path, &database_url, name, "warn").await;
        let load = Load::start(&client, &format!("{}/webhooks/sms", host.url()), &verifier);
        load.wait_for_202s(&host).await;
        Self {
            database_url,
            config_path,
            verifier,
            client,
            host,
            load,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_load_loses_and_duplicates_nothing() {
    // Load, then kill -9 mid-load.
    let UnderLoad {
        database_url,
        config_path,
        verifier,
        client,
        mut host,
        load,
    } = UnderLoad::start("kill-9").await;
    host.kill_9().await;
    let events = load.events().await;
    let before_crash = events.iter().filter(|e| e.was_accepted()).count();
    let unanswered = events
        .iter()
        .filter(|e| e.answers.contains(&Answer::Unanswered))
        .count();
    assert!(
        before_crash >= KILL_AFTER_ACCEPTED,
        "{before_crash} accepted"
    );
    assert!(
        before_crash < SENDERS * EVENTS_PER_SENDER,
        "the load ended before the kill"
    );
    let mut statuses: HashMap<String, usize> = HashMap::new();
    for answer in events.iter().flat_map(|e| &e.answers) {
        let key = match answer {
            Answer::Accepted { .. } => "202".to_owned(),
            Answer::Status(status) => status.to_string(),
            Answer::Unanswered => "no answer".to_owned(),
        };
        *statuses.entry(key).or_default() += 1;
    }
    eprintln!(
        "before the kill: {} of {} events sent: {before_crash} accepted, {unanswered} without an \
         answer; answers {statuses:?}",
        events.iter().filter(|e| !e.answers.is_empty()).count(),
        events.len(),
    );

    // Restart on the same database; the provider retries what got no 202.
    let host = Host::start(&config_path, &database_url, "restarted", "warn").await;
    let route = format!("{}/webhooks/sms", host.url());
    let (done, pending): (Vec<Event>, Vec<Event>) =
        events.into_iter().partition(Event::was_accepted);
    let mut chunks: Vec<Vec<Event>> = (0..SENDERS).map(|_| Vec::new()).collect();
    for (i, event) in pending.into_iter().enumerate() {
        chunks[i % SENDERS].push(event);
    }
    let retriers: Vec<_> = chunks
        .into_iter()
        .map(|mut chunk| {
            let (client, route, verifier) = (client.clone(), route.clone(), verifier.clone());
            tokio::spawn(async move {
                for event in &mut chunk {
                    retry_until_accepted(&client, &route, &verifier, event).await;
                }
                chunk
            })
        })
        .collect();
    let mut events = done;
    for retrier in retriers {
        events.extend(retrier.await.expect("retry task"));
    }
    // Redeliveries of events committed before the crash.
    let committed_before: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e.was_accepted())
        .map(|(i, _)| i)
        .take(REDELIVERED)
        .collect();
    assert_eq!(committed_before.len(), REDELIVERED);
    for &i in &committed_before {
        let event = &mut events[i];
        let first = event.accepted_ids().next().expect("accepted");
        let answer = deliver(&client, &route, &verifier, &event.body).await;
        assert_eq!(
            answer,
            Answer::Accepted {
                id: first,
                duplicate: true
            },
            "a redelivery of a committed event"
        );
        event.answers.push(answer);
    }

    // Exactly once, by id and by idempotency key.
    let pool = PgPool::connect(&database_url).await.expect("pool");
    let stored: Vec<(i64, String, String)> = sqlx::query_as(
        "SELECT id, idempotency_key, body->>'provider_message_id' FROM webhook_events \
         WHERE source = 'sms'",
    )
    .fetch_all(&pool)
    .await
    .expect("query events");
    let mut by_message_id: HashMap<&str, Vec<i64>> = HashMap::new();
    for (id, _, provider_message_id) in &stored {
        by_message_id
            .entry(provider_message_id.as_str())
            .or_default()
            .push(*id);
    }
    let keys: HashSet<&str> = stored.iter().map(|(_, key, _)| key.as_str()).collect();
    assert_eq!(keys.len(), stored.len(), "an idempotency key stored twice");
    assert_eq!(
        stored.len(),
        SENDERS * EVENTS_PER_SENDER,
        "every event stored once"
    );
    for event in &events {
        let ids: HashSet<i64> = event.accepted_ids().collect();
        assert_eq!(
            ids.len(),
            1,
            "one id for every 202 of {}: {:?}",
            event.provider_message_id,
            event.answers
        );
        let stored_ids = by_message_id
            .get(event.provider_message_id.as_str())
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            stored_ids,
            ids.into_iter().collect::<Vec<_>>(),
            "{} is stored exactly once, under the id of its 202",
            event.provider_message_id
        );
        let fresh = event
            .answers
            .iter()
            .filter(|a| {
                matches!(
                    a,
                    Answer::Accepted {
                        duplicate: false,
                        ..
                    }
                )
            })
            .count();
        assert!(fresh <= 1, "two first-time 202s: {:?}", event.answers);
    }
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM messages")
        .fetch_one(&pool)
        .await
        .expect("count messages");
    assert_eq!(messages, stored.len() as i64, "one message per event");
    let duplicates_after_crash = events
        .iter()
        .flat_map(|e| &e.answers)
        .filter(|a| {
            matches!(
                a,
                Answer::Accepted {
                    duplicate: true,
                    ..
                }
            )
        })
        .count();
    eprintln!(
        "stored {} events; {duplicates_after_crash} redeliveries answered as duplicates",
        stored.len()
    );
    let _ = std::fs::remove_file(&config_path);
    drop(host);
}

/// Requests the host holds, unanswered, when the signal comes.
const HELD: usize = 8;

/// A host (test and log named `name`) whose event writes wait for a lock the
/// test holds.
struct HeldWrites {
    host: Host,
    config_path: PathBuf,
    verifier: Arc<Verifier>,
    /// The sms source's route.
    route: String,
    /// On the host's database.
    pool: PgPool,
    /// Every batch write of the host waits for it until it is released.
    lock: sqlx::Transaction<'static, sqlx::Postgres>,
    /// Time-outs well beyond the hold: requests sent with it get answered.
    client: reqwest::Client,
}

impl HeldWrites {
    async fn start(name: &str) -> Self {
        let database_url = hermes_adapters::postgres::local::test_database().await;
        // A drain deadline and a statement timeout far beyond how long a test
        // holds the lock: a graceful drain never reaches them.
        let (config_path, verifier, _) = setup(
            name,
            "[shutdown]\ndrain_timeout_ms = 120000\n[database]\nstatement_timeout_ms = 120000",
        );
        let host = Host::start(&config_path, &database_url, name, "warn,hermes_host=info").await;
        let route = format!("{}/webhooks/sms", host.url());
        let pool = PgPool::connect(&database_url).await.expect("pool");
        let lock = lock_events(&pool).await;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .expect("client");
        Self {
            host,
            config_path,
            verifier,
            route,
            pool,
            lock,
            client,
        }
    }

    /// Polls every 10 ms until a batch write of the host waits for the lock
    /// and `ready` says the test's own condition holds too (`None`; else
    /// what it still waits for; it may assert). Fails after 60 s, with the
    /// host's log.
    async fn wait_for_a_waiting_write(&self, mut ready: impl AsyncFnMut() -> Option<String>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let not_yet = ready().await;
            let waiting = lock_waiters(&self.pool).await;
            if not_yet.is_none() && waiting >= 1 {
                return;
            }
            let not_yet = not_yet.map(|what| format!("{what}, ")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "{not_yet}{waiting} writes waiting for the lock after 60 s:\n{}",
                self.host.log_text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The host gets `signal` (named `name` in its log) while it holds `HELD`
/// requests whose batch writes wait for a lock the test holds. It must stop
/// accepting connections at once, keep running (draining) while the writes
/// wait, and once the lock is released commit all of them, answer each 202,
/// and exit 0 without reaching its drain deadline.
async fn signal_with_held_writes_drains_them_and_exits_0(signal: libc::c_int, name: &str) {
    let mut held = HeldWrites::start(&format!("held-{name}")).await;
    let url = held.host.url().to_owned();
    let requests: Vec<_> = (0..HELD)
        .map(|n| {
            let event = Event::new(1_000_000 + n);
            let (client, route, verifier) = (
                held.client.clone(),
                held.route.clone(),
                held.verifier.clone(),
            );
            tokio::spawn(async move {
                let answer = deliver(&client, &route, &verifier, &event.body).await;
                (event.provider_message_id, answer)
            })
        })
        .collect();

    // All HELD are in the pipeline (its in-flight gauge) and a batch write
    // waits for the lock.
    held.wait_for_a_waiting_write(async || {
        let in_flight = in_flight(&held.client, &url).await;
        assert!(
            in_flight <= HELD && requests.iter().all(|task| !task.is_finished()),
            "an answer while writes are held: in flight {in_flight}:\n{}",
            held.host.log_text()
        );
        (in_flight < HELD).then(|| format!("in flight {in_flight} of {HELD}"))
    })
    .await;

    held.host.signal(signal);
    held.host
        .wait_for_line(&format!("{name} received"), Duration::from_secs(30))
        .await;

    // Stops accepting: the listener is closed once the shutdown began (the
    // server drops it before it drains), so connections are refused.
    let address = url.trim_start_matches("http://").to_owned();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(&address).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(error) => panic!("connecting after {name}: {error}"),
            Ok(_) => assert!(
                Instant::now() < deadline,
                "still accepting connections 10 s after {name}:\n{}",
                held.host.log_text()
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let late = Event::new(2_000_000);
    let signed = held
        .verifier
        .sign(&late.body, &held.route, "", SystemTime::now());
    let sent = fresh
        .post(&held.route)
        .headers(signed)
        .header("content-type", "application/json")
        .body(late.body)
        .send()
        .await;
    match sent {
        Err(error) if error.is_connect() => {}
        other => panic!("a request after {name}: {other:?}"),
    }

    // Draining: still running, nothing answered, nothing committed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    if let Ok(Some(status)) = held.host.child.try_wait() {
        panic!(
            "hermes exited ({status}) with {HELD} writes pending:\n{}",
            held.host.log_text()
        );
    }
    assert!(
        requests.iter().all(|task| !task.is_finished()),
        "answered before its write could commit"
    );
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events")
        .fetch_one(&held.pool)
        .await
        .expect("count");
    assert_eq!(stored, 0, "committed while the lock was held");

    held.lock.rollback().await.expect("release the lock");
    let mut answered: HashMap<String, i64> = HashMap::new();
    for task in requests {
        let (provider_message_id, answer) = task.await.expect("request task");
        let Answer::Accepted {
            id,
            duplicate: false,
        } = answer
        else {
            panic!(
                "{provider_message_id} answered {answer:?}, not a first 202:\n{}",
                held.host.log_text()
            );
        };
        answered.insert(provider_message_id, id);
    }
    let status = held.host.exit_status(Duration::from_secs(30)).await;
    let log = held.host.log_text();
    assert!(status.success(), "{status}:\n{log}");
    assert!(
        !log.contains("drain deadline"),
        "a drain within its deadline:\n{log}"
    );
    assert!(log.contains("hermes stopped"), "{log}");

    // Each held event stored once, under the id of its 202; nothing else.
    let stored: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, body->>'provider_message_id' FROM webhook_events ORDER BY id")
            .fetch_all(&held.pool)
            .await
            .expect("query events");
    let mut stored_ids: Vec<(String, i64)> = stored.into_iter().map(|(id, m)| (m, id)).collect();
    stored_ids.sort();
    let mut answered: Vec<(String, i64)> = answered.into_iter().collect();
    answered.sort();
    assert_eq!(answered.len(), HELD);
    assert_eq!(stored_ids, answered, "stored exactly the 202s, once each");
    let _ = std::fs::remove_file(&held.config_path);
}

/// The host's `hermes_pipeline_in_flight` gauge for the webhooks pipeline.
async fn in_flight(client: &reqwest::Client, url: &str) -> usize {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find(|line| {
            line.starts_with("hermes_pipeline_in_flight{")
                && line.contains(r#"pipeline="webhooks""#)
        })
        .and_then(|line| line.split_whitespace().last())
        .and_then(|value| value.parse::<f64>().ok())
        .map_or(0, |value| value as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_held_writes_stops_accepting_drains_them_and_exits_0() {
    signal_with_held_writes_drains_them_and_exits_0(libc::SIGTERM, "SIGTERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_held_writes_stops_accepting_drains_them_and_exits_0() {
    signal_with_held_writes_drains_them_and_exits_0(libc::SIGINT, "SIGINT").await;
}

/// A second signal while a graceful shutdown waits (here for a write held by
/// a lock, with a drain deadline of two minutes) ends the process at once,
/// with the status of a death by that signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_the_drain_exits_at_once() {
    let mut held = HeldWrites::start("second-signal").await;
    let event = Event::new(3_000_000);
    let (client, route, verifier) = (
        held.client.clone(),
        held.route.clone(),
        held.verifier.clone(),
    );
    let request =
        tokio::spawn(async move { deliver(&client, &route, &verifier, &event.body).await });
    held.wait_for_a_waiting_write(async || None).await;

    held.host.signal(libc::SIGTERM);
    held.host
        .wait_for_line("SIGTERM received", Duration::from_secs(30))
        .await;
    held.host.signal(libc::SIGINT);
    let status = held.host.exit_status(Duration::from_secs(10)).await;
    let log = held.host.log_text();
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}:\n{log}");
    assert!(log.contains("SIGINT received again"), "{log}");
    held.lock.rollback().await.expect("release the lock");
    // The held request lost its answer with the process: not a 202.
    let answer = request.await.expect("request task");
    assert!(!matches!(answer, Answer::Accepted { .. }), "{answer:?}");
    let _ = std::fs::remove_file(&held.config_path);
}

/// SIGTERM amid a steady load, requests arriving while the host closes: it
/// answers nothing but 202 or 503 (or leaves a request unanswered once it
/// stops accepting), exits 0 within its drain deadline, and every 202's event
/// is in Postgres after the process is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_amid_load_answers_only_202_or_503_and_exits_0() {
    let UnderLoad {
        database_url,
        config_path,
        mut host,
        load,
        ..
    } = UnderLoad::start("sigterm").await;
    host.signal(libc::SIGTERM);
    let status = host.exit_status(Duration::from_secs(30)).await;
    let log = host.log_text();
    assert!(status.success(), "{status}:\n{log}");
    assert!(!log.contains("drain deadline"), "{log}");

    let mut ids = Vec::new();
    for answer in load.events().await.into_iter().flat_map(|e| e.answers) {
        match answer {
            Answer::Accepted { id, duplicate } => {
                assert!(!duplicate);
                ids.push(id);
            }
            // Once the host stops accepting: refused, or no server.
            Answer::Status(503) | Answer::Unanswered => {}
            Answer::Status(other) => panic!("answered {other} while shutting down"),
        }
    }
    assert!(ids.len() >= KILL_AFTER_ACCEPTED);
    let pool = PgPool::connect(&database_url).await.expect("pool");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_events WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(stored as usize, ids.len(), "every 202 is committed");
    let _ = std::fs::remove_file(&config_path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_startup_exits_0() {
    // Startup hangs in the connect, where the signal arrives.
    let (url, silent) = silent_database().await;
    let (config_path, _, _) = setup("startup", "[database]\nacquire_timeout_ms = 60000");
    let mut host = Host::spawn(&config_path, &url, "startup", "info");
    host.wait_for_line("using Postgres", Duration::from_secs(30))
        .await;
    host.signal(libc::SIGTERM);
    let status = host.exit_status(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}:\n{}", host.log_text());
    assert!(
        host.log_text().contains("SIGTERM received"),
        "{}",
        host.log_text()
    );
    silent.abort();
}
