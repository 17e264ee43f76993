//! The `hermes` binary's stops and stderr, end to end. `hermes demo` stops on
//! SIGINT during a timed run (summary, graceful shutdown, exit 0) and during
//! startup (exit 0); it refuses a configuration without the sources it sends
//! to before it starts anything. With `--log-format json` every stderr line is
//! JSON, errors included; in text mode errors stay plain lines.

mod child;

use child::{exit_within, send_signal, silent_database, tmp_dir, wait_for_output};

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Child;

/// A `hermes` subprocess whose stdout and stderr are collected as they come.
struct Hermes {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Hermes {
    /// Starts `hermes args…` as [`child::hermes`] sets it up, collecting
    /// its stdout and stderr.
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut child = child::hermes(args, env)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the hermes binary");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(child.stdout.take().expect("stdout"), stdout.clone()),
            collect(child.stderr.take().expect("stderr"), stderr.clone()),
        ];
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Starts `hermes demo args…` against `database_url`, on a port the
    /// kernel picks.
    fn demo(args: &[&str], database_url: &str, rust_log: &str) -> Self {
        let args: Vec<&str> = ["demo"].iter().chain(args).copied().collect();
        Self::spawn(
            &args,
            &[
                ("DATABASE_URL", database_url),
                ("HERMES_LISTEN", "127.0.0.1:0"),
                ("RUST_LOG", rust_log),
            ],
        )
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr").clone()
    }

    fn output(&self) -> String {
        both_streams(&self.stdout, &self.stderr)
    }

    /// Waits until `stream` (stdout or stderr) contains `needle`.
    async fn wait_for(&mut self, stderr: bool, needle: &str, limit: Duration) {
        let stream = if stderr { &self.stderr } else { &self.stdout };
        wait_for_output(
            &mut self.child,
            limit,
            &format!("{needle:?}"),
            || stream.lock().expect("output").clone(),
            |text| text.contains(needle).then_some(()),
        )
        .await;
    }

    /// Sends `signal` (`libc::SIGINT`, `libc::SIGTERM`).
    fn signal(&self, signal: libc::c_int) {
        send_signal(&self.child, signal);
    }

    /// How the process exited, within `limit`; its output is complete then.
    async fn exit_status(&mut self, limit: Duration) -> std::process::ExitStatus {
        let (stdout, stderr) = (&self.stdout, &self.stderr);
        let status = exit_within(&mut self.child, limit, || both_streams(stdout, stderr)).await;
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), reader).await;
        }
        status
    }
}

/// What a process wrote to `stdout` and `stderr` so far, labelled.
fn both_streams(stdout: &Mutex<String>, stderr: &Mutex<String>) -> String {
    let text = |stream: &Mutex<String>| stream.lock().expect("output").clone();
    format!("stdout:\n{}\nstderr:\n{}", text(stdout), text(stderr))
}

/// Appends every line of `stream` to `into`.
fn collect(
    stream: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut text = into.lock().expect("output");
            text.push_str(&line);
            text.push('\n');
        }
    })
}

/// Writes `text` to a configuration file for test `name`.
fn config_file(name: &str, text: &str) -> String {
    let path = tmp_dir().join(format!("demo-signals-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write the config");
    path.to_str().expect("UTF-8 path").to_owned()
}

/// Asserts that `stderr` has at least one line and that each is a JSON
/// object with a level and a message or an error; returns the objects.
fn json_lines(stderr: &str) -> Vec<Value> {
    assert!(!stderr.trim().is_empty(), "nothing on stderr");
    stderr
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}\nstderr:\n{stderr}"));
            assert!(value.is_object(), "not a JSON object: {line:?}");
            assert!(value["level"].is_string(), "no level: {line:?}");
            value
        })
        .collect()
}

