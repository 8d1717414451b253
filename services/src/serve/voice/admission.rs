//! Who may open a voice session. The upgrade itself is signed by Twilio (checked by the route);
//! here the stream must name its call with the token our answer TwiML gave Twilio (`tokens`):
//! signed with a server secret, bound to the call id and the CallSid, short-lived and used once
//! (recorded in Postgres, so whichever instance a replay reaches refuses it). The call must be
//! answered, its recorded CallSid the one in `start`, and have no live session on any instance
//! (`voice_sessions`). Tables: `media_stream_tokens`, `voice_sessions` (this module only).

use std::collections::BTreeMap;

use cmb_domain::call::{Call, Status};
use cmb_domain::CallId;
use sqlx::PgPool;
use uuid::Uuid;

use super::error::SessionError;
use super::shared::Voice;
use super::tokens::{Refusal, TokenClaims, CALL_PARAMETER, TOKEN_PARAMETER};

/// A stream let in: the call, its recorded CallSid (the only one the session uses, e.g. to
/// hang up) and the live-session row it holds until `release`.
#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) call_id: CallId,
    pub(super) call_sid: String,
    pub(super) session_id: Uuid,
}

/// Decides on a stream's `start`: its CallSid and custom parameters.
pub(super) async fn admit(
    voice: &Voice,
    start_call_sid: &str,
    params: &BTreeMap<String, String>,
) -> Result<Result<Admitted, Refusal>, SessionError> {
    let Some(token) = params.get(TOKEN_PARAMETER) else {
        return Ok(Err(Refusal::NoToken));
    };
    let claims = match voice.stream_tokens.check(token, voice.clock.now()) {
        Ok(c) => c,
        Err(r) => return Ok(Err(r)),
    };
    let named = params.get(CALL_PARAMETER).map(|id| id.parse::<CallId>());
    if matches!(named, Some(Err(_))) || matches!(named, Some(Ok(id)) if id != claims.call_id) {
        return Ok(Err(Refusal::OtherCall));
    }
    if claims.call_sid != start_call_sid {
        return Ok(Err(Refusal::OtherCall));
    }
    let (call, _) = voice
        .store
        .load::<Call>(&claims.call_id.to_string())
        .await?;
    if call.call_sid.as_deref() != Some(start_call_sid) {
        return Ok(Err(Refusal::OtherCall));
    }
    if call.status != Some(Status::InProgress) {
        let status = call.status.map_or("unknown", |s| s.as_str());
        return Ok(Err(Refusal::NotAnswered(status.to_string())));
    }
    if call.session_ended {
        return Ok(Err(Refusal::SessionOver));
    }
    let pool = voice.store.pool();
    if !use_token(pool, &claims).await? {
        return Ok(Err(Refusal::Replayed));
    }
    let session_id = Uuid::new_v4();
    // The row outlives a dead instance only until the paid duration is over.
    let lasts = i64::from(call.max_minutes.max(1)) * 60 + 120;
    if !claim(pool, claims.call_id, session_id, lasts).await? {
        return Ok(Err(Refusal::SessionLive));
    }
    Ok(Ok(Admitted {
        call_id: claims.call_id,
        call_sid: start_call_sid.to_string(),
        session_id,
    }))
}

/// Records the token's one use; false when it was used already (on any instance).
async fn use_token(pool: &PgPool, claims: &TokenClaims) -> Result<bool, sqlx::Error> {
    // Expired tokens are refused before they get here: their rows can go.
    sqlx::query("DELETE FROM media_stream_tokens WHERE expires_at < now() - interval '1 hour'")
        .execute(pool)
        .await?;
    let done = sqlx::query(
        "INSERT INTO media_stream_tokens (nonce, call_id, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (nonce) DO NOTHING",
    )
    .bind(claims.nonce)
    .bind(claims.call_id.uuid())
    .bind(claims.expires_at)
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Takes the call's live-session row; false when another session holds it.
async fn claim(
    pool: &PgPool,
    call_id: CallId,
    session_id: Uuid,
    lasts_secs: i64,
) -> Result<bool, sqlx::Error> {
    let got: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO voice_sessions (call_id, session_id, expires_at)
         VALUES ($1, $2, now() + make_interval(secs => $3))
         ON CONFLICT (call_id) DO UPDATE
            SET session_id = EXCLUDED.session_id, started_at = now(),
                expires_at = EXCLUDED.expires_at
          WHERE voice_sessions.expires_at < now()
         RETURNING session_id",
    )
    .bind(call_id.uuid())
    .bind(session_id)
    .bind(lasts_secs as f64)
    .fetch_optional(pool)
    .await?;
    Ok(got == Some(session_id))
}

/// Gives the call's live-session row back (only the session that holds it can).
pub(super) async fn release(pool: &PgPool, admitted: &Admitted) {
    let done = sqlx::query("DELETE FROM voice_sessions WHERE call_id = $1 AND session_id = $2")
        .bind(admitted.call_id.uuid())
        .bind(admitted.session_id)
        .execute(pool)
        .await;
    if let Err(e) = done {
        tracing::warn!(call = %admitted.call_id, error = %e, "releasing the voice session failed");
    }
}
