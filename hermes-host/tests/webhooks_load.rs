//! Webhook ingestion under concurrency, saturation and shutdown, against a
//! real Postgres.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Reply, post, sms, start, wait_until, wait_until_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_identical_deliveries_are_stored_once() {
    // Small batches written concurrently: copies meet in one batch and in
    // concurrent batches. "sms" batches go through ingest_webhook_batch,
    // "raw" ones through the COPY, which fails on a stored key, and then
    // through ingest_webhook_batch.
    let h = start("[webhooks]\nbatch_size = 4\nbatch_concurrency = 4\nbatch_timeout_ms = 2").await;
    for round in 0..2 {
        for source in ["sms", "raw"] {
            let payload = sms("+14155550100", "+14155550101", &format!("same {round}"));
            let body = serde_json::to_vec(&payload).unwrap();
            let headers = h.sign(source, &body, &format!("id-{round}"));
            let tasks: Vec<_> = (0..50)
                .map(|_| {
                    let (client, url, body, headers) = (
                        h.client.clone(),
                        h.url.clone(),
                        body.clone(),
                        headers.clone(),
                    );
                    tokio::spawn(async move { post(&client, &url, source, body, headers).await })
                })
                .collect();
            let mut replies = Vec::new();
            for task in tasks {
                replies.push(task.await.unwrap().unwrap());
            }
            for reply in &replies {
                h.assert_committed(reply).await;
            }
            let ids: HashSet<i64> = replies.iter().map(Reply::id).collect();
            assert_eq!(ids.len(), 1, "{source}: one id for every copy: {ids:?}");
            let first = replies.iter().filter(|r| !r.duplicate()).count();
            assert_eq!(first, 1, "{source}: exactly one copy is not a duplicate");
        }
        assert_eq!(h.count("webhook_events").await, 2 * (round + 1));
        assert_eq!(h.count("messages").await, round + 1);
    }
    assert_eq!(h.count("parties").await, 2);
    assert_eq!(h.count("conversations").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_answers_503_at_once_then_recovers() {
    // Room for one event in flight and one in the ingress buffer. The stuck
    // insert waits for the test's lock: a statement timeout far above that
    // wait keeps it from timing out and, its retries given up, answering 503.
    let h = start(
        "[webhooks]\ningest_capacity = 1\nprocessors = 1\nmax_demand = 1\nbatch_size = 1\n\
         batch_concurrency = 1\nmax_in_flight = 1\nbatch_timeout_ms = 1\nretry_after_secs = 2\n\
         [database]\nstatement_timeout_ms = 60000",
    )
    .await;
    // Hold inserts: the batch handler blocks on this lock.
    let lock = h.lock_events().await;

    let spawn = |n: u32| {
        let body =
            serde_json::to_vec(&sms("+14155550100", "+14155550101", &format!("m{n}"))).unwrap();
        let headers = h.sign("sms", &body, "id");
        let (client, url) = (h.client.clone(), h.url.clone());
        tokio::spawn(async move { post(&client, &url, "sms", body, headers).await })
    };
    let ingest = h.server().ingest().clone();
    let stuck_in_batch = spawn(1);
    // In the batch handler once its insert waits for the lock (an in-flight
    // count of 1 is reached earlier, when the event is produced).
    wait_until_async(|| async { h.lock_waiters().await == 1 }).await;
    let stuck_in_buffer = spawn(2);
    wait_until(|| ingest.ingress().free() == 0).await;

    for n in 3..8 {
        let started = Instant::now();
        let reply = spawn(n).await.unwrap().unwrap();
        assert_eq!(reply.status, 503, "{reply:?}");
        assert_eq!(reply.retry_after.as_deref(), Some("2"), "{reply:?}");
        assert!(reply.error().contains("full"), "{reply:?}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a 503 must not wait"
        );
    }
    assert_eq!(h.count("webhook_events").await, 0);

    lock.rollback().await.unwrap();
    for task in [stuck_in_batch, stuck_in_buffer] {
        let reply = task.await.unwrap().unwrap();
        h.assert_committed(&reply).await;
    }
    let reply = spawn(100).await.unwrap().unwrap();
    h.assert_committed(&reply).await;
    assert_eq!(h.count("webhook_events").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing() {
    // The test's lock holds every batch write, so shutdown starts with
    // events both in flight (batches waiting for the lock, at most
    // max_in_flight) and in the ingress buffer (the rest): the drain must
    // write and answer all of them.
    const HELD: usize = 60;
    const CAPACITY: usize = 100;
    const MAX_IN_FLIGHT: usize = 20;
    let mut h = start(&format!(
        "[webhooks]\ningest_capacity = {CAPACITY}\nmax_in_flight = {MAX_IN_FLIGHT}\n\
         max_demand = 5\nbatch_size = 10\nbatch_concurrency = 2\nbatch_timeout_ms = 5\n\
         [database]\nstatement_timeout_ms = 60000\n\
         [shutdown]\ndrain_timeout_ms = 60000"
    ))
    .await;
    let lock = h.lock_events().await;
    // Raw events (the COPY path) and normalized ones.
    let tasks: Vec<_> = (0..HELD)
        .map(|n| {
            let (source, payload) = if n % 2 == 0 {
                ("raw", serde_json::json!({"n": n}))
            } else {
                ("sms", sms("+14155550100", "+14155550101", &format!("m{n}")))
            };
            let body = serde_json::to_vec(&payload).unwrap();
            let headers = h.sign(source, &body, &format!("d{n}"));
            let (client, url) = (h.client.clone(), h.url.clone());
            tokio::spawn(async move { post(&client, &url, source, body, headers).await })
        })
        .collect();

    // Every request is in the pipeline (produced or buffered), and a batch
    // waits for the lock.
    let ingest = h.server().ingest().clone();
    let buffered = || CAPACITY - ingest.ingress().free();
    wait_until(|| ingest.pipeline().in_flight() + buffered() == HELD).await;
    wait_until_async(|| async { h.lock_waiters().await >= 1 }).await;
    // (Read apart, in flight and buffered may be a message apart: the sum
    // was checked above.)
    let in_flight = ingest.pipeline().in_flight();
    assert!(
        (1..=MAX_IN_FLIGHT).contains(&in_flight),
        "in flight: {in_flight}"
    );

    let server = h.server.take().unwrap();
    let shutdown = tokio::spawn(server.shutdown());
    wait_until(|| ingest.pipeline().is_draining()).await;
    // The drain waits for the held writes: nothing is answered meanwhile.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!shutdown.is_finished(), "the drain waits for the writes");
    let answered = tasks.iter().filter(|t| t.is_finished()).count();
    assert_eq!(answered, 0, "answered while every write was held");
    assert_eq!(h.count("webhook_events").await, 0);

    lock.rollback().await.unwrap();
    let report = tokio::time::timeout(Duration::from_secs(60), shutdown)
        .await
        .expect("the drain ends once the lock is released")
        .unwrap();
    assert!(!report.forced, "the drain was forced");

    let mut accepted = HashSet::new();
    for task in tasks {
        let reply = task
            .await
            .unwrap()
            .expect("an answer before the server stopped");
        assert_eq!(reply.status, 202, "{reply:?}");
        assert!(!reply.duplicate(), "{reply:?}");
        assert!(
            accepted.insert(reply.id()),
            "id {} answered twice",
            reply.id()
        );
    }
    let stored: Vec<i64> = sqlx::query_scalar("SELECT id FROM webhook_events")
        .fetch_all(&h.pool)
        .await
        .unwrap();
    assert_eq!(stored.len(), HELD, "each event stored once");
    assert_eq!(
        stored.into_iter().collect::<HashSet<_>>(),
        accepted,
        "the stored events are the ones answered 202"
    );
    assert_eq!(h.count("messages").await, (HELD / 2) as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_resolve_the_same_new_parties_once() {
    // Distinct events between the same two new numbers, in small batches
    // written concurrently: each batch's later steps must see the parties and
    // conversation a concurrent batch committed while an earlier step waited.
    let h = start("[webhooks]\nbatch_size = 2\nbatch_concurrency = 4\nbatch_timeout_ms = 2").await;
    let tasks: Vec<_> = (0..40)
        .map(|n| {
            let (from, to) = if n % 2 == 0 {
                ("+14155550110", "+14155550111")
            } else {
                ("+14155550111", "+14155550110")
            };
            let body = serde_json::to_vec(&sms(from, to, &format!("message {n}"))).unwrap();
            let headers = h.sign("sms", &body, &format!("pair-{n}"));
            let (client, url) = (h.client.clone(), h.url.clone());
            tokio::spawn(async move { post(&client, &url, "sms", body, headers).await })
        })
        .collect();
    for task in tasks {
        let reply = task.await.unwrap().unwrap();
        h.assert_committed(&reply).await;
        assert!(!reply.duplicate(), "{reply:?}");
    }
    assert_eq!(h.count("webhook_events").await, 40);
    assert_eq!(h.count("messages").await, 40);
    assert_eq!(h.count("parties").await, 2);
    assert_eq!(h.count("conversations").await, 1);
}
