//! A user's spending limits (the seeds' user_budget_settings): per call, per day, per month,
//! and the share of a limit at which they are warned. A call whose maximum price would break
//! a limit is refused before any hold; crossing the warning threshold is recorded once per
//! period.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::values::{Cents, Invalid};

/// The start (UTC midnight) of the day of `now`: daily limits count from here.
pub fn day_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.from_utc_datetime(&now.date_naive().and_time(chrono::NaiveTime::MIN))
}

/// The start (UTC midnight of the first) of the month of `now`: monthly limits count from here.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    // Day 1 exists in every month.
    let first = now.date_naive().with_day(1).unwrap_or(now.date_naive());
    Utc.from_utc_datetime(&first.and_time(chrono::NaiveTime::MIN))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BudgetSettings {
    pub max_cost_per_call_cents: Option<i64>,
    pub max_daily_spend_cents: Option<i64>,
    pub max_monthly_spend_cents: Option<i64>,
    /// Warn when spend reaches this share of a daily or monthly limit (1–100; default 80).
    pub warn_at_percent: u8,
}

impl BudgetSettings {
    pub const DEFAULT_WARN_AT: u8 = 80;

    pub fn validate(self) -> Result<Self, Invalid> {
        for (field, v) in [
            ("max_cost_per_call_cents", self.max_cost_per_call_cents),
            ("max_daily_spend_cents", self.max_daily_spend_cents),
            ("max_monthly_spend_cents", self.max_monthly_spend_cents),
        ] {
            if v.is_some_and(|v| !(0..=100_000_000).contains(&v)) {
                return Err(Invalid::new(
                    field,
                    format!("{field}: 0 to 100000000 cents"),
                ));
            }
        }
        if !(1..=100).contains(&self.warn_at_percent) {
            return Err(Invalid::new("warn_at_percent", "warn_at_percent: 1 to 100"));
        }
        Ok(self)
    }

