//! Money with Stripe: the user's customer and cards, payment intents that hold a call's
//! maximum price, credit packs, and Stripe's webhooks. Every Stripe write carries an
//! `Idempotency-Key` derived from what it is for, so a retry never charges twice.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use cmb_domain::billing::{
    Billing, BillingCommand, BillingError, Card, RecordStripeEvent, StripeEvent,
};
use cmb_domain::call::{MAX_MINUTES, MIN_MINUTES};
use cmb_domain::user::User;
use cmb_domain::wallet::{Wallet, WalletCommand, CENTS_PER_CREDIT};
use cmb_domain::{Actor, CommandContext};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::store_error;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult};
use crate::serve::http::extract::Json;
use crate::serve::http::ratelimit;
use crate::serve::http::AppState;
use cmb_providers::stripe::{CreatePaymentIntent, StripeError};

/// Credit packs on sale: credits and their price in cents (1 credit = 5¢).
pub const PACKS: &[i64] = &[100, 500, 1000];
pub const CURRENCY: &str = "usd";

pub fn stripe_error(e: StripeError) -> ApiError {
    match e {
        StripeError::Card(card) => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "card_declined",
            format!(
                "the card was declined: {}",
                card.decline_code.as_deref().unwrap_or(&card.code)
            ),
        ),
        StripeError::InvalidRequest {
            status, message, ..
        } if status == 404 || status == 400 => ApiError::validation("payment_method_id", message),
        StripeError::InvalidRequest { message, .. } => ApiError::internal(message),
        StripeError::Unreachable(detail) => {
            tracing::warn!(%detail, "Stripe unreachable");
            ApiError {
                retry_after: Some(5),
                ..ApiError::unavailable("payments are unavailable for a moment; try again")
            }
        }
    }
}

fn billing_rejected(e: BillingError) -> ApiError {
    match e {
        BillingError::UnknownCard => ApiError::not_found("payment method"),
        BillingError::DefaultCard => ApiError::new(
            StatusCode::BAD_REQUEST,
            "default_payment_method",
            e.to_string(),
        ),
        BillingError::UnknownAuthorization => ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "payment_intent_invalid",
            e.to_string(),
        )
        .with_field("payment_intent_id"),
        BillingError::AuthorizationUsed | BillingError::AuthorizationTooSmall { .. } => {
            ApiError::new(
                StatusCode::PAYMENT_REQUIRED,
                "payment_intent_insufficient",
                e.to_string(),
            )
            .with_field("payment_intent_id")
        }
    }
}

pub async fn load(state: &AppState, user: Uuid) -> ApiResult<Billing> {
    let (billing, _) = state
        .store
        .load::<Billing>(&user.to_string())
        .await
        .map_err(|e| store_error(e, billing_rejected))?;
    Ok(billing)
}

pub async fn record(state: &AppState, user: &AuthUser, command: BillingCommand) -> ApiResult<()> {
    state
        .store
        .execute::<Billing>(&user.id.to_string(), command, &user.context())
        .await
        .map(|_| ())
        .map_err(|e| store_error(e, billing_rejected))
}

/// The user's Stripe customer, created (once: the key is the user id) when first needed.
async fn customer(state: &AppState, user: &AuthUser) -> ApiResult<String> {
    if let Some(id) = load(state, user.id).await?.customer_id {
        return Ok(id);
    }
    let (me, _) = state
        .store
        .load::<User>(&user.id.to_string())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    let email = me.email.map(|e| e.to_string()).unwrap_or_default();
    let created = state
        .stripe
        .create_customer(
            &email,
            &me.name,
            &user.id.to_string(),
            &format!("customer-{}", user.id),
        )
        .await
        .map_err(stripe_error)?;
    record(
        state,
        user,
        BillingCommand::RecordCustomer {
            customer_id: created.id.clone(),
        },
    )
    .await?;
    Ok(load(state, user.id)
        .await?
        .customer_id
        .unwrap_or(created.id))
}

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
    let b = load(&state, user.id).await?;
    let (wallet, _) = state
        .store
        .load::<Wallet>(&user.id.to_string())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
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
    let customer = customer(&state, &user).await?;
    let attached = state
        .stripe
        .attach_payment_method(pm, &customer)
        .await
        .map_err(stripe_error)?;
    let make_default = body.set_default || load(&state, user.id).await?.default_card.is_none();
    if make_default {
        state
            .stripe
            .set_default_payment_method(&customer, &attached.id)
            .await
            .map_err(stripe_error)?;
    }
    let card = Card {
        payment_method_id: attached.id.clone(),
        brand: attached.brand,
        last4: attached.last4,
        exp_month: attached.exp_month,
        exp_year: attached.exp_year,
    };
    record(
        &state,
        &user,
        BillingCommand::AttachCard {
            card: card.clone(),
            make_default,
        },
    )
    .await?;
    let b = load(&state, user.id).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({ "payment_method": card_json(&card, b.default_card.as_deref()) })),
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
    let b = load(&state, user.id).await?;
    if !b.cards.iter().any(|c| c.payment_method_id == id) {
        return Err(ApiError::not_found("payment method"));
    }
    if b.default_card.as_deref() == Some(id.as_str()) {
        return Err(billing_rejected(BillingError::DefaultCard));
    }
    state
        .stripe
        .detach_payment_method(&id)
        .await
        .map_err(stripe_error)?;
    record(
        &state,
        &user,
        BillingCommand::DetachCard {
            payment_method_id: id,
        },
    )
    .await?;
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
    let b = load(&state, user.id).await?;
    let customer = b
        .customer_id
        .clone()
        .ok_or_else(|| ApiError::not_found("payment method"))?;
    if !b.cards.iter().any(|c| c.payment_method_id == id) {
        return Err(ApiError::not_found("payment method"));
    }
    state
        .stripe
        .set_default_payment_method(&customer, &id)
        .await
        .map_err(stripe_error)?;
    record(
        &state,
        &user,
        BillingCommand::SetDefault {
            payment_method_id: id.clone(),
        },
    )
    .await?;
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

