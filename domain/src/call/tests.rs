//! The call aggregate, given / when / then.

use chrono::{DateTime, Duration, Utc};
use cqrs_es::test::TestFramework;
use uuid::Uuid;

use super::*;
use crate::ids::UserId;
use crate::pricing::PriceTable;
use crate::values::PhoneNumber;

fn requested(scheduled_for: Option<DateTime<Utc>>) -> CallEvent {
    CallEvent::CallRequested {
        user_id: Uuid::nil(),
        persona_id: "brad_001".into(),
        persona_name: "Brad".into(),
        phone: PhoneNumber::parse("phone", "+14155550123").unwrap(),
        max_minutes: 5,
        payment: Payment::Credits { credits: 45 },
        prices: PriceTable::LAUNCH,
        max_price_cents: 225,
        scheduled_for,
        timezone: None,
    }
}

fn status(s: &str, sequence: u32, at: DateTime<Utc>) -> CallCommand {
    CallCommand::RecordStatus {
        call_sid: "CA1".into(),
        status: Status::from_twilio(s).unwrap(),
        sequence: Some(sequence),
        duration_secs: (s == "completed").then_some(61),
        at,
    }
}

#[test]
fn a_completed_call_is_priced_per_started_minute_and_costs_twilio_minutes() {
    let t = Utc::now();
    TestFramework::<Call>::with(())
        .given(vec![
            requested(None),
            CallEvent::CallPlaced {
                call_sid: "CA1".into(),
            },
            CallEvent::CallStatusChanged {
                status: Status::InProgress,
                sequence: Some(2),
                at: t,
            },
        ])
        .when(status("completed", 3, t + Duration::seconds(61)))
        .then_expect_events(vec![
            CallEvent::CallStatusChanged {
                status: Status::Ended(Outcome::Completed),
                sequence: Some(3),
                at: t + Duration::seconds(61),
            },
            CallEvent::CallEnded {
                outcome: Outcome::Completed,
                answered_secs: 61,
                billed_minutes: 2,
                price_cents: 105,
                at: t + Duration::seconds(61),
            },
            CallEvent::CostRecorded(Cost {
                service: "twilio".into(),
                operation: "outbound-voice-minutes".into(),
                quantity: 2,
                unit: "minute".into(),
                unit_cost_micros: 14_000,
                per_units: 1,
                total_micros: 28_000,
                estimated: false,
                billed_reference: None,
            }),
        ]);
}

#[test]
fn late_and_duplicate_callbacks_never_move_a_call_backwards() {
    let t = Utc::now();
    let given = vec![
        requested(None),
        CallEvent::CallPlaced {
            call_sid: "CA1".into(),
        },
        CallEvent::CallStatusChanged {
            status: Status::InProgress,
            sequence: Some(2),
            at: t,
        },
    ];
    for late in ["ringing", "initiated", "in-progress"] {
        TestFramework::<Call>::with(())
            .given(given.clone())
            .when(status(late, 1, t))
            .then_expect_events(vec![]);
    }
    TestFramework::<Call>::with(())
        .given(given)
        .when(CallCommand::RecordStatus {
            call_sid: "CA2".into(),
            status: Status::Ringing,
            sequence: None,
            at: t,
            duration_secs: None,
        })
        .then_expect_error(CallError::WrongCallSid {
            expected: "CA1".into(),
            got: "CA2".into(),
        });
}

#[test]
fn an_unanswered_call_costs_nothing() {
    let t = Utc::now();
    TestFramework::<Call>::with(())
        .given(vec![requested(None)])
        .when(status("no-answer", 2, t))
        .then_expect_events(vec![
            CallEvent::CallPlaced {
                call_sid: "CA1".into(),
            },
            CallEvent::CallStatusChanged {
                status: Status::Ended(Outcome::NoAnswer),
                sequence: Some(2),
                at: t,
            },
            CallEvent::CallEnded {
                outcome: Outcome::NoAnswer,
                answered_secs: 0,
                billed_minutes: 0,
                price_cents: 0,
                at: t,
            },
        ]);
}

#[test]
fn scheduled_calls_fire_once_and_cancel_only_with_notice() {
    let t = Utc::now();
    let when = t + Duration::minutes(30);
    TestFramework::<Call>::with(())
        .given(vec![
            requested(Some(when)),
            CallEvent::ScheduledCallFired { at: when },
        ])
        .when(CallCommand::Fire { at: when })
        .then_expect_events(vec![]);
    TestFramework::<Call>::with(())
        .given(vec![requested(Some(when))])
        .when(CallCommand::Cancel {
            by: UserId::from_uuid(Uuid::nil()),
            at: when - Duration::minutes(4),
            min_notice: Duration::minutes(5),
        })
        .then_expect_error(CallError::TooLate(5));
    TestFramework::<Call>::with(())
        .given(vec![requested(Some(when))])
        .when(CallCommand::Cancel {
            by: UserId::generate(),
            at: t,
            min_notice: Duration::minutes(5),
        })
        .then_expect_error(CallError::NotOwner);
}