    /// Which limit a call of at most `max_price` would break, given what was already spent
    /// (or is held) today and this month.
    pub fn refusal(
        &self,
        max_price: Cents,
        spent_today: Cents,
        spent_month: Cents,
    ) -> Option<Breach> {
        if let Some(limit) = self.max_cost_per_call_cents.map(Cents) {
            if max_price > limit {
                return Some(Breach {
                    limit: "max_cost_per_call_cents",
                    limit_cents: limit,
                    would_be_cents: max_price,
                });
            }
        }
        if let Some(limit) = self.max_daily_spend_cents.map(Cents) {
            if spent_today + max_price > limit {
                return Some(Breach {
                    limit: "max_daily_spend_cents",
                    limit_cents: limit,
                    would_be_cents: spent_today + max_price,
                });
            }
        }
        if let Some(limit) = self.max_monthly_spend_cents.map(Cents) {
            if spent_month + max_price > limit {
                return Some(Breach {
                    limit: "max_monthly_spend_cents",
                    limit_cents: limit,
                    would_be_cents: spent_month + max_price,
                });
            }
        }
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breach {
    pub limit: &'static str,
    pub limit_cents: Cents,
    pub would_be_cents: Cents,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BudgetCommand {
    Set(BudgetSettings),
    /// Spend in `period` ("day:2026-11-29" or "month:2026-11") is now `spent_cents` of a
    /// `limit_cents` limit: warns once per period when it crosses the threshold.
    ObserveSpend {
        period: String,
        spent_cents: i64,
        limit_cents: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BudgetEvent {
    BudgetSet(BudgetSettings),
    BudgetAlertRaised {
        period: String,
        spent_cents: i64,
        limit_cents: i64,
        percent: u8,
    },
}

impl DomainEvent for BudgetEvent {
    fn event_type(&self) -> String {
        match self {
            BudgetEvent::BudgetSet(_) => "BudgetSet",
            BudgetEvent::BudgetAlertRaised { .. } => "BudgetAlertRaised",
        }
        .into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BudgetError {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    pub settings: Option<BudgetSettings>,
    pub alerted: Vec<String>,
}

impl Budget {
    pub fn settings(&self) -> BudgetSettings {
        self.settings.unwrap_or(BudgetSettings {
            warn_at_percent: BudgetSettings::DEFAULT_WARN_AT,
            ..Default::default()
        })
    }
}

impl Aggregate for Budget {
    const TYPE: &'static str = "budget";
    type Command = BudgetCommand;
    type Event = BudgetEvent;
    type Error = BudgetError;
    type Services = ();

    async fn handle(
        &mut self,
        command: BudgetCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), BudgetError> {
        match command {
            BudgetCommand::Set(settings) => {
                if self.settings != Some(settings) {
                    sink.write(BudgetEvent::BudgetSet(settings), self).await;
                }
            }
            BudgetCommand::ObserveSpend {
                period,
                spent_cents,
                limit_cents,
            } => {
                let threshold = self.settings().warn_at_percent as i64;
                if limit_cents > 0
                    && spent_cents * 100 >= limit_cents * threshold
                    && !self.alerted.contains(&period)
                {
                    let percent = (spent_cents * 100 / limit_cents).min(255) as u8;
                    sink.write(
                        BudgetEvent::BudgetAlertRaised {
                            period,
                            spent_cents,
                            limit_cents,
                            percent,
                        },
                        self,
                    )
                    .await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: BudgetEvent) {
        match event {
            BudgetEvent::BudgetSet(s) => self.settings = Some(s),
            BudgetEvent::BudgetAlertRaised { period, .. } => self.alerted.push(period),
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    #[test]
    fn days_and_months_start_at_utc_midnight() {
        let t = DateTime::parse_from_rfc3339("2026-11-29T23:59:59-05:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(day_start(t).to_rfc3339(), "2026-11-30T00:00:00+00:00");
        assert_eq!(month_start(t).to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(month_start(day_start(t)), month_start(t));
    }

    #[test]
    fn the_first_limit_broken_is_named() {
        let s = BudgetSettings {
            max_cost_per_call_cents: Some(300),
            max_daily_spend_cents: Some(500),
            max_monthly_spend_cents: Some(1000),
            warn_at_percent: 80,
        };
        assert_eq!(s.refusal(Cents(225), Cents(0), Cents(0)), None);
        assert_eq!(
            s.refusal(Cents(345), Cents(0), Cents(0)).unwrap().limit,
            "max_cost_per_call_cents"
        );
        assert_eq!(
            s.refusal(Cents(225), Cents(300), Cents(300)).unwrap().limit,
            "max_daily_spend_cents"
        );
        assert_eq!(
            s.refusal(Cents(225), Cents(0), Cents(900)).unwrap().limit,
            "max_monthly_spend_cents"
        );
    }

    #[test]
    fn crossing_the_threshold_warns_once_per_period() {
        let set = BudgetEvent::BudgetSet(BudgetSettings {
            max_daily_spend_cents: Some(1000),
            warn_at_percent: 80,
            ..Default::default()
        });
        let observe = |spent| BudgetCommand::ObserveSpend {
            period: "day:2026-11-29".into(),
            spent_cents: spent,
            limit_cents: 1000,
        };
        TestFramework::<Budget>::with(())
            .given(vec![set.clone()])
            .when(observe(700))
            .then_expect_events(vec![]);
        let alert = BudgetEvent::BudgetAlertRaised {
            period: "day:2026-11-29".into(),
            spent_cents: 850,
            limit_cents: 1000,
            percent: 85,
        };
        TestFramework::<Budget>::with(())
            .given(vec![set.clone()])
            .when(observe(850))
            .then_expect_events(vec![alert.clone()]);
        TestFramework::<Budget>::with(())
            .given(vec![set, alert])
            .when(observe(950))
            .then_expect_events(vec![]);
    }
}
