//! PaymentIntents: create (and confirm), retrieve, capture (partially), cancel.

use super::*;

pub(super) fn find_intent<'a>(l: &'a mut Ledger, id: &str) -> Result<&'a mut Intent, ApiError> {
    l.intents
        .iter_mut()
        .find(|i| i.id == id)
        .ok_or_else(|| ApiError::missing("intent", "payment_intent", id))
}

pub(super) async fn create_intent(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op: WriteOp = Box::new(|l, p, events| {
        let amount = cents(p, "amount")?.ok_or_else(|| {
            ApiError::invalid(
                Some("parameter_missing"),
                Some("amount"),
                "Missing required param: amount.".into(),
            )
        })?;
        let currency = param(p, "currency")
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_missing"),
                    Some("currency"),
                    "Missing required param: currency.".into(),
                )
            })?
            .to_ascii_lowercase();
        if currency == "usd" && amount < MIN_USD_CENTS {
            return Err(ApiError::invalid(
                Some("amount_too_small"),
                Some("amount"),
                "Amount must be at least $0.50 usd".into(),
            ));
        }
        let capture_method = param(p, "capture_method")
            .unwrap_or("automatic")
            .to_string();
        if !["automatic", "automatic_async", "manual"].contains(&capture_method.as_str()) {
            return Err(bad_param("capture_method", &capture_method));
        }
        let confirm = flag(p, "confirm")?;
        let off_session = flag(p, "off_session")?;
        if off_session && !confirm {
            return Err(ApiError::invalid(
                None,
                Some("off_session"),
                "off_session can only be used when confirm=true.".into(),
            ));
        }
        let customer = param(p, "customer").map(str::to_string);
        if let Some(c) = &customer {
            if !l.customers.contains_key(c) {
                return Err(ApiError::missing("customer", "customer", c));
            }
        }
        let raw_number = param(p, "payment_method_data[card][number]").or(param(p, "card[number]"));
        let payment_method = match (param(p, "payment_method"), raw_number) {
            (_, Some(number)) => {
                let card = test_number(number).ok_or_else(|| ApiError {
                    status: StatusCode::PAYMENT_REQUIRED,
                    kind: "card_error",
                    code: Some("incorrect_number"),
                    decline_code: None,
                    message: "Your card number is incorrect.".into(),
                    param: Some("number"),
                    payment_intent: None,
                })?;
                Some(new_card(l, card, None))
            }
            (Some(token), None) if test_token(token).is_some() => {
                let card = test_token(token).unwrap_or(VISA);
                Some(new_card(l, card, None))
            }
            (Some(id), None) => {
                let card = l
                    .cards
                    .get(id)
                    .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", id))?;
                if card.customer.is_some() && card.customer != customer {
                    return Err(ApiError::invalid(
                        None,
                        Some("payment_method"),
                        format!("The provided PaymentMethod {id} belongs to another customer."),
                    ));
                }
                Some(id.to_string())
            }
            (None, None) => None,
        };
        let mut intent = Intent {
            id: random_id("pi"),
            created: now(),
            amount,
            currency,
            customer,
            payment_method: payment_method.clone(),
            capture_method: capture_method.clone(),
            status: if payment_method.is_some() {
                "requires_confirmation"
            } else {
                "requires_payment_method"
            },
            amount_capturable: 0,
            amount_received: 0,
            amount_refunded: 0,
            metadata: metadata(p),
            description: param(p, "description").map(str::to_string),
            last_payment_error: None,
            latest_charge: None,
            canceled_at: None,
            cancellation_reason: None,
        };
        if !confirm {
            let json = intent.json();
            l.intents.push(intent);
            return Ok(json);
        }
        let Some(pm) = payment_method else {
            return Err(ApiError::invalid(
                Some("payment_intent_unexpected_state"),
                Some("payment_method"),
                "You cannot confirm this PaymentIntent because it's missing a payment method."
                    .into(),
            ));
        };
        let card = l
            .cards
            .get(&pm)
            .map(|c| (c.card, c.json()))
            .unwrap_or((VISA, Value::Null));
        let decline = match card.0.behaviour {
            Behaviour::Succeeds | Behaviour::Disputed => None,
            Behaviour::Declined => Some(("generic_decline", "Your card was declined.")),
            Behaviour::InsufficientFunds => {
                Some(("insufficient_funds", "Your card has insufficient funds."))
            }
        };
        if let Some((decline_code, message)) = decline {
            intent.status = "requires_payment_method";
            intent.payment_method = None;
            intent.last_payment_error = Some(json!({
                "type": "card_error",
                "code": "card_declined",
                "decline_code": decline_code,
                "message": message,
                "payment_method": card.1,
            }));
            let json = intent.json();
            l.intents.push(intent);
            events.push(("payment_intent.payment_failed", json.clone()));
            return Err(ApiError {
                status: StatusCode::PAYMENT_REQUIRED,
                kind: "card_error",
                code: Some("card_declined"),
                decline_code: Some(decline_code),
                message: message.into(),
                param: None,
                payment_intent: Some(Box::new(json)),
            });
        }
        intent.latest_charge = Some(random_id("ch"));
        if capture_method == "manual" {
            intent.status = "requires_capture";
            intent.amount_capturable = amount;
            events.push(("payment_intent.amount_capturable_updated", intent.json()));
        } else {
            intent.status = "succeeded";
            intent.amount_received = amount;
            l.captured_cents += amount;
            events.push(("payment_intent.succeeded", intent.json()));
            if card.0.behaviour == Behaviour::Disputed {
                events.push(("charge.dispute.created", intent.dispute_json()));
            }
        }
        let json = intent.json();
        l.intents.push(intent);
        Ok(json)
    });
    sim.write(&headers, "POST /v1/payment_intents".into(), &body, op)
        .await
}

