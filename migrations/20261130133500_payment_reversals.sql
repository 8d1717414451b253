-- Refunds and disputes (issue 13, "Money paths"). A Stripe charge is found by its payment
-- intent in the event log itself (a credit pack's grant, or the call it paid for), not in a
-- read model that may lag.
CREATE INDEX IF NOT EXISTS events_credit_grant_reference
    ON events ((payload -> 'CreditsGranted' ->> 'reference'))
    WHERE aggregate_type = 'wallet' AND event_type = 'CreditsGranted';
CREATE INDEX IF NOT EXISTS events_call_payment_intent
    ON events ((payload -> 'CallRequested' -> 'payment' ->> 'payment_intent_id'))
    WHERE aggregate_type = 'call' AND event_type = 'CallRequested';

-- Credits a reversal took back that the wallet could not cover.
ALTER TABLE rm_wallets ADD COLUMN IF NOT EXISTS debt bigint NOT NULL DEFAULT 0;
-- Cents of a call's capture refunded or disputed.
ALTER TABLE rm_calls ADD COLUMN IF NOT EXISTS reversed_cents bigint NOT NULL DEFAULT 0;
