//! Money with Stripe: the user's customer and cards, payment intents that hold a call's
//! maximum price, credit packs, and Stripe's webhook events recorded once each. Every Stripe
//! write carries an `Idempotency-Key` derived from what it is for, so a retry never charges
//! twice.
//!
//! Money given back at Stripe (`charge.refunded`, `charge.dispute.created`) is taken back from
//! what it paid for, found by its payment intent in the event log: a credit pack's credits
//! (`WalletCommand::Revoke`: the rest becomes debt), or recorded on the call it paid for
//! (`CallCommand::RecordPaymentReversal`). Both are idempotent per reversal, so a redelivered
//! webhook takes nothing twice.

use cmb_domain::billing::{
    Billing, BillingCommand, BillingError, Card, RecordStripeEvent, StripeEvent, StripeEventError,
};
use cmb_domain::call::{Call, CallCommand, CallError, Reversal};
use cmb_domain::user::{User, UserError};
use cmb_domain::values::Cents;
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError, CENTS_PER_CREDIT};
use cmb_domain::{CallId, CommandContext, UserId};
use cmb_providers::stripe::{CreatePaymentIntent, PaymentIntent, Stripe, StripeError};

use crate::backbone::store::{CommandError, Committed, EventStore};

/// Credit packs on sale: credits and their price in cents (1 credit = 5¢).
pub const PACKS: &[i64] = &[100, 500, 1000];
pub const CURRENCY: &str = "usd";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Rejected(#[from] CommandError<BillingError>),
    #[error(transparent)]
    Stripe(#[from] StripeError),
    #[error("add a payment method first (POST /api/user/payment-method)")]
    NoPaymentMethod,
    #[error("the card was not authorised: {0}")]
    NotAuthorised(String),
    #[error("the payment did not go through ({0})")]
    NotPaid(String),
    #[error(transparent)]
    User(#[from] CommandError<UserError>),
    #[error(transparent)]
    Wallet(#[from] CommandError<WalletError>),
    #[error(transparent)]
    Call(#[from] CommandError<CallError>),
    #[error("billing: {0}")]
    Db(#[from] sqlx::Error),
}

pub async fn load(store: &EventStore, user: UserId) -> Result<Billing, Error> {
    let (billing, _) = store.load::<Billing>(&user.to_string()).await?;
    Ok(billing)
}

/// Records a billing event on the user's billing aggregate.
pub async fn record(
    store: &EventStore,
    user: UserId,
    command: BillingCommand,
    ctx: &CommandContext,
) -> Result<(), Error> {
    store
        .execute::<Billing>(&user.to_string(), command, ctx)
        .await
        .map(|_| ())
        .map_err(Error::from)
}

/// The user's Stripe customer, created (once: the key is the user id) when first needed.
async fn customer(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    ctx: &CommandContext,
) -> Result<String, Error> {
    if let Some(id) = load(store, user).await?.customer_id {
        return Ok(id);
    }
    let (me, _) = store.load::<User>(&user.to_string()).await?;
    let email = me.email.map(|e| e.to_string()).unwrap_or_default();
    let created = stripe
        .create_customer(
            &email,
            &me.name,
            &user.to_string(),
            &format!("customer-{user}"),
        )
        .await?;
    record(
        store,
        user,
        BillingCommand::RecordCustomer {
            customer_id: created.id.clone(),
        },
        ctx,
    )
    .await?;
    Ok(load(store, user).await?.customer_id.unwrap_or(created.id))
}

/// Attaches card `payment_method_id` to the user's customer (the default when asked, or when
/// it is the first); returns it and the default card.
pub async fn attach_card(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    payment_method_id: &str,
    set_default: bool,
    ctx: &CommandContext,
) -> Result<(Card, Option<String>), Error> {
    let customer = customer(store, stripe, user, ctx).await?;
    let attached = stripe
        .attach_payment_method(payment_method_id, &customer)
        .await?;
    let make_default = set_default || load(store, user).await?.default_card.is_none();
    if make_default {
        stripe
            .set_default_payment_method(&customer, &attached.id)
            .await?;
    }
    let card = Card {
        payment_method_id: attached.id.clone(),
        brand: attached.brand,
        last4: attached.last4,
        exp_month: attached.exp_month,
        exp_year: attached.exp_year,
    };
    record(
        store,
        user,
        BillingCommand::AttachCard {
            card: card.clone(),
            make_default,
        },
        ctx,
    )
    .await?;
    Ok((card, load(store, user).await?.default_card))
}

/// Detaches one of the user's cards (not the default one).
pub async fn detach_card(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    payment_method_id: &str,
    ctx: &CommandContext,
) -> Result<(), Error> {
    let b = load(store, user).await?;
    if !b
        .cards
        .iter()
        .any(|c| c.payment_method_id == payment_method_id)
    {
        return Err(CommandError::Rejected(BillingError::UnknownCard).into());
    }
    if b.default_card.as_deref() == Some(payment_method_id) {
        return Err(CommandError::Rejected(BillingError::DefaultCard).into());
    }
    stripe.detach_payment_method(payment_method_id).await?;
    record(
        store,
        user,
        BillingCommand::DetachCard {
            payment_method_id: payment_method_id.to_string(),
        },
        ctx,
    )
    .await
}

/// Makes one of the user's cards the default.
pub async fn make_default(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    payment_method_id: &str,
    ctx: &CommandContext,
) -> Result<(), Error> {
    let b = load(store, user).await?;
    let customer = b
        .customer_id
        .clone()
        .ok_or(Error::Rejected(CommandError::Rejected(
            BillingError::UnknownCard,
        )))?;
    if !b
        .cards
        .iter()
        .any(|c| c.payment_method_id == payment_method_id)
    {
        return Err(CommandError::Rejected(BillingError::UnknownCard).into());
    }
    stripe
        .set_default_payment_method(&customer, payment_method_id)
        .await?;
    record(
        store,
        user,
        BillingCommand::SetDefault {
            payment_method_id: payment_method_id.to_string(),
        },
        ctx,
    )
    .await
}

/// Customer and default card, or [`Error::NoPaymentMethod`].
async fn chargeable(store: &EventStore, user: UserId) -> Result<(String, String), Error> {
    let b = load(store, user).await?;
    match (b.customer_id, b.default_card) {
        (Some(c), Some(pm)) => Ok((c, pm)),
        _ => Err(Error::NoPaymentMethod),
    }
}

/// Authorises (manual capture) `amount` cents on the default card for a call of up to
/// `minutes` minutes, and records the authorisation for a call to use.
pub async fn authorise_call(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    minutes: u32,
    amount: Cents,
    idempotency_key: &str,
    ctx: &CommandContext,
) -> Result<PaymentIntent, Error> {
    let (customer, pm) = chargeable(store, user).await?;
    let intent = stripe
        .create_payment_intent(
            &CreatePaymentIntent {
                amount: amount.0,
                currency: CURRENCY.into(),
                customer,
                payment_method: pm,
                manual_capture: true,
                metadata: vec![
                    ("user_id".into(), user.to_string()),
                    ("minutes".into(), minutes.to_string()),
                ],
                description: Some(format!("Call Me Back: a call of up to {minutes} minutes")),
            },
            idempotency_key,
        )
        .await?;
    if intent.status != "requires_capture" {
        let reason = intent
            .last_payment_error
            .as_ref()
            .map(|e| e.to_string())
            .unwrap_or_else(|| intent.status.clone());
        return Err(Error::NotAuthorised(reason));
    }
    record(
        store,
        user,
        BillingCommand::RecordAuthorization {
            payment_intent_id: intent.id.clone(),
            amount_cents: intent.amount,
        },
        ctx,
    )
    .await?;
    Ok(intent)
}

/// A credit pack bought.
#[derive(Debug, Clone)]
pub struct Bought {
    pub payment_intent_id: String,
    pub amount: Cents,
    pub committed: Committed,
}

/// Buys `credits` (one of [`PACKS`]) at once with the default card; grants them once per
/// payment intent, whatever is retried.
pub async fn buy_credits(
    store: &EventStore,
    stripe: &Stripe,
    user: UserId,
    credits: i64,
    idempotency_key: &str,
    ctx: &CommandContext,
) -> Result<Bought, Error> {
    let (customer, pm) = chargeable(store, user).await?;
    let amount = credits * CENTS_PER_CREDIT;
    let intent = stripe
        .create_payment_intent(
            &CreatePaymentIntent {
                amount,
                currency: CURRENCY.into(),
                customer,
                payment_method: pm,
                manual_capture: false,
                metadata: vec![
                    ("user_id".into(), user.to_string()),
                    ("credits".into(), credits.to_string()),
                ],
                description: Some(format!("Call Me Back: {credits} credits")),
            },
            idempotency_key,
        )
        .await?;
    if intent.status != "succeeded" {
        return Err(Error::NotPaid(intent.status));
    }
    let grant = WalletCommand::Grant {
        credits,
        reason: "credit pack".into(),
        reference: intent.id.clone(),
    };
    let committed = store
        .execute::<Wallet>(&user.to_string(), grant, ctx)
        .await?;
    Ok(Bought {
        payment_intent_id: intent.id,
        amount: Cents(amount),
        committed,
    })
}

/// Records Stripe's event `event_id` (once per id); whether it was new.
pub async fn record_stripe_event(
    store: &EventStore,
    event_id: &str,
    event: RecordStripeEvent,
    ctx: &CommandContext,
) -> Result<bool, CommandError<StripeEventError>> {
    let committed = store.execute::<StripeEvent>(event_id, event, ctx).await?;
    Ok(committed.events > 0)
}

/// Money Stripe gave back to the payer of one of our charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeReversal {
    pub kind: Reversal,
    pub payment_intent: String,
    /// `refund:<charge>` (its amount is the charge's refunded total so far) or
    /// `dispute:<dispute>`.
    pub reference: String,
    pub amount: Cents,
    /// When Stripe reported it.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl ChargeReversal {
    /// The reversal a Stripe event of type `kind` about `object`, created at `created` (unix
    /// seconds), reports, if it is one.
    pub fn of(kind: &str, object: &serde_json::Value, created: i64) -> Option<ChargeReversal> {
        let (kind, amount) = match kind {
            "charge.refunded" => (Reversal::Refund, "amount_refunded"),
            "charge.dispute.created" => (Reversal::Dispute, "amount"),
            _ => return None,
        };
        Some(ChargeReversal {
            kind,
            payment_intent: object.get("payment_intent")?.as_str()?.to_string(),
            reference: format!("{}:{}", kind.as_str(), object.get("id")?.as_str()?),
            amount: Cents(object.get(amount)?.as_i64()?),
            at: chrono::DateTime::from_timestamp(created, 0).unwrap_or_else(chrono::Utc::now),
        })
    }
}

/// What a reversal took back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reversed {
    /// From a credit pack: the credits the user's wallet lost now (0 when already taken).
    Credits { user: UserId, events: usize },
    /// Recorded on the call its payment paid for.
    Call { call: CallId, events: usize },
    /// The payment intent pays for nothing of ours.
    Unknown,
}

/// What payment intent `pi` paid for, from the event log: a credit pack's grant (the user) or
/// a call.
async fn paid_for(pool: &sqlx::PgPool, pi: &str) -> Result<Option<Reversed>, sqlx::Error> {
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id FROM events
          WHERE (aggregate_type = 'wallet' AND event_type = 'CreditsGranted'
                 AND payload -> 'CreditsGranted' ->> 'reference' = $1)
             OR (aggregate_type = 'call' AND event_type = 'CallRequested'
                 AND payload -> 'CallRequested' -> 'payment' ->> 'payment_intent_id' = $1)
          LIMIT 1",
    )
    .bind(pi)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(kind, id)| {
        Some(match kind.as_str() {
            "wallet" => Reversed::Credits {
                user: id.parse().ok()?,
                events: 0,
            },
            _ => Reversed::Call {
                call: id.parse().ok()?,
                events: 0,
            },
        })
    }))
}

