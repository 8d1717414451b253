//! Every event's place in its aggregate's story: what happened, when, and who caused it.

use async_trait::async_trait;
use cmb_domain::EventEnvelope;
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::Projection;

pub struct Timeline;

#[async_trait]
impl Projection for Timeline {
    fn name(&self) -> &'static str {
        "timeline"
    }
    fn tables(&self) -> &'static [&'static str] {
        &["rm_timeline"]
    }
    fn aggregate_types(&self) -> &'static [&'static str] {
        &[]
    }
    async fn apply(&self, db: &mut PgConnection, e: &EventEnvelope) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO rm_timeline (aggregate_type, aggregate_id, sequence, event_type, occurred_at,
                                      actor, request_id, correlation_id, causation_id)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT DO NOTHING",
        )
        .bind(&e.aggregate_type)
        .bind(&e.aggregate_id)
        .bind(e.sequence as i64)
        .bind(&e.event_type)
        .bind(e.occurred_at)
        .bind(&e.metadata.actor)
        .bind(&e.metadata.request_id)
        .bind(&e.metadata.correlation_id)
        .bind(&e.metadata.causation_id)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// One line of a timeline.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Entry {
    pub sequence: i64,
    pub event_type: String,
    pub occurred_at: chrono::DateTime<chrono::Utc>,
    pub actor: String,
    pub correlation_id: String,
    pub causation_id: String,
}

/// An aggregate's events in order.
pub async fn of(
    pool: &PgPool,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<Vec<Entry>, sqlx::Error> {
    sqlx::query_as(
        "SELECT sequence, event_type, occurred_at, actor, correlation_id, causation_id
           FROM rm_timeline WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence",
    )
    .bind(aggregate_type)
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
}
