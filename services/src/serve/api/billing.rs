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
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::serve::http::answer::Done;
use crate::serve::http::auth::AuthUser;
use crate::serve::http::error::{ApiError, ApiResult, ErrorBody};
use crate::serve::http::extract::{request_id, Json};
use crate::serve::http::state::AppState;
use crate::usecases::billing::{self, CURRENCY, PACKS};
use crate::usecases::prices;

/// A saved card.
#[derive(Serialize, ToSchema)]
pub struct PaymentMethod {
    /// Stripe's `pm_…` id.
    id: String,
    brand: String,
    last4: String,
    exp_month: u32,
    exp_year: u32,
    is_default: bool,
}

fn card_json(card: &Card, default: Option<&str>) -> PaymentMethod {
    PaymentMethod {
        id: card.payment_method_id.clone(),
        brand: card.brand.clone(),
        last4: card.last4.clone(),
        exp_month: card.exp_month,
        exp_year: card.exp_year,
        is_default: Some(card.payment_method_id.as_str()) == default,
    }
}

#[derive(Serialize, ToSchema)]
pub struct Credits {
    /// Credits owned.
    balance: i64,
    /// Credits not held for a call.
    available: i64,
    /// Credits owed after a refunded or disputed credit purchase; while above 0, no new call
    /// (402 `debt_outstanding`). The next credits that come in pay it first.
    debt: i64,
    cents_per_credit: i64,
}

#[derive(Serialize, ToSchema)]
pub struct Billing {
    payment_methods: Vec<PaymentMethod>,
    default_payment_method: Option<String>,
    credits: Credits,
    #[schema(example = "usd")]
    currency: String,
}

#[derive(Serialize, ToSchema)]
pub struct PaymentMethodAnswer {
    payment_method: PaymentMethod,
}

#[derive(Serialize, ToSchema)]
pub struct DefaultAnswer {
    default_payment_method: String,
}

/// Your cards, the default one, and your credits.
#[utoipa::path(get, path = "/user/billing", tag = "billing", security(("bearer" = [])),
    responses((status = 200, description = "Your billing", body = Billing)))]
pub async fn billing(
    State(state): State<AppState>,
    user: AuthUser,
) -> ApiResult<impl IntoResponse> {
    let b = billing::load(&state.store, user.id).await?;
    let (wallet, _) = state.store.load::<Wallet>(&user.id.to_string()).await?;
    let methods: Vec<_> = b
        .cards
        .iter()
        .map(|c| card_json(c, b.default_card.as_deref()))
        .collect();
    Ok(axum::Json(Billing {
        payment_methods: methods,
        default_payment_method: b.default_card,
        credits: Credits {
            balance: wallet.balance,
            available: wallet.available(),
            debt: wallet.debt,
            cents_per_credit: CENTS_PER_CREDIT,
        },
        currency: CURRENCY.into(),
    }))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"payment_method_id": "pm_card_visa", "set_default": true}))]
pub struct AttachBody {
    /// A Stripe PaymentMethod made by Stripe.js.
    #[schema(pattern = "^pm_", max_length = 100, example = "pm_card_visa")]
    payment_method_id: String,
    #[serde(default)]
    set_default: bool,
    /// Your password, when you signed in more than 15 minutes ago.
    #[schema(max_length = 128)]
    password: Option<String>,
}

/// Save a card (made with Stripe.js) for calls and credits. Needs a sign-in from the last 15
/// minutes or `password`.
#[utoipa::path(post, path = "/user/payment-method", tag = "billing", security(("bearer" = [])), request_body = AttachBody,
    responses(
        (status = 201, description = "The saved card", body = PaymentMethodAnswer),
        (status = 402, description = "The card was declined", body = ErrorBody),
        (status = 403, description = "An older sign-in and no password (`reauthentication_required`), or a wrong password (`wrong_password`)", body = ErrorBody),
    ))]
pub async fn attach(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<AttachBody>,
) -> ApiResult<impl IntoResponse> {
    let pm = body.payment_method_id.trim();
    if !pm.starts_with("pm_") || pm.len() > 100 {
        return Err(ApiError::validation(
            "payment_method_id",
            "payment_method_id: a Stripe pm_… id",
        ));
    }
    user.reauthenticate(&state, body.password.as_deref())
        .await?;
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
        axum::Json(PaymentMethodAnswer {
            payment_method: card_json(&card, default.as_deref()),
        }),
    ))
}