/// Takes back what `reversal` gave back at Stripe: a credit pack's credits (never below zero,
/// the rest owed as debt), or records it on the call. Idempotent: the same reversal again
/// takes nothing.
pub async fn reverse(
    store: &EventStore,
    reversal: &ChargeReversal,
    ctx: &CommandContext,
) -> Result<Reversed, Error> {
    let Some(target) = paid_for(store.pool(), &reversal.payment_intent).await? else {
        tracing::warn!(
            payment_intent = %reversal.payment_intent,
            reference = %reversal.reference,
            "a {} of a payment intent that pays for nothing of ours",
            reversal.kind.as_str()
        );
        return Ok(Reversed::Unknown);
    };
    metrics::counter!("cmb_payment_reversals_total", "kind" => reversal.kind.as_str()).increment(1);
    match target {
        Reversed::Credits { user, .. } => {
            // Credits of a pack are 5¢ each: a reversal of part of a cent takes a whole credit.
            let credits = cmb_domain::pricing::credits_for(reversal.amount);
            let revoke = WalletCommand::Revoke {
                grant: reversal.payment_intent.clone(),
                reversal: reversal.reference.clone(),
                credits,
                cause: reversal.kind.as_str().into(),
            };
            let done = store
                .execute::<Wallet>(&user.to_string(), revoke, ctx)
                .await?;
            Ok(Reversed::Credits {
                user,
                events: done.events,
            })
        }
        Reversed::Call { call, .. } => {
            let record = CallCommand::RecordPaymentReversal {
                kind: reversal.kind,
                reference: reversal.reference.clone(),
                amount_cents: reversal.amount.0,
                at: reversal.at,
            };
            let done = store
                .execute::<Call>(&call.to_string(), record, ctx)
                .await?;
            Ok(Reversed::Call {
                call,
                events: done.events,
            })
        }
        Reversed::Unknown => Ok(Reversed::Unknown),
    }
}
