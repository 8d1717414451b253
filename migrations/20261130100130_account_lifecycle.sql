-- Sign out everywhere: a token carries the session epoch it was issued in, and tokens of an
-- epoch below the user's current one are refused. Written when the sessions are revoked (so
-- the refusal is immediate on every instance) and by the users projection from
-- SessionsRevoked (GREATEST, so a rebuild never lowers it).
CREATE TABLE session_epochs
(
    user_id uuid PRIMARY KEY,
    epoch   integer NOT NULL
);

-- Password reset links: only a hash of the token is kept; each is used once and expires.
CREATE TABLE password_resets
(
    token_hash text PRIMARY KEY,
    user_id    uuid        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    used_at    timestamptz
);
CREATE INDEX password_resets_user ON password_resets (user_id);
