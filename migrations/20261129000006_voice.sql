-- What was said on each call, kept apart from the events (which are immutable) so it can be
-- deleted after the retention period.
CREATE TABLE call_transcripts
(
    call_id uuid        NOT NULL,
    seq     integer     NOT NULL,
    speaker text        NOT NULL, -- 'caller' | 'persona'
    text    text        NOT NULL,
    -- The persona was interrupted: `text` is what the caller heard.
    cut_off boolean     NOT NULL DEFAULT false,
    at      timestamptz NOT NULL,
    PRIMARY KEY (call_id, seq)
);
CREATE INDEX call_transcripts_at ON call_transcripts (at);
