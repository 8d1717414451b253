//! Leases in Postgres for the singletons (publisher, scheduler): one holder at a time, and a
//! holder that dies (or stalls past the TTL) loses it to the next instance that asks.
//!
//! A lease is advisory: work done under it must stay correct if a stalled former holder still
//! runs for a moment (the publisher is, through `Nats-Msg-Id` de-duplication).
//!
//! [`run_singleton`] is the loop of the periodic singletons (scheduler, request sweeper,
//! erasures): a round every so often while the lease is held, the lease given up on shutdown.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub struct Lease {
    name: String,
    holder: String,
    ttl: Duration,
    held_until: Option<Instant>,
    last_renewed: Option<Instant>,
}

impl Lease {
    pub fn new(name: impl Into<String>, holder: impl Into<String>, ttl: Duration) -> Self {
        Lease {
            name: name.into(),
            holder: holder.into(),
            ttl,
            held_until: None,
            last_renewed: None,
        }
    }

    /// Whether this instance holds the lease now (by its own conservative clock).
    pub fn is_held(&self) -> bool {
        self.held_until.is_some_and(|t| Instant::now() < t)
    }

    /// Acquires the lease if it is free or expired, renews it if held and a third of its TTL
    /// has passed. Returns whether it is held afterwards.
    pub async fn ensure(&mut self, pool: &PgPool) -> Result<bool, sqlx::Error> {
        let due = self
            .last_renewed
            .is_none_or(|t| t.elapsed() >= self.ttl / 3);
        if self.is_held() && !due {
            return Ok(true);
        }
        let asked_at = Instant::now();
        let got: Option<String> = sqlx::query_scalar(
            "INSERT INTO leases (name, holder, acquired_at, expires_at)
             VALUES ($1, $2, now(), now() + make_interval(secs => $3))
             ON CONFLICT (name) DO UPDATE
                SET holder = EXCLUDED.holder,
                    expires_at = EXCLUDED.expires_at,
                    acquired_at = CASE WHEN leases.holder = EXCLUDED.holder
                                       THEN leases.acquired_at ELSE now() END
              WHERE leases.holder = EXCLUDED.holder OR leases.expires_at < now()
             RETURNING holder",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(self.ttl.as_secs_f64())
        .fetch_optional(pool)
        .await?;
        let was_held = self.is_held();
        if got.is_some() {
            self.held_until = Some(asked_at + self.ttl);
            self.last_renewed = Some(asked_at);
            if !was_held {
                tracing::info!(lease = %self.name, holder = %self.holder, "lease acquired");
            }
        } else {
            if was_held {
                tracing::warn!(lease = %self.name, "lease lost");
            }
            self.held_until = None;
        }
        Ok(self.is_held())
    }

    /// Gives the lease up so another instance can take over at once.
    pub async fn release(&mut self, pool: &PgPool) {
        self.held_until = None;
        let _ = sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(&self.name)
            .bind(&self.holder)
            .execute(pool)
            .await;
    }
}

/// Runs `round` every `every` on whichever instance holds the lease `name` (asked for, and
/// renewed, before each round), until `shutdown`; then gives the lease up. A round's own
/// failures are its to log; a failed lease check is logged here and the round skipped.
pub async fn run_singleton<F, Fut>(
    pool: &PgPool,
    mut lease: Lease,
    every: Duration,
    shutdown: CancellationToken,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while !shutdown.is_cancelled() {
        match lease.ensure(pool).await {
            Ok(true) => round().await,
            Ok(false) => {}
            Err(e) => tracing::warn!(lease = %lease.name, error = %e, "lease check failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep(every) => {}
        }
    }
    lease.release(pool).await;
}
