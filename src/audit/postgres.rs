//! [`PostgresAuditSink`]: chains in a PostgreSQL table (features `audit`
//! and `postgres`).

use std::io;

use sqlx::{Connection, PgPool, Postgres, Row, pool::PoolConnection};

use super::{AuditLine, AuditSink, ChainTaken};

const SCHEMA: &str = r#"
SELECT pg_advisory_xact_lock(hashtextextended('tower-idempotency/audit/schema', 0));
CREATE TABLE IF NOT EXISTS idempotency_audit (
    instance   text    NOT NULL,
    seq        bigint  NOT NULL,
    checkpoint boolean NOT NULL,
    line       text    NOT NULL,
    PRIMARY KEY (instance, seq, checkpoint)
);
CREATE OR REPLACE FUNCTION idempotency_audit_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'idempotency_audit is append-only';
END
$$;
CREATE OR REPLACE TRIGGER idempotency_audit_no_change
    BEFORE UPDATE OR DELETE ON idempotency_audit
    FOR EACH ROW EXECUTE FUNCTION idempotency_audit_append_only();
CREATE OR REPLACE TRIGGER idempotency_audit_no_truncate
    BEFORE TRUNCATE ON idempotency_audit
    FOR EACH STATEMENT EXECUTE FUNCTION idempotency_audit_append_only();
"#;

/// Chains in the table `idempotency_audit`, one per instance: a row per line
/// (`instance`, `seq`, `checkpoint`, `line`, the same text as in a JSON
/// Lines file).
///
/// The table is created on [`connect`](Self::connect) when it does not
/// exist, with triggers that refuse `UPDATE`, `DELETE` and `TRUNCATE`. It is
/// append-only for every role that does not own it: create it with an
/// owner role, and give the application's role only `INSERT` and `SELECT`
/// (an owner can disable triggers).
/// The sink holds a session advisory lock on its instance for as long as it
/// lives, so a second writer of the same instance is refused; each batch is
/// one transaction.
#[derive(Debug)]
pub struct PostgresAuditSink {
    pool: PgPool,
    instance: String,
    connection: Option<PoolConnection<Postgres>>,
    /// The chain's last seq as this writer knows it: from its tail, then
    /// from each committed batch.
    last_seq: Option<u64>,
    /// The lock was taken once: losing it now means the chain may have
    /// passed to another writer.
    started: bool,
    /// The last append failed: its batch may have committed unacknowledged.
    unacknowledged: bool,
}

fn other(err: sqlx::Error) -> io::Error {
    io::Error::other(err)
}

impl PostgresAuditSink {
    /// Creates the table if needed and takes the chain of `instance`.
    pub async fn connect(pool: PgPool, instance: &str) -> io::Result<Self> {
        let mut connection = pool.acquire().await.map_err(other)?;
        // Created once, by a role that owns it; the application's role then
        // needs only INSERT and SELECT.
        let exists: bool =
            sqlx::query_scalar("SELECT to_regclass('idempotency_audit') IS NOT NULL")
                .fetch_one(&mut *connection)
                .await
                .map_err(other)?;
        if !exists {
            let mut tx = connection.begin().await.map_err(other)?;
            sqlx::raw_sql(SCHEMA)
                .execute(&mut *tx)
                .await
                .map_err(other)?;
            tx.commit().await.map_err(other)?;
        }
        let mut sink = PostgresAuditSink {
            pool,
            instance: instance.to_owned(),
            connection: None,
            last_seq: None,
            started: false,
            unacknowledged: false,
        };
        sink.connection().await?;
        Ok(sink)
    }

