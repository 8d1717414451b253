//! Settles a call's hold when it ends: takes exactly its price (never more than the hold) and
//! releases the rest; an unanswered, failed or cancelled call releases all of it. Frees the
//! user's active-call slot. Idempotent at every step (holds are named by the call id).

use cmb_domain::call::{Call, CallCommand, Payment};
use cmb_domain::pricing::credits_for;
use cmb_domain::values::Cents;
use cmb_domain::wallet::{Wallet, WalletCommand, CENTS_PER_CREDIT};
use cmb_domain::{Actor, CommandContext, EventEnvelope};

use crate::backbone::store::EventStore;
use cmb_providers::stripe::{Stripe, StripeError};

pub const NAME: &str = "settlement";

pub async fn handle(store: EventStore, stripe: Stripe, event: EventEnvelope) -> anyhow::Result<()> {
    if event.event_type != "CallEnded" {
        return Ok(());
    }
    let call_id = event.aggregate_id.clone();
    let ctx = CommandContext::caused_by(&event, Actor::Worker(NAME.into()));
    let (call, _) = store
        .load::<Call>(&call_id)
        .await
        .map_err(|e| anyhow::anyhow!("loading call {call_id}: {e}"))?;
    let (Some(user), Some(payment)) = (call.user_id, call.payment.clone()) else {
        anyhow::bail!("call {call_id} has no owner or payment");
    };
    if !call.settled {
        let price = call.price_cents.unwrap_or(0);
        let (charged, released) = match payment {
            Payment::Credits { credits } => {
                let used = credits_for(Cents(price)).min(credits);
                let command = if used > 0 {
                    WalletCommand::Settle {
                        hold_id: call_id.clone(),
                        credits: used,
                    }
                } else {
                    WalletCommand::Release {
                        hold_id: call_id.clone(),
                    }
                };
                store
                    .execute::<Wallet>(&user.to_string(), command, &ctx)
                    .await
                    .map_err(|e| anyhow::anyhow!("settling the hold of {call_id}: {e}"))?;
                (used * CENTS_PER_CREDIT, (credits - used) * CENTS_PER_CREDIT)
            }
            Payment::Card { payment_intent_id } => {
                settle_card(&stripe, &call_id, &payment_intent_id, price).await?;
                (price, call.max_price_cents - price)
            }
        };
        store
            .execute::<Call>(
                &call_id,
                CallCommand::RecordSettlement {
                    charged_cents: charged,
                    released_cents: released,
                },
                &ctx,
            )
            .await
            .map_err(|e| anyhow::anyhow!("recording the settlement of {call_id}: {e}"))?;
    }
    observe_budget(
        &store,
        user,
        &call_id,
        call.price_cents.unwrap_or(0),
        &event,
        &ctx,
    )
    .await?;
    sqlx::query("DELETE FROM active_calls WHERE call_id = $1::uuid")
        .bind(&call_id)
        .execute(store.pool())
        .await?;
    Ok(())
}

/// Records a budget alert when this call takes the day's or month's spend past the user's
/// warning threshold (once per period).
async fn observe_budget(
    store: &EventStore,
    user: uuid::Uuid,
    call_id: &str,
    price: i64,
    event: &EventEnvelope,
    ctx: &CommandContext,
) -> anyhow::Result<()> {
    use crate::serve::api::budget::{day_start, month_start, spent_since};
    use cmb_domain::budget::{Budget, BudgetCommand};
    let (budget, _) = store
        .load::<Budget>(&user.to_string())
        .await
        .map_err(|e| anyhow::anyhow!("loading the budget: {e}"))?;
    let settings = budget.settings();
    let at = event.occurred_at;
    let this = uuid::Uuid::parse_str(call_id).ok();
    for (limit, since, period) in [
        (
            settings.max_daily_spend_cents,
            day_start(at),
            format!("day:{}", at.format("%Y-%m-%d")),
        ),
        (
            settings.max_monthly_spend_cents,
            month_start(at),
            format!("month:{}", at.format("%Y-%m")),
        ),
    ] {
        let Some(limit) = limit else { continue };
        let spent = spent_since(store.pool(), user, since, this).await? + price;
        let command = BudgetCommand::ObserveSpend {
            period,
            spent_cents: spent,
            limit_cents: limit,
        };
        store
            .execute::<Budget>(&user.to_string(), command, ctx)
            .await
            .map_err(|e| anyhow::anyhow!("observing spend: {e}"))?;
    }
    Ok(())
}

/// Captures exactly `price` (the rest of the authorisation is released by Stripe), or cancels
/// the intent when the call cost nothing. The idempotency keys make a retry a replay.
async fn settle_card(stripe: &Stripe, call_id: &str, pi: &str, price: i64) -> anyhow::Result<()> {
    let result = if price > 0 {
        stripe
            .capture_payment_intent(pi, price, &format!("capture-{call_id}"))
            .await
    } else {
        stripe
            .cancel_payment_intent(pi, &format!("release-{call_id}"))
            .await
    };
    match result {
        Ok(_) => Ok(()),
        Err(e) if e.retryable() => Err(anyhow::anyhow!("settling {pi}: {e}")),
        Err(StripeError::InvalidRequest { message, .. }) => {
            // Settled already (by an earlier delivery with another key, or by hand)?
            let intent = stripe
                .retrieve_payment_intent(pi)
                .await
                .map_err(|e| anyhow::anyhow!("checking {pi}: {e}"))?;
            let done =
                (price > 0 && intent.status == "succeeded" && intent.amount_received == price)
                    || (price == 0 && intent.status == "canceled");
            if done {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "settling {pi} refused: {message} (intent is {})",
                    intent.status
                ))
            }
        }
        Err(e) => Err(anyhow::anyhow!("settling {pi}: {e}")),
    }
}
