//! Refunds of captured PaymentIntents.

use super::*;

pub(super) async fn create_refund(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op: WriteOp = Box::new(|l, p, events| {
        let requested = cents(p, "amount")?;
        let reason = param(p, "reason").map(str::to_string);
        let intent = match (param(p, "payment_intent"), param(p, "charge")) {
            (Some(pi), _) => find_intent(l, pi)?,
            (None, Some(ch)) => l
                .intents
                .iter_mut()
                .find(|i| i.latest_charge.as_deref() == Some(ch))
                .ok_or_else(|| ApiError::missing("charge", "charge", ch))?,
            (None, None) => {
                return Err(ApiError::invalid(
                    Some("parameter_missing"),
                    Some("payment_intent"),
                    "One of the following params should be provided for this request: payment_intent or charge.".into(),
                ))
            }
        };
        if intent.status != "succeeded" || intent.amount_received == 0 {
            return Err(unexpected_state(intent, "refunded"));
        }
        let left = intent.amount_received - intent.amount_refunded;
        if left == 0 {
            return Err(ApiError::invalid(
                Some("charge_already_refunded"),
                None,
                format!(
                    "Charge {} has already been refunded.",
                    intent.latest_charge.as_deref().unwrap_or_default()
                ),
            ));
        }
        let amount = requested.unwrap_or(left);
        if amount > left {
            return Err(ApiError::invalid(
                Some("amount_too_large"),
                Some("amount"),
                format!(
                    "Refund amount ({amount}) is greater than unrefunded amount on charge ({left})"
                ),
            ));
        }
        intent.amount_refunded += amount;
        let refund = json!({
            "id": random_id("re"),
            "object": "refund",
            "amount": amount,
            "currency": intent.currency,
            "charge": intent.latest_charge,
            "payment_intent": intent.id,
            "reason": reason,
            "status": "succeeded",
            "created": now(),
            "metadata": metadata(p),
        });
        events.push(("charge.refunded", intent.charge_json()));
        l.refunded_cents += amount;
        Ok(refund)
    });
    sim.write(&headers, "POST /v1/refunds".into(), &body, op)
        .await
}
