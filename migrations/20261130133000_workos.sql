-- WorkOS AuthKit sign-in.
--
-- A sign-in under way: the state we sent to WorkOS (only its SHA-256 kept) and the PKCE
-- verifier of the challenge we sent with it. Used once, within ten minutes.
CREATE TABLE workos_logins
(
    state_hash    text PRIMARY KEY,
    code_verifier text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    used_at       timestamptz
);
CREATE INDEX workos_logins_expiry ON workos_logins (expires_at);

-- Accounts made by a WorkOS sign-in have no phone until the user adds one; the read model
-- says which ways the user signs in, and whether WorkOS verified the email.
ALTER TABLE rm_users ALTER COLUMN phone DROP NOT NULL;
ALTER TABLE rm_users ADD COLUMN has_password boolean NOT NULL DEFAULT true;
ALTER TABLE rm_users ADD COLUMN workos_user_id text;
ALTER TABLE rm_users ADD COLUMN email_verified boolean NOT NULL DEFAULT false;

-- identity_claims gains a kind: 'workos' (a WorkOS user id → the account it signs in to).
