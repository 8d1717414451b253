-- Events a consumer (a projection or a worker) kept failing on, set aside so that the other
-- aggregates move on. `callmeback dlq list|retry` shows them and puts them back; a running
-- instance re-applies what is marked `retry`, in stream order.
CREATE TABLE dead_letters
(
    id              bigserial PRIMARY KEY,
    -- `projection:<name>` or `worker:<name>`
    consumer        text        NOT NULL,
    stream_sequence bigint      NOT NULL,
    -- From the event, or from the message's headers when its body could not be decoded.
    aggregate_type  text,
    aggregate_id    text,
    sequence        bigint,
    event_type      text,
    deliveries      int         NOT NULL,
    error           text        NOT NULL,
    -- The message body, kept only when it could not be decoded (nothing else holds it then).
    body            bytea,
    status          text        NOT NULL DEFAULT 'parked'
        CHECK (status IN ('parked', 'retry', 'resolved')),
    parked_at       timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    claimed_until   timestamptz,
    UNIQUE (consumer, stream_sequence)
);
CREATE INDEX dead_letters_open ON dead_letters (consumer, status, stream_sequence)
    WHERE status <> 'resolved';
CREATE INDEX dead_letters_aggregate ON dead_letters (consumer, aggregate_type, aggregate_id)
    WHERE status <> 'resolved';
