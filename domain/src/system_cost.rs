//! Provider usage that belongs to no call — greetings synthesised at start-up for the cache,
//! voice checks, warm-ups — recorded as costs of their own, so that a provider's monthly bill
//! reconciles with the event log: call costs (`CostRecorded`) plus these
//! (`SystemCostRecorded`). Each recording is a `system_cost` aggregate of one event, under an id
//! the recorder chooses; recording the same id again changes nothing.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::cost::Cost;

/// Records one use of a provider that no call pays for.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordSystemCost {
    /// What it was for: `greeting-cache`, `voice-check`, `warm-up`.
    pub purpose: String,
    /// What it concerned (a persona, a voice), for the analyst.
    pub subject: String,
    pub cost: Cost,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SystemCostEvent {
    SystemCostRecorded {
        purpose: String,
        subject: String,
        cost: Cost,
    },
}

impl DomainEvent for SystemCostEvent {
    fn event_type(&self) -> String {
        "SystemCostRecorded".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SystemCostError {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemCost {
    pub recorded: bool,
}

impl Aggregate for SystemCost {
    const TYPE: &'static str = "system_cost";
    type Command = RecordSystemCost;
    type Event = SystemCostEvent;
    type Error = SystemCostError;
    type Services = ();

    async fn handle(
        &mut self,
        c: RecordSystemCost,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), SystemCostError> {
        if !self.recorded {
            sink.write(
                SystemCostEvent::SystemCostRecorded {
                    purpose: c.purpose,
                    subject: c.subject,
                    cost: c.cost,
                },
                self,
            )
            .await;
        }
        Ok(())
    }

    fn apply(&mut self, _: SystemCostEvent) {
        self.recorded = true;
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;
    use crate::cost::CostKind;
    use crate::pricing::PriceTable;

    fn record() -> RecordSystemCost {
        RecordSystemCost {
            purpose: "greeting-cache".into(),
            subject: "sys-brad".into(),
            cost: PriceTable::LAUNCH.cost(CostKind::TtsCharacters, 42, false),
        }
    }

    #[test]
    fn a_system_cost_is_recorded_once() {
        let r = record();
        let event = SystemCostEvent::SystemCostRecorded {
            purpose: r.purpose.clone(),
            subject: r.subject.clone(),
            cost: r.cost.clone(),
        };
        TestFramework::<SystemCost>::with(())
            .given_no_previous_events()
            .when(record())
            .then_expect_events(vec![event.clone()]);
        TestFramework::<SystemCost>::with(())
            .given(vec![event])
            .when(record())
            .then_expect_events(vec![]);
    }
}
