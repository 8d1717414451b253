//! Request a call: validate, hold its maximum price, and record the request — the saga every
//! call starts with, now or scheduled. The hold comes first (credits reserved on the wallet,
//! or a Stripe authorisation of the user's that covers the maximum price); if anything after
//! it fails, the hold and the active-call claim are given back at once. Before anything is
//! held, the destination must be one the service may ring (`dials::CallPolicy`); a call now
//! is also counted toward its number's and its user's daily limits (a scheduled one when it
//! fires, by the dialer).

use chrono::{DateTime, Utc};
use cmb_domain::billing::BillingCommand;
use cmb_domain::budget::Breach;
use cmb_domain::call::{
    Call, CallCommand, CallError, CallRequest, Payment, DEFAULT_MINUTES, MAX_MINUTES, MIN_MINUTES,
};
use cmb_domain::pricing::{credits_for, PriceTable, PricingError};
use cmb_domain::user::User;
use cmb_domain::values::{Cents, Invalid, PhoneNumber};
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use cmb_domain::{CallId, CommandContext, PersonaId, UserId};
use cmb_providers::stripe::{PaymentIntent, Stripe, StripeError};

use super::active;
use super::dials::{self, CallPolicy, DialRefusal};
use super::journal::{self, HeldBy};
use crate::backbone::store::{CommandError, Committed, EventStore};
use crate::faults::crash_point;
use crate::usecases::{billing, budget, personas, prices};

/// How the user pays for the call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PayWith {
    /// Reserve credits on the wallet.
    Credits,
    /// A Stripe PaymentIntent (manual capture) the user authorised for at least the maximum.
    Card { payment_intent_id: String },
}

/// A call as the user asks for it, parsed at the edge.
#[derive(Debug, Clone)]
pub struct Request {
    pub user_id: UserId,
    /// `None`: the account's phone number.
    pub phone: Option<PhoneNumber>,
    pub persona_id: PersonaId,
    /// `None`: the minutes the payment intent was created for, or `DEFAULT_MINUTES` on credits.
    pub minutes: Option<u32>,
    pub pay_with: PayWith,
    /// A scheduled call's UTC time and the user's IANA zone.
    pub scheduled: Option<(DateTime<Utc>, Option<String>)>,
}

/// What holds the call's maximum price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    Credits(i64),
    Card(String),
}

