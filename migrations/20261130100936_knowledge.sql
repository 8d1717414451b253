-- Persona knowledge (issue 21). The documents' text beside the event log (the events say what
-- happened to a document, never its text), their passages with a full-text index and the
-- embedding beside it, and the documents' read model (projection `personas`).
CREATE TABLE knowledge_documents
(
    persona_id  text        NOT NULL,
    document_id text        NOT NULL,
    format      text        NOT NULL,
    body        text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (persona_id, document_id)
);

CREATE TABLE knowledge_passages
(
    persona_id  text     NOT NULL,
    document_id text     NOT NULL,
    ord         integer  NOT NULL,
    heading     text,
    text        text     NOT NULL,
    tokens      integer  NOT NULL,
    tsv         tsvector GENERATED ALWAYS AS (
        to_tsvector('english', coalesce(heading, '') || ' ' || text)) STORED,
    -- Empty when the passage could not be embedded.
    embedding   real[]   NOT NULL DEFAULT '{}',
    PRIMARY KEY (persona_id, document_id, ord)
);
CREATE INDEX knowledge_passages_tsv ON knowledge_passages USING gin (tsv);

CREATE TABLE rm_persona_knowledge
(
    persona_id  text        NOT NULL,
    document_id text        NOT NULL,
    title       text        NOT NULL,
    format      text        NOT NULL,
    chars       integer     NOT NULL,
    status      text        NOT NULL,
    passages    integer,
    embedded    boolean,
    reason      text,
    added_at    timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (persona_id, document_id)
);
