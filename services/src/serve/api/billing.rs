//! Money with Stripe: the user's cards, payment intents that hold a call's maximum price,
//! credit packs, and Stripe's webhooks (the flows are in `usecases::billing`).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use cmb_domain::billing::{Card, RecordStripeEvent};
use cmb_domain::call::{MAX_MINUTES, MIN_MINUTES};
use cmb_domain::wallet::{Wallet, CENTS_PER_CREDIT};
use cmb_domain::{Actor, CommandContext};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::{request_id, Json};
use crate::serve::http::ratelimit;
use crate::serve::http::state::AppState;
use crate::usecases::billing::{self, CURRENCY, PACKS};
use crate::usecases::prices;

fn card_json(card: &Card, default: Option<&str>) -> serde_json::Value {
    json!({
        "id": card.payment_method_id,
        "brand": card.brand,
        "last4": card.last4,
        "exp_month": card.exp_month,
        "exp_year": card.exp_year,
        "is_default": Some(card.payment_method_id.as_str()) == default,
    })
}

pub async fn billing(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(&state.pool, ratelimit::USAGE, &format!("user:{}", user.id)).await?;
    let b = billing::load(&state.store, user.id).await?;
    let (wallet, _) = state.store.load::<Wallet>(&user.id.to_string()).await?;
    let methods: Vec<_> = b
        .cards
        .iter()
        .map(|c| card_json(c, b.default_card.as_deref()))
        .collect();
    Ok(axum::Json(json!({
        "payment_methods": methods,
        "default_payment_method": b.default_card,
        "credits": { "balance": wallet.balance, "available": wallet.available(), "cents_per_credit": CENTS_PER_CREDIT },
        "currency": CURRENCY,
    })))
}

#[derive(Deserialize)]
pub struct AttachBody {
    payment_method_id: String,
    #[serde(default)]
    set_default: bool,
}

pub async fn attach(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<AttachBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    let pm = body.payment_method_id.trim();
    if !pm.starts_with("pm_") || pm.len() > 100 {
        return Err(ApiError::validation(
            "payment_method_id",
            "payment_method_id: a Stripe pm_… id",
        ));
    }
    let (card, default) = billing::attach_card(
        &state.store,
        &state.stripe,
        user.id,
        pm,
        body.set_default,
        &user.context(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "payment_method": card_json(&card, default.as_deref()) })),
    ))
}

pub async fn detach(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    billing::detach_card(&state.store, &state.stripe, user.id, &id, &user.context()).await?;
    Ok(axum::Json(json!({ "message": "payment method removed" })))
}

pub async fn make_default(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    billing::make_default(&state.store, &state.stripe, user.id, &id, &user.context()).await?;
    Ok(axum::Json(json!({ "default_payment_method": id })))
}

/// The Stripe idempotency key of a client request: the client's own key (so its retry returns
/// the same intent), scoped to the user, or a new one.
fn idempotency_key(purpose: &str, user: &AuthUser, supplied: Option<&str>) -> String {
    match supplied {
        Some(k) if !k.is_empty() && k.len() <= 100 => format!("{purpose}-{}-{k}", user.id),
        _ => format!("{purpose}-{}", Uuid::now_v7()),
    }
}

#[derive(Deserialize)]
pub struct IntentBody {
    estimated_duration: u32,
    /// Makes a retried request return the same intent (defaults to a new one each time).
    idempotency_key: Option<String>,
}

pub async fn create_payment_intent(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<IntentBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    let minutes = body.estimated_duration;
    if !(MIN_MINUTES..=MAX_MINUTES).contains(&minutes) {
        return Err(ApiError::validation(
            "estimated_duration",
            format!("estimated_duration: {MIN_MINUTES} to {MAX_MINUTES} minutes"),
        ));
    }
    let prices = prices::current(&state.store, state.clock.now()).await?;
    let amount = prices.max_price(minutes).0;
    let key = idempotency_key("hold", &user, body.idempotency_key.as_deref());
    let intent = billing::authorise_call(
        &state.store,
        &state.stripe,
        user.id,
        minutes,
        amount,
        &key,
        &user.context(),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({
            "payment_intent_id": intent.id,
            "amount": intent.amount,
            "currency": CURRENCY,
            "status": intent.status,
            "max_duration_minutes": minutes,
        })),
    ))
}

#[derive(Deserialize)]
pub struct CreditsBody {
    credits: i64,
    idempotency_key: Option<String>,
}

/// Buys a credit pack at once with the default card.
pub async fn buy_credits(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CreditsBody>,
) -> ApiResult<impl IntoResponse> {
    ratelimit::check(
        &state.pool,
        ratelimit::PROFILE,
        &format!("user:{}", user.id),
    )
    .await?;
    if !PACKS.contains(&body.credits) {
        return Err(ApiError::validation(
            "credits",
            format!("credits: one of the packs {PACKS:?}"),
        ));
    }
    let key = idempotency_key("credits", &user, body.idempotency_key.as_deref());
    let bought = billing::buy_credits(
        &state.store,
        &state.stripe,
        user.id,
        body.credits,
        &key,
        &user.context(),
    )
    .await?;
    state.read_your_writes("wallets", &bought.committed).await;
    let (wallet, _) = state.store.load::<Wallet>(&user.id.to_string()).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({ "payment_intent_id": bought.payment_intent_id, "amount": bought.amount, "credits": body.credits, "balance": wallet.balance }),
        ),
    ))
}

/// Stripe's webhooks: verified (signature, 300 s tolerance), then recorded once per event id.
pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let event = cmb_providers::stripe::verify_webhook(
        state.config.stripe.webhook_secret.expose(),
        &body,
        header,
        chrono::Utc::now().timestamp(),
        300,
    )
    .map_err(|e| {
        metrics::counter!("cmb_webhooks_refused_total", "source" => "stripe").increment(1);
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_signature", e.to_string())
    })?;
    const KINDS: &[&str] = &[
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_intent.canceled",
        "payment_intent.amount_capturable_updated",
        "payment_method.attached",
        "payment_method.detached",
        "charge.refunded",
    ];
    if !KINDS.contains(&event.kind.as_str()) {
        return Ok(axum::Json(json!({ "received": true, "recorded": false })));
    }
    let object = &event.object;
    let summary = json!({
        "amount": object.get("amount"),
        "amount_received": object.get("amount_received"),
        "amount_refunded": object.get("amount_refunded"),
        "status": object.get("status"),
        "customer": object.get("customer"),
        "payment_intent": object.get("payment_intent"),
        "metadata": object.get("metadata"),
    });
    let ctx = CommandContext::for_request(request_id(&headers), Actor::Webhook("stripe".into()));
    let command = RecordStripeEvent {
        kind: event.kind.clone(),
        object_id: object
            .get("id")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_string(),
        created: event.created,
        summary,
    };
    let recorded = billing::record_stripe_event(&state.store, &event.id, command, &ctx).await?;
    Ok(axum::Json(
        json!({ "received": true, "recorded": recorded }),
    ))
}
