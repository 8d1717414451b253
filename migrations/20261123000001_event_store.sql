-- The event store (postgres-es's table) with three columns of our own that give every event a
-- place in commit order. postgres-es names its columns on insert, so the defaults fill these.
--   global_position: unique and increasing in *insert* order; alone it is not commit order.
--   xact_id:         the inserting transaction's id. Ordered by (xact_id, global_position) and
--                    read only below pg_snapshot_xmin(pg_current_snapshot()), no in-flight commit
--                    can later appear behind the reader.
--   recorded_at:     wall-clock time of the insert.
CREATE TABLE events
(
    aggregate_type  text                         NOT NULL,
    aggregate_id    text                         NOT NULL,
    sequence        bigint CHECK (sequence >= 0) NOT NULL,
    event_type      text                         NOT NULL,
    event_version   text                         NOT NULL,
    payload         json                         NOT NULL,
    metadata        json                         NOT NULL,
    global_position bigint GENERATED ALWAYS AS IDENTITY,
    xact_id         xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_commit_order ON events (xact_id, global_position);
CREATE INDEX events_recorded_at ON events (recorded_at);

CREATE TABLE snapshots
(
    aggregate_type   text                                 NOT NULL,
    aggregate_id     text                                 NOT NULL,
    last_sequence    bigint CHECK (last_sequence >= 0)    NOT NULL,
    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
    payload          json                                 NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
);

-- Singletons (the publisher, the scheduler) hold a lease; whoever lets it expire loses it.
CREATE TABLE leases
(
    name        text PRIMARY KEY,
    holder      text        NOT NULL,
    acquired_at timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- How far the publisher has confirmed publication, in commit order.
CREATE TABLE publisher_checkpoints
(
    name            text PRIMARY KEY,
    commit_xid      bigint      NOT NULL,
    global_position bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Per projection and aggregate, the last event sequence applied: makes application idempotent
-- under redelivery and detects a gap (an event that arrives before its predecessor).
CREATE TABLE projection_offsets
(
    projection     text   NOT NULL,
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    PRIMARY KEY (projection, aggregate_type, aggregate_id)
);

-- Per projection, the furthest stream position applied and when.
CREATE TABLE projection_status
(
    projection      text PRIMARY KEY,
    stream_sequence bigint      NOT NULL DEFAULT 0,
    events_applied  bigint      NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
