-- Read model: every event's place in its aggregate's story (call timelines, audits).
CREATE TABLE rm_timeline
(
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL,
    event_type     text        NOT NULL,
    occurred_at    timestamptz NOT NULL,
    actor          text        NOT NULL,
    request_id     text        NOT NULL,
    correlation_id text        NOT NULL,
    causation_id   text        NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE INDEX rm_timeline_correlation ON rm_timeline (correlation_id);

-- Read model: personas as the front end lists them.
CREATE TABLE rm_personas
(
    id            text PRIMARY KEY,
    created_by    text        NOT NULL,
    name          text        NOT NULL,
    description   text        NOT NULL,
    voice_id      text        NOT NULL,
    system_prompt text        NOT NULL,
    greeting      text        NOT NULL,
    is_public     boolean     NOT NULL,
    tags          text[]      NOT NULL DEFAULT '{}',
    turn_taking   jsonb       NOT NULL,
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL
);
CREATE INDEX rm_personas_created_by ON rm_personas (created_by);
CREATE INDEX rm_personas_public ON rm_personas (is_public);
CREATE INDEX rm_personas_tags ON rm_personas USING gin (tags);
