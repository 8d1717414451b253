-- The request saga's journal: a call request's active-call slot, hold and `CallRequested` are
-- one recoverable unit. A row is written before the first step and closed when the call exists
-- (or the request gave everything back); a row left open past the grace period belongs to a
-- request that died midway, and the sweeper releases its hold and slot and says why.
CREATE TABLE call_requests (
    call_id    uuid        PRIMARY KEY,
    user_id    uuid        NOT NULL,
    -- 'credits' or 'card'
    method     text        NOT NULL,
    -- the PaymentIntent of a card hold
    payment_intent_id text,
    scheduled  boolean     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    closed_at  timestamptz,
    -- requested | failed: … | swept: …
    outcome    text
);
CREATE INDEX call_requests_open ON call_requests (started_at) WHERE closed_at IS NULL;
