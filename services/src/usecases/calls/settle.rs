//! Settle a call's hold when it ends: take exactly its price (never more than the hold) and
//! release the rest; an unanswered, failed or cancelled call releases all of it. Then warn on
//! the budget if this call crossed a threshold, and free the user's active-call slot.
//! Idempotent at every step (holds are named by the call id, Stripe writes carry idempotency
//! keys), so a redelivered `CallEnded` settles nothing twice.

use chrono::{DateTime, Utc};
use cmb_domain::call::{Call, CallCommand, CallError, Payment, Settlement};
use cmb_domain::values::Cents;
use cmb_domain::wallet::{Wallet, WalletCommand, WalletError};
use cmb_domain::{CallId, CommandContext, UserId};
use cmb_providers::stripe::{Stripe, StripeError};

use super::active;
use crate::backbone::store::{CommandError, EventStore};
use crate::usecases::budget;

#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// The call has no owner or payment: there is nothing to settle, now or later.
    #[error("call {0} has no owner or payment")]
    NothingToSettle(CallId),
    #[error("call {0}: {1}")]
    Call(CallId, CommandError<CallError>),
    #[error("the hold of call {0}: {1}")]
    Wallet(CallId, CommandError<WalletError>),
    #[error("settling {pi}: {error}")]
    Stripe { pi: String, error: StripeError },
    #[error("settling {pi} refused: {message} (intent is {status})")]
    StripeRefused {
        pi: String,
        message: String,
        status: String,
    },
    /// The hold was closed by something other than this settlement: left for an operator.
    #[error(
        "the hold of call {call} is already closed, having used {used:?} credits where this \
         settlement takes {wanted}"
    )]
    HoldClosedElsewhere {
        call: CallId,
        used: Option<i64>,
        wanted: i64,
    },
    #[error("the budget: {0}")]
    Budget(#[from] budget::ReadError),
    #[error("freeing the active-call slot: {0}")]
    Db(#[from] sqlx::Error),
}

impl SettleError {
    /// Whether trying again later may succeed; otherwise the call is left for an operator.
    pub fn retryable(&self) -> bool {
        !matches!(
            self,
            SettleError::NothingToSettle(_) | SettleError::HoldClosedElsewhere { .. }
        )
    }
}

/// Settles call `call_id`, which ended at `ended_at`.
pub async fn settle(
    store: &EventStore,
    stripe: &Stripe,
    call_id: CallId,
    ended_at: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<(), SettleError> {
    let id = call_id.to_string();
    let (call, _) = store
        .load::<Call>(&id)
        .await
        .map_err(|e| SettleError::Call(call_id, e))?;
    let (Some(user), Some(payment)) = (call.user_id, call.payment.clone()) else {
        return Err(SettleError::NothingToSettle(call_id));
    };
    let price = call.price_cents.unwrap_or(0);
    if !call.settled {
        let settlement = payment.settle(price, call.max_price_cents);
        match &payment {
            Payment::Credits { .. } => {
                let command = if settlement.credits_used > 0 {
                    WalletCommand::Settle {
                        hold_id: id.clone(),
                        credits: settlement.credits_used,
                    }
                } else {
                    WalletCommand::Release {
                        hold_id: id.clone(),
                    }
                };
                match store
                    .execute::<Wallet>(&user.to_string(), command, ctx)
                    .await
                {
                    Ok(_) => {}
                    // Closed by an earlier delivery of this settlement that died before
                    // recording it on the call: its own step, if it used the same credits.
                    Err(CommandError::Rejected(WalletError::HoldClosed(hold))) => {
                        let (wallet, _) = store
                            .load::<Wallet>(&user.to_string())
                            .await
                            .map_err(|e| SettleError::Wallet(call_id, e))?;
                        let used = wallet.settled.get(&hold).copied();
                        if used != Some(settlement.credits_used) {
                            return Err(SettleError::HoldClosedElsewhere {
                                call: call_id,
                                used,
                                wanted: settlement.credits_used,
                            });
                        }
                    }
                    Err(e) => return Err(SettleError::Wallet(call_id, e)),
                }
            }
            Payment::Card { payment_intent_id } => {
                settle_card(
                    stripe,
                    &id,
                    payment_intent_id,
                    Cents(settlement.charged_cents),
                )
                .await?;
            }
        }
        // A crash here leaves the hold closed (or the card captured) and the call unsettled:
        // the redelivered `CallEnded` recognises its own step (tests/crashes.rs).
        crate::faults::crash_point("settle.after_hold");
        let Settlement {
            charged_cents,
            released_cents,
            ..
        } = settlement;
        store
            .execute::<Call>(
                &id,
                CallCommand::RecordSettlement {
                    charged_cents,
                    released_cents,
                },
                ctx,
            )
            .await
            .map_err(|e| SettleError::Call(call_id, e))?;
        crate::faults::crash_point("settle.after_record");
    }
    budget::observe(
        store,
        UserId::from(user),
        call_id,
        Cents(price),
        ended_at,
        ctx,
    )
    .await?;
    active::release(store.pool(), call_id).await?;
    Ok(())
}

/// Captures exactly `price` (the rest of the authorisation is released by Stripe), or cancels
/// the intent when the call cost nothing. The idempotency keys make a retry a replay.
async fn settle_card(
    stripe: &Stripe,
    call_id: &str,
    pi: &str,
    price: Cents,
) -> Result<(), SettleError> {
    let result = if price.0 > 0 {
        stripe
            .capture_payment_intent(pi, price.0, &format!("capture-{call_id}"))
            .await
    } else {
        stripe
            .cancel_payment_intent(pi, &format!("release-{call_id}"))
            .await
    };
    let failed = |error| SettleError::Stripe {
        pi: pi.to_string(),
        error,
    };
    match result {
        Ok(_) => Ok(()),
        Err(StripeError::InvalidRequest { message, .. }) => {
            // Settled already (by an earlier delivery with another key, or by hand)?
            let intent = stripe.retrieve_payment_intent(pi).await.map_err(failed)?;
            let done =
                (price.0 > 0 && intent.status == "succeeded" && intent.amount_received == price.0)
                    || (price.0 == 0 && intent.status == "canceled");
            if done {
                Ok(())
            } else {
                Err(SettleError::StripeRefused {
                    pi: pi.to_string(),
                    message,
                    status: intent.status,
                })
            }
        }
        Err(e) => Err(failed(e)),
    }
}
