-- Crypto-shredding (backbone::keys, README "Privacy"): one data key per user, under which the
-- personal fields of their events are sealed. Erasure destroys the key (key NULL, erased_at
-- set) and keeps the row, so what is written for the user afterwards is written erased.
CREATE TABLE data_keys
(
    user_id    uuid PRIMARY KEY,
    -- 32 bytes, ChaCha20-Poly1305; NULL once erased
    key        bytea,
    created_at timestamptz NOT NULL DEFAULT now(),
    erased_at  timestamptz,
    CHECK ((key IS NULL) = (erased_at IS NOT NULL)),
    CHECK (key IS NULL OR octet_length(key) = 32)
);