    /// A connection holding the instance's lock.
    async fn connection(&mut self) -> io::Result<&mut PoolConnection<Postgres>> {
        if self.connection.is_none() {
            let mut connection = self.pool.acquire().await.map_err(other)?;
            let locked: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_lock(hashtextextended('tower-idempotency/audit/' || $1, 0))",
            )
            .bind(&self.instance)
            .fetch_one(&mut *connection)
            .await
            .map_err(other)?;
            if !locked {
                let held = format!(
                    "another writer holds the audit chain of instance `{}`",
                    self.instance
                );
                return Err(if self.started {
                    ChainTaken::error(format!("{held}: this writer's session ended"))
                } else {
                    io::Error::new(io::ErrorKind::WouldBlock, held)
                });
            }
            if self.started
                && let Some(last) = self.last_seq
            {
                // The lock was free again, but another writer may have held
                // it meanwhile: nothing may follow this writer's last row.
                let max: Option<i64> = sqlx::query_scalar(
                    "SELECT max(seq) FROM idempotency_audit WHERE instance = $1",
                )
                .bind(&self.instance)
                .fetch_one(&mut *connection)
                .await
                .map_err(other)?;
                if max.is_some_and(|max| max as u64 > last) && !self.unacknowledged {
                    return Err(ChainTaken::error(format!(
                        "the chain of `{}` goes on to seq {} after this writer's last row, seq {last}: another writer continued it while this writer's session was gone",
                        self.instance,
                        max.unwrap_or(0)
                    )));
                }
            }
            self.started = true;
            self.connection = Some(connection);
        }
        Ok(self.connection.as_mut().expect("set above"))
    }

    /// The chain of `instance`, as lines in order: for
    /// [`verify_lines`](super::verify_lines).
    pub async fn lines(pool: &PgPool, instance: &str) -> io::Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT line FROM idempotency_audit WHERE instance = $1 ORDER BY seq, checkpoint",
        )
        .bind(instance)
        .fetch_all(pool)
        .await
        .map_err(other)
    }

    async fn try_append(&mut self, lines: &[AuditLine]) -> io::Result<()> {
        let instance = self.instance.clone();
        let retry = self.unacknowledged;
        let connection = self.connection().await?;
        let mut tx = connection.begin().await.map_err(other)?;
        let seqs: Vec<i64> = lines
            .iter()
            .map(|l| i64::try_from(l.seq).unwrap_or(i64::MAX))
            .collect();
        let checkpoints: Vec<bool> = lines.iter().map(|l| l.checkpoint).collect();
        let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        let inserted = sqlx::query(
            "INSERT INTO idempotency_audit (instance, seq, checkpoint, line) \
             SELECT $1, s, c, l FROM UNNEST($2::bigint[], $3::boolean[], $4::text[]) AS t(s, c, l) \
             ON CONFLICT DO NOTHING RETURNING seq",
        )
        .bind(&instance)
        .bind(&seqs)
        .bind(&checkpoints)
        .bind(&texts)
        .fetch_all(&mut *tx)
        .await
        .map_err(other)?;
        if inserted.len() < lines.len() {
            // A batch retried after its commit was not acknowledged: the rows
            // there must be these very lines.
            let held: Vec<(i64, bool, String)> = sqlx::query(
                "SELECT a.seq, a.checkpoint, a.line FROM idempotency_audit a \
                 JOIN UNNEST($2::bigint[], $3::boolean[]) AS t(s, c) ON a.seq = t.s AND a.checkpoint = t.c \
                 WHERE a.instance = $1",
            )
            .bind(&instance)
            .bind(&seqs)
            .bind(&checkpoints)
            .fetch_all(&mut *tx)
            .await
            .map_err(other)?
            .into_iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
            for (seq, checkpoint, line) in held {
                let ours = lines
                    .iter()
                    .find(|l| l.seq as i64 == seq && l.checkpoint == checkpoint);
                // A retried batch holds the very same lines, checkpoints
                // included: any other row there was written by someone else.
                if ours.is_some_and(|l| l.text != line) {
                    return Err(ChainTaken::error(format!(
                        "the chain of `{instance}` already holds another {} at seq {seq}: a row this writer did not write (a second writer, or an INSERT by hand)",
                        if checkpoint { "checkpoint" } else { "entry" }
                    )));
                }
            }
        }
        let last = lines.last().map_or(0, |l| l.seq);
        if retry {
            // A retry: its batch may have committed, and another writer
            // continued after it while this one had no session.
            let max: Option<i64> =
                sqlx::query_scalar("SELECT max(seq) FROM idempotency_audit WHERE instance = $1")
                    .bind(&instance)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(other)?;
            if let Some(max) = max.filter(|max| *max as u64 > last) {
                return Err(ChainTaken::error(format!(
                    "the chain of `{instance}` goes on to seq {max} after this writer's batch, which ends at seq {last}: a row this writer did not write"
                )));
            }
        }
        tx.commit().await.map_err(other)?;
        self.last_seq = Some(last);
        Ok(())
    }
}

