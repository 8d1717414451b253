//! Card payment methods: list, attach (test tokens and numbers), detach.

use super::*;

pub(super) async fn list_payment_methods(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    sim.read(&headers, query, |l, p| {
        if let Some(kind) = param(p, "type").filter(|t| *t != "card") {
            return Ok(json!({ "object": "list", "data": [], "has_more": false, "url": "/v1/payment_methods", "type": kind }));
        }
        let customer = param(p, "customer");
        let limit = param(p, "limit")
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(10)
            .clamp(1, 100);
        if let Some(c) = customer {
            if !l.customers.contains_key(c) {
                return Err(ApiError::missing("customer", "customer", c));
            }
        }
        let mut cards: Vec<&Card> = l
            .cards
            .values()
            .filter(|c| c.customer.is_some() && c.customer.as_deref() == customer.or(c.customer.as_deref()))
            .collect();
        cards.sort_by_key(|c| std::cmp::Reverse(c.seq));
        let has_more = cards.len() > limit;
        let data: Vec<Value> = cards.iter().take(limit).map(|c| c.json()).collect();
        Ok(json!({ "object": "list", "data": data, "has_more": has_more, "url": "/v1/payment_methods" }))
    })
    .await
}

/// A new payment method for a test token or raw test card number.
pub(super) fn new_card(l: &mut Ledger, card: TestCard, customer: Option<String>) -> String {
    l.seq += 1;
    let id = random_id("pm");
    l.cards.insert(
        id.clone(),
        Card {
            id: id.clone(),
            seq: l.seq,
            created: now(),
            customer,
            card,
        },
    );
    id
}

pub(super) async fn attach(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_methods/{id}/attach");
    let op: WriteOp = Box::new(move |l, p, events| {
        let customer = param(p, "customer")
            .ok_or_else(|| {
                ApiError::invalid(
                    Some("parameter_missing"),
                    Some("customer"),
                    "Missing required param: customer.".into(),
                )
            })?
            .to_string();
        if !l.customers.contains_key(&customer) {
            return Err(ApiError::missing("customer", "customer", &customer));
        }
        let pm_id =
            if let Some(card) = test_token(&id) {
                new_card(l, card, Some(customer.clone()))
            } else {
                let card = l
                    .cards
                    .get_mut(&id)
                    .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", &id))?;
                match &card.customer {
                    Some(c) if *c != customer => return Err(ApiError::invalid(
                        None,
                        Some("payment_method"),
                        "The payment method you provided has already been attached to a customer."
                            .into(),
                    )),
                    _ => card.customer = Some(customer.clone()),
                }
                id.clone()
            };
        let json = l.cards.get(&pm_id).map(Card::json).unwrap_or_default();
        events.push(("payment_method.attached", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}

pub(super) async fn detach(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/payment_methods/{id}/detach");
    let op: WriteOp = Box::new(move |l, _, events| {
        let card = l
            .cards
            .get_mut(&id)
            .ok_or_else(|| ApiError::missing("payment_method", "PaymentMethod", &id))?;
        let Some(customer) = card.customer.take() else {
            return Err(ApiError::invalid(
                None,
                None,
                "The payment method you provided is not attached to a customer so detachment is impossible.".into(),
            ));
        };
        let json = card.json();
        if let Some(c) = l.customers.get_mut(&customer) {
            if c["invoice_settings"]["default_payment_method"] == json!(id) {
                c["invoice_settings"]["default_payment_method"] = Value::Null;
            }
        }
        events.push(("payment_method.detached", json.clone()));
        Ok(json)
    });
    sim.write(&headers, endpoint, &body, op).await
}
