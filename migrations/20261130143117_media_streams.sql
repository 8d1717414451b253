-- Media streams (issue 13): the stream tokens already used, so a token opens one session
-- whichever instance it reaches, and the live voice session of each call, so a call has one
-- session at a time across instances. Behind `serve::voice::admission`.
CREATE TABLE media_stream_tokens
(
    nonce      uuid PRIMARY KEY,
    call_id    uuid        NOT NULL,
    used_at    timestamptz NOT NULL DEFAULT now(),
    -- Past this the token is refused anyway, so the row may go.
    expires_at timestamptz NOT NULL
);
CREATE INDEX media_stream_tokens_expiry ON media_stream_tokens (expires_at);

CREATE TABLE voice_sessions
(
    call_id    uuid PRIMARY KEY,
    session_id uuid        NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    -- A session never outlives its call's paid duration; a row left by a dead instance
    -- stops counting then.
    expires_at timestamptz NOT NULL
);
