//! The PostgreSQL relay with the in-memory transport, against baselines
//! measured in the same run.
//!
//! ```sh
//! cargo bench --bench relay_postgres --features postgres
//! SAGA_BENCH_MESSAGES=20000 DATABASE_URL=postgres://... cargo bench --bench relay_postgres --features postgres
//! ```
//!
//! Measures, on N messages of 1 KiB (`SAGA_BENCH_MESSAGES`, default 100000)
//! with 10 consecutive messages per ordering key (`SAGA_BENCH_PER_KEY`), one
//! database client each:
//! - raw INSERT: the same rows into a plain copy of the outbox table, 100 per statement;
//! - naive loop: `SELECT … FOR UPDATE SKIP LOCKED LIMIT 100`, publish, `DELETE`, commit;
//! - relay drain: the relay emptying an outbox that holds the N messages;
//! - latency: commit-to-publish at an open-loop load of half the drain rate
//!   (one transaction per message), woken by LISTEN/NOTIFY.
//!
//! Ratios are what to compare across machines; absolute rates depend on the box.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saga::memory::MemoryTransport;
use saga::outbox::{Relay, RelayConfig, wait_until_delivered};
use saga::sql::PostgresStore;
use saga::sql::sqlx::postgres::PgPoolOptions;
use saga::sql::sqlx::{self, Row};
use saga::{Message, MessageId, OutboxEntry, OutboxStore, Transactional, Transport, wire};

