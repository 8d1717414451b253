-- Which persona knowledge passages (`<document id>:<ord>`) were added to the reply to a
-- caller's line (issue 21).
ALTER TABLE call_transcripts ADD COLUMN passages text[] NOT NULL DEFAULT '{}';
