//! [`PostgresStore`]: records in a PostgreSQL table, shared by a fleet of
//! servers.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use sqlx::{AssertSqlSafe, PgPool, Row, postgres::PgRow};

use super::{Claim, Peeked, RecordKey, Store, StoreError, Token};
use crate::Fingerprint;

/// A [`Store`] in a PostgreSQL table, on a `sqlx` pool the application
/// supplies.
///
/// The table (created by [`migrate`](Self::migrate), or by running
/// [`PostgresStore::create_table_sql`] yourself):
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS idempotency_records (
///     key         text        PRIMARY KEY,  -- "<scope length>:<scope><key>"
///     fingerprint bytea       NOT NULL,     -- SHA-256 of the request
///     token       bigint,                   -- fencing token, while in flight
///     record      bytea,                    -- the response, once completed
///     expires_at  timestamptz NOT NULL,     -- lease end, then retention end
///     took_over   boolean     NOT NULL DEFAULT false -- claimed from a lapsed claim
/// );
/// CREATE INDEX IF NOT EXISTS idempotency_records_expires_at
///     ON idempotency_records (expires_at);
/// ```
///
/// - `claim` is one statement: a plain read of what holds the key, and only
///   when nothing does, an `INSERT ... ON CONFLICT DO UPDATE ... WHERE
///   expires_at <= now() RETURNING`. A replay or an in-flight answer is a
///   read: it writes nothing and takes no row lock, so it never waits for
///   the holder's `complete`. `renew`, `complete` and `release` are one
///   `UPDATE` or `DELETE` each, fenced by `token`. One round trip apiece.
/// - Every statement is a transaction of its own. Under
///   `default_transaction_isolation = serializable` or `repeatable read`,
///   one that loses a race to a concurrent claim fails with a
///   serialization error; the store runs it again (up to 8 times in all)
///   rather than answer `Unavailable`.
/// - Time is the database's `now()`, so app servers with skewed clocks
///   agree.
/// - Expired rows are ignored by every statement and replaced by the next
///   claim of their key; [`remove_expired`](Self::remove_expired) deletes them
///   all, and [`spawn_cleanup`](Self::spawn_cleanup) does so periodically.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use tower_idempotency::{IdempotencyLayer, store::PostgresStore};
///
/// let pool = sqlx::PgPool::connect("postgres://127.0.0.1/app").await?;
/// let store = PostgresStore::new(pool);
/// store.migrate().await?;
/// let layer = IdempotencyLayer::new(store);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
    lapsed_retention: Duration,
}

/// SQL with the table name in it. The name is validated by
/// [`PostgresStore::with_table`] (or is the default), so these strings are
/// safe to run: each is wrapped in `AssertSqlSafe` where it is used.
struct Statements {
    table: String,
    claim: Arc<str>,
    renew: Arc<str>,
    complete: Arc<str>,
    release: Arc<str>,
    peek: Arc<str>,
    remove_expired: Arc<str>,
}

impl Statements {
    fn new(table: &str) -> Self {
        Statements {
            table: table.to_owned(),
            // `held` reads what holds the key (a live claim or record, or a
            // lapsed claim of another request) with a plain read: a replay or
            // an in-flight answer writes nothing and takes no row lock, so it
            // never queues behind the holder's `complete` or `renew`. Only
            // when nothing holds the key does `claimed` insert, or take an
            // expired row over under its row lock. Under READ COMMITTED a row
            // committed by a racing claim after this statement's snapshot is
            // invisible to `held` and not taken over by `claimed`: no row
            // comes back, and the caller runs the statement again.
            claim: Arc::from(format!(
                "WITH held AS (
                    SELECT fingerprint, record, expires_at FROM {table}
                    WHERE key = $1
                      AND (expires_at > now() OR (record IS NULL AND fingerprint <> $2
                           AND expires_at > now() - $5 * interval '1 millisecond'))
                ),
                claimed AS (
                    INSERT INTO {table} AS t (key, fingerprint, token, record, expires_at)
                    SELECT $1, $2, $3, NULL, now() + $4 * interval '1 millisecond'
                    WHERE NOT EXISTS (SELECT 1 FROM held)
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
                FROM held"
            )),
            renew: Arc::from(format!(
                "UPDATE {table} SET expires_at = now() + $3 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND record IS NULL"
            )),
            complete: Arc::from(format!(
                "UPDATE {table} SET record = $3, token = NULL,
                        expires_at = now() + $4 * interval '1 millisecond'
                 WHERE key = $1 AND token = $2 AND record IS NULL"
            )),
            release: Arc::from(format!(
                "DELETE FROM {table} WHERE key = $1 AND token = $2 AND record IS NULL"
            )),
            // A live record, or a lapsed claim within its retention ($2 ms).
            peek: Arc::from(format!(
                "SELECT token, record FROM {table}
                 WHERE key = $1
                   AND (expires_at > now() OR (record IS NULL
                        AND expires_at > now() - $2 * interval '1 millisecond'))"
            )),
            // A lapsed claim stays for the lapsed retention ($1 ms) after its
            // lease: its holder may still renew and complete it.
            remove_expired: Arc::from(format!(
                "DELETE FROM {table} WHERE expires_at <= now()
                   AND (record IS NOT NULL
                        OR expires_at <= now() - $1 * interval '1 millisecond')"
            )),
        }
    }
}

