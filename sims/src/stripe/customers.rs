//! Customers: create, retrieve, update (the default payment method), delete (its cards
//! detached; retrieving it then answers `deleted: true`, deleting it again `resource_missing`,
//! as Stripe does).

use super::*;

// ---------------------------------------------------------------------------------------------
// Handlers

pub(super) async fn create_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let op: WriteOp = Box::new(|l, p, _| {
        let customer = json!({
            "id": random_id("cus"),
            "object": "customer",
            "created": now(),
            "email": param(p, "email"),
            "name": param(p, "name"),
            "description": param(p, "description"),
            "metadata": metadata(p),
            "invoice_settings": { "default_payment_method": null },
            "livemode": false,
        });
        l.customers.insert(
            customer["id"].as_str().unwrap_or_default().to_string(),
            customer.clone(),
        );
        Ok(customer)
    });
    sim.write(&headers, "POST /v1/customers".into(), &body, op)
        .await
}

pub(super) async fn get_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = sim.admit(&headers).await {
        return r;
    }
    let found = sim.ledger().customers.get(&id).cloned();
    match found {
        Some(body) => respond(StatusCode::OK, body, &[]),
        None => {
            let e = ApiError::missing("id", "customer", &id);
            respond(e.status, e.body(), &[])
        }
    }
}

pub(super) async fn update_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("POST /v1/customers/{id}");
    let op: WriteOp = Box::new(move |l, p, _| {
        let default_pm = param(p, "invoice_settings[default_payment_method]");
        if let Some(pm) = default_pm.filter(|pm| !pm.is_empty()) {
            let attached = l.cards.get(pm).map(|c| c.customer.as_deref() == Some(&id));
            match attached {
                None => return Err(ApiError::missing("invoice_settings[default_payment_method]", "PaymentMethod", pm)),
                Some(false) => {
                    return Err(ApiError::invalid(
                        None,
                        Some("invoice_settings[default_payment_method]"),
                        format!("The customer does not have a payment method with the ID {pm}. The payment method must be attached to the customer."),
                    ))
                }
                Some(true) => {}
            }
        }
        let customer = l
            .customers
            .get_mut(&id)
            .ok_or_else(|| ApiError::missing("id", "customer", &id))?;
        for key in ["email", "name", "description"] {
            if let Some(v) = param(p, key) {
                customer[key] = json!(v);
            }
        }
        for (k, v) in metadata(p) {
            customer["metadata"][k] = json!(v);
        }
        if let Some(pm) = default_pm {
            customer["invoice_settings"]["default_payment_method"] = if pm.is_empty() {
                Value::Null
            } else {
                json!(pm)
            };
        }
        Ok(customer.clone())
    });
    sim.write(&headers, endpoint, &body, op).await
}

pub(super) async fn delete_customer(
    State(sim): State<StripeSim>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let endpoint = format!("DELETE /v1/customers/{id}");
    let op: WriteOp = Box::new(move |l, _, _| {
        let customer = l
            .customers
            .get_mut(&id)
            .filter(|c| c["deleted"] != true)
            .ok_or_else(|| ApiError::missing("id", "customer", &id))?;
        let deleted = json!({ "id": id, "object": "customer", "deleted": true });
        *customer = deleted.clone();
        for card in l.cards.values_mut() {
            if card.customer.as_deref() == Some(id.as_str()) {
                card.customer = None;
            }
        }
        Ok(deleted)
    });
    sim.write(&headers, endpoint, &body, op).await
}
