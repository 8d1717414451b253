-- Analysts' tokens for the MCP server (`callmeback analyst-token create|revoke|list`): separate
-- from users' tokens, opaque, shown once; only their SHA-256 is kept. A name has at most one
-- token in force; revoked tokens stay listed with when they were revoked.
CREATE TABLE analyst_tokens
(
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         text        NOT NULL,
    token_sha256 text        NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);
CREATE UNIQUE INDEX analyst_tokens_name_in_force ON analyst_tokens (name) WHERE revoked_at IS NULL;
