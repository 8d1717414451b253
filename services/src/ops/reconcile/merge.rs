//! Partial reconciles merged, and refunds matched to calls by their places in the log.

use hashbrown::HashMap;

use super::{CallLine, Reconciler};

impl Reconciler {
    /// Folds in `later`: a reconciler (with the same range) of events that all come after
    /// this one's in the log — or of other aggregate types, whose order against these does
    /// not matter except for refunds, which carry their positions.
    pub fn merge(&mut self, later: Reconciler) {
        // Into nothing yet (the first part), taken whole rather than rebuilt entry by entry.
        if self.calls.is_empty() {
            self.calls = later.calls;
        } else {
            self.merge_calls(later.calls);
        }
        if self.by_intent.is_empty() {
            self.by_intent = later.by_intent;
        } else {
            for (pi, calls) in later.by_intent {
                self.by_intent.entry(pi).or_default().extend(calls);
            }
        }
        self.refunds.extend(later.refunds);
        for (service, micros) in later.system_micros {
            *self.system_micros.entry(service).or_default() += micros;
        }
        self.next = self.next.max(later.next);
    }

    /// Folds `later`'s calls into these (see [`Self::merge`]).
    fn merge_calls(&mut self, later: HashMap<String, Box<CallLine>>) {
        self.calls.reserve(later.len());
        for (id, b) in later {
            let Some(a) = self.calls.get_mut(&id) else {
                self.calls.insert(id, b);
                continue;
            };
            if b.requested {
                a.requested = true;
                a.requested_at = b.requested_at;
                a.user_id = b.user_id;
                a.day = b.day;
            }
            if b.payment_intent.is_some() {
                a.payment_intent = b.payment_intent;
            }
            if b.call_sid.is_some() {
                a.call_sid = b.call_sid;
            }
            if b.price_cents.is_some() {
                a.outcome = b.outcome;
                a.answered_secs = b.answered_secs;
                a.price_cents = b.price_cents;
            }
            if b.charged_cents.is_some() {
                a.charged_cents = b.charged_cents;
            }
            a.refunded_on_call += b.refunded_on_call;
            a.disputed_cents += b.disputed_cents;
            for (service, micros) in b.cost_micros {
                *a.cost_micros.entry(service).or_default() += micros;
            }
            for (service, micros) in b.billed_micros {
                *a.billed_micros.entry(service).or_default() += micros;
            }
        }
    }

    /// Matches each refund to the call last requested with its payment intent before it in
    /// the log; the others are returned, in log order.
    pub(super) fn match_refunds(&mut self) -> Vec<(String, i64)> {
        let mut refunds = std::mem::take(&mut self.refunds);
        refunds.sort_by_key(|(position, ..)| *position);
        let mut orphans = Vec::new();
        for (position, pi, refunded) in refunds {
            let call = self.by_intent.get(&pi).and_then(|calls| {
                calls
                    .iter()
                    .filter(|(at, _)| *at < position)
                    .max_by_key(|(at, _)| *at)
            });
            match call.and_then(|(_, c)| self.calls.get_mut(c)) {
                Some(line) => line.refunded_cents = line.refunded_cents.max(refunded),
                None => orphans.push((pi, refunded)),
            }
        }
        orphans
    }
}
