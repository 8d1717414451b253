-- Event payloads as jsonb (issue 18): the analysts' reconcile is added up by Postgres over the
-- payloads (`replay --source postgres reconcile`), and jsonb reads a field without parsing the
-- whole text again for each one. The command path binds payloads as jsonb already, so writing
-- one no longer converts it back to text. The expression index on CallPlaced's call_sid is
-- rebuilt over the jsonb column as it stands.
ALTER TABLE events ALTER COLUMN payload TYPE jsonb USING payload::jsonb;
