//! Gives back what a call request that died midway left held: a singleton under the
//! `request-sweeper` lease, on any instance, running `usecases::calls::journal::sweep` over
//! requests left open past the grace period.

use std::time::Duration;

use cmb_domain::{Actor, CommandContext};
use cmb_providers::stripe::Stripe;
use tokio_util::sync::CancellationToken;

use crate::backbone::lease::{run_singleton, Lease};
use crate::backbone::store::EventStore;
use crate::usecases::calls::journal;

pub const LEASE: &str = "request-sweeper";

pub struct Sweeper {
    pub store: EventStore,
    pub stripe: Stripe,
    pub instance_id: String,
    pub lease_ttl: Duration,
    /// A request still open this long after it started died midway.
    pub grace: Duration,
}

impl Sweeper {
    pub async fn run(self, shutdown: CancellationToken) {
        let pool = self.store.pool().clone();
        let lease = Lease::new(LEASE, &self.instance_id, self.lease_ttl);
        // Often enough that nothing stays held much past the grace period.
        let every = (self.grace / 4).clamp(Duration::from_millis(500), Duration::from_secs(30));
        run_singleton(&pool, lease, every, shutdown, || async {
            let ctx = CommandContext::for_request(
                uuid::Uuid::new_v4().to_string(),
                Actor::Worker(LEASE.into()),
            );
            match journal::sweep(&self.store, &self.stripe, self.grace, &ctx).await {
                Ok(s) if s.released > 0 || s.completed > 0 => {
                    tracing::info!(
                        released = s.released,
                        completed = s.completed,
                        "requests swept"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "request sweep failed"),
            }
        })
        .await
    }
}
