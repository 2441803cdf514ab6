//! What the layer costs, each figure beside the bare service in the same run,
//! and for Redis and PostgreSQL beside the floor of one plain write.
//!
//! `cargo bench --bench layer` (memory store only; add `--features metrics`
//! to measure with the layer's metrics going to a Prometheus recorder), or
//! with the remote stores:
//! `REDIS_URL=redis://127.0.0.1:6379 DATABASE_URL=postgres://postgres@127.0.0.1/test
//! cargo bench --all-features --bench layer`

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::Request;
use http_body_util::Full;
use tokio::runtime::Runtime;
use tower_idempotency::{Fingerprint, IdempotencyLayer, MemoryStore, Store};

mod common;

use common::{KIB, get, handler, post, run};

/// The same workload for any store, so every backend is measured alike.
fn bench_store<St: Store + Clone>(c: &mut Criterion, rt: &Runtime, name: &str, store: St) {
    let bare = handler::<Full<Bytes>>();
    let layered = tower::ServiceBuilder::new()
        .layer(IdempotencyLayer::new(store))
        .service(handler());

    if name == "memory" {
        // The store is not involved: measured once.
        let mut group = c.benchmark_group(format!("{name}/pass-through"));
        group.bench_function("bare GET", |b| b.to_async(rt).iter(|| run(&bare, get())));
        group.bench_function("layered GET", |b| {
            b.to_async(rt).iter(|| run(&layered, get()))
        });
        group.bench_function("bare POST", |b| {
            b.to_async(rt).iter(|| run(&bare, post(None)))
        });
        group.bench_function("layered POST, no key", |b| {
            b.to_async(rt).iter(|| run(&layered, post(None)))
        });
        group.finish();
    }

    let mut group = c.benchmark_group(format!("{name}/keyed 1 KiB"));
    let next = AtomicU64::new(0);
    let nonce = std::process::id();
    group.bench_function("bare handler", |b| {
        b.to_async(rt).iter(|| run(&bare, post(Some("k"))))
    });
    group.bench_function("first execution", |b| {
        b.to_async(rt).iter(|| {
            let key = format!("first-{nonce}-{}", next.fetch_add(1, Ordering::Relaxed));
            run(&layered, post(Some(key.as_str())))
        })
    });
    let recorded = format!("recorded-{nonce}");
    rt.block_on(run(&layered, post(Some(&recorded))));
    group.bench_function("replay", |b| {
        b.to_async(rt).iter(|| run(&layered, post(Some(&recorded))))
    });
    group.finish();
}

fn layer(c: &mut Criterion) {
    // With `--features metrics`, the layer's metrics go to a real recorder,
    // so the figures include what they cost.
    #[cfg(feature = "metrics")]
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("a metrics recorder installs");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    bench_store(c, &rt, "memory", MemoryStore::default());
    #[cfg(feature = "redis")]
    redis_store(c, &rt);
    #[cfg(feature = "postgres")]
    postgres_store(c, &rt);
}

/// Redis, beside the floor: one plain `SET` on the same kind of connection.
#[cfg(feature = "redis")]
fn redis_store(c: &mut Criterion, rt: &Runtime) {
    let Ok(url) = std::env::var("REDIS_URL") else {
        eprintln!("redis benches skipped: REDIS_URL is not set");
        return;
    };
    let prefix = format!("tower-idempotency-bench:{}:", std::process::id());
    let store = rt
        .block_on(tower_idempotency::store::RedisStore::connect(&url))
        .unwrap()
        .with_prefix(&prefix);
    let client = redis::Client::open(url.as_str()).unwrap();
    let connection = rt
        .block_on(redis::aio::ConnectionManager::new(client))
        .unwrap();
    c.bench_function("redis/floor: one SET", |b| {
        b.to_async(rt).iter(|| {
            let mut connection = connection.clone();
            let key = format!("{prefix}floor");
            async move {
                let _: () = redis::cmd("SET")
                    .arg(key)
                    .arg(KIB)
                    .query_async(&mut connection)
                    .await
                    .unwrap();
            }
        })
    });
    bench_store(c, rt, "redis", store);
}

/// PostgreSQL, beside the floor: one single-row `INSERT` on the same pool.
#[cfg(feature = "postgres")]
fn postgres_store(c: &mut Criterion, rt: &Runtime) {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("postgres benches skipped: DATABASE_URL is not set");
        return;
    };
    let table = format!("idem_bench_{}", std::process::id());
    let pool = rt.block_on(sqlx::PgPool::connect(&url)).unwrap();
    let store = tower_idempotency::store::PostgresStore::new(pool.clone())
        .with_table(&table)
        .unwrap();
    rt.block_on(store.migrate()).unwrap();
    let floor = format!("{table}_floor");
    rt.block_on(
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {floor} (key text, body bytea)"
        )))
        .execute(&pool),
    )
    .unwrap();
    let insert: std::sync::Arc<str> = format!("INSERT INTO {floor} VALUES ($1, $2)").into();
    c.bench_function("postgres/floor: one-row INSERT", |b| {
        b.to_async(rt).iter(|| {
            let (pool, insert) = (pool.clone(), insert.clone());
            async move {
                sqlx::query(sqlx::AssertSqlSafe(insert))
                    .bind("k")
                    .bind(KIB)
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        })
    });
    bench_store(c, rt, "postgres", store.clone());
    contended(c, rt, &url, &store, &table);
    rt.block_on(
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP TABLE {table}; DROP TABLE {floor}"
        )))
        .execute(&pool),
    )
    .unwrap();
}