/// A table name [`PostgresStore::with_table`] refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTableName(String);

impl fmt::Display for InvalidTableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid table name {:?}: use `table` or `schema.table`, each part 1 to 63 \
             characters of ASCII letters, digits and `_`, not starting with a digit",
            self.0
        )
    }
}

impl std::error::Error for InvalidTableName {}

/// `"schema"."table"`; safe, since every part passed `valid_identifier`.
fn quoted(parts: &[&str]) -> String {
    parts
        .iter()
        .map(|part| format!("\"{part}\""))
        .collect::<Vec<_>>()
        .join(".")
}

fn valid_identifier(part: &str) -> bool {
    let mut bytes = part.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && part.len() <= 63
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

fn unavailable(err: sqlx::Error) -> StoreError {
    StoreError::unavailable(err)
}

/// A lease or TTL in milliseconds, at least 1 and at most 100 years, inside
/// PostgreSQL's interval and timestamp range.
/// A column that does not hold what this store writes there.
fn undecodable(err: sqlx::Error) -> StoreError {
    StoreError::Corrupt(Box::new(err))
}

fn millis(d: Duration) -> i64 {
    const CENTURY_MS: i64 = 100 * 365 * 24 * 60 * 60 * 1000;
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .clamp(1, CENTURY_MS)
}

/// Tokens are stored as `bigint`.
fn token_sql(token: Token) -> i64 {
    token.0 as i64
}

/// A row that is not what this store writes.
#[derive(Debug)]
struct Unreadable(&'static str);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unreadable idempotency row: {}", self.0)
    }
}

impl std::error::Error for Unreadable {}

fn corrupt(why: &'static str) -> StoreError {
    StoreError::Corrupt(Box::new(Unreadable(why)))
}

impl PostgresStore {
    /// The default table name.
    pub const DEFAULT_TABLE: &'static str = "idempotency_records";

    /// How long a claim whose lease ran out is kept by default, for its
    /// holder to renew or complete it if nobody takes it over: 24 hours.
    pub const DEFAULT_LAPSED_RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

    /// A store in the default table, `idempotency_records`.
    pub fn new(pool: PgPool) -> Self {
        PostgresStore {
            pool,
            sql: Arc::new(Statements::new(&quoted(&[Self::DEFAULT_TABLE]))),
            lapsed_retention: Self::DEFAULT_LAPSED_RETENTION,
        }
    }

    /// How long after its lease ends a claim nobody took over is kept
    /// (default [`DEFAULT_LAPSED_RETENTION`](Self::DEFAULT_LAPSED_RETENTION)).
    /// Until then its holder, stalled or cut off from the database for a
    /// while, can still renew it and record its response, only the same
    /// request may take it over, and [`remove_expired`](Self::remove_expired)
    /// keeps it; after it, the key is free for any request.
    #[must_use]
    pub fn with_lapsed_retention(mut self, retention: Duration) -> Self {
        self.lapsed_retention = retention;
        self
    }