/// Customer and default card, or 400 when there is none.
async fn chargeable(state: &AppState, user: &AuthUser) -> ApiResult<(String, String)> {
    let b = load(state, user.id).await?;
    match (b.customer_id, b.default_card) {
        (Some(c), Some(pm)) => Ok((c, pm)),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "no_payment_method",
            "add a payment method first (POST /api/user/payment-method)",
        )),
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
    let prices = super::calls::current_prices(&state).await?;
    let amount = prices.max_price(minutes).0;
    let (customer, pm) = chargeable(&state, &user).await?;
    let key = idempotency_key("hold", &user, body.idempotency_key.as_deref());
    let intent = state
        .stripe
        .create_payment_intent(
            &CreatePaymentIntent {
                amount,
                currency: CURRENCY.into(),
                customer,
                payment_method: pm,
                manual_capture: true,
                metadata: vec![
                    ("user_id".into(), user.id.to_string()),
                    ("minutes".into(), minutes.to_string()),
                ],
                description: Some(format!("Call Me Back: a call of up to {minutes} minutes")),
            },
            &key,
        )
        .await
        .map_err(stripe_error)?;
    if intent.status != "requires_capture" {
        let reason = intent
            .last_payment_error
            .map(|e| e.to_string())
            .unwrap_or_else(|| intent.status.clone());
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "card_declined",
            format!("the card was not authorised: {reason}"),
        ));
    }
    record(
        &state,
        &user,
        BillingCommand::RecordAuthorization {
            payment_intent_id: intent.id.clone(),
            amount_cents: intent.amount,
        },
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
    let (customer, pm) = chargeable(&state, &user).await?;
    let key = idempotency_key("credits", &user, body.idempotency_key.as_deref());
    let amount = body.credits * CENTS_PER_CREDIT;
    let intent = state
        .stripe
        .create_payment_intent(
            &CreatePaymentIntent {
                amount,
                currency: CURRENCY.into(),
                customer,
                payment_method: pm,
                manual_capture: false,
                metadata: vec![
                    ("user_id".into(), user.id.to_string()),
                    ("credits".into(), body.credits.to_string()),
                ],
                description: Some(format!("Call Me Back: {} credits", body.credits)),
            },
            &key,
        )
        .await
        .map_err(stripe_error)?;
    if intent.status != "succeeded" {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "card_declined",
            format!("the payment did not go through ({})", intent.status),
        ));
    }
    // Once per payment intent, whatever is retried.
    let grant = WalletCommand::Grant {
        credits: body.credits,
        reason: "credit pack".into(),
        reference: intent.id.clone(),
    };
    let committed = state
        .store
        .execute::<Wallet>(&user.id.to_string(), grant, &user.context())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    super::settle(&state, "wallets", &committed).await;
    let (wallet, _) = state
        .store
        .load::<Wallet>(&user.id.to_string())
        .await
        .map_err(|e| store_error(e, ApiError::internal))?;
    Ok((
        StatusCode::CREATED,
        axum::Json(
            json!({ "payment_intent_id": intent.id, "amount": amount, "credits": body.credits, "balance": wallet.balance }),
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
    let ctx = CommandContext::for_request(
        crate::serve::http::request_id(&headers),
        Actor::Webhook("stripe".into()),
    );
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
    let committed = state
        .store
        .execute::<StripeEvent>(&event.id, command, &ctx)
        .await
        .map_err(|e| store_error(e, |e| match e {}))?;
    Ok(axum::Json(
        json!({ "received": true, "recorded": committed.events > 0 }),
    ))
}
