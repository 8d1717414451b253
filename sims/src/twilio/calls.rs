//! The Calls REST resource: create, fetch, update (hang up, cancel), list.

use super::*;

pub(super) async fn create_call(
    State(sim): State<TwilioSim>,
    Path(account): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if sim.inner.settings.faults.apply().await {
        return twilio_error(
            StatusCode::SERVICE_UNAVAILABLE,
            20503,
            "Service unavailable (injected failure)",
        );
    }
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let form = parse_form(&body);
    let Some(to) = param(&form, "To") else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21201,
            "No 'To' number is specified",
        );
    };
    if !plausible_destination(to) {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21211,
            &format!("Invalid 'To' Phone Number: {to}"),
        );
    }
    let Some(from) = param(&form, "From") else {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21603,
            "A 'From' phone number is required.",
        );
    };
    let url = param(&form, "Url");
    let twiml = param(&form, "Twiml");
    if url.is_none() && twiml.is_none() {
        return twilio_error(StatusCode::BAD_REQUEST, 21205, "Url parameter is required.");
    }
    let time_limit = match param(&form, "TimeLimit").map(|v| v.trim().parse::<u32>()) {
        None => DEFAULT_TIME_LIMIT_SECS,
        Some(Ok(secs)) if secs > 0 => secs,
        Some(_) => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                20001,
                "TimeLimit must be a positive number of seconds",
            )
        }
    };
    let events: Vec<String> = form
        .iter()
        .filter(|(k, _)| k == "StatusCallbackEvent")
        .flat_map(|(_, v)| v.split([' ', ',']))
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
        .collect();
    if let Some(bad) = events.iter().find(|e| {
        !matches!(
            e.as_str(),
            "initiated" | "ringing" | "answered" | "completed"
        )
    }) {
        return twilio_error(
            StatusCode::BAD_REQUEST,
            21626,
            &format!("Invalid StatusCallbackEvent: {bad}"),
        );
    }
    let call = SimCall {
        sid: format!("CA{:032x}", rand::random::<u128>()),
        to: to.to_string(),
        from: from.to_string(),
        url: url.unwrap_or_default().to_string(),
        status_callback: param(&form, "StatusCallback").map(str::to_string),
        time_limit,
        status: "queued".into(),
        date_created: Utc::now(),
        answered_at: None,
        ended_at: None,
        duration_secs: None,
        callbacks_sent: 0,
        stream_opened: false,
        stream_closed: false,
        frames_sent: 0,
        frames_received: 0,
        marks_received: 0,
        marks_echoed: 0,
        clears_received: 0,
        invalid_messages: 0,
        said_after_stream: 0,
    };
    let body = sim.resource(&call);
    let sid = call.sid.clone();
    sim.lock().push(Record {
        call,
        events,
        twiml: twiml.map(str::to_string),
        hang_up: CancellationToken::new(),
        counters: Arc::default(),
    });
    tracing::info!(call_sid = %sid, "simulated call queued");
    tokio::spawn(run_call(sim.clone(), sid));
    if let Some(hold) = sim.inner.settings.hold_create_response {
        tokio::time::sleep(hold).await;
    }
    (StatusCode::CREATED, Json(body)).into_response()
}

/// `{sid}.json` → `sid`; anything else is not a call.
pub(super) fn call_sid(segment: &str) -> Option<&str> {
    segment.strip_suffix(".json").filter(|s| !s.is_empty())
}

pub(super) async fn fetch_call(
    State(sim): State<TwilioSim>,
    Path((account, call)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    match call_sid(&call).and_then(|sid| sim.call(sid)) {
        Some(call) => Json(sim.resource(&call)).into_response(),
        None => not_found(),
    }
}

pub(super) fn not_found() -> Response {
    twilio_error(
        StatusCode::NOT_FOUND,
        20404,
        "The requested resource was not found",
    )
}

/// `Status=completed` hangs up in any state (an unanswered call ends `canceled`);
/// `Status=canceled` only ends a call that has not been answered. An ended call is left as
/// it is. Redirects (`Url`, `Twiml`) are not simulated.
pub(super) async fn update_call(
    State(sim): State<TwilioSim>,
    Path((account, call)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let Some(sid) = call_sid(&call) else {
        return not_found();
    };
    let Some(current) = sim.call(sid) else {
        return not_found();
    };
    let form = parse_form(&body);
    let answered = current.status == "in-progress";
    match param(&form, "Status") {
        Some("completed") => {
            sim.finish(sid, if answered { "completed" } else { "canceled" });
        }
        Some("canceled") if !answered => {
            sim.finish(sid, "canceled");
        }
        Some("canceled") => {}
        Some(other) => {
            return twilio_error(
                StatusCode::BAD_REQUEST,
                20001,
                &format!("Invalid Status: {other}"),
            )
        }
        None => tracing::debug!(call_sid = %sid, "call update without Status ignored"),
    }
    match sim.call(sid) {
        Some(call) => Json(sim.resource(&call)).into_response(),
        None => not_found(),
    }
}

/// Filters `To`, `From`, `Status`, and `StartTime` with `>=`, `<=` or exact day (on the day the
/// call was created); newest first, one page.
pub(super) async fn list_calls(
    State(sim): State<TwilioSim>,
    Path(account): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Response {
    if let Err(refused) = sim.check_account(&account, &headers) {
        return refused.into_response();
    }
    let query = query.map(|Query(q)| q).unwrap_or_default();
    let day = |name: &str| -> Result<Option<chrono::NaiveDate>, Refusal> {
        match param(&query, name) {
            None => Ok(None),
            Some(v) => chrono::NaiveDate::parse_from_str(v.trim(), "%Y-%m-%d")
                .map(Some)
                .map_err(|_| {
                    refusal(
                        StatusCode::BAD_REQUEST,
                        20001,
                        &format!("{name} must be YYYY-MM-DD"),
                    )
                }),
        }
    };
    let (after, before, on) = match (day("StartTime>="), day("StartTime<="), day("StartTime")) {
        (Ok(a), Ok(b), Ok(o)) => (a, b, o),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e.into_response(),
    };
    let to = param(&query, "To");
    let from = param(&query, "From");
    let status = param(&query, "Status");
    let page_size = param(&query, "PageSize")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(50)
        .clamp(1, 1000);
    let mut calls: Vec<SimCall> = sim
        .calls()
        .into_iter()
        .filter(|c| to.is_none_or(|t| c.to == t))
        .filter(|c| from.is_none_or(|f| c.from == f))
        .filter(|c| status.is_none_or(|s| c.status == s))
        .filter(|c| after.is_none_or(|d| c.date_created.date_naive() >= d))
        .filter(|c| before.is_none_or(|d| c.date_created.date_naive() <= d))
        .filter(|c| on.is_none_or(|d| c.date_created.date_naive() == d))
        .collect();
    calls.reverse();
    calls.truncate(page_size);
    let uri = format!("/{API_VERSION}/Accounts/{account}/Calls.json");
    let resources: Vec<Value> = calls.iter().map(|c| sim.resource(c)).collect();
    Json(json!({
        "calls": resources,
        "page": 0,
        "page_size": page_size,
        "start": 0,
        "end": resources.len().saturating_sub(1),
        "first_page_uri": format!("{uri}?PageSize={page_size}&Page=0"),
        "next_page_uri": null,
        "previous_page_uri": null,
        "uri": uri,
    }))
    .into_response()
}
