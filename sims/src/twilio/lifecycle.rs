//! A created call's life: ringing, answered or not, the TwiML fetch and its media stream, the
//! end; and its status callbacks, numbered, signed and posted in order.

use super::*;

/// A status callback to post: its `CallStatus` and any extra fields.
pub(super) struct Callback {
    pub(super) params: Vec<(String, String)>,
}

/// Numbers and queues the status callbacks of one call, holding `ringing` back one step when
/// asked to reorder. A separate task posts them, so a slow webhook does not slow the call.
pub(super) struct Callbacks {
    pub(super) tx: Option<mpsc::Sender<Callback>>,
    pub(super) events: Vec<String>,
    pub(super) base: Vec<(String, String)>,
    pub(super) sequence: u64,
    pub(super) reorder: bool,
    pub(super) held: Option<Callback>,
}

impl Callbacks {
    /// Sends the callback for `event` (initiated, ringing, answered, completed) if the call
    /// asked for it; Twilio sends only `completed` when no event was asked for.
    pub(super) async fn emit(&mut self, event: &str, status: &str, extra: Vec<(String, String)>) {
        let wanted = if self.events.is_empty() {
            event == "completed"
        } else {
            self.events.iter().any(|e| e == event)
        };
        if !wanted || self.tx.is_none() {
            return;
        }
        let mut params = self.base.clone();
        params.extend(
            [
                ("CallStatus", status.to_string()),
                ("SequenceNumber", self.sequence.to_string()),
                ("Timestamp", rfc2822(Utc::now())),
                ("CallbackSource", "call-progress-events".to_string()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        params.extend(extra);
        self.sequence += 1;
        let callback = Callback { params };
        if self.reorder && event == "ringing" {
            self.held = Some(callback);
            return;
        }
        self.send(callback).await;
        if let Some(held) = self.held.take() {
            self.send(held).await;
        }
    }

    pub(super) async fn send(&mut self, callback: Callback) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(callback).await;
        }
    }

    pub(super) async fn flush(&mut self) {
        if let Some(held) = self.held.take() {
            self.send(held).await;
        }
        self.tx = None;
    }
}

/// Posts the callbacks of one call in order, signed over the exact `StatusCallback` URL.
pub(super) async fn post_callbacks(
    sim: TwilioSim,
    sid: String,
    url: String,
    mut rx: mpsc::Receiver<Callback>,
) {
    let times = if sim.inner.settings.duplicate_callbacks {
        2
    } else {
        1
    };
    while let Some(callback) = rx.recv().await {
        for _ in 0..times {
            let signed = signature(&sim.inner.settings.auth_token, &url, &callback.params);
            let posted = sim
                .inner
                .http
                .post(&url)
                .header("X-Twilio-Signature", signed)
                .form(&callback.params)
                .send()
                .await;
            sim.update(&sid, |r| r.call.callbacks_sent += 1);
            match posted {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    tracing::warn!(call_sid = %sid, status = r.status().as_u16(), "status callback refused")
                }
                Err(e) => tracing::warn!(call_sid = %sid, error = %e, "status callback failed"),
            }
        }
    }
}

