//! `POST /webhooks/{source}` against a real Postgres: every status code,
//! idempotency, normalization, and the operations endpoints.

mod common;

use std::time::{Duration, SystemTime};

use common::{Harness, sms, start};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_after_commit_and_redelivery_is_a_duplicate() {
    let h = start("").await;
    let payload = sms("+14155550100", "+14155550101", "hello");
    let first = h.deliver("sms", &payload, "d1").await;
    h.assert_committed(&first).await;
    assert!(!first.duplicate());

    let again = h.deliver("sms", &payload, "d1").await;
    h.assert_committed(&again).await;
    assert_eq!(again.id(), first.id());
    assert!(again.duplicate());
    assert_eq!(h.count("webhook_events").await, 1);
    assert_eq!(h.count("messages").await, 1);

    // The raw body is stored as jsonb, with source and key.
    let (source, body): (String, serde_json::Value) =
        sqlx::query_as("SELECT source, body FROM webhook_events WHERE id = $1")
            .bind(first.id())
            .fetch_one(&h.pool)
            .await
            .unwrap();
    assert_eq!(source, "sms");
    assert_eq!(body, payload);
}

/// Holds the events table with a SHARE lock, sends `payload` to `source`,
/// and checks that no answer comes while the write waits for the lock (nor
/// is the row visible), then that the 202 comes once the lock is released
/// and names a stored row.
async fn answered_only_after_the_commit(source: &str, payload: serde_json::Value) -> Harness {
    // A statement timeout far above the lock's lifetime: the write waits,
    // it does not time out and retry.
    let h = start("[database]\nstatement_timeout_ms = 60000\n").await;
    let lock = h.lock_events().await;
    let body = serde_json::to_vec(&payload).unwrap();
    let headers = h.sign(source, &body, "held");
    let (client, url, owned) = (h.client.clone(), h.url.clone(), source.to_owned());
    let request =
        tokio::spawn(async move { common::post(&client, &url, &owned, body, headers).await });

    // The batch's write is waiting for the lock: the event was verified,
    // enqueued and batched, and only the commit is missing.
    common::wait_until_async(|| async { h.lock_waiters().await == 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    if request.is_finished() {
        panic!("{source}: answered before the commit: {:?}", request.await);
    }
    assert_eq!(h.count("webhook_events").await, 0, "{source}");
    assert_eq!(h.lock_waiters().await, 1, "{source}: the write still waits");

    lock.rollback().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the 202 once the lock is released")
        .unwrap()
        .unwrap();
    h.assert_committed(&reply).await;
    assert!(!reply.duplicate(), "{reply:?}");
    assert_eq!(h.stored_body(reply.id()).await, payload, "{source}");
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_event_is_answered_only_after_its_commit() {
    // normalize = "none": the COPY path.
    let h = answered_only_after_the_commit("raw", json!({"n": 1})).await;
    assert_eq!(h.count("webhook_events").await, 1);
    assert_eq!(h.count("messages").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normalized_event_is_answered_only_after_its_commit() {
    // normalize = "sms": ingest_webhook_batch stores the message with it.
    let payload = sms("+14155550100", "+14155550101", "held");
    let h = answered_only_after_the_commit("sms", payload).await;
    assert_eq!(h.count("webhook_events").await, 1);
    let event: i64 = sqlx::query_scalar("SELECT event_id FROM messages")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    let id: i64 = sqlx::query_scalar("SELECT id FROM webhook_events")
        .fetch_one(&h.pool)
        .await
        .unwrap();
    assert_eq!(event, id, "the message names its event");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_ids_are_idempotency_keys() {
    let h = start("").await;
    // GitHub: X-GitHub-Delivery is the key, whatever the body.
    let a = h.deliver("raw", &json!({"n": 1}), "delivery-1").await;
    h.assert_committed(&a).await;
    let b = h.deliver("raw", &json!({"n": 2}), "delivery-1").await;
    h.assert_committed(&b).await;
    assert_eq!((b.id(), b.duplicate()), (a.id(), true));
    let c = h.deliver("raw", &json!({"n": 1}), "delivery-2").await;
    h.assert_committed(&c).await;
    assert!(!c.duplicate());
    assert_ne!(c.id(), a.id());
    // normalize = "none": raw events only.
    let d = h.deliver("raw", &json!([1, 2, 3]), "delivery-3").await;
    h.assert_committed(&d).await;
    assert_eq!(h.count("webhook_events").await, 3);
    assert_eq!(h.count("messages").await, 0);
}

async fn assert_nothing_stored(h: &Harness) {
    assert_eq!(h.count("webhook_events").await, 0);
    assert_eq!(h.count("messages").await, 0);
    assert_eq!(h.count("parties").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_missing_and_stale_signatures_are_401() {
    let h = start("").await;
    let body = serde_json::to_vec(&sms("+14155550100", "+14155550101", "x")).unwrap();

    let missing = h.post("sms", body.clone(), Default::default()).await;
    assert_eq!(missing.status, 401, "{missing:?}");
    assert!(
        missing.error().contains("x-provider-signature-256"),
        "{missing:?}"
    );

    let mut tampered = body.clone();
    tampered.push(b' ');
    let headers = h.sign("sms", &body, "id");
    let bad = h.post("sms", tampered, headers).await;
    assert_eq!(bad.status, 401, "{bad:?}");
    assert!(bad.error().contains("mismatch"), "{bad:?}");

    let wrong_secret = {
        let mut headers = h.sign("sms", &body, "id");
        headers.insert(
            "x-provider-signature-256",
            format!("sha256={}", "0".repeat(64)).parse().unwrap(),
        );
        h.post("sms", body.clone(), headers).await
    };
    assert_eq!(wrong_secret.status, 401, "{wrong_secret:?}");

    let email = serde_json::to_vec(
        &json!({"from": "a@example.com", "to": "b@example.com", "timestamp": 0}),
    )
    .unwrap();
    let old = SystemTime::now() - Duration::from_secs(600);
    let headers = h.sign_at("email", &email, "msg_1", old);
    let stale = h.post("email", email, headers).await;
    assert_eq!(stale.status, 401, "{stale:?}");
    assert!(stale.error().contains("stale"), "{stale:?}");

    assert_nothing_stored(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_too_large_unknown_and_unstorable_are_400_413_404() {
    let h = start("").await;
    // A raw source ("none") checks the JSON without building it: same answers.
    for source in ["sms", "raw"] {
        for body in [
            b"{not json".to_vec(),
            vec![0xff, 0xfe, b'{', b'}'],
            Vec::new(),
            b"{} trailing".to_vec(),
            // A valid payload, then more.
            [
                serde_json::to_vec(&sms("+14155550100", "+14155550101", "x")).unwrap(),
                b" {".to_vec(),
            ]
            .concat(),
            b"[1, 2,]".to_vec(),
            br#"{"n": "a\u0000b"}"#.to_vec(),
            br#"{"n": "\ud800"}"#.to_vec(),
            br#"{"n": 1e200000}"#.to_vec(),
            // Deeper than Postgres's JSON parser goes, it would fail its batch.
            format!(r#"{{"n": {}0{}}}"#, "[".repeat(1500), "]".repeat(1500)).into_bytes(),
        ] {
            let headers = h.sign(source, &body, "id");
            let reply = h.post(source, body, headers).await;
            assert_eq!(reply.status, 400, "{source}: {reply:?}");
            assert!(reply.error().contains("malformed"), "{source}: {reply:?}");
        }
    }

    // max_body_bytes = 4096 for "sms".
    let big = serde_json::to_vec(&sms("+14155550100", "+14155550101", &"x".repeat(5000))).unwrap();
    let headers = h.sign("sms", &big, "id");
    let reply = h.post("sms", big, headers).await;
    assert_eq!(reply.status, 413, "{reply:?}");
    assert!(reply.error().contains("4096"), "{reply:?}");

    let reply = h.post("nope", b"{}".to_vec(), Default::default()).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply.error().contains("nope"), "{reply:?}");
    // A huge name is not echoed whole.
    let huge = "n".repeat(10_000);
    let reply = h.post(&huge, b"{}".to_vec(), Default::default()).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply.error().len() < 200, "{reply:?}");
    // Another method: 405, Allow naming what the source takes.
    let response = h.request(reqwest::Method::PUT, "/webhooks/sms").await;
    assert_eq!(response.status(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert!(response.text().await.unwrap().contains("PUT"));
    let reply = h.post("%FF", b"{}".to_vec(), Default::default()).await;
    assert_eq!(reply.status, 404, "{reply:?}");
    assert!(reply.error().contains("UTF-8"), "{reply:?}");

    let headers = h.sign("raw", b"{}", &"d".repeat(257));
    let reply = h.post("raw", b"{}".to_vec(), headers).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert!(reply.error().contains("256 bytes"), "{reply:?}");

    let (status, body) = h.get("/no/such/route").await;
    assert_eq!(status, 404);
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = h.get("/webhooks/sms").await;
    assert_eq!(status, 405);
    assert!(body.contains("\"error\""), "{body}");

    assert_nothing_stored(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_payloads_are_422_naming_the_field_and_store_nothing() {
    let h = start("").await;
    let base = sms("+14155550100", "+14155550101", "x");
    let cases = [
        ("sms", "from", json!("4155550100"), "E.164"),
        ("sms", "to", serde_json::Value::Null, "required"),
        (
            "sms",
            "attachments",
            json!(vec!["https://e.com/a.png"; 11]),
            "10",
        ),
        ("sms", "timestamp", json!("last tuesday"), "RFC 3339"),
        ("sms", "body", json!(42), "string"),
    ];
    for (source, field, value, reason) in cases {
        let mut payload = base.clone();
        payload[field] = value;
        let reply = h.deliver(source, &payload, "id").await;
        assert_eq!(reply.status, 422, "{field}: {reply:?}");
        assert_eq!(reply.json["field"], field, "{reply:?}");
        assert!(reply.error().contains(field), "{reply:?}");
        assert!(reply.error().contains(reason), "{reply:?}");
    }
    let email = json!({"from": "a@example.com", "to": "b@example.com", "timestamp": 0});
    let mut bad_address = email.clone();
    bad_address["to"] = json!("not-an-address");
    let reply = h.deliver("email", &bad_address, "e1").await;
    assert_eq!(
        (reply.status, reply.json["field"].as_str()),
        (422, Some("to"))
    );
    let mut many = email.clone();
    many["attachments"] = json!(vec!["https://e.com/a.pdf"; 26]);
    let reply = h.deliver("email", &many, "e2").await;
    assert_eq!(reply.status, 422, "{reply:?}");
    assert!(reply.error().contains("25"), "{reply:?}");
    let reply = h
        .deliver("email", &json!(["not", "an", "object"]), "e3")
        .await;
    assert_eq!(reply.status, 422, "{reply:?}");

    assert_nothing_stored(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_too_long_provider_message_id_is_422_and_stores_nothing() {
    let h = start("").await;
    let mut payload = sms("+14155550100", "+14155550101", "x");
    // Well within the source's max_body_bytes (4096): refused for itself.
    payload["provider_message_id"] = json!("a".repeat(1000));
    let reply = h.deliver("sms", &payload, "long-id").await;
    assert_eq!(reply.status, 422, "{reply:?}");
    assert_eq!(reply.json["field"], "provider_message_id", "{reply:?}");
    assert!(
        reply
            .error()
            .contains("1000 bytes long, longer than the 255 accepted"),
        "{reply:?}"
    );

    assert_nothing_stored(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_resolve_parties_conversations_and_attachments() {
    let h = start("").await;
    let (alice, bob) = ("+14155550100", "+442071838750");
    let there = h.deliver("sms", &sms(alice, bob, "ping"), "1").await;
    h.assert_committed(&there).await;
    let mut back = sms(bob, alice, "pong");
    back["attachments"] = json!([
        "https://cdn.example.com/1.jpg",
        "https://cdn.example.com/2.jpg"
    ]);
    let back = h.deliver("sms", &back, "2").await;
    h.assert_committed(&back).await;

    assert_eq!(h.count("parties").await, 2);
    assert_eq!(h.count("conversations").await, 1);
    assert_eq!(h.count("messages").await, 2);
    assert_eq!(h.count("providers").await, 1);
    assert_eq!(h.count("channels").await, 1);
    let urls: Vec<(i32, String)> = sqlx::query_as(
        "SELECT a.position, a.url FROM message_attachments a
         JOIN messages m ON m.id = a.message_id WHERE m.event_id = $1 ORDER BY a.position",
    )
    .bind(back.id())
    .fetch_all(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        urls,
        vec![
            (0, "https://cdn.example.com/1.jpg".to_owned()),
            (1, "https://cdn.example.com/2.jpg".to_owned())
        ]
    );
    let (sender, body, provider, kind): (String, Option<String>, String, String) = sqlx::query_as(
        "SELECT s.address, m.body, p.name, c.kind FROM messages m
         JOIN parties s ON s.id = m.sender_id
         JOIN channels c ON c.id = m.channel_id JOIN providers p ON p.id = c.provider_id
         WHERE m.event_id = $1",
    )
    .bind(back.id())
    .fetch_one(&h.pool)
    .await
    .unwrap();
    assert_eq!(
        (
            sender.as_str(),
            body.as_deref(),
            provider.as_str(),
            kind.as_str()
        ),
        (bob, Some("pong"), "sms", "sms")
    );

    // Email: addresses lower-cased, so both spellings are one party.
    let first = h
        .deliver(
            "email",
            &json!({"from": "Alice@Example.COM", "to": "bob@example.org", "timestamp": 1714564800,
                    "attachments": ["https://files.example.com/report.pdf"]}),
            "msg_1",
        )
        .await;
    h.assert_committed(&first).await;
    let second = h
        .deliver(
            "email",
            &json!({"from": "bob@example.org", "to": "alice@example.com", "timestamp": 1714564900}),
            "msg_2",
        )
        .await;
    h.assert_committed(&second).await;
    let emails: Vec<String> =
        sqlx::query_scalar("SELECT address FROM parties WHERE kind = 'email' ORDER BY address")
            .fetch_all(&h.pool)
            .await
            .unwrap();
    assert_eq!(emails, ["alice@example.com", "bob@example.org"]);
    assert_eq!(h.count("conversations").await, 2);
    assert_eq!(h.count("messages").await, 4);
    assert_eq!(h.count("message_attachments").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_metrics() {
    let h = start("").await;
    let (status, body) = h.get("/health").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = h.get("/ready").await;
    assert_eq!(status, 200, "{body}");
    let reply = h
        .deliver("sms", &sms("+14155550100", "+14155550101", "m"), "1")
        .await;
    h.assert_committed(&reply).await;
    // An unknown path with a made-up method: one series for all such requests.
    for path in ["/nowhere", "/elsewhere"] {
        let method = reqwest::Method::from_bytes(b"PURGE").unwrap();
        let reply = h.request(method, path).await;
        assert_eq!(reply.status(), 404);
    }
    let (status, metrics) = h.get("/metrics").await;
    assert_eq!(status, 200);
    // The recorder is the process's, shared with the other tests: only the
    // made-up method's count is this test's alone.
    for series in [
        "hermes_http_requests_total{method=\"POST\",route=\"/webhooks/{source}\",status=\"202\"}",
        "hermes_http_requests_total{method=\"OTHER\",route=\"unmatched\",status=\"404\"} 2",
    ] {
        assert!(metrics.contains(series), "no {series} in {metrics}");
    }
    assert!(
        metrics.contains("hermes_http_request_duration_seconds_bucket"),
        "{metrics}"
    );
    // Batch sizes are a histogram too, not a summary.
    assert!(
        metrics.contains("hermes_pipeline_batch_size_bucket"),
        "{metrics}"
    );
    assert!(
        metrics.contains("hermes_pipeline_succeeded_total"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_over_the_limit_is_413_while_reading() {
    use tokio::io::AsyncWriteExt;

    let h = start("").await;
    let mut stream = tokio::net::TcpStream::connect(h.server().local_addr())
        .await
        .unwrap();
    let head = "POST /webhooks/sms HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
                transfer-encoding: chunked\r\nconnection: close\r\nx-provider-signature-256: sha256=00\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    // No Content-Length, and a body that never ends: 4 chunks of 1000 bytes,
    // then a fifth announcing 1000 of which only 97 come, 4097 bytes against
    // max_body_bytes = 4096; no terminating chunk. A server that read the
    // whole body before checking its length would wait for ever; one that
    // counts while reading answers once the last byte sent is read (so it
    // has read everything: closing the connection resets nothing unread).
    let chunk = format!("3e8\r\n{}\r\n", "x".repeat(1000));
    for _ in 0..4 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    let over = format!("3e8\r\n{}", "x".repeat(97));
    stream.write_all(over.as_bytes()).await.unwrap();
    stream.flush().await.unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut stream))
        .await
        .expect("no answer in 5 s to a body over the limit whose end was never sent");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("4096"), "{answer}");
    assert_nothing_stored(&h).await;
}

/// Reads an HTTP/1.1 answer from `stream`: its head and as much body as it
/// announces (the server may keep the connection open while the request's
/// body is unfinished), or what came before the connection closed.
async fn read_answer(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut buffer = [0; 1024];
    loop {
        // A reset ends the answer too: the callers' assertions say what came.
        let n = stream.read(&mut buffer).await.unwrap_or(0);
        answer.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&answer);
        let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
            let length = head.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            });
            length.is_some_and(|length| body.len() >= length)
        });
        if n == 0 || complete {
            return text.into_owned();
        }
    }
}

/// The `read_timeout_ms` of [`start_with_read_timeout`]'s host.
const READ_TIMEOUT: Duration = Duration::from_millis(300);

/// A host whose `read_timeout_ms` is [`READ_TIMEOUT`].
async fn start_with_read_timeout() -> Harness {
    start(&format!(
        "[http]\nread_timeout_ms = {}\n",
        READ_TIMEOUT.as_millis()
    ))
    .await
}

/// A body that stops coming is answered 408 once `read_timeout_ms` passes,
/// and stores nothing; headers that stop coming get the connection closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_bodies_get_408_and_late_headers_a_closed_connection() {
    use tokio::io::AsyncWriteExt;
    let h = start_with_read_timeout().await;
    let connect = || tokio::net::TcpStream::connect(h.server().local_addr());

    let mut stream = connect().await.unwrap();
    let head = "POST /webhooks/raw HTTP/1.1\r\nhost: localhost\r\n\
                content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"n\":";
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("a late body is answered");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains(r#""error":"the body did not arrive within 300 ms""#),
        "{answer}"
    );
    assert!(started.elapsed() >= READ_TIMEOUT, "{:?}", started.elapsed());
    assert_nothing_stored(&h).await;

    let mut stream = connect().await.unwrap();
    stream
        .write_all(b"POST /webhooks/raw HTTP/1.1\r\nhost: loc")
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("a connection whose headers never end is closed");
    // hyper closes it, with or without a 408 first.
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );

    // Nothing at all, or too little to tell HTTP/1.1 from HTTP/2's preface.
    for sent in [&b""[..], b"P"] {
        let mut stream = connect().await.unwrap();
        stream.write_all(sent).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
            .await
            .expect("a connection that sends no request is closed");
        assert!(answer.is_empty(), "{answer}");
    }
}

/// A connection with no request in progress for `read_timeout_ms` after its
/// last one is closed, over HTTP/1.1 keep-alive and over HTTP/2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_read_timeout() {
    use http_body_util::Empty;
    use hyper::body::Bytes;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio::io::AsyncWriteExt;
    let h = start_with_read_timeout().await;
    let address = h.server().local_addr();

    // HTTP/1.1: one request, then nothing on the kept-alive connection.
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let idle = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut stream))
        .await
        .expect("an idle HTTP/1.1 connection is closed");
    assert!(closed.is_empty(), "{closed}");
    assert!(idle.elapsed() >= READ_TIMEOUT / 2, "{:?}", idle.elapsed());

    // HTTP/2 (prior knowledge): one request, then no stream.
    let stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let request = hyper::Request::get(format!("http://{address}/health"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    drop(response);
    let idle = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("an idle HTTP/2 connection is closed");
    ended.unwrap().unwrap();
    assert!(idle.elapsed() >= READ_TIMEOUT / 2, "{:?}", idle.elapsed());
    assert!(sender.is_closed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_the_database_rejects_fails_alone() {
    // One batch: a body a constraint of the database refuses (one an operator
    // added: the host refuses what it knows Postgres would) among good ones.
    let h = start("[webhooks]\nbatch_size = 8\nbatch_timeout_ms = 200").await;
    sqlx::query(
        "ALTER TABLE webhook_events ADD CONSTRAINT no_poison CHECK (body->>'n' IS DISTINCT FROM 'poison')",
    )
    .execute(&h.pool)
    .await
    .unwrap();
    let mut bodies: Vec<Vec<u8>> = (0..5)
        .map(|n| serde_json::to_vec(&json!({"n": n})).unwrap())
        .collect();
    bodies.insert(2, br#"{"n": "poison"}"#.to_vec());
    let tasks: Vec<_> = bodies
        .into_iter()
        .enumerate()
        .map(|(n, body)| {
            let headers = h.sign("raw", &body, &format!("d{n}"));
            let (client, url) = (h.client.clone(), h.url.clone());
            tokio::spawn(async move { common::post(&client, &url, "raw", body, headers).await })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap().unwrap());
    }
    for (n, reply) in replies.iter().enumerate() {
        if n == 2 {
            assert_eq!(reply.status, 422, "{reply:?}");
            assert!(reply.error().contains("rejected"), "{reply:?}");
        } else {
            h.assert_committed(reply).await;
        }
    }
    assert_eq!(h.count("webhook_events").await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_202_names_the_row_of_its_own_event() {
    // Raw events are stored by COPY under ids drawn ahead from the table's
    // sequence, normalized ones by INSERT under its next value: interleaved,
    // every id is distinct and names the row of the event it answered.
    let h = start("").await;
    let mut ids = std::collections::HashSet::new();
    let mut answered = Vec::new();
    for n in 0..6 {
        let (source, payload) = if n % 2 == 0 {
            ("raw", json!({"n": n}))
        } else {
            ("sms", sms("+14155550100", "+14155550101", &format!("m{n}")))
        };
        let reply = h.deliver(source, &payload, &format!("d{n}")).await;
        h.assert_committed(&reply).await;
        assert_eq!(
            h.stored_body(reply.id()).await,
            payload,
            "{source} event {n}"
        );
        assert!(ids.insert(reply.id()), "id {} answered twice", reply.id());
        answered.push(reply.id());
    }
    // The first raw event drew a block of ids (256), so the next sms event,
    // numbered by the sequence, comes after the whole block: the COPY ran.
    assert!(answered[1] > answered[0] + 200, "ids {answered:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_messages_name_cannot_be_removed() {
    // Messages name parties, channels and conversations without foreign
    // keys (migration 0003): those tables are append-only instead.
    let h = start("").await;
    let reply = h
        .deliver("sms", &sms("+14155550100", "+14155550101", "hello"), "d1")
        .await;
    h.assert_committed(&reply).await;
    for statement in [
        "DELETE FROM parties",
        "DELETE FROM channels",
        "DELETE FROM conversations",
        "TRUNCATE parties CASCADE",
        "UPDATE parties SET id = DEFAULT",
    ] {
        let error = sqlx::query(statement)
            .execute(&h.pool)
            .await
            .expect_err(statement);
        let db = error.as_database_error().expect("a database error");
        assert_eq!(db.code().as_deref(), Some("23001"), "{statement}: {db}");
    }
    assert_eq!(h.count("parties").await, 2);
    assert_eq!(h.count("conversations").await, 1);
    assert_eq!(h.count("messages").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twilio_form_posts_are_stored_as_json_objects() {
    // Twilio calls the configured URL (here with a query of its own) and signs
    // it with the sorted form parameters; a JSON body instead gets a
    // `bodySHA256` query parameter added to that URL.
    let configured = "https://hooks.example.com/webhooks/twilio?tenant=7";
    let h = start(&format!(
        "[[webhooks.sources]]\nname = \"twilio\"\nscheme = \"twilio\"\n\
         secrets = [\"twilio-token\"]\nurl = \"{configured}\"\nnormalize = \"none\"\n"
    ))
    .await;
    let source = h.server().sources().get("twilio").unwrap().clone();
    // Posts `body` signed for `signed_url`, with the scheme's Content-Type
    // if `typed`, else none.
    let send = |query: &str, body: &'static [u8], signed_url: &str, typed: bool| {
        let mut headers = source
            .verifier()
            .sign(body, signed_url, "", SystemTime::now());
        if !typed {
            headers.remove("content-type");
        }
        let request = h
            .client
            .post(format!("{}/webhooks/twilio?{query}", h.url))
            .headers(headers)
            .body(body);
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            let json: serde_json::Value = response.json().await.unwrap();
            (status, json)
        }
    };
    let stored = |reply: serde_json::Value| h.stored_body(reply["id"].as_i64().unwrap());

    let form: &[u8] = b"To=%2B15550100&From=%2B15550101&Body=hello+there&MediaUrl=a&MediaUrl=b";
    let (status, reply) = send("tenant=7", form, configured, true).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(
        stored(reply).await,
        json!({"To": "+15550100", "From": "+15550101", "Body": "hello there", "MediaUrl": ["a", "b"]})
    );

    let body: &[u8] = br#"{"kind":"status"}"#;
    let signed_url = hermes_adapters::webhook::twilio_url_with_body_sha256(configured, body);
    let query = signed_url.split_once('?').unwrap().1;
    let (status, reply) = send(query, body, &signed_url, true).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(stored(reply).await, json!({"kind": "status"}));
    // Without a Content-Type too: bodySHA256 marks the body as not a form,
    // for its signature check and for how it is stored.
    let untyped: &[u8] = br#"{"kind":"untyped"}"#;
    let signed_url = hermes_adapters::webhook::twilio_url_with_body_sha256(configured, untyped);
    let query = signed_url.split_once('?').unwrap().1;
    let (status, reply) = send(query, untyped, &signed_url, false).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(stored(reply).await, json!({"kind": "untyped"}));

    // Without a Content-Type or bodySHA256, a Twilio body is read as a
    // form, as its signature was checked.
    let bare: &[u8] = b"From=%2B15550102&Body=no+type";
    let (status, reply) = send("tenant=7", bare, configured, false).await;
    assert_eq!(status, 202, "{reply}");
    assert_eq!(
        stored(reply).await,
        json!({"From": "+15550102", "Body": "no type"})
    );

    // The same form signed for another tenant's URL is refused, and stores nothing.
    let other = "https://hooks.example.com/webhooks/twilio?tenant=8";
    let (status, reply) = send("tenant=7", form, other, true).await;
    assert_eq!(status, 401, "{reply}");
    // A field that does not decode to UTF-8 (Latin-1's é) is refused, not
    // stored with U+FFFD in place of what was sent.
    let latin1: &[u8] = b"From=%2B15550103&Body=caf%E9";
    let (status, reply) = send("tenant=7", latin1, configured, true).await;
    assert_eq!(status, 400, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(
        error.contains("\"Body\"") && error.contains("UTF-8"),
        "{reply}"
    );
    assert_eq!(h.count("webhook_events").await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_database_gets_503_not_a_hang() {
    const STATEMENT_TIMEOUT: Duration = Duration::from_millis(300);
    let h = start(&format!(
        "[database]\nstatement_timeout_ms = {}\n",
        STATEMENT_TIMEOUT.as_millis()
    ))
    .await;
    // The host's writer retries by the default policy: each attempt waits
    // for the lock until the statement timeout (a transient error), then a
    // jittered back-off of [d/2, d] before the next, d doubling from `base`.
    let policy = hermes_adapters::postgres::RetryPolicy::default();
    let ceilings: Vec<Duration> = (1..policy.attempts)
        .map(|retry| (policy.base * 2u32.pow(retry - 1)).min(policy.max))
        .collect();
    let least_wait: Duration = ceilings.iter().map(|d| *d / 2).sum();
    let most_wait: Duration = ceilings.iter().sum();
    let least = STATEMENT_TIMEOUT * policy.attempts + least_wait;
    // Every attempt's overhead (a new connection after a cancelled one),
    // the batch timeout, and a slow, loaded machine.
    let most = STATEMENT_TIMEOUT * policy.attempts + most_wait + Duration::from_secs(3);
    // So the retries end by count, not by give_up_after.
    assert!(most < policy.give_up_after, "{most:?}");

    // An operator's lock holds every write of the events table.
    let mut locker = h.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *locker)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let body = serde_json::to_vec(&json!({"n": 1})).unwrap();
    let headers = h.sign("raw", &body, "stalled");
    let (client, url) = (h.client.clone(), h.url.clone());
    let request =
        tokio::spawn(async move { common::post(&client, &url, "raw", body, headers).await });
    // Meanwhile, count the attempts: each is a statement (its own start
    // time) waiting for the lock. Polling may miss one, never add one.
    let mut attempts = std::collections::HashSet::new();
    while !request.is_finished() {
        let waiting: Vec<(i32, String)> = sqlx::query_as(
            "SELECT pid, query_start::text FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_all(&h.pool)
        .await
        .unwrap();
        attempts.extend(waiting);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = request.await.unwrap().unwrap();
    let elapsed = started.elapsed();
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.retry_after.is_some(), "{reply:?}");
    // What to do, not the database's own error (which the log has).
    assert_eq!(
        reply.json["error"],
        "the event could not be stored now; retry later (a redelivery is stored once)"
    );
    assert!(
        attempts.len() <= policy.attempts as usize,
        "{} attempts seen, the policy allows {}",
        attempts.len(),
        policy.attempts
    );
    // Every attempt of the policy and its back-off, not fewer (each takes
    // the whole statement timeout), and not the lock's lifetime.
    assert!(
        elapsed >= least,
        "503 after {elapsed:?}, before {} attempts could time out ({least:?})",
        policy.attempts
    );
    assert!(
        elapsed <= most,
        "503 after {elapsed:?}, not within {most:?}"
    );

    locker.rollback().await.unwrap();
    let reply = h.deliver("raw", &json!({"n": 1}), "stalled").await;
    h.assert_committed(&reply).await;
    assert!(!reply.duplicate(), "{reply:?}");
}

/// Backends stopped with SIGSTOP, as a frozen server would be; woken again
/// when dropped (also when the test fails), to find their client gone.
struct FrozenBackends(Vec<i32>);

impl FrozenBackends {
    /// Stops the backend of a host whose pool holds one connection, after
    /// one delivery made it open that connection.
    async fn of_the_hosts_one_connection(h: &Harness) -> Self {
        let warm = h.deliver("raw", &json!({"n": 0}), "warm").await;
        h.assert_committed(&warm).await;
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
        )
        .bind(hermes_host::database::APPLICATION_NAME)
        .fetch_all(&h.pool)
        .await
        .unwrap();
        assert_eq!(pids.len(), 1, "the host's one connection: {pids:?}");
        Self::stop(pids)
    }

    fn stop(pids: Vec<i32>) -> Self {
        for &pid in &pids {
            // SAFETY: kill(2) takes two integers and touches no memory.
            assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "stop {pid}");
        }
        Self(pids)
    }
}

impl Drop for FrozenBackends {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGCONT) };
        }
    }
}

/// A database server that stops answering in the middle of a batch (the
/// host's backend frozen by SIGSTOP: no statement timeout can fire in it) is
/// not waited for without end: the host gives the attempt up after
/// `statement_timeout_ms` plus its margin, closes that connection, and
/// stores the event on a fresh one.
#[tokio::test]
async fn a_frozen_database_connection_is_given_up_and_the_event_stored_on_another() {
    use hermes_host::config::ATTEMPT_MARGIN;
    const STATEMENT_TIMEOUT: Duration = Duration::from_millis(300);
    // One connection: the frozen one, until the host closes it. A long
    // acquire timeout, so that a ping of the frozen connection before it is
    // handed out (when it idled a while) cannot end the wait instead.
    let h = start(&format!(
        "[database]\nmax_connections = 1\nacquire_timeout_ms = 60000\n\
         statement_timeout_ms = {}\n",
        STATEMENT_TIMEOUT.as_millis()
    ))
    .await;
    let _frozen = FrozenBackends::of_the_hosts_one_connection(&h).await;

    let started = std::time::Instant::now();
    let reply = h.deliver("raw", &json!({"n": 1}), "frozen").await;
    let elapsed = started.elapsed();
    h.assert_committed(&reply).await;
    let attempt_timeout = STATEMENT_TIMEOUT + ATTEMPT_MARGIN;
    assert!(
        elapsed >= attempt_timeout,
        "202 after {elapsed:?}: the frozen attempt was not waited out"
    );
    // The first retry's back-off, a new connection, and a loaded machine.
    assert!(
        elapsed < attempt_timeout + Duration::from_secs(5),
        "202 after {elapsed:?}"
    );
}

/// Meta verifies a callback URL with a GET before it sends events: a `meta`
/// source with a `verify_token` echoes `hub.challenge` when the token
/// matches, and refuses anything else with a JSON error.
#[tokio::test]
async fn a_meta_source_answers_the_subscription_handshake() {
    let h = start(
        "[[webhooks.sources]]\nname = \"whatsapp\"\nscheme = \"meta\"\n\
         secrets = [\"app-secret\"]\nverify_token = \"dashboard token\"\n\n\
         [[webhooks.sources]]\nname = \"messenger\"\nscheme = \"meta\"\n\
         secrets = [\"app-secret\"]\n",
    )
    .await;
    let response = h
        .request(
            reqwest::Method::GET,
            "/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=1158201444\
             &hub.verify_token=dashboard+token",
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; charset=utf-8"
    );
    assert_eq!(response.text().await.unwrap(), "1158201444");

    for (path, status, says) in [
        (
            "/webhooks/whatsapp?hub.mode=subscribe&hub.challenge=1&hub.verify_token=guess",
            403,
            "does not match",
        ),
        (
            "/webhooks/whatsapp?hub.mode=subscribe&hub.verify_token=dashboard+token",
            400,
            "hub.challenge is missing",
        ),
        ("/webhooks/whatsapp", 400, "hub.mode is missing"),
        (
            "/webhooks/messenger?hub.mode=subscribe&hub.challenge=1&hub.verify_token=x",
            405,
            "verify_token",
        ),
        (
            "/webhooks/nope?hub.mode=subscribe&hub.challenge=1&hub.verify_token=x",
            404,
            "nope",
        ),
    ] {
        let response = h.request(reqwest::Method::GET, path).await;
        let got = response.status().as_u16();
        if got == 405 {
            assert_eq!(response.headers()["allow"], "POST");
        }
        let body = response.text().await.unwrap();
        assert_eq!(got, status, "{path}: {body}");
        let error: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains(says),
            "{path}: {body}"
        );
    }
    // Other methods: 405, Allow naming what each source takes.
    for (source, allow) in [("whatsapp", "GET, HEAD, POST"), ("messenger", "POST")] {
        let path = format!("/webhooks/{source}");
        let response = h.request(reqwest::Method::DELETE, &path).await;
        assert_eq!(response.status(), 405, "{source}");
        assert_eq!(response.headers()["allow"], allow, "{source}");
    }
    assert_nothing_stored(&h).await;
}

/// A `/ready` check cut off by its timeout on a frozen database connection
/// does not leave that connection parked in the pool's ping of it: with a
/// pool of one, the next event is stored on a fresh connection at once.
#[tokio::test]
async fn a_ready_check_cut_off_by_a_frozen_connection_frees_it() {
    let h = start("[database]\nmax_connections = 1\nacquire_timeout_ms = 60000\n").await;
    let _frozen = FrozenBackends::of_the_hosts_one_connection(&h).await;

    let (status, body) = h.get("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not reached within 2 s"), "{body}");
    // Without the guard, this waits for the pool's one slot, held by a
    // ping of the frozen connection, until the 60 s acquire timeout.
    let started = std::time::Instant::now();
    let reply = tokio::time::timeout(
        Duration::from_secs(20),
        h.deliver("raw", &json!({"n": 1}), "after-ready"),
    )
    .await
    .expect("the event is stored on a fresh connection");
    h.assert_committed(&reply).await;
    assert!(started.elapsed() < Duration::from_secs(20));
}