const BATCH: usize = 100;
/// Messages per ordering key, consecutive (`SAGA_BENCH_PER_KEY`, default 10).
fn per_key() -> usize {
    std::env::var("SAGA_BENCH_PER_KEY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .max(1)
}

fn entries(range: std::ops::Range<usize>, payload: &[u8]) -> Vec<OutboxEntry> {
    let per_key = per_key();
    range
        .map(|i| {
            let message = Message::new("bench.event", payload.to_vec())
                .with_ordering_key(format!("agg-{}", i / per_key));
            OutboxEntry::new("bench", message)
        })
        .collect()
}

fn rate(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/saga_test".into());
    let n: usize = std::env::var("SAGA_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("PostgreSQL reachable at DATABASE_URL");
    let schema = format!("bench_{}", std::process::id());
    let store = PostgresStore::with_schema(pool.clone(), &schema).unwrap();
    store.migrate().await.unwrap();
    let payload = vec![b'x'; 1024];
    println!(
        "relay_postgres: {n} messages of 1 KiB, {} per ordering key, one client per role",
        per_key()
    );

    // Baseline 1: raw INSERT of the same rows, same statement shape, no outbox logic.
    sqlx::query(&format!(
        "CREATE TABLE {schema}.raw (LIKE {schema}.saga_outbox INCLUDING ALL)"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let started = Instant::now();
    for chunk in (0..n).step_by(BATCH) {
        let batch = entries(chunk..(chunk + BATCH).min(n), &payload);
        let mut channels = Vec::new();
        let mut ids = Vec::new();
        let mut keys = Vec::new();
        let mut headers = Vec::new();
        let mut payloads = Vec::new();
        for e in &batch {
            channels.push(e.channel.clone());
            ids.push(e.message.id.as_uuid());
            keys.push(e.message.ordering_key.clone());
            let map: serde_json::Map<String, serde_json::Value> = wire::to_headers(&e.message)
                .into_iter()
                .map(|(k, v)| (k, v.into()))
                .collect();
            headers.push(serde_json::Value::Object(map));
            payloads.push(e.message.payload.clone());
        }
        sqlx::query(&format!(
            "INSERT INTO {schema}.raw (channel, message_id, ordering_key, headers, payload, created_at, retry_at) \
             SELECT c, i, k, h, p, now(), now() FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::jsonb[], $5::bytea[]) AS u(c, i, k, h, p)"
        ))
        .bind(&channels)
        .bind(&ids)
        .bind(&keys)
        .bind(&headers)
        .bind(&payloads)
        .execute(&pool)
        .await
        .unwrap();
    }
    let raw_insert = rate(n, started.elapsed());

    // Our enqueue, the same way: this fills the outbox for the drain.
    let started = Instant::now();
    for chunk in (0..n).step_by(BATCH) {
        let mut tx = store.begin().await.unwrap();
        store
            .enqueue(&mut tx, &entries(chunk..(chunk + BATCH).min(n), &payload))
            .await
            .unwrap();
        store.commit(tx).await.unwrap();
    }
    let enqueue = rate(n, started.elapsed());

    // Baseline 2: the naive loop on the raw table.
    let transport = MemoryTransport::default();
    let started = Instant::now();
    let mut moved = 0;
    loop {
        let mut tx = pool.begin().await.unwrap();
        let rows = sqlx::query(&format!(
            "SELECT seq, channel, headers, payload FROM {schema}.raw ORDER BY seq LIMIT {BATCH} FOR UPDATE SKIP LOCKED"
        ))
        .fetch_all(&mut *tx)
        .await
        .unwrap();
        if rows.is_empty() {
            break;
        }
        let mut seqs = Vec::new();
        for row in &rows {
            let headers: serde_json::Value = row.get("headers");
            let pairs: Vec<(String, String)> = headers
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            let message = wire::from_headers(pairs, row.get("payload")).unwrap();
            transport
                .publish(row.get::<String, _>("channel").as_str(), &message)
                .await
                .unwrap();
            seqs.push(row.get::<i64, _>("seq"));
        }
        sqlx::query(&format!("DELETE FROM {schema}.raw WHERE seq = ANY($1)"))
            .bind(&seqs)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        moved += rows.len();
    }
    assert_eq!(moved, n);
    let naive = rate(n, started.elapsed());

    // The relay draining the pre-filled outbox.
    let relay_transport: Arc<dyn Transport> = Arc::new(MemoryTransport::default());
    let relay = Relay::new(
        store.clone(),
        Arc::clone(&relay_transport),
        RelayConfig::default().batch_size(BATCH),
    );
    let started = Instant::now();
    let mut drained = 0;
    loop {
        let report = relay.run_once().await.unwrap();
        if report.claimed == 0 {
            break;
        }
        drained += report.published;
    }
    assert_eq!(drained, n);
    let drain = rate(n, started.elapsed());

    // Latency: commit-to-publish at half the drain rate, one transaction per message.
    let published_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let watched = MemoryTransport::default();
    let clock = Arc::clone(&published_at);
    watched.on_publish(move |_, m| {
        clock.lock().unwrap().insert(m.id, Instant::now());
        None
    });
    let worker = Relay::new(
        store.clone(),
        Arc::new(watched),
        RelayConfig::default().batch_size(BATCH),
    )
    .spawn();
    let offered = drain / 2.0;
    let producers = 4;
    let duration = Duration::from_secs(10);
    let committed_at: Arc<Mutex<HashMap<MessageId, Instant>>> = Arc::default();
    let mut tasks = Vec::new();
    for p in 0..producers {
        let store = store.clone();
        let committed_at = Arc::clone(&committed_at);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval(Duration::from_secs_f64(producers as f64 / offered));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let end = Instant::now() + duration;
            let mut i = p;
            while Instant::now() < end {
                ticks.tick().await;
                let batch = entries(i..i + 1, &payload);
                let id = batch[0].message.id;
                let mut tx = store.begin().await.unwrap();
                store.enqueue(&mut tx, &batch).await.unwrap();
                store.commit(tx).await.unwrap();
                committed_at.lock().unwrap().insert(id, Instant::now());
                i += producers;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    wait_until_delivered(&store, Duration::from_secs(60))
        .await
        .unwrap();
    worker.shutdown().await;
    let committed = std::mem::take(&mut *committed_at.lock().unwrap());
    let published = std::mem::take(&mut *published_at.lock().unwrap());
    let mut latencies: Vec<Duration> = committed
        .iter()
        .filter_map(|(id, at)| published.get(id).map(|p| p.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    let achieved = committed.len() as f64 / duration.as_secs_f64();

    println!("raw INSERT (100 rows per statement)       : {raw_insert:>9.0} msg/s");
    println!(
        "enqueue (PostgresStore, 100 per commit)   : {enqueue:>9.0} msg/s  ({:.2}x raw INSERT)",
        enqueue / raw_insert
    );
    println!("naive SKIP LOCKED loop (claim 100, delete): {naive:>9.0} msg/s");
    println!(
        "relay drain (batch 100)                   : {drain:>9.0} msg/s  ({:.2}x raw INSERT, target >= 0.8; {:.2}x naive loop)",
        drain / raw_insert,
        drain / naive
    );
    println!(
        "commit-to-publish, offered {offered:.0} msg/s (achieved {achieved:.0}, {} samples): p50 {:.2} ms, p99 {:.2} ms (target p99 <= 10 ms)",
        latencies.len(),
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0
    );
    sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