pub(super) async fn get_intent(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = sim.admit(&headers).await {
        return r;
    }
    let outcome = find_intent(&mut sim.ledger(), &id).map(|i| i.json());
    match outcome {
        Ok(body) => respond(StatusCode::OK, body, &[]),
        Err(e) => respond(e.status, e.body(), &[]),
    }
}

pub(super) fn unexpected_state(intent: &Intent, action: &str) -> ApiError {
    ApiError {
        payment_intent: Some(Box::new(intent.json())),
        ..ApiError::invalid(
            Some("payment_intent_unexpected_state"),
            None,
            format!(
                "This PaymentIntent could not be {action} because it has a status of {}.",
                intent.status
            ),
        )
    }
}

pub(super) async fn capture(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_intents/{id}/capture");
    let op: WriteOp = Box::new(move |l, p, events| {
        let requested = cents(p, "amount_to_capture")?;
        let intent = find_intent(l, &id)?;
        if intent.status != "requires_capture" {
            return Err(unexpected_state(intent, "captured"));
        }
        let amount = requested.unwrap_or(intent.amount_capturable);
        if amount > intent.amount_capturable {
            return Err(ApiError::invalid(
                Some("amount_too_large"),
                Some("amount_to_capture"),
                format!(
                    "The amount to capture ({amount}) is greater than the amount capturable ({}).",
                    intent.amount_capturable
                ),
            ));
        }
        for (k, v) in metadata(p) {
            intent.metadata.insert(k, v);
        }
        intent.status = "succeeded";
        intent.amount_received = amount;
        intent.amount_capturable = 0;
        let json = intent.json();
        let dispute = (amount > 0).then(|| intent.dispute_json());
        let disputed = l.disputes(json["payment_method"].as_str());
        l.captured_cents += amount;
        events.push(("payment_intent.succeeded", json.clone()));
        if let Some(dispute) = dispute.filter(|_| disputed) {
            events.push(("charge.dispute.created", dispute));
        }
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

pub(super) async fn cancel(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_intents/{id}/cancel");
    let op: WriteOp = Box::new(move |l, p, events| {
        let reason = param(p, "cancellation_reason").map(str::to_string);
        if let Some(r) = &reason {
            if ![
                "duplicate",
                "fraudulent",
                "requested_by_customer",
                "abandoned",
            ]
            .contains(&r.as_str())
            {
                return Err(bad_param("cancellation_reason", r));
            }
        }
        let intent = find_intent(l, &id)?;
        let cancellable = [
            "requires_payment_method",
            "requires_confirmation",
            "requires_action",
            "requires_capture",
        ];
        if !cancellable.contains(&intent.status) {
            return Err(unexpected_state(intent, "canceled"));
        }
        intent.status = "canceled";
        intent.amount_capturable = 0;
        intent.canceled_at = Some(now());
        intent.cancellation_reason = reason;
        let json = intent.json();
        events.push(("payment_intent.canceled", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}
