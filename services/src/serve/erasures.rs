//! Finishes erasures interrupted midway (a crash after `UserErased`, Stripe unreachable): a
//! singleton under the `erasures` lease, on any instance, running
//! `usecases::accounts::erasure::resume` over the `erasures` rows that are due — on start (an
//! erasure cut off by the last shutdown or crash), then every `ERASURE_RETRY_MS / 2`.

use std::time::Duration;

use cmb_domain::{Actor, CommandContext};
use cmb_providers::stripe::Stripe;
use tokio_util::sync::CancellationToken;

use crate::backbone::lease::{run_singleton, Lease};
use crate::backbone::store::EventStore;
use crate::usecases::accounts::erasure;

pub const LEASE: &str = "erasures";

/// Erasures taken up per round.
const BATCH: i64 = 50;

pub struct Erasures {
    pub store: EventStore,
    pub stripe: Stripe,
    pub instance_id: String,
    pub lease_ttl: Duration,
    /// `ERASURE_RETRY_MS`.
    pub retry: Duration,
}

impl Erasures {
    pub async fn run(self, shutdown: CancellationToken) {
        let pool = self.store.pool().clone();
        let lease = Lease::new(LEASE, &self.instance_id, self.lease_ttl);
        let every = (self.retry / 2).clamp(Duration::from_millis(250), Duration::from_secs(30));
        run_singleton(&pool, lease, every, shutdown, || async {
            let ctx = CommandContext::for_request(
                uuid::Uuid::new_v4().to_string(),
                Actor::Worker(LEASE.into()),
            );
            match erasure::resume(&self.store, &self.stripe, self.retry, BATCH, &ctx).await {
                Ok((0, 0)) => {}
                Ok((finished, failing)) => tracing::info!(finished, failing, "erasures taken up"),
                Err(e) => tracing::warn!(error = %e, "erasures round failed"),
            }
        })
        .await
    }
}