/// Remove a card.
#[utoipa::path(delete, path = "/user/payment-method/{id}", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path, description = "The card's `pm_…` id")),
    responses(
        (status = 200, description = "Removed", body = Done),
        (status = 400, description = "The default card cannot be removed while others remain", body = ErrorBody),
        (status = 404, description = "Not one of your cards", body = ErrorBody),
    ))]
pub async fn detach(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    billing::detach_card(&state.store, &state.stripe, user.id, &id, &user.context()).await?;
    Ok(axum::Json(Done::new("payment method removed")))
}

/// Make a card the default.
#[utoipa::path(put, path = "/user/payment-method/{id}/default", tag = "billing", security(("bearer" = [])),
    params(("id" = String, Path, description = "The card's `pm_…` id")),
    responses(
        (status = 200, description = "The default card", body = DefaultAnswer),
        (status = 404, description = "Not one of your cards", body = ErrorBody),
    ))]
pub async fn make_default(
    State(state): State<AppState>,
    user: AuthUser,
    Path(id): Path<String>,
) -> ApiResult<impl IntoResponse> {
    billing::make_default(&state.store, &state.stripe, user.id, &id, &user.context()).await?;
    Ok(axum::Json(DefaultAnswer {
        default_payment_method: id,
    }))
}

/// The Stripe idempotency key of a client request: the client's own key (so its retry returns
/// the same intent), scoped to the user, or a new one.
fn idempotency_key(purpose: &str, user: &AuthUser, supplied: Option<&str>) -> ApiResult<String> {
    match supplied {
        Some(k) if k.len() > 100 || !k.bytes().all(|b| b.is_ascii_graphic()) => {
            Err(ApiError::validation(
                "idempotency_key",
                "idempotency_key: at most 100 visible ASCII characters (a UUID will do)",
            ))
        }
        Some(k) if !k.is_empty() => Ok(format!("{purpose}-{}-{k}", user.id)),
        _ => Ok(format!("{purpose}-{}", Uuid::now_v7())),
    }
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"estimated_duration": 5}))]
pub struct IntentBody {
    /// The call's length in minutes; the hold is the price of this many.
    #[schema(minimum = 1, maximum = 30)]
    estimated_duration: u32,
    /// Makes a retried request return the same intent (defaults to a new one each time);
    /// visible ASCII (a UUID will do).
    #[schema(max_length = 100, pattern = "^[!-~]*$")]
    idempotency_key: Option<String>,
}

/// A hold on your default card: an authorisation for the price of a call.
#[derive(Serialize, ToSchema)]
pub struct IntentAnswer {
    #[schema(example = "pi_3Nxyz")]
    payment_intent_id: String,
    /// In cents.
    amount: i64,
    currency: String,
    /// Stripe's status: `requires_capture` once held.
    status: String,
    /// The minutes it pays for: a call with this intent and no `duration_minutes` lasts this long.
    max_duration_minutes: u32,
}

/// Hold the price of a call of `estimated_duration` minutes on your default card; pass its
/// `payment_intent_id` to `POST /api/call` or `/api/calls/schedule`.
#[utoipa::path(post, path = "/user/create-payment-intent", tag = "billing", security(("bearer" = [])), request_body = IntentBody,
    responses(
        (status = 201, description = "The hold", body = IntentAnswer),
        (status = 402, description = "The card was declined (`card_declined`), or no card is on file (`no_payment_method`)", body = ErrorBody),
    ))]
pub async fn create_payment_intent(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<IntentBody>,
) -> ApiResult<impl IntoResponse> {
    let minutes = body.estimated_duration;
    if !(MIN_MINUTES..=MAX_MINUTES).contains(&minutes) {
        return Err(ApiError::validation(
            "estimated_duration",
            format!("estimated_duration: {MIN_MINUTES} to {MAX_MINUTES} minutes"),
        ));
    }
    let key = idempotency_key("hold", &user, body.idempotency_key.as_deref())?;
    let prices = prices::current(&state.store, state.clock.now()).await?;
    let amount = prices.max_price(minutes);
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
        axum::Json(IntentAnswer {
            payment_intent_id: intent.id,
            amount: intent.amount,
            currency: CURRENCY.into(),
            status: intent.status,
            max_duration_minutes: minutes,
        }),
    ))
}