/// The number right after `label` in `text` (`"summary after 3.2 s"` → 3.2).
fn number_after(text: &str, label: &str) -> f64 {
    let at = text
        .find(label)
        .unwrap_or_else(|| panic!("no {label:?} in:\n{text}"));
    text[at + label.len()..]
        .split_whitespace()
        .next()
        .and_then(|word| word.parse().ok())
        .unwrap_or_else(|| panic!("no number after {label:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_a_timed_demo_with_its_summary_and_exit_0() {
    let database_url = hermes_adapters::postgres::local::test_database().await;
    let mut demo = Hermes::demo(
        &["--duration", "10m", "--connections", "4"],
        &database_url,
        "warn",
    );
    // The first progress line: the timed run is under way.
    demo.wait_for(false, "events/s", Duration::from_secs(120))
        .await;
    demo.signal(libc::SIGINT);
    let status = demo.exit_status(Duration::from_secs(60)).await;
    let stdout = demo.stdout();
    assert!(status.success(), "{status}\n{}", demo.output());
    let ran = number_after(&stdout, "summary after");
    assert!(ran < 120.0, "ran {ran} s of 10 min:\n{stdout}");
    assert!(
        stdout.contains("in Postgres:") && stdout.contains("accepted this run"),
        "{stdout}"
    );
    assert!(stdout.contains("hermes demo: stopped"), "{stdout}");
    assert!(
        !stdout.contains("drain deadline passed"),
        "a graceful stop: {stdout}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_during_demo_startup_exits_0() {
    let (database_url, silent) = silent_database().await;
    // No sources: the demo adds its own.
    let config = config_file("startup", "[database]\nacquire_timeout_ms = 60000\n");
    let mut demo = Hermes::demo(
        &["--config", &config, "--duration", "10m"],
        &database_url,
        "info",
    );
    demo.wait_for(true, "using Postgres", Duration::from_secs(30))
        .await;
    demo.signal(libc::SIGINT);
    let status = demo.exit_status(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}\n{}", demo.output());
    assert!(
        demo.stdout()
            .contains("hermes demo: stopped during startup"),
        "{}",
        demo.output()
    );
    assert!(
        demo.stderr().contains("SIGINT received"),
        "{}",
        demo.output()
    );
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_without_sms_and_email_sources_fails_before_starting() {
    let (database_url, silent) = silent_database().await;
    let config = config_file(
        "sources",
        r#"
[[webhooks.sources]]
name = "sms"
scheme = "hmac-sha256"
secrets = ["demo-signals-secret"]
normalize = "sms"

[[webhooks.sources]]
name = "raw"
scheme = "github"
secrets = ["demo-signals-secret"]
"#,
    );
    let mut demo = Hermes::demo(
        &["--config", &config, "--duration", "10m"],
        &database_url,
        "info",
    );
    // Were Postgres reached first, the silent database would hold it 30 s.
    let status = demo.exit_status(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(1), "{}", demo.output());
    let stderr = demo.stderr();
    assert!(
        stderr.contains(r#"hermes: error: the demo sends SMS webhooks to a source named "sms""#),
        "{stderr}"
    );
    assert!(
        stderr.contains(r#"("sms", "raw") lack "email""#),
        "names what is there and what is missing: {stderr}"
    );
    assert!(
        !stderr.contains("using Postgres") && !demo.stdout().contains("serving on"),
        "nothing started: {}",
        demo.output()
    );
    assert!(
        !stderr.contains("demo-signals-secret"),
        "no secret: {stderr}"
    );
    silent.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_one_json_error_line_with_json_logs_and_a_plain_line_without() {
    let config = config_file(
        "bad",
        "[http]\nbogus = 1\n\n[[webhooks.sources]]\nname = \"sms\"\nscheme = \"github\"\nsecrets = [\"bad-config-secret\"]\n",
    );
    // RUST_LOG unset, off, or letting only another crate through: the error
    // is there whatever the filter.
    for rust_log in [None, Some("off"), Some("hermes_pipeline=debug")] {
        let env: Vec<(&str, &str)> = rust_log
            .map(|filter| ("RUST_LOG", filter))
            .into_iter()
            .collect();
        for command in ["serve", "migrate", "demo"] {
            let mut hermes = Hermes::spawn(
                &["--log-format", "json", command, "--config", &config],
                &env,
            );
            let status = hermes.exit_status(Duration::from_secs(30)).await;
            assert_eq!(status.code(), Some(1), "{command}: {}", hermes.output());
            let stderr = hermes.stderr();
            let lines = json_lines(&stderr);
            let errors: Vec<&Value> = lines
                .iter()
                .filter(|line| line["level"] == "ERROR")
                .collect();
            assert_eq!(
                errors.len(),
                1,
                "{command}, RUST_LOG {rust_log:?}: {stderr}"
            );
            let error = errors[0]["error"].as_str().expect("an error field");
            assert!(
                error.starts_with("invalid configuration in ")
                    && error.contains("line 2, column 1: unknown field `bogus`"),
                "{command}: {error}"
            );
            assert!(!stderr.contains("bad-config-secret"), "{stderr}");
        }
    }
    // The same through HERMES_LOG_FORMAT.
    let mut hermes = Hermes::spawn(
        &["serve", "--config", &config],
        &[("HERMES_LOG_FORMAT", "json")],
    );
    assert_eq!(
        hermes.exit_status(Duration::from_secs(30)).await.code(),
        Some(1)
    );
    json_lines(&hermes.stderr());
    // Text: a line for a person.
    let mut hermes = Hermes::spawn(&["serve", "--config", &config], &[]);
    assert_eq!(
        hermes.exit_status(Duration::from_secs(30)).await.code(),
        Some(1)
    );
    let stderr = hermes.stderr();
    assert!(
        stderr.starts_with("hermes: error: invalid configuration in ")
            && stderr.contains("unknown field `bogus`"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_of_migrate_and_of_serve_until_sigterm_are_json_lines_only() {
    let database_url = hermes_adapters::postgres::local::test_database().await;
    let env = [
        ("DATABASE_URL", database_url.as_str()),
        ("HERMES_LISTEN", "127.0.0.1:0"),
    ];
    let mut migrate = Hermes::spawn(&["--log-format", "json", "migrate"], &env);
    let status = migrate.exit_status(Duration::from_secs(60)).await;
    assert!(status.success(), "{status}\n{}", migrate.output());
    let lines = json_lines(&migrate.stderr());
    assert!(
        lines
            .iter()
            .any(|line| line["message"] == "migrations applied" && line["version"].is_i64()),
        "{}",
        migrate.stderr()
    );

    let mut serve = Hermes::spawn(&["--log-format", "json", "serve"], &env);
    serve
        .wait_for(true, "hermes is listening", Duration::from_secs(60))
        .await;
    serve.signal(libc::SIGTERM);
    let status = serve.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}\n{}", serve.output());
    let lines = json_lines(&serve.stderr());
    let messages: Vec<&str> = lines
        .iter()
        .filter_map(|line| line["message"].as_str())
        .collect();
    for expected in ["using Postgres", "hermes is listening", "hermes stopped"] {
        assert!(messages.contains(&expected), "{expected:?} in {messages:?}");
    }
    assert_eq!(
        messages
            .iter()
            .filter(|message| message.contains("listening"))
            .count(),
        1,
        "the address is logged once: {messages:?}"
    );
}
