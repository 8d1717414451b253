//! Fires scheduled calls when their time comes: a singleton under the `scheduler` lease, on
//! any instance. Firing is a command on the call, which does it once however often it is asked
//! (a restart, a second instance that briefly thinks it holds the lease), and the dialer takes
//! it from the stream.

use std::time::Duration;

use cmb_domain::call::{Call, CallCommand};
use cmb_domain::{Actor, CommandContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backbone::lease::Lease;
use crate::backbone::store::EventStore;
use crate::clock::Clock;

pub const LEASE: &str = "scheduler";

pub struct Scheduler {
    pub pool: PgPool,
    pub store: EventStore,
    pub clock: Clock,
    pub instance_id: String,
    pub lease_ttl: Duration,
    pub tick: Duration,
    /// A call found due later than this after its time (the service was down) expires.
    pub grace: Duration,
}

impl Scheduler {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut lease = Lease::new(LEASE, &self.instance_id, self.lease_ttl);
        while !shutdown.is_cancelled() {
            match lease.ensure(&self.pool).await {
                Ok(true) => {
                    if let Err(e) = self.fire_due().await {
                        tracing::warn!(error = %e, "scheduler tick failed");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "scheduler lease check failed"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(self.tick) => {}
            }
        }
        lease.release(&self.pool).await;
    }

    /// Fires every call whose time has come. Returns how many were fired.
    pub async fn fire_due(&self) -> anyhow::Result<usize> {
        let now = self.clock.now();
        let due = cmb_projections::calls::due(&self.pool, now, 500).await?;
        let ctx = CommandContext::for_request(
            uuid::Uuid::new_v4().to_string(),
            Actor::Worker(LEASE.into()),
        );
        let mut fired = 0;
        let grace = chrono::Duration::from_std(self.grace).unwrap_or_default();
        for (id, when) in due {
            let command = if now - when > grace {
                tracing::warn!(call = %id, %when, "scheduled call expired: its time passed while the service was down");
                CallCommand::Expire { at: now }
            } else {
                CallCommand::Fire { at: now }
            };
            match self.store.execute::<Call>(&id, command, &ctx).await {
                Ok(c) if c.events > 0 => {
                    fired += 1;
                    tracing::info!(call = %id, "scheduled call fired");
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(call = %id, error = %e, "could not fire a scheduled call"),
            }
        }
        Ok(fired)
    }
}
