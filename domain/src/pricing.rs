//! Prices: what a call costs the user, and what each provider's unit costs us, as versioned
//! events, so a replay prices each call at the rates in force when it was requested.
//!
//! Money: user prices in integer US cents; provider unit costs in integer micro-dollars
//! (a millionth of a dollar), since they are fractions of a cent. Never floats.
//!
//! Rounding rule: a call is charged the connection fee plus the per-minute rate for every
//! *started* minute of answered time (61 s is 2 minutes). An unanswered, busy or failed call
//! costs the user nothing. Provider costs follow each provider's own unit (Twilio bills per
//! started minute too).

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::cost::{Cost, CostKind};
use crate::values::Cents;

/// One dollar in micro-dollars.
pub const MICROS_PER_DOLLAR: i64 = 1_000_000;
/// One cent in micro-dollars.
pub const MICROS_PER_CENT: i64 = 10_000;

/// The single pricing aggregate's id.
pub const PRICING_ID: &str = "prices";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceTable {
    pub version: u32,
    /// What the user pays to connect a call.
    pub connection_fee_cents: i64,
    /// What the user pays per started minute.
    pub per_minute_cents: i64,
    /// Twilio outbound voice, per started minute.
    pub twilio_per_minute_micros: i64,
    /// Deepgram streaming speech-to-text, per minute of audio (billed per second).
    pub deepgram_per_minute_micros: i64,
    /// LLM tokens (input and output), per million.
    pub llm_per_million_tokens_micros: i64,
    /// ElevenLabs text-to-speech, per thousand characters.
    pub elevenlabs_per_thousand_chars_micros: i64,
}

impl PriceTable {
    /// The prices the product launched with (project review 2.0's cost model).
    pub const LAUNCH: PriceTable = PriceTable {
        version: 1,
        connection_fee_cents: 25,
        per_minute_cents: 40,
        twilio_per_minute_micros: 14_000,
        deepgram_per_minute_micros: 5_900,
        llm_per_million_tokens_micros: 100_000,
        elevenlabs_per_thousand_chars_micros: 150_000,
    };

    /// Started minutes in `seconds` of answered time.
    pub fn billed_minutes(seconds: u32) -> u32 {
        seconds.div_ceil(60)
    }

    /// What an answered call of `seconds` costs the user.
    pub fn call_price(&self, seconds: u32) -> Cents {
        Cents(
            self.connection_fee_cents
                + self.per_minute_cents * Self::billed_minutes(seconds) as i64,
        )
    }

    /// The most a call of at most `minutes` can cost: what is held before dialling.
    pub fn max_price(&self, minutes: u32) -> Cents {
        Cents(self.connection_fee_cents + self.per_minute_cents * minutes as i64)
    }

    /// What a call answered for `seconds`, paid for at most `max_minutes`, costs the user:
    /// never more than what was held.
    pub fn price_of_call(&self, seconds: u32, max_minutes: u32) -> Cents {
        Cents(
            self.call_price(seconds)
                .0
                .min(self.max_price(max_minutes).0),
        )
    }

    /// The rate of `kind`: micro-dollars per so many units.
    pub fn rate(&self, kind: CostKind) -> (i64, i64) {
        match kind {
            CostKind::TwilioVoiceMinutes => (self.twilio_per_minute_micros, 1),
            CostKind::DeepgramStreamingStt => (self.deepgram_per_minute_micros, 60),
            CostKind::ChatTokens(_)
            | CostKind::MemoryExtractionTokens(_)
            | CostKind::MemoryEmbeddingTokens
            | CostKind::KnowledgeEmbeddingTokens => (self.llm_per_million_tokens_micros, 1_000_000),
            CostKind::TtsCharacters => (self.elevenlabs_per_thousand_chars_micros, 1000),
        }
    }

    /// A cost line: `quantity` units of `kind` at this table's rate; `estimated` when we
    /// counted them rather than the provider.
    pub fn cost(&self, kind: CostKind, quantity: i64, estimated: bool) -> Cost {
        let (micros, per) = self.rate(kind);
        Cost::priced(
            kind.service(),
            kind.operation(),
            quantity,
            kind.unit(),
            micros,
            per,
            estimated,
        )
    }
}

/// Credits that pay for `cents`, rounded up.
pub fn credits_for(cents: Cents) -> i64 {
    let cents = cents.0.max(0);
    (cents + crate::wallet::CENTS_PER_CREDIT - 1) / crate::wallet::CENTS_PER_CREDIT
}

