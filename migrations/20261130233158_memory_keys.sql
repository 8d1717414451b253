-- What personas learned on a call (memory events' facts, summary, open items) is sealed under a
-- data key of its own per user and call (backbone::keys, README "Privacy"), wrapped by the
-- master key like the users' keys. The transcripts' retention destroys the keys older than it
-- (key NULL, erased_at set), so what was learned from a transcript cannot be read back from
-- the log once the transcript is gone; erasure destroys all of a user's.
CREATE TABLE memory_keys
(
    user_id    uuid        NOT NULL,
    call_id    uuid        NOT NULL,
    -- 60 bytes: the data key wrapped by the master key `master_id` names; NULL once destroyed
    key        bytea,
    master_id  bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    erased_at  timestamptz,
    PRIMARY KEY (user_id, call_id),
    CHECK ((key IS NULL) = (erased_at IS NOT NULL)),
    CHECK (key IS NULL AND master_id IS NULL
        OR octet_length(key) = 60 AND octet_length(master_id) = 8)
);
CREATE INDEX memory_keys_live ON memory_keys (created_at) WHERE key IS NOT NULL;
