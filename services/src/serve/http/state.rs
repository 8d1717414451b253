//! What every handler may use: configuration, connections, the event store, the providers'
//! clients and the voice sessions' shared parts.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;

use crate::backbone::projector::LagBoard;
use crate::backbone::store::{Committed, EventStore};
use crate::config::Config;

/// Everything a handler may need.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub pool: PgPool,
    pub store: EventStore,
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub metrics: PrometheusHandle,
    pub projection_lag: LagBoard,
    pub elevenlabs: cmb_providers::elevenlabs::ElevenLabs,
    pub twilio: cmb_providers::twilio::Twilio,
    pub stripe: cmb_providers::stripe::Stripe,
    pub mailer: cmb_providers::email::Mailer,
    /// None: WorkOS sign-in is off (production without `WORKOS_API_KEY`).
    pub workos: Option<cmb_providers::workos::Workos>,
    pub voice: Arc<crate::serve::voice::Voice>,
    pub clock: crate::clock::Clock,
}

impl AppState {
    /// Waits for `projection` to show `committed` (bounded by `READ_YOUR_WRITES_MS`), so a
    /// client that reads right after writing sees its write. Returns whether it did: when it
    /// did not, a handler answers with what the command itself produced.
    pub async fn read_your_writes(&self, projection: &str, committed: &Committed) -> bool {
        if committed.events == 0 {
            return true;
        }
        let bound: Duration = self.config.read_your_writes;
        self.store
            .wait_projected(projection, committed, bound)
            .await
    }
}