/// A requested call.
#[derive(Debug, Clone)]
pub struct Requested {
    pub call_id: CallId,
    pub hold: Hold,
    /// What was recorded, so the caller can answer with it before the read model has it.
    pub request: CallRequest,
    pub at: DateTime<Utc>,
    pub committed: Committed,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Bad input, naming its field.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("no such account")]
    NoAccount,
    #[error(transparent)]
    Persona(#[from] personas::Error),
    #[error(transparent)]
    Budget(#[from] budget::CheckError),
    #[error("no such payment intent")]
    UnknownIntent,
    #[error(
        "the payment intent holds {} cents ({status}); a call of {minutes} minutes can cost up \
         to {} cents: {} cents missing. Ask for fewer minutes, or create an intent for {minutes}",
        capturable.0, needed.0, (*needed - *capturable).0
    )]
    IntentTooSmall {
        status: String,
        capturable: Cents,
        needed: Cents,
        minutes: u32,
    },
    #[error(transparent)]
    Stripe(StripeError),
    #[error("you already have a call in progress; one at a time")]
    CallInProgress,
    /// The destination policy or a daily limit refuses the call.
    #[error(transparent)]
    Refused(DialRefusal),
    #[error(
        "you owe {debt} credits after a refunded or disputed credit purchase: buy credits to \
         settle the debt before a new call"
    )]
    InDebt { debt: i64 },
    #[error(
        "this call can cost up to {max_price} ({needed} credits); you have {available} credits \
         available"
    )]
    InsufficientCredits {
        max_price: Cents,
        needed: i64,
        available: i64,
    },
    #[error(transparent)]
    Wallet(CommandError<WalletError>),
    #[error(transparent)]
    Billing(#[from] billing::Error),
    #[error(transparent)]
    Call(#[from] CommandError<CallError>),
    #[error(transparent)]
    User(#[from] CommandError<cmb_domain::user::UserError>),
    #[error(transparent)]
    Prices(#[from] CommandError<PricingError>),
    #[error("the active-call claim: {0}")]
    Claim(#[from] sqlx::Error),
}

impl RequestError {
    /// The breach, when a budget limit refused the call.
    pub fn budget_breach(&self) -> Option<&Breach> {
        match self {
            RequestError::Budget(budget::CheckError::Exceeded { breach, .. }) => Some(breach),
            _ => None,
        }
    }
}

/// The minutes an intent pays for: the ones it was created for (`POST
/// /api/user/create-payment-intent` writes them in its metadata), else as many as its amount
/// covers at today's prices.
fn intent_minutes(intent: &PaymentIntent, prices: &PriceTable) -> u32 {
    if let Some(minutes) = intent.metadata.get("minutes").and_then(|m| m.parse().ok()) {
        return minutes;
    }
    let held = intent.amount_capturable.max(intent.amount);
    (MIN_MINUTES..=MAX_MINUTES)
        .rev()
        .find(|&m| prices.max_price(m).0 <= held)
        .unwrap_or(MIN_MINUTES)
}

/// Validates, holds the maximum price, and requests the call.
pub async fn request(
    store: &EventStore,
    stripe: &Stripe,
    policy: &CallPolicy,
    now: DateTime<Utc>,
    request: Request,
    ctx: &CommandContext,
) -> Result<Requested, RequestError> {
    let user = request.user_id;
    let valid = |minutes: u32| {
        if (MIN_MINUTES..=MAX_MINUTES).contains(&minutes) {
            Ok(minutes)
        } else {
            Err(Invalid::new(
                "duration",
                format!("duration: {MIN_MINUTES} to {MAX_MINUTES} minutes"),
            ))
        }
    };
    request.minutes.map(valid).transpose()?;
    // The intent must be ours, authorised, and cover the call's maximum price.
    let intent = match &request.pay_with {
        PayWith::Credits => None,
        PayWith::Card { payment_intent_id } => Some(
            stripe
                .retrieve_payment_intent(payment_intent_id.trim())
                .await
                .map_err(|e| match e {
                    StripeError::InvalidRequest { .. } => RequestError::UnknownIntent,
                    other => RequestError::Stripe(other),
                })?,
        ),
    };
    let phone = match request.phone {
        Some(p) => p,
        None => {
            let (me, _) = store.load::<User>(&user.to_string()).await?;
            if !me.registered {
                return Err(RequestError::NoAccount);
            }
            // An account made by a WorkOS sign-in has no phone until the user adds one.
            me.phone.ok_or_else(|| {
                RequestError::Invalid(Invalid::new(
                    "phone",
                    "your account has no phone number: add one to your profile, or give one",
                ))
            })?
        }
    };
    policy.destination(&phone).map_err(RequestError::Refused)?;
    let persona_id = PersonaId::new(request.persona_id.as_str().trim());
    let persona = personas::accessible(store, &persona_id, user).await?;
    let prices = prices::current(store, now).await?;
    let minutes = match (request.minutes, &intent) {
        (Some(minutes), _) => minutes,
        (None, Some(intent)) => valid(intent_minutes(intent, &prices))?,
        (None, None) => DEFAULT_MINUTES,
    };
    let max_price = prices.max_price(minutes);
    budget::check(store, user, now, max_price).await?;
    // Credits owed after a refund or dispute block every new call, whatever pays for it.
    let (wallet, _) = store
        .load::<Wallet>(&user.to_string())
        .await
        .map_err(RequestError::Wallet)?;
    if wallet.debt > 0 {
        return Err(RequestError::InDebt { debt: wallet.debt });
    }
    let payment = match (request.pay_with, intent) {
        (PayWith::Card { .. }, Some(intent)) => {
            if intent.status != "requires_capture" || intent.amount_capturable < max_price.0 {
                return Err(RequestError::IntentTooSmall {
                    status: intent.status,
                    capturable: Cents(intent.amount_capturable),
                    needed: max_price,
                    minutes,
                });
            }
            Payment::Card {
                payment_intent_id: intent.id,
            }
        }
        _ => Payment::Credits {
            credits: credits_for(max_price),
        },
    };

    let call_id = CallId::generate();
    let pool = store.pool();
    // One recoverable unit: the journal row first, so a crash after any step below is found
    // and given back by the sweeper (`journal::sweep`).
    let held_by = match &payment {
        Payment::Credits { .. } => HeldBy::Credits,
        Payment::Card { payment_intent_id } => HeldBy::Card(payment_intent_id.clone()),
    };
    journal::open(pool, call_id, user, &held_by, request.scheduled.is_some()).await?;
    crash_point("request.after_journal");
    if request.scheduled.is_none() && !active::claim(pool, user, call_id).await? {
        journal::close_logged(pool, call_id, "failed: another call in progress").await;
        return Err(RequestError::CallInProgress);
    }
    if request.scheduled.is_none() {
        if let Err(refused) = policy.claim(pool, call_id, user, &phone, now).await? {
            active::release_logged(pool, call_id).await;
            journal::close_logged(pool, call_id, &format!("failed: {refused}")).await;
            return Err(RequestError::Refused(refused));
        }
    }
    crash_point("request.after_claim");
    let hold = match &payment {
        Payment::Credits { credits } => {
            let reserve = WalletCommand::Reserve {
                hold_id: call_id.to_string(),
                credits: *credits,
            };
            if let Err(e) = store
                .execute::<Wallet>(&user.to_string(), reserve, ctx)
                .await
            {
                active::release_logged(pool, call_id).await;
                dials::release_logged(pool, call_id).await;
                journal::close_logged(pool, call_id, &format!("failed: {e}")).await;
                return Err(match e {
                    CommandError::Rejected(WalletError::Insufficient { needed, available }) => {
                        RequestError::InsufficientCredits {
                            max_price,
                            needed,
                            available,
                        }
                    }
                    CommandError::Rejected(WalletError::InDebt { debt }) => {
                        RequestError::InDebt { debt }
                    }
                    other => RequestError::Wallet(other),
                });
            }
            Hold::Credits(*credits)
        }
        Payment::Card { payment_intent_id } => {
            let used = billing::record(
                store,
                user,
                BillingCommand::UseAuthorization {
                    payment_intent_id: payment_intent_id.clone(),
                    call_id: call_id.to_string(),
                    needed_cents: max_price.0,
                },
                ctx,
            )
            .await;
            if let Err(e) = used {
                active::release_logged(pool, call_id).await;
                dials::release_logged(pool, call_id).await;
                journal::close_logged(pool, call_id, &format!("failed: {e}")).await;
                return Err(e.into());
            }
            Hold::Card(payment_intent_id.clone())
        }
    };
    let (scheduled_for, timezone) = match request.scheduled {
        Some((at, tz)) => (Some(at), tz),
        None => (None, None),
    };
    let recorded = CallRequest {
        user_id: user,
        persona_id: persona_id.clone(),
        persona_name: persona.name.clone(),
        phone,
        max_minutes: minutes,
        payment,
        prices,
        scheduled_for,
        timezone,
    };
    crash_point("request.after_hold");
    let command = CallCommand::Request(recorded.clone());
    match store
        .execute::<Call>(&call_id.to_string(), command, ctx)
        .await
    {
        Ok(committed) => {
            crash_point("request.after_call");
            journal::close_logged(pool, call_id, "requested").await;
            Ok(Requested {
                call_id,
                hold,
                request: recorded,
                at: now,
                committed,
            })
        }
        Err(e) => {
            release_hold(store, stripe, user, call_id, &hold, ctx).await;
            active::release_logged(pool, call_id).await;
            dials::release_logged(pool, call_id).await;
            journal::close_logged(pool, call_id, &format!("failed: {e}")).await;
            Err(e.into())
        }
    }
}

/// The call never existed: give the money back at once.
async fn release_hold(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    call_id: CallId,
    hold: &Hold,
    ctx: &CommandContext,
) {
    match hold {
        Hold::Card(pi) => {
            if let Err(e) = stripe
                .cancel_payment_intent(pi, &format!("release-{call_id}"))
                .await
            {
                tracing::error!(call = %call_id, error = %e, "could not cancel a payment intent");
            }
        }
        Hold::Credits(_) => {
            let release = WalletCommand::Release {
                hold_id: call_id.to_string(),
            };
            if let Err(e) = store
                .execute::<Wallet>(&user.to_string(), release, ctx)
                .await
            {
                tracing::error!(call = %call_id, error = %e, "could not release a hold");
            }
        }
    }
}