#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"credits": 100}))]
pub struct CreditsBody {
    /// A pack: 100, 500 or 1000.
    #[schema(example = 100, schema_with = pack_schema)]
    credits: i64,
    #[schema(max_length = 100, pattern = "^[!-~]*$")]
    idempotency_key: Option<String>,
    /// Your password, when you signed in more than 15 minutes ago.
    #[schema(max_length = 128)]
    password: Option<String>,
}

/// `credits` is one of the packs.
fn pack_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::Integer)
        .enum_values(Some(PACKS.iter().copied()))
        .description(Some("A pack: 100, 500 or 1000"))
        .build()
}

#[derive(Serialize, ToSchema)]
pub struct CreditsAnswer {
    payment_intent_id: String,
    /// Charged, in cents.
    amount: i64,
    credits: i64,
    /// Your credits now.
    balance: i64,
}

/// Buy a credit pack at once with the default card (credits owed after a refunded or disputed
/// purchase are paid first). Needs a sign-in from the last 15 minutes or `password`.
#[utoipa::path(post, path = "/user/credits", tag = "billing", security(("bearer" = [])), request_body = CreditsBody,
    responses(
        (status = 201, description = "Bought", body = CreditsAnswer),
        (status = 402, description = "The card was declined (`card_declined`), or no card is on file (`no_payment_method`)", body = ErrorBody),
        (status = 403, description = "An older sign-in and no password (`reauthentication_required`), or a wrong password (`wrong_password`)", body = ErrorBody),
    ))]
pub async fn buy_credits(
    State(state): State<AppState>,
    user: AuthUser,
    Json(body): Json<CreditsBody>,
) -> ApiResult<impl IntoResponse> {
    if !PACKS.contains(&body.credits) {
        return Err(ApiError::validation(
            "credits",
            format!("credits: one of the packs {PACKS:?}"),
        ));
    }
    let key = idempotency_key("credits", &user, body.idempotency_key.as_deref())?;
    if body
        .password
        .as_deref()
        .is_some_and(|p| p.chars().count() > 128)
    {
        return Err(ApiError::validation(
            "password",
            "password: at most 128 characters",
        ));
    }
    user.reauthenticate(&state, body.password.as_deref())
        .await?;
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
        axum::Json(CreditsAnswer {
            payment_intent_id: bought.payment_intent_id,
            amount: bought.amount.0,
            credits: body.credits,
            balance: wallet.balance,
        }),
    ))
}

#[derive(Serialize, ToSchema)]
pub struct WebhookAnswer {
    received: bool,
    /// False for an event kind we do not use, or one already recorded.
    recorded: bool,
}

/// Stripe's webhooks: verified (signature, 300 s tolerance), then recorded once per event id.
/// A `charge.refunded` or `charge.dispute.created` takes back what the charge paid for: a
/// credit pack's credits (what the wallet cannot cover becomes debt, which blocks new calls),
/// or it is recorded on the call. Called by Stripe only.
#[utoipa::path(post, path = "/stripe/webhook", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, description = "`t=<unix time>,v1=<hex HMAC-SHA256 of \"t.body\" with the endpoint secret>`")),
    request_body(content = Object, content_type = "application/json", description = "A Stripe Event"),
    responses(
        (status = 200, description = "Received", body = WebhookAnswer),
        (status = 400, description = "The signature is missing, wrong or too old", body = ErrorBody),
    ))]
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
        "charge.dispute.created",
    ];
    if !KINDS.contains(&event.kind.as_str()) {
        return Ok(axum::Json(WebhookAnswer {
            received: true,
            recorded: false,
        }));
    }
    let object = &event.object;
    let summary = json!({
        "amount": object.get("amount"),
        "amount_received": object.get("amount_received"),
        "amount_refunded": object.get("amount_refunded"),
        "status": object.get("status"),
        "customer": object.get("customer"),
        "payment_intent": object.get("payment_intent"),
        "charge": object.get("charge"),
        "reason": object.get("reason"),
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
    // A refund or dispute takes back what the charge paid for. Done on every delivery, not
    // only the first: a delivery that died after recording the event is redelivered by
    // Stripe, and a reversal already taken takes nothing again.
    if let Some(reversal) = billing::ChargeReversal::of(&event.kind, object, event.created) {
        billing::reverse(&state.store, &reversal, &ctx).await?;
    }
    Ok(axum::Json(WebhookAnswer {
        received: true,
        recorded,
    }))
}
