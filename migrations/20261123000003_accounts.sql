-- Uniqueness that spans aggregates is claimed here, in the command path, before the command
-- that needs it: an email or phone per user, a persona name per owner.
CREATE TABLE identity_claims
(
    kind       text        NOT NULL, -- 'email' | 'phone'
    value      text        NOT NULL,
    user_id    uuid        NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identity_claims_user ON identity_claims (user_id);

CREATE TABLE persona_name_claims
(
    owner      text        NOT NULL,
    name_key   text        NOT NULL, -- lower-cased name
    persona_id text        NOT NULL UNIQUE,
    claimed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner, name_key)
);

-- Tokens refused until they expire. Written at logout (so the refusal is immediate on every
-- instance) and by the users projection from TokenRevoked events (so it can be rebuilt).
CREATE TABLE revoked_tokens
(
    token_id   text PRIMARY KEY,
    user_id    uuid        NOT NULL,
    expires_at timestamptz NOT NULL
);

-- Fixed-window request counters shared by every instance.
CREATE TABLE rate_limits
(
    key          text        NOT NULL,
    window_start timestamptz NOT NULL,
    count        integer     NOT NULL,
    PRIMARY KEY (key, window_start)
);

CREATE TABLE rm_users
(
    id           uuid PRIMARY KEY,
    name         text        NOT NULL,
    email        text        NOT NULL,
    phone        text        NOT NULL,
    locked_until timestamptz,
    last_sign_in timestamptz,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

CREATE TABLE rm_contacts
(
    user_id    uuid        NOT NULL,
    persona_id text        NOT NULL,
    added_at   timestamptz NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);
CREATE INDEX rm_contacts_persona ON rm_contacts (persona_id);

CREATE TABLE rm_persona_preferences
(
    user_id        uuid        NOT NULL,
    persona_id     text        NOT NULL,
    custom_prompt  text,
    voice_override text,
    favorite       boolean     NOT NULL,
    memory_enabled boolean     NOT NULL,
    updated_at     timestamptz NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);

CREATE TABLE rm_wallets
(
    user_id    uuid PRIMARY KEY,
    balance    bigint      NOT NULL,
    updated_at timestamptz NOT NULL
);

CREATE TABLE rm_credit_ledger
(
    user_id       uuid        NOT NULL,
    sequence      bigint      NOT NULL,
    kind          text        NOT NULL,
    credits       bigint      NOT NULL,
    reason        text        NOT NULL,
    reference     text        NOT NULL,
    balance_after bigint      NOT NULL,
    at            timestamptz NOT NULL,
    PRIMARY KEY (user_id, sequence)
);

ALTER TABLE rm_personas ADD COLUMN use_count bigint NOT NULL DEFAULT 0;
