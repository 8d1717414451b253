//! The user's budget: the limits they set, what they spent (or hold) today and this month,
//! the check every call passes before its hold, the voice session's check before another
//! minute, and the warning recorded when a settled call crosses the threshold.
//!
//! Spend counts completed calls at their price and open calls (scheduled or under way) at
//! their held maximum, by the UTC day and month they were requested (read from the call ledger,
//! written with the calls' events, never behind them: `usecases::calls::ledger`).

use chrono::{DateTime, Utc};
use cmb_domain::budget::{day_start, month_start, Breach, Budget, BudgetCommand, BudgetSettings};
use cmb_domain::values::Cents;
use cmb_domain::{CallId, CommandContext, UserId};

use crate::backbone::store::{CommandError, EventStore};

type StoreError = CommandError<cmb_domain::budget::BudgetError>;

/// Reading the limits or the spend failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading spend: {0}")]
    Spend(#[from] sqlx::Error),
}

/// Why a call may not be requested, or the check could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(
        "this call could cost up to {} cents, which would take you to {} cents against your {} \
         of {} cents",
        max_price.0, breach.would_be_cents.0, breach.limit, breach.limit_cents.0
    )]
    Exceeded { max_price: Cents, breach: Breach },
    #[error(transparent)]
    Read(#[from] ReadError),
}

/// What the user spent (or holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Spent {
    pub today_cents: Cents,
    pub this_month_cents: Cents,
}

pub async fn settings(store: &EventStore, user: UserId) -> Result<BudgetSettings, StoreError> {
    let (budget, _) = store.load::<Budget>(&user.to_string()).await?;
    Ok(budget.settings())
}

/// Spend today and this month (UTC), leaving out call `except`.
pub async fn spent(
    store: &EventStore,
    user: UserId,
    now: DateTime<Utc>,
    except: Option<CallId>,
) -> Result<Spent, sqlx::Error> {
    let pool = store.pool();
    let since = |start| crate::usecases::calls::ledger::spent_since(pool, user, start, except);
    Ok(Spent {
        today_cents: Cents(since(day_start(now)).await?),
        this_month_cents: Cents(since(month_start(now)).await?),
    })
}

/// Refuses a call of at most `max_price` cents that would break a limit.
pub async fn check(
    store: &EventStore,
    user: UserId,
    now: DateTime<Utc>,
    max_price: Cents,
) -> Result<(), CheckError> {
    let settings = settings(store, user).await.map_err(ReadError::from)?;
    if settings.max_cost_per_call_cents.is_none()
        && settings.max_daily_spend_cents.is_none()
        && settings.max_monthly_spend_cents.is_none()
    {
        return Ok(());
    }
    let spent = spent(store, user, now, None)
        .await
        .map_err(ReadError::from)?;
    match settings.refusal(max_price, spent.today_cents, spent.this_month_cents) {
        Some(breach) => Err(CheckError::Exceeded { max_price, breach }),
        None => Ok(()),
    }
}

/// Sets the limits (already validated).
pub async fn set(
    store: &EventStore,
    user: UserId,
    settings: BudgetSettings,
    ctx: &CommandContext,
) -> Result<(), StoreError> {
    store
        .execute::<Budget>(&user.to_string(), BudgetCommand::Set(settings), ctx)
        .await
        .map(|_| ())
}

/// Whether call `call_id`, at `price` cents if it goes on, stays within the user's daily and
/// monthly limits (the hold was checked against them; the limits may have changed since).
pub async fn allows(
    store: &EventStore,
    user: UserId,
    call_id: CallId,
    now: DateTime<Utc>,
    price: Cents,
) -> Result<bool, ReadError> {
    let s = settings(store, user).await?;
    if s.max_daily_spend_cents.is_none() && s.max_monthly_spend_cents.is_none() {
        return Ok(true);
    }
    let spent = spent(store, user, now, Some(call_id)).await?;
    let within = |limit: Option<i64>, spent: Cents| limit.is_none_or(|l| spent + price <= Cents(l));
    Ok(within(s.max_daily_spend_cents, spent.today_cents)
        && within(s.max_monthly_spend_cents, spent.this_month_cents))
}

/// Records a budget alert when call `call_id`, priced `price` cents, takes the spend of the
/// day or month of `at` past the user's warning threshold (once per period).
pub async fn observe(
    store: &EventStore,
    user: UserId,
    call_id: CallId,
    price: Cents,
    at: DateTime<Utc>,
    ctx: &CommandContext,
) -> Result<(), ReadError> {
    let settings = settings(store, user).await?;
    let spent = spent(store, user, at, Some(call_id)).await?;
    for (limit, spent, period) in [
        (
            settings.max_daily_spend_cents,
            spent.today_cents,
            format!("day:{}", at.format("%Y-%m-%d")),
        ),
        (
            settings.max_monthly_spend_cents,
            spent.this_month_cents,
            format!("month:{}", at.format("%Y-%m")),
        ),
    ] {
        let Some(limit) = limit else { continue };
        let command = BudgetCommand::ObserveSpend {
            period,
            spent_cents: (spent + price).0,
            limit_cents: limit,
        };
        store
            .execute::<Budget>(&user.to_string(), command, ctx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_says_its_amounts_in_cents() {
        let e = CheckError::Exceeded {
            max_price: Cents(225),
            breach: Breach {
                limit: "max_daily_spend_cents",
                limit_cents: Cents(500),
                would_be_cents: Cents(525),
            },
        };
        assert_eq!(
            e.to_string(),
            "this call could cost up to 225 cents, which would take you to 525 cents against \
             your max_daily_spend_cents of 500 cents"
        );
    }
}