    /// Uses another table: `table` or `schema.table`, each part 1 to 63
    /// ASCII letters, digits and `_`, not starting with a digit. The name is
    /// used exactly as given (quoted, so case matters and reserved words such
    /// as `order` work).
    pub fn with_table(mut self, table: &str) -> Result<Self, InvalidTableName> {
        let parts: Vec<&str> = table.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| valid_identifier(p)) {
            return Err(InvalidTableName(table.to_owned()));
        }
        self.sql = Arc::new(Statements::new(&quoted(&parts)));
        Ok(self)
    }

    /// The SQL that creates the table and its index (and adds a column a
    /// table made by an earlier version lacks), for those who manage their
    /// schema themselves.
    pub fn create_table_sql(&self) -> String {
        let table = &self.sql.table;
        // An index lives in its table's schema and takes an unqualified name,
        // of at most 63 characters.
        let base = table.rsplit('.').next().unwrap_or(table).trim_matches('"');
        let index = format!("\"{}_expires_at\"", &base[..base.len().min(52)]);
        format!(
            "CREATE TABLE IF NOT EXISTS {table} (
                key text PRIMARY KEY,
                fingerprint bytea NOT NULL,
                token bigint,
                record bytea,
                expires_at timestamptz NOT NULL,
                took_over boolean NOT NULL DEFAULT false
            );
            DO $$ BEGIN
                IF NOT EXISTS (SELECT 1 FROM pg_attribute
                               WHERE attrelid = '{table}'::regclass
                                 AND attname = 'took_over' AND NOT attisdropped) THEN
                    ALTER TABLE {table} ADD COLUMN took_over boolean NOT NULL DEFAULT false;
                END IF;
            END $$;
            CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);"
        )
    }

    /// Creates the table and its index if they do not exist, and adds the
    /// `took_over` column to a table made before it existed.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::raw_sql(AssertSqlSafe(self.create_table_sql()))
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Deletes every expired row (a completed record past its TTL, a claim
    /// past its lease and the lapsed retention after it) and returns how
    /// many it deleted.
    pub async fn remove_expired(&self) -> Result<u64, StoreError> {
        let done = retry_serialization(|| {
            sqlx::query(AssertSqlSafe(self.sql.remove_expired.clone()))
                .bind(millis(self.lapsed_retention))
                .execute(&self.pool)
        })
        .await?;
        Ok(done.rows_affected())
    }

    /// Spawns a task that calls [`remove_expired`](Self::remove_expired)
    /// every `every`, logging failures, until the returned handle is
    /// aborted.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, like [`tokio::spawn`].
    pub fn spawn_cleanup(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let store = self.clone();
        let every = every.max(Duration::from_millis(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(err) = store.remove_expired().await {
                    tracing::warn!(error = %err, "could not remove expired idempotency rows");
                }
            }
        })
    }

    /// Runs a fenced `UPDATE` or `DELETE` (rebuilt by `query` per attempt):
    /// exactly one row is the claim's own, none means it was fenced.
    async fn fenced_update<'q>(
        &self,
        query: impl Fn() -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> Result<(), StoreError> {
        let done = retry_serialization(|| query().execute(&self.pool)).await?;
        match done.rows_affected() {
            1 => Ok(()),
            _ => Err(StoreError::Fenced),
        }
    }
}

/// How many times a statement is run when it keeps losing serialization
/// races (under `default_transaction_isolation = serializable` or
/// `repeatable read`) before the store reports itself unavailable.
const SERIALIZATION_ATTEMPTS: usize = 8;

/// A statement that lost a race under a strict isolation level: running it
/// again, in a new snapshot, decides it.
fn is_serialization_failure(err: &sqlx::Error) -> bool {
    // 40001 serialization_failure, 40P01 deadlock_detected.
    matches!(err, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01")))
}

/// Runs `statement`, again when it lost a serialization race, at most
/// [`SERIALIZATION_ATTEMPTS`] times. Every statement of this store is a
/// transaction of its own, so running it again is always safe: a claim
/// finds what the winner wrote, a fenced update finds its token gone or not.
async fn retry_serialization<T, F>(mut statement: impl FnMut() -> F) -> Result<T, StoreError>
where
    F: Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 1;
    loop {
        match statement().await {
            Err(err) if attempt < SERIALIZATION_ATTEMPTS && is_serialization_failure(&err) => {
                attempt += 1;
                tracing::debug!(
                    attempt,
                    "idempotency statement lost a serialization race; running it again"
                );
                tokio::task::yield_now().await;
            }
            done => return done.map_err(unavailable),
        }
    }
}