#[derive(Debug, Clone, PartialEq)]
pub enum PricingCommand {
    /// Publishes `table` from `effective_from` unless it is the table already in force.
    Publish {
        table: PriceTable,
        effective_from: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PricingEvent {
    PricesPublished {
        table: PriceTable,
        effective_from: DateTime<Utc>,
    },
}

impl DomainEvent for PricingEvent {
    fn event_type(&self) -> String {
        "PricesPublished".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PricingError {
    #[error("price table version {0} is not newer than the one in force")]
    StaleVersion(u32),
}

/// Every table ever published, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Pricing {
    pub tables: Vec<(DateTime<Utc>, PriceTable)>,
}

impl Pricing {
    /// The table in force at `at` (the launch table before any was published).
    pub fn at(&self, at: DateTime<Utc>) -> PriceTable {
        self.tables
            .iter()
            .rev()
            .find(|(from, _)| *from <= at)
            .map(|(_, t)| *t)
            .unwrap_or(PriceTable::LAUNCH)
    }

    pub fn version(&self, version: u32) -> Option<PriceTable> {
        self.tables
            .iter()
            .map(|(_, t)| *t)
            .find(|t| t.version == version)
    }
}

impl Aggregate for Pricing {
    const TYPE: &'static str = "pricing";
    type Command = PricingCommand;
    type Event = PricingEvent;
    type Error = PricingError;
    type Services = ();

    async fn handle(
        &mut self,
        command: PricingCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), PricingError> {
        let PricingCommand::Publish {
            table,
            effective_from,
        } = command;
        match self.tables.last() {
            Some((_, current)) if *current == table => return Ok(()),
            Some((_, current)) if current.version >= table.version => {
                return Err(PricingError::StaleVersion(table.version))
            }
            _ => {}
        }
        sink.write(
            PricingEvent::PricesPublished {
                table,
                effective_from,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, event: PricingEvent) {
        let PricingEvent::PricesPublished {
            table,
            effective_from,
        } = event;
        self.tables.push((effective_from, table));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_charged_per_started_minute() {
        let p = PriceTable::LAUNCH;
        assert_eq!(p.call_price(0), Cents(25));
        assert_eq!(p.call_price(1), Cents(65));
        assert_eq!(p.call_price(60), Cents(65));
        assert_eq!(p.call_price(61), Cents(105));
        assert_eq!(p.max_price(5), Cents(225));
        assert_eq!(p.price_of_call(61, 5), Cents(105));
        assert_eq!(
            p.price_of_call(3600, 5),
            Cents(225),
            "never more than the hold"
        );
        assert_eq!(credits_for(Cents(225)), 45);
        assert_eq!(credits_for(Cents(226)), 46);
    }

    #[test]
    fn costs_are_priced_at_the_tables_rates_rounded_once() {
        let p = PriceTable::LAUNCH;
        let stt = p.cost(CostKind::DeepgramStreamingStt, 90, false);
        assert_eq!(
            (stt.service.as_str(), stt.operation.as_str()),
            ("deepgram", "streaming-stt")
        );
        assert_eq!(stt.total_micros, 8_850, "90 s at 5,900 µ$ a minute");
        let tokens = p.cost(
            CostKind::ChatTokens(crate::cost::LlmProvider::Cerebras),
            1_234,
            true,
        );
        assert_eq!(
            tokens.total_micros, 123,
            "1,234 tokens at 0.1 $ a million, half up"
        );
        assert!(tokens.estimated);
        assert_eq!(
            p.cost(CostKind::TtsCharacters, 1_000, false).total_micros,
            150_000
        );
        assert_eq!(
            p.cost(CostKind::TwilioVoiceMinutes, 2, false).total_micros,
            28_000
        );
    }

    #[test]
    fn the_table_in_force_is_the_last_one_published_before() {
        let t0 = Utc::now();
        let mut p = Pricing::default();
        p.apply(PricingEvent::PricesPublished {
            table: PriceTable::LAUNCH,
            effective_from: t0,
        });
        let v2 = PriceTable {
            version: 2,
            per_minute_cents: 45,
            ..PriceTable::LAUNCH
        };
        p.apply(PricingEvent::PricesPublished {
            table: v2,
            effective_from: t0 + chrono::Duration::days(1),
        });
        assert_eq!(p.at(t0 + chrono::Duration::hours(1)).version, 1);
        assert_eq!(p.at(t0 + chrono::Duration::days(2)).version, 2);
        assert_eq!(p.version(2), Some(v2));
    }
}