#[test]
fn a_call_is_never_billed_past_its_paid_duration() {
    let t = Utc::now();
    let events = TestFramework::<Call>::with(())
        .given(vec![
            requested(None),
            CallEvent::CallPlaced {
                call_sid: "CA1".into(),
            },
            CallEvent::CallStatusChanged {
                status: Status::InProgress,
                sequence: Some(2),
                at: t,
            },
        ])
        .when(CallCommand::RecordStatus {
            call_sid: "CA1".into(),
            status: Status::Ended(Outcome::Completed),
            sequence: Some(3),
            duration_secs: Some(3600),
            at: t,
        })
        .inspect_result()
        .expect("accepted");
    let ended = events
        .iter()
        .find_map(|e| match e {
            CallEvent::CallEnded {
                billed_minutes,
                price_cents,
                ..
            } => Some((*billed_minutes, *price_cents)),
            _ => None,
        })
        .expect("the call ended");
    assert_eq!(ended, (5, 225), "5 paid minutes at most, the held price");
}

#[test]
fn a_billed_figure_is_recorded_once_per_provider_and_reference() {
    let billed = Cost::priced("twilio", "billed", 1, "call", 44_000, 1, true);
    let recorded = CallEvent::CostRecorded(Cost {
        estimated: false,
        billed_reference: Some("CA1".into()),
        ..billed.clone()
    });
    TestFramework::<Call>::with(())
        .given(vec![requested(None)])
        .when(CallCommand::RecordBilledCost {
            reference: "CA1".into(),
            cost: billed.clone(),
        })
        .then_expect_events(vec![recorded.clone()]);
    TestFramework::<Call>::with(())
        .given(vec![requested(None), recorded])
        .when(CallCommand::RecordBilledCost {
            reference: "CA1".into(),
            cost: billed,
        })
        .then_expect_events(vec![]);
}

#[test]
fn a_dial_attempt_is_recorded_only_by_the_handler_that_expected_it() {
    let t = Utc::now();
    TestFramework::<Call>::with(())
        .given(vec![requested(None)])
        .when(CallCommand::StartDial { attempt: 1, at: t })
        .then_expect_events(vec![CallEvent::DialAttempted { attempt: 1, at: t }]);
    // A second handler that also read "no attempt yet" records nothing, so it never dials.
    TestFramework::<Call>::with(())
        .given(vec![
            requested(None),
            CallEvent::DialAttempted { attempt: 1, at: t },
        ])
        .when(CallCommand::StartDial { attempt: 1, at: t })
        .then_expect_events(vec![]);
    // After a failed attempt, the next one is 2.
    TestFramework::<Call>::with(())
        .given(vec![
            requested(None),
            CallEvent::DialAttempted { attempt: 1, at: t },
            CallEvent::DialFailed {
                attempt: 1,
                reason: "503".into(),
            },
        ])
        .when(CallCommand::StartDial { attempt: 2, at: t })
        .then_expect_events(vec![CallEvent::DialAttempted { attempt: 2, at: t }]);
}

#[test]
fn a_refund_or_dispute_of_the_capture_is_recorded_once_and_never_beyond_the_hold() {
    let t = Utc::now();
    let reverse = |kind, reference: &str, amount_cents| CallCommand::RecordPaymentReversal {
        kind,
        reference: reference.into(),
        amount_cents,
        at: t,
    };
    let refunded = CallEvent::PaymentReversed {
        kind: Reversal::Refund,
        reference: "refund:ch_1".into(),
        amount_cents: 65,
        at: t,
    };
    TestFramework::<Call>::with(())
        .given(vec![requested(None)])
        .when(reverse(Reversal::Refund, "refund:ch_1", 65))
        .then_expect_events(vec![refunded.clone()]);
    // Redelivered: nothing more. The charge refunded further (cumulative 105): 40 more.
    TestFramework::<Call>::with(())
        .given(vec![requested(None), refunded.clone()])
        .when(reverse(Reversal::Refund, "refund:ch_1", 65))
        .then_expect_events(vec![]);
    TestFramework::<Call>::with(())
        .given(vec![requested(None), refunded.clone()])
        .when(reverse(Reversal::Refund, "refund:ch_1", 105))
        .then_expect_events(vec![CallEvent::PaymentReversed {
            kind: Reversal::Refund,
            reference: "refund:ch_1".into(),
            amount_cents: 40,
            at: t,
        }]);
    // A dispute for more than is left of the 225¢ hold: only what is left.
    TestFramework::<Call>::with(())
        .given(vec![requested(None), refunded])
        .when(reverse(Reversal::Dispute, "dispute:dp_1", 225))
        .then_expect_events(vec![CallEvent::PaymentReversed {
            kind: Reversal::Dispute,
            reference: "dispute:dp_1".into(),
            amount_cents: 160,
            at: t,
        }]);
}

#[test]
fn a_voice_session_records_its_costs_once() {
    let stt = Cost::priced("deepgram", "streaming-stt", 30, "second", 72, 1, false);
    let end = || CallCommand::RecordSessionEnd {
        costs: vec![stt.clone()],
        turns: 2,
        barge_ins: 0,
        early_replies: 0,
        reason: "caller hung up".into(),
        greeting_ms: None,
        barge_in_stop_ms: None,
        first_audio_ms: None,
    };
    let ended = CallEvent::VoiceSessionEnded {
        turns: 2,
        barge_ins: 0,
        early_replies: 0,
        reason: "caller hung up".into(),
        greeting_ms: None,
        barge_in_stop_ms: None,
        first_audio_ms: None,
    };
    TestFramework::<Call>::with(())
        .given(vec![requested(None)])
        .when(end())
        .then_expect_events(vec![CallEvent::CostRecorded(stt.clone()), ended.clone()]);
    // The same session replayed (or a second one) doubles nothing.
    TestFramework::<Call>::with(())
        .given(vec![
            requested(None),
            CallEvent::CostRecorded(stt.clone()),
            ended,
        ])
        .when(end())
        .then_expect_events(vec![]);
}