fn parse_claim(row: &PgRow, token: Token) -> Result<Claim, StoreError> {
    let acquired: bool = row.try_get("acquired").map_err(undecodable)?;
    if acquired {
        let took_over: bool = row.try_get("took_over").map_err(undecodable)?;
        return Ok(Claim::Acquired { token, took_over });
    }
    let fingerprint: Vec<u8> = row.try_get("fingerprint").map_err(undecodable)?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint.as_slice())
        .map(Fingerprint::from_bytes)
        .map_err(|_| corrupt("fingerprint is not 32 bytes"))?;
    let record: Option<Vec<u8>> = row.try_get("record").map_err(undecodable)?;
    Ok(match record {
        Some(record) => Claim::Completed {
            fingerprint,
            record: Bytes::from(record),
        },
        None => {
            let remaining: Option<i64> = row.try_get("remaining_ms").map_err(undecodable)?;
            Claim::InFlight {
                fingerprint,
                lease_remaining: Duration::from_millis(
                    remaining.and_then(|ms| u64::try_from(ms).ok()).unwrap_or(0),
                ),
            }
        }
    })
}

impl Store for PostgresStore {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn claim(
        &self,
        key: &RecordKey,
        fingerprint: Fingerprint,
        lease: Duration,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send {
        let token = Token(crate::random_u64());
        async move {
            // Almost always one round trip; see `Statements::claim` for when
            // a second is needed.
            for _ in 0..3 {
                let row = retry_serialization(|| {
                    sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
                        .bind(key.as_str())
                        .bind(&fingerprint.as_bytes()[..])
                        .bind(token_sql(token))
                        .bind(millis(lease))
                        .bind(millis(self.lapsed_retention))
                        .fetch_optional(&self.pool)
                })
                .await?;
                if let Some(row) = row {
                    return parse_claim(&row, token);
                }
            }
            Err(StoreError::unavailable(Unreadable(
                "the key changed hands three times during one claim",
            )))
        }
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: Token,
        lease: Duration,
    ) -> Result<(), StoreError> {
        self.fenced_update(|| {
            sqlx::query(AssertSqlSafe(self.sql.renew.clone()))
                .bind(key.as_str())
                .bind(token_sql(token))
                .bind(millis(lease))
        })
        .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: Token,
        record: Bytes,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.fenced_update(|| {
            sqlx::query(AssertSqlSafe(self.sql.complete.clone()))
                .bind(key.as_str())
                .bind(token_sql(token))
                .bind(&record[..])
                .bind(millis(ttl))
        })
        .await
    }

    async fn release(&self, key: &RecordKey, token: Token) -> Result<(), StoreError> {
        self.fenced_update(|| {
            sqlx::query(AssertSqlSafe(self.sql.release.clone()))
                .bind(key.as_str())
                .bind(token_sql(token))
        })
        .await
    }

    async fn peek(&self, key: &RecordKey) -> Result<Peeked, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.peek.clone()))
            .bind(key.as_str())
            .bind(millis(self.lapsed_retention))
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?;
        let Some(row) = row else {
            return Ok(Peeked::Absent);
        };
        let record: Option<Vec<u8>> = row.try_get("record").map_err(undecodable)?;
        let token: Option<i64> = row.try_get("token").map_err(undecodable)?;
        Ok(match (record, token) {
            (Some(record), _) => Peeked::Completed {
                record: Bytes::from(record),
            },
            (None, Some(token)) => Peeked::InFlight {
                token: Token(token as u64),
            },
            (None, None) => return Err(corrupt("a claim without a token")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn table_names_are_validated() {
        // A lazy pool never connects: only names are checked here.
        let store =
            PostgresStore::new(PgPool::connect_lazy("postgres://127.0.0.1/unused").unwrap());
        for good in ["records", "_r1", "app.idempotency", "a_b.c_d"] {
            assert!(
                store.clone().with_table(good).is_ok(),
                "{good} should be accepted"
            );
        }
        let long = "x".repeat(64);
        for bad in [
            "",
            "1abc",
            "a-b",
            "a.b.c",
            "a;drop table x",
            "\"quoted\"",
            ".t",
            long.as_str(),
        ] {
            assert_eq!(
                store.clone().with_table(bad).unwrap_err(),
                InvalidTableName(bad.to_owned()),
                "{bad} should be refused"
            );
        }
    }
}