/// One call, from queued to its end. See the module docs for the phases.
pub(super) async fn run_call(sim: TwilioSim, sid: String) {
    let Some((call, events, twiml, hang_up, counters)) = sim.update(&sid, |r| {
        (
            r.call.clone(),
            r.events.clone(),
            r.twiml.clone(),
            r.hang_up.clone(),
            r.counters.clone(),
        )
    }) else {
        return;
    };
    let settings = &sim.inner.settings;
    let base: Vec<(String, String)> = [
        ("CallSid", call.sid.as_str()),
        ("AccountSid", settings.account_sid.as_str()),
        ("From", call.from.as_str()),
        ("To", call.to.as_str()),
        ("Direction", "outbound-api"),
        ("ApiVersion", API_VERSION),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let (tx, rx) = mpsc::channel(16);
    let poster = call
        .status_callback
        .clone()
        .map(|url| tokio::spawn(post_callbacks(sim.clone(), sid.clone(), url, rx)));
    let mut callbacks = Callbacks {
        tx: poster.is_some().then_some(tx),
        events,
        base: base.clone(),
        sequence: 0,
        reorder: settings.reorder_callbacks,
        held: None,
    };

    callbacks.emit("initiated", "initiated", Vec::new()).await;
    sim.set_status(&sid, "ringing");
    callbacks.emit("ringing", "ringing", Vec::new()).await;
    let rang = tokio::select! {
        _ = hang_up.cancelled() => false,
        _ = tokio::time::sleep(settings.ring) => true,
    };
    let outcome = settings.outcome.for_call(&call.to);
    if !rang {
        // Hung up (canceled) while ringing; `finish` already set the status.
    } else if let Some(status) = outcome.unanswered_status() {
        sim.finish(&sid, status);
    } else {
        sim.set_status(&sid, "in-progress");
        callbacks.emit("answered", "in-progress", Vec::new()).await;
        let limit = settings
            .call_length
            .min(Duration::from_secs(u64::from(call.time_limit)));
        let deadline = tokio::time::Instant::now() + limit;
        let ended_by_stream =
            converse(&sim, &call, &base, twiml, &hang_up, deadline, counters).await;
        if ended_by_stream {
            tracing::debug!(call_sid = %sid, "call ended by our server");
        }
        sim.finish(&sid, "completed");
    }

    let Some(ended) = sim.call(&sid) else {
        return;
    };
    let mut extra = Vec::new();
    if ended.status == "completed" {
        let seconds = ended.duration_secs.unwrap_or(0);
        extra.push(("CallDuration".to_string(), seconds.to_string()));
        // Billed minutes, rounded up; an answered call bills at least one.
        extra.push((
            "Duration".to_string(),
            seconds.div_ceil(60).max(1).to_string(),
        ));
    }
    callbacks.emit("completed", &ended.status, extra).await;
    callbacks.flush().await;
    if let Some(poster) = poster {
        let _ = poster.await;
    }
    tracing::info!(call_sid = %sid, status = %ended.status, duration = ended.duration_secs.unwrap_or(0), "simulated call ended");
}

/// The answered part of a call: fetch the TwiML, run its stream, wait for the end. Returns
/// whether our side ended it (a bidirectional stream closed, or the TwiML could not be had —
/// Twilio then says "an application error has occurred" and hangs up).
pub(super) async fn converse(
    sim: &TwilioSim,
    call: &SimCall,
    base: &[(String, String)],
    twiml: Option<String>,
    hang_up: &CancellationToken,
    deadline: tokio::time::Instant,
    counters: Arc<StreamCounters>,
) -> bool {
    let settings = &sim.inner.settings;
    let twiml = match twiml {
        Some(inline) => inline,
        None => match fetch_twiml(sim, call, base).await {
            Some(t) => t,
            None => return true,
        },
    };
    if hang_up.is_cancelled() {
        // Hung up while we were fetching the TwiML: nothing left to run.
        return false;
    }
    let stream = media::parse_stream(&twiml);
    let Some(stream) = stream else {
        tokio::select! {
            _ = hang_up.cancelled() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
        return false;
    };
    let bidirectional = stream.bidirectional;
    let says = media::says_after_connect(&twiml);
    let stop = CancellationToken::new();
    let context = StreamContext {
        account_sid: settings.account_sid.clone(),
        call_sid: call.sid.clone(),
        auth_token: settings.auth_token.clone(),
        script: settings.caller.clone(),
        counters: counters.clone(),
    };
    let mut session = tokio::spawn(media::run_stream(context, stream, stop.clone()));
    let mut session_done = false;
    let ended_by_us = loop {
        tokio::select! {
            _ = hang_up.cancelled() => break false,
            _ = tokio::time::sleep_until(deadline) => break false,
            end = &mut session, if !session_done => {
                session_done = true;
                // With <Connect>, Twilio goes on to the verbs after it once our server closes
                // the socket or it breaks (a `<Say>` is spoken, at this simulator's own pace of
                // about 70 ms a character), then hangs up; with <Start>, the call carries on.
                if bidirectional && matches!(end, Ok(StreamEnd::Closed) | Err(_)) {
                    for text in &says {
                        counters.said_after_stream.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(call_sid = %call.sid, said = %text, "said after the stream ended");
                        let speaking = Duration::from_millis(70 * text.chars().count() as u64);
                        tokio::select! {
                            _ = hang_up.cancelled() => break,
                            _ = tokio::time::sleep(speaking) => {}
                        }
                    }
                    break true;
                }
            }
        }
    };
    stop.cancel();
    if !session_done {
        let _ = tokio::time::timeout(Duration::from_secs(5), session).await;
    }
    ended_by_us
}

/// POSTs the answered call's parameters to its `Url`, signed, and returns the TwiML.
pub(super) async fn fetch_twiml(
    sim: &TwilioSim,
    call: &SimCall,
    base: &[(String, String)],
) -> Option<String> {
    let mut params = base.to_vec();
    params.push(("CallStatus".into(), "in-progress".into()));
    let signed = signature(&sim.inner.settings.auth_token, &call.url, &params);
    let answer = sim
        .inner
        .http
        .post(&call.url)
        .header("X-Twilio-Signature", signed)
        .form(&params)
        .send()
        .await;
    match answer {
        Ok(r) if r.status().is_success() => match r.text().await {
            Ok(body) => Some(body),
            Err(e) => {
                tracing::warn!(call_sid = %call.sid, error = %e, "TwiML unreadable; hanging up (Twilio error 11200)");
                None
            }
        },
        Ok(r) => {
            tracing::warn!(call_sid = %call.sid, status = r.status().as_u16(), "TwiML fetch refused; hanging up (Twilio error 11200)");
            None
        }
        Err(e) => {
            tracing::warn!(call_sid = %call.sid, error = %e, "TwiML fetch failed; hanging up (Twilio error 11200)");
            None
        }
    }
}
