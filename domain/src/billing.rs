//! A user's billing with Stripe: their customer, saved cards (one default), and the payment
//! intents authorised for calls (each pays for one call at most). Also the record of Stripe's
//! webhook events, one aggregate per event id, so the same event twice changes nothing.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub payment_method_id: String,
    pub brand: String,
    pub last4: String,
    pub exp_month: u32,
    pub exp_year: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BillingCommand {
    RecordCustomer {
        customer_id: String,
    },
    AttachCard {
        card: Card,
        make_default: bool,
    },
    DetachCard {
        payment_method_id: String,
    },
    SetDefault {
        payment_method_id: String,
    },
    /// A PaymentIntent with manual capture, authorised for `amount_cents`.
    RecordAuthorization {
        payment_intent_id: String,
        amount_cents: i64,
    },
    /// Reserves an authorised intent for one call.
    UseAuthorization {
        payment_intent_id: String,
        call_id: String,
        needed_cents: i64,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BillingEvent {
    StripeCustomerCreated {
        customer_id: String,
    },
    PaymentMethodAttached {
        card: Card,
    },
    PaymentMethodDetached {
        payment_method_id: String,
    },
    DefaultPaymentMethodSet {
        payment_method_id: String,
    },
    PaymentAuthorized {
        payment_intent_id: String,
        amount_cents: i64,
    },
    PaymentAuthorizationUsed {
        payment_intent_id: String,
        call_id: String,
    },
}

impl DomainEvent for BillingEvent {
    fn event_type(&self) -> String {
        match self {
            BillingEvent::StripeCustomerCreated { .. } => "StripeCustomerCreated",
            BillingEvent::PaymentMethodAttached { .. } => "PaymentMethodAttached",
            BillingEvent::PaymentMethodDetached { .. } => "PaymentMethodDetached",
            BillingEvent::DefaultPaymentMethodSet { .. } => "DefaultPaymentMethodSet",
            BillingEvent::PaymentAuthorized { .. } => "PaymentAuthorized",
            BillingEvent::PaymentAuthorizationUsed { .. } => "PaymentAuthorizationUsed",
        }
        .into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BillingError {
    #[error("no such payment method")]
    UnknownCard,
    #[error("the default payment method cannot be removed; make another one the default first")]
    DefaultCard,
    #[error("this payment intent was not authorised for you")]
    UnknownAuthorization,
    #[error("this payment intent already pays for another call")]
    AuthorizationUsed,
    #[error("this payment intent holds {held} cents; the call can cost up to {needed} cents")]
    AuthorizationTooSmall { held: i64, needed: i64 },
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Billing {
    pub customer_id: Option<String>,
    pub cards: Vec<Card>,
    pub default_card: Option<String>,
    /// Authorised intents: (id, amount, the call it pays for).
    pub authorizations: Vec<(String, i64, Option<String>)>,
}

impl Aggregate for Billing {
    const TYPE: &'static str = "billing";
    type Command = BillingCommand;
    type Event = BillingEvent;
    type Error = BillingError;
    type Services = ();

    async fn handle(
        &mut self,
        command: BillingCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), BillingError> {
        let mut events = vec![];
        match command {
            BillingCommand::RecordCustomer { customer_id } => {
                if self.customer_id.is_none() {
                    events.push(BillingEvent::StripeCustomerCreated { customer_id });
                }
            }
            BillingCommand::AttachCard { card, make_default } => {
                let id = card.payment_method_id.clone();
                if !self.cards.iter().any(|c| c.payment_method_id == id) {
                    events.push(BillingEvent::PaymentMethodAttached { card });
                }
                if (make_default || self.default_card.is_none())
                    && self.default_card.as_deref() != Some(&id)
                {
                    events.push(BillingEvent::DefaultPaymentMethodSet {
                        payment_method_id: id,
                    });
                }
            }
            BillingCommand::DetachCard { payment_method_id } => {
                if !self
                    .cards
                    .iter()
                    .any(|c| c.payment_method_id == payment_method_id)
                {
                    return Err(BillingError::UnknownCard);
                }
                if self.default_card.as_deref() == Some(&payment_method_id) {
                    return Err(BillingError::DefaultCard);
                }
                events.push(BillingEvent::PaymentMethodDetached { payment_method_id });
            }
            BillingCommand::SetDefault { payment_method_id } => {
                if !self
                    .cards
                    .iter()
                    .any(|c| c.payment_method_id == payment_method_id)
                {
                    return Err(BillingError::UnknownCard);
                }
                if self.default_card.as_deref() != Some(&payment_method_id) {
                    events.push(BillingEvent::DefaultPaymentMethodSet { payment_method_id });
                }
            }
            BillingCommand::RecordAuthorization {
                payment_intent_id,
                amount_cents,
            } => {
                if !self.authorizations.iter().any(|a| a.0 == payment_intent_id) {
                    events.push(BillingEvent::PaymentAuthorized {
                        payment_intent_id,
                        amount_cents,
                    });
                }
            }
            BillingCommand::UseAuthorization {
                payment_intent_id,
                call_id,
                needed_cents,
            } => {
                let Some((_, held, used)) = self
                    .authorizations
                    .iter()
                    .find(|a| a.0 == payment_intent_id)
                else {
                    return Err(BillingError::UnknownAuthorization);
                };
                match used {
                    Some(c) if *c == call_id => {}
                    Some(_) => return Err(BillingError::AuthorizationUsed),
                    None if *held < needed_cents => {
                        return Err(BillingError::AuthorizationTooSmall {
                            held: *held,
                            needed: needed_cents,
                        })
                    }
                    None => events.push(BillingEvent::PaymentAuthorizationUsed {
                        payment_intent_id,
                        call_id,
                    }),
                }
            }
        }
        for e in events {
            sink.write(e, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: BillingEvent) {
        match event {
            BillingEvent::StripeCustomerCreated { customer_id } => {
                self.customer_id = Some(customer_id)
            }
            BillingEvent::PaymentMethodAttached { card } => self.cards.push(card),
            BillingEvent::PaymentMethodDetached { payment_method_id } => self
                .cards
                .retain(|c| c.payment_method_id != payment_method_id),
            BillingEvent::DefaultPaymentMethodSet { payment_method_id } => {
                self.default_card = Some(payment_method_id)
            }
            BillingEvent::PaymentAuthorized {
                payment_intent_id,
                amount_cents,
            } => self
                .authorizations
                .push((payment_intent_id, amount_cents, None)),
            BillingEvent::PaymentAuthorizationUsed {
                payment_intent_id,
                call_id,
            } => {
                if let Some(a) = self
                    .authorizations
                    .iter_mut()
                    .find(|a| a.0 == payment_intent_id)
                {
                    a.2 = Some(call_id);
                }
            }
        }
    }
}

/// One Stripe webhook event, recorded once whatever Stripe resends.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordStripeEvent {
    pub kind: String,
    pub object_id: String,
    pub created: i64,
    pub summary: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StripeEventEvent {
    StripeEventReceived {
        kind: String,
        object_id: String,
        created: i64,
        summary: serde_json::Value,
    },
}

impl DomainEvent for StripeEventEvent {
    fn event_type(&self) -> String {
        "StripeEventReceived".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StripeEventError {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StripeEvent {
    pub received: bool,
}

impl Aggregate for StripeEvent {
    const TYPE: &'static str = "stripe_event";
    type Command = RecordStripeEvent;
    type Event = StripeEventEvent;
    type Error = StripeEventError;
    type Services = ();

    async fn handle(
        &mut self,
        c: RecordStripeEvent,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), StripeEventError> {
        if !self.received {
            sink.write(
                StripeEventEvent::StripeEventReceived {
                    kind: c.kind,
                    object_id: c.object_id,
                    created: c.created,
                    summary: c.summary,
                },
                self,
            )
            .await;
        }
        Ok(())
    }

    fn apply(&mut self, _: StripeEventEvent) {
        self.received = true;
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;

    use super::*;

    fn card(id: &str) -> Card {
        Card {
            payment_method_id: id.into(),
            brand: "visa".into(),
            last4: "4242".into(),
            exp_month: 12,
            exp_year: 2030,
        }
    }

    #[test]
    fn the_first_card_becomes_the_default_and_cannot_be_removed() {
        TestFramework::<Billing>::with(())
            .given_no_previous_events()
            .when(BillingCommand::AttachCard {
                card: card("pm_1"),
                make_default: false,
            })
            .then_expect_events(vec![
                BillingEvent::PaymentMethodAttached { card: card("pm_1") },
                BillingEvent::DefaultPaymentMethodSet {
                    payment_method_id: "pm_1".into(),
                },
            ]);
        TestFramework::<Billing>::with(())
            .given(vec![
                BillingEvent::PaymentMethodAttached { card: card("pm_1") },
                BillingEvent::DefaultPaymentMethodSet {
                    payment_method_id: "pm_1".into(),
                },
            ])
            .when(BillingCommand::DetachCard {
                payment_method_id: "pm_1".into(),
            })
            .then_expect_error(BillingError::DefaultCard);
    }

    #[test]
    fn an_authorization_pays_for_one_call_and_must_cover_it() {
        let given = vec![BillingEvent::PaymentAuthorized {
            payment_intent_id: "pi_1".into(),
            amount_cents: 225,
        }];
        let use_for = |call: &str, needed| BillingCommand::UseAuthorization {
            payment_intent_id: "pi_1".into(),
            call_id: call.into(),
            needed_cents: needed,
        };
        TestFramework::<Billing>::with(())
            .given(given.clone())
            .when(use_for("c1", 265))
            .then_expect_error(BillingError::AuthorizationTooSmall {
                held: 225,
                needed: 265,
            });
        let mut used = given;
        used.push(BillingEvent::PaymentAuthorizationUsed {
            payment_intent_id: "pi_1".into(),
            call_id: "c1".into(),
        });
        TestFramework::<Billing>::with(())
            .given(used.clone())
            .when(use_for("c2", 225))
            .then_expect_error(BillingError::AuthorizationUsed);
        TestFramework::<Billing>::with(())
            .given(used)
            .when(use_for("c1", 225))
            .then_expect_events(vec![]);
    }
}
