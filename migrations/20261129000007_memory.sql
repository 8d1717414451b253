-- What each persona remembers about each user (projection `memory`). Embeddings come from the
-- `FactsLearned` events, so a rebuild reproduces them without calling the provider.
CREATE TABLE rm_memory_facts
(
    user_id    uuid        NOT NULL,
    persona_id text        NOT NULL,
    id         text        NOT NULL,
    text       text        NOT NULL,
    kind       text        NOT NULL,
    call_id    text        NOT NULL,
    at         timestamptz NOT NULL,
    embedding  real[]      NOT NULL DEFAULT '{}',
    PRIMARY KEY (user_id, persona_id, id)
);

CREATE TABLE rm_memory_summary
(
    user_id    uuid        NOT NULL,
    persona_id text        NOT NULL,
    summary    text        NOT NULL,
    call_id    text        NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (user_id, persona_id)
);

CREATE TABLE rm_memory_open_items
(
    user_id    uuid        NOT NULL,
    persona_id text        NOT NULL,
    id         text        NOT NULL,
    text       text        NOT NULL,
    call_id    text        NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (user_id, persona_id, id)
);
