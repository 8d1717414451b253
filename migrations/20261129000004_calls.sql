-- One active call per user, claimed in the command path before the call is requested and
-- released when it ends (by the settlement worker, from the stream).
CREATE TABLE active_calls
(
    user_id    uuid PRIMARY KEY,
    call_id    uuid        NOT NULL UNIQUE,
    claimed_at timestamptz NOT NULL DEFAULT now()
);

-- Read model: calls as the front end lists them (history, scheduled calls, usage).
CREATE TABLE rm_calls
(
    id             uuid PRIMARY KEY,
    user_id        uuid        NOT NULL,
    persona_id     text        NOT NULL,
    persona_name   text        NOT NULL,
    phone          text        NOT NULL,
    status         text        NOT NULL,
    max_minutes    integer     NOT NULL,
    max_price_cents bigint     NOT NULL,
    payment_method text        NOT NULL,
    payment_ref    text,
    price_version  integer     NOT NULL,
    scheduled_for  timestamptz,
    timezone       text,
    call_sid       text,
    dial_attempts  integer     NOT NULL DEFAULT 0,
    answered_at    timestamptz,
    ended_at       timestamptz,
    duration_secs  integer     NOT NULL DEFAULT 0,
    billed_minutes integer     NOT NULL DEFAULT 0,
    price_cents    bigint      NOT NULL DEFAULT 0,
    charged_cents  bigint,
    cost_micros    bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL,
    updated_at     timestamptz NOT NULL
);
CREATE INDEX rm_calls_user_created ON rm_calls (user_id, created_at DESC);
CREATE INDEX rm_calls_due ON rm_calls (scheduled_for) WHERE status = 'scheduled';
CREATE UNIQUE INDEX rm_calls_sid ON rm_calls (call_sid) WHERE call_sid IS NOT NULL;

-- Read model: every cost event, for per-call, per-user, per-provider and per-day costs.
CREATE TABLE rm_call_costs
(
    call_id          uuid        NOT NULL,
    sequence         bigint      NOT NULL,
    user_id          uuid        NOT NULL,
    service          text        NOT NULL,
    operation        text        NOT NULL,
    quantity         bigint      NOT NULL,
    unit             text        NOT NULL,
    unit_cost_micros bigint      NOT NULL,
    total_micros     bigint      NOT NULL,
    estimated        boolean     NOT NULL,
    at               timestamptz NOT NULL,
    PRIMARY KEY (call_id, sequence)
);
CREATE INDEX rm_call_costs_user ON rm_call_costs (user_id, at);

ALTER TABLE rm_wallets ADD COLUMN reserved bigint NOT NULL DEFAULT 0;
