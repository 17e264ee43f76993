//! Webhook ingestion under concurrency, saturation and shutdown, against a
//! real Postgres.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{Reply, post, sms, start};

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
    // Room for one event in flight and one in the ingress buffer.
    let h = start(
        "[webhooks]\ningest_capacity = 1\nprocessors = 1\nmax_demand = 1\nbatch_size = 1\n\
         batch_concurrency = 1\nmax_in_flight = 1\nbatch_timeout_ms = 1\nretry_after_secs = 2",
    )
    .await;
    // Hold inserts: the batch handler blocks on this lock.
    let mut lock = h.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE webhook_events IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();

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
    // count of 1 is reached earlier: the ingress's pending ask takes a slot).
    let pool = h.pool.clone();
    wait_until_async(|| {
        let pool = pool.clone();
        async move {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            waiting == 1
        }
    })
    .await;
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
    let mut h = start(
        "[webhooks]\ningest_capacity = 1000\nbatch_size = 20\nbatch_timeout_ms = 50\n\
         [shutdown]\ndrain_timeout_ms = 20000",
    )
    .await;
    let tasks: Vec<_> = (0..300)
        .map(|n| {
            let body =
                serde_json::to_vec(&sms("+14155550100", "+14155550101", &format!("m{n}"))).unwrap();
            let headers = h.sign("sms", &body, "id");
            let (client, url) = (h.client.clone(), h.url.clone());
            tokio::spawn(async move { post(&client, &url, "sms", body, headers).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = h.server.take().unwrap().shutdown().await;
    assert!(!report.forced);

    let mut accepted = HashSet::new();
    let (mut unavailable, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(reply) if reply.status == 202 => {
                accepted.insert(reply.id());
            }
            Ok(reply) => {
                assert_eq!(reply.status, 503, "{reply:?}");
                unavailable += 1;
            }
            Err(_) => refused += 1,
        }
    }
    eprintln!(
        "accepted {}, 503 {unavailable}, refused {refused}",
        accepted.len()
    );
    let stored: HashSet<i64> = sqlx::query_scalar("SELECT id FROM webhook_events")
        .fetch_all(&h.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert!(!accepted.is_empty());
    assert!(
        accepted.is_subset(&stored),
        "every 202 is stored: missing {:?}",
        accepted.difference(&stored).collect::<Vec<_>>()
    );
    assert_eq!(
        accepted.len(),
        stored.len(),
        "every stored event was answered 202 ({unavailable} 503, {refused} refused)"
    );
}

async fn wait_until(condition: impl Fn() -> bool) {
    wait_until_async(|| std::future::ready(condition())).await;
}

async fn wait_until_async<F: Future<Output = bool>>(condition: impl Fn() -> F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(Instant::now() < deadline, "condition not reached in 10 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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