impl AuditSink for PostgresAuditSink {
    async fn tail(&mut self) -> io::Result<Vec<String>> {
        let instance = self.instance.clone();
        let connection = self.connection().await?;
        // The entries' rows run 1..N: a row inserted by hand at another seq
        // is no chain's end.
        let (count, max): (i64, Option<i64>) = sqlx::query_as(
            "SELECT count(*), max(seq) FROM idempotency_audit WHERE instance = $1 AND NOT checkpoint",
        )
        .bind(&instance)
        .fetch_one(&mut **connection)
        .await
        .map_err(other)?;
        if Some(count) != max && count > 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the chain of `{instance}` holds {count} entries, its last at seq {}: rows were inserted or removed by hand; check it before a writer continues it",
                    max.unwrap_or(0)
                ),
            ));
        }
        // From the entry before the one the last checkpoint signs.
        let rows: Vec<(i64, bool, String)> = sqlx::query_as(
            "SELECT seq, checkpoint, line FROM idempotency_audit WHERE instance = $1 AND seq >= \
             COALESCE((SELECT max(seq) FROM idempotency_audit WHERE instance = $1 AND checkpoint), 1) - 1 \
             ORDER BY seq, checkpoint",
        )
        .bind(&instance)
        .fetch_all(&mut **connection)
        .await
        .map_err(other)?;
        self.last_seq = Some(max.unwrap_or(0) as u64);
        rows.into_iter()
            .map(|(seq, checkpoint, line)| {
                // Each entry's row is at its own seq.
                let at = format!("\"seq\":{seq},");
                if !checkpoint && !line.contains(&at) {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("the chain of `{instance}` holds at seq {seq} an entry of another seq: a row inserted by hand"),
                    ));
                }
                Ok(line)
            })
            .collect()
    }

    async fn append(&mut self, lines: &[AuditLine]) -> io::Result<()> {
        let result = self.try_append(lines).await;
        self.unacknowledged = result.is_err();
        if result.is_err() {
            self.drop_connection().await;
        }
        result
    }

    /// An idle writer's check that its session, and with it its lock, is
    /// still there; a lost session is taken again, if no other writer
    /// took the chain meanwhile.
    async fn probe(&mut self) -> io::Result<()> {
        if let Some(connection) = self.connection.as_mut()
            && sqlx::query("SELECT 1")
                .execute(&mut **connection)
                .await
                .is_err()
        {
            self.drop_connection().await;
        }
        self.connection().await.map(drop)
    }

    async fn close(&mut self) -> io::Result<()> {
        let Some(mut connection) = self.connection.take() else {
            return Ok(());
        };
        sqlx::query(
            "SELECT pg_advisory_unlock(hashtextextended('tower-idempotency/audit/' || $1, 0))",
        )
        .bind(&self.instance)
        .execute(&mut *connection)
        .await
        .map_err(other)?;
        Ok(())
    }
}

impl PostgresAuditSink {
    /// Ends the locked session after an error: its lock may be gone with it,
    /// and a pooled session would keep it.
    async fn drop_connection(&mut self) {
        if let Some(connection) = self.connection.take() {
            let _ = connection.close().await;
        }
    }
}

impl Drop for PostgresAuditSink {
    fn drop(&mut self) {
        // Never back into the pool with the lock: the session ends instead.
        if let Some(connection) = self.connection.take() {
            drop(connection.detach());
        }
    }
}
