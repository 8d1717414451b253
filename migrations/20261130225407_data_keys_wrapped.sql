-- Data keys wrapped by a master key (backbone::keys, README "Privacy"): `key` holds the data
-- key sealed by the master key from the environment (DATA_KEYS_MASTER_KEY), nonce ‖ ciphertext
-- ‖ tag, 60 bytes, and `master_id` which master (8 bytes of a hash of it, not the key). A row
-- with no master_id is a key written in clear by a build before wrapping (32 bytes);
-- `callmeback privacy rewrap` wraps those, and moves keys from an old master to a new one.
ALTER TABLE data_keys ADD COLUMN master_id bytea;
ALTER TABLE data_keys DROP CONSTRAINT data_keys_key_check;
ALTER TABLE data_keys ADD CONSTRAINT data_keys_key_check CHECK (
    key IS NULL AND master_id IS NULL
    OR master_id IS NULL AND octet_length(key) = 32
    OR octet_length(master_id) = 8 AND octet_length(key) = 60);
