//! Calls by their Twilio CallSid, read from the event log (`CallPlaced`), never from a read
//! model that may lag: a webhook or media stream that lacks our call id, and the dialer telling
//! the call it lost in a crash from other calls to the same number.

use cmb_domain::CallId;
use sqlx::PgPool;

/// The call Twilio knows as `call_sid`.
pub async fn call_of(pool: &PgPool, call_sid: &str) -> Result<Option<CallId>, sqlx::Error> {
    let id: Option<String> = sqlx::query_scalar(
        "SELECT aggregate_id FROM events
          WHERE aggregate_type = 'call' AND event_type = 'CallPlaced'
            AND payload -> 'CallPlaced' ->> 'call_sid' = $1
          LIMIT 1",
    )
    .bind(call_sid)
    .fetch_optional(pool)
    .await?;
    Ok(id.and_then(|id| id.parse().ok()))
}

/// Which of `sids` already belong to a call other than `except`.
pub async fn taken_by_others(
    pool: &PgPool,
    sids: &[String],
    except: CallId,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT payload -> 'CallPlaced' ->> 'call_sid' FROM events
          WHERE aggregate_type = 'call' AND event_type = 'CallPlaced'
            AND payload -> 'CallPlaced' ->> 'call_sid' = ANY($1)
            AND aggregate_id <> $2",
    )
    .bind(sids)
    .bind(except.to_string())
    .fetch_all(pool)
    .await
}
