//! Fires scheduled calls when their time comes: a singleton under the `scheduler` lease, on
//! any instance. Firing is a command on the call, which does it once however often it is asked
//! (a restart, a second instance that briefly thinks it holds the lease), and the dialer takes
//! it from the stream.
//!
//! The same singleton watches placed calls that have gone quiet: Twilio posts each status
//! callback once, so one lost on its way (the instance it reached died mid-request) would
//! leave a call open forever, its hold never settled. A call with no news for
//! [`QUIET_FOR`] is looked up on Twilio's REST API, and an end found there is recorded as the
//! callback would have (the call aggregate ignores it if the callback arrived after all).

use std::time::Duration;

use cmb_domain::call::{Call, CallCommand, Status};
use cmb_domain::{Actor, CommandContext};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::backbone::lease::{run_singleton, Lease};
use crate::backbone::store::EventStore;
use crate::clock::Clock;

pub const LEASE: &str = "scheduler";

/// A placed call with no status change for this long is looked up on Twilio.
pub const QUIET_FOR: Duration = Duration::from_secs(45);
/// How often quiet calls are looked up (each at most once per sweep).
pub const SWEEP_EVERY: Duration = Duration::from_secs(20);

pub struct Scheduler {
    pub pool: PgPool,
    pub store: EventStore,
    pub clock: Clock,
    pub instance_id: String,
    pub lease_ttl: Duration,
    pub tick: Duration,
    /// A call found due later than this after its time (the service was down) expires.
    pub grace: Duration,
    pub twilio: cmb_providers::twilio::Twilio,
}

impl Scheduler {
    pub async fn run(self, shutdown: CancellationToken) {
        let lease = Lease::new(LEASE, &self.instance_id, self.lease_ttl);
        let last_sweep = std::sync::Mutex::new(std::time::Instant::now());
        run_singleton(&self.pool, lease, self.tick, shutdown, || async {
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "scheduler tick failed");
            }
            let sweep = {
                let mut last = last_sweep.lock().unwrap_or_else(|p| p.into_inner());
                let due = last.elapsed() >= SWEEP_EVERY;
                if due {
                    *last = std::time::Instant::now();
                }
                due
            };
            if sweep {
                if let Err(e) = self.end_quiet_calls().await {
                    tracing::warn!(error = %e, "quiet calls sweep failed");
                }
            }
        })
        .await
    }

    /// Fires every call whose time has come. Returns how many were fired.
    pub async fn fire_due(&self) -> Result<usize, sqlx::Error> {
        let now = self.clock.now();
        let due = crate::usecases::calls::ledger::due(&self.pool, now, 500).await?;
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
            match self
                .store
                .execute::<Call>(&id.to_string(), command, &ctx)
                .await
            {
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

    /// Looks up placed calls that have gone quiet on Twilio and records the end of those that
    /// ended there. Returns how many ends were recorded.
    pub async fn end_quiet_calls(&self) -> Result<usize, sqlx::Error> {
        let quiet_since =
            self.clock.now() - chrono::Duration::from_std(QUIET_FOR).unwrap_or_default();
        let quiet = cmb_projections::calls::unfinished(&self.pool, quiet_since, 200).await?;
        let ctx = CommandContext::for_request(
            uuid::Uuid::new_v4().to_string(),
            Actor::Worker(LEASE.into()),
        );
        let mut ended = 0;
        for (id, sid) in quiet {
            let resource = match self.twilio.fetch_call(&sid).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    tracing::warn!(call = %id, %sid, "quiet call unknown to Twilio");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(call = %id, %sid, error = %e, "looking up a quiet call failed");
                    continue;
                }
            };
            let Some(status) = Status::from_twilio(&resource.status) else {
                continue;
            };
            if !status.is_final() {
                continue;
            }
            let command = CallCommand::RecordStatus {
                call_sid: sid.clone(),
                status,
                sequence: None,
                duration_secs: resource.duration.as_deref().and_then(|d| d.parse().ok()),
                at: self.clock.now(),
            };
            match self
                .store
                .execute::<Call>(&id.to_string(), command, &ctx)
                .await
            {
                Ok(c) if c.events > 0 => {
                    ended += 1;
                    metrics::counter!("cmb_calls_ended_by_sweep_total").increment(1);
                    tracing::warn!(call = %id, %sid, status = %resource.status, "call ended on Twilio without a callback reaching us; recorded");
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(call = %id, error = %e, "could not record a quiet call's end")
                }
            }
        }
        Ok(ended)
    }
}