/// The claim statement of earlier releases, whose `ON CONFLICT DO UPDATE ...
/// WHERE` locked the row even when it updated nothing: kept here only as the
/// baseline the current statement is measured against.
#[cfg(feature = "postgres")]
fn locking_claim(table: &str) -> String {
    format!(
        "WITH claimed AS (
            INSERT INTO {table} AS t (key, fingerprint, token, record, expires_at)
            VALUES ($1, $2, $3, NULL, now() + $4 * interval '1 millisecond')
            ON CONFLICT (key) DO UPDATE
                SET fingerprint = EXCLUDED.fingerprint, token = EXCLUDED.token,
                    record = NULL, expires_at = EXCLUDED.expires_at,
                    took_over = t.record IS NULL
                        AND t.expires_at > now() - $5 * interval '1 millisecond'
                WHERE t.expires_at <= now()
                  AND (t.record IS NOT NULL OR t.fingerprint = EXCLUDED.fingerprint
                       OR t.expires_at <= now() - $5 * interval '1 millisecond')
            RETURNING took_over
        )
        SELECT true AS acquired, took_over, NULL::bytea AS fingerprint,
               NULL::bytea AS record, NULL::bigint AS remaining_ms
        FROM claimed
        UNION ALL
        SELECT false, false, fingerprint, record,
               greatest(ceil(extract(epoch FROM expires_at - now()) * 1000), 0)::bigint
        FROM {table}
        WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM claimed)
          AND (expires_at > now() OR (record IS NULL AND fingerprint <> $2
               AND expires_at > now() - $5 * interval '1 millisecond'))"
    )
}

/// Eight duplicates of one key at once, answered from a completed record
/// (replays) and from a claim whose holder keeps renewing, each renewal a
/// transaction that holds the row for 2 ms (in-flight answers): the current
/// claim beside the earlier locking statement, in the same run. One
/// iteration is one batch of eight.
#[cfg(feature = "postgres")]
fn contended(
    c: &mut Criterion,
    rt: &Runtime,
    url: &str,
    store: &tower_idempotency::store::PostgresStore,
    table: &str,
) {
    use std::{sync::Arc, time::Duration};
    use tower_idempotency::store::{Claim, RecordKey};

    let pool = rt
        .block_on(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(9)
                .connect(url),
        )
        .unwrap();
    let store = store.clone();
    let fp = Fingerprint::from_bytes([9; 32]);
    let done = RecordKey::new("bench", "done");
    let busy = RecordKey::new("bench", "busy");
    let Ok(Claim::Acquired { token, .. }) =
        rt.block_on(store.claim(&done, fp, Duration::from_secs(60)))
    else {
        panic!("a fresh key is acquired");
    };
    rt.block_on(store.complete(
        &done,
        token,
        Bytes::from_static(KIB),
        Duration::from_secs(3600),
    ))
    .unwrap();
    let Ok(Claim::Acquired { .. }) = rt.block_on(store.claim(&busy, fp, Duration::from_secs(3600)))
    else {
        panic!("a fresh key is acquired");
    };

    // The holder of `busy`, renewing in a loop on a runtime of its own.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let (stop, url, table, key) =
            (stop.clone(), url.to_owned(), table.to_owned(), busy.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sqlx::Connection;
                let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
                let renew = format!(
                    "UPDATE {table} SET expires_at = now() + interval '1 hour' WHERE key = $1"
                );
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = conn.begin().await.unwrap();
                    sqlx::query(sqlx::AssertSqlSafe(renew.clone()))
                        .bind(key.as_str())
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    tx.commit().await.unwrap();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
    };

    let old: Arc<str> = locking_claim(table).into();
    let mut group = c.benchmark_group("postgres/8 duplicates at once");
    group.throughput(Throughput::Elements(8));
    for (case, key) in [
        ("replays", &done),
        ("in-flight answers, holder renewing", &busy),
    ] {
        group.bench_function(format!("{case}: locking statement (earlier)"), |b| {
            b.to_async(rt).iter(|| {
                let (pool, old) = (pool.clone(), old.clone());
                async move {
                    let claims = (0..8).map(|_| {
                        sqlx::query(sqlx::AssertSqlSafe(old.clone()))
                            .bind(key.as_str())
                            .bind(&fp.as_bytes()[..])
                            .bind(1i64)
                            .bind(60_000i64)
                            .bind(86_400_000i64)
                            .fetch_optional(&pool)
                    });
                    for row in futures_util::future::join_all(claims).await {
                        assert!(row.unwrap().is_some());
                    }
                }
            })
        });
        group.bench_function(format!("{case}: PostgresStore::claim"), |b| {
            b.to_async(rt).iter(|| {
                let store = store.clone();
                async move {
                    let claims = (0..8).map(|_| store.claim(key, fp, Duration::from_secs(60)));
                    for claim in futures_util::future::join_all(claims).await {
                        assert!(!matches!(claim.unwrap(), Claim::Acquired { .. }));
                    }
                }
            })
        });
    }
    group.finish();
    stop.store(true, Ordering::Relaxed);
    holder.join().unwrap();
}

fn fingerprint(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let (parts, ()) = Request::post("/book?x=1")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    for size in [1024usize, 64 * 1024, 1024 * 1024] {
        let body = vec![7u8; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("{} KiB", size / 1024), |b| {
            b.iter(|| Fingerprint::compute(black_box(&parts), &[], black_box(&body)))
        });
    }
    group.finish();
}

criterion_group!(benches, layer, fingerprint);
criterion_main!(benches);
