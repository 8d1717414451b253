-- What the analysts' reconcile reads of each call event, kept beside the event (issue 18).
-- `replay --source postgres reconcile` read it from the jsonb payloads — a few JSON lookups
-- per event on every reconcile, 185–296k events/s. These stored generated columns do those
-- lookups once, when the event is written (and again if a payload is rewritten in place, as
-- `privacy migrate` does), and the partial index `events_call_facts` holds them with the call's
-- id and sequence: the reconcile reads the index alone (an index-only scan, in call and
-- sequence order), never the payloads.
--
-- Only money and ids: a call's user, payment method and intent, Twilio's CallSid, outcome,
-- seconds and prices, cost lines, refunds. None of them is a personal field (domain::privacy:
-- the phone number is, and stays sealed in the payload only).
--
--   fact_kind   NULL for other aggregates' events; for a call event of version 1:
--               1 CallRequested, 2 CallPlaced, 3 CallEnded, 4 CostRecorded, 5 CallSettled,
--               6 PaymentReversed, 0 another call event this build knows (the call exists);
--               -1 any other (an unknown type, another version): the reconcile folds that
--               call from its whole events instead.
--   fact_text   1 user_id, 2 call_sid, 3 outcome, 4 service, 6 kind
--   fact_text2  1 the card's payment_intent_id
--   fact_int    1 payment: 0 credits, 1 card; 3 price_cents; 4 total_micros; 5 charged_cents;
--               6 amount_cents
--   fact_int2   3 answered_secs; 4 billed (1: a bill's figure, 0: our estimate)
--
-- A value that is missing or not of its type reads NULL (never an error: these run on every
-- insert); the reconcile folds a call with a NULL where a value is required from its whole
-- events, so the report is the one the event-by-event fold gives.

-- A JSON number that is a whole number of at most 18 digits, or NULL.
CREATE FUNCTION json_bigint(v jsonb) RETURNS bigint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT CASE WHEN jsonb_typeof(v) = 'number' AND v::text ~ '^-?[0-9]{1,18}$'
                  THEN v::text::bigint END $$;

-- A JSON string's text, or NULL.
CREATE FUNCTION json_string(v jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT CASE WHEN jsonb_typeof(v) = 'string' THEN v #>> '{}' END $$;

CREATE FUNCTION call_fact_kind(aggregate_type text, event_type text, event_version text)
    RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
AS $$ SELECT (CASE
    WHEN aggregate_type <> 'call' THEN NULL
    WHEN event_version <> '1' THEN -1
    ELSE CASE event_type
        WHEN 'CallRequested' THEN 1
        WHEN 'CallPlaced' THEN 2
        WHEN 'CallEnded' THEN 3
        WHEN 'CostRecorded' THEN 4
        WHEN 'CallSettled' THEN 5
        WHEN 'PaymentReversed' THEN 6
        WHEN 'ScheduledCallFired' THEN 0
        WHEN 'CallCancelled' THEN 0
        WHEN 'DialAttempted' THEN 0
        WHEN 'DialFailed' THEN 0
        WHEN 'CallStatusChanged' THEN 0
        WHEN 'TurnCompleted' THEN 0
        WHEN 'VoiceSessionEnded' THEN 0
        ELSE -1 END
    END)::smallint $$;

ALTER TABLE events
    ADD COLUMN fact_kind smallint
        GENERATED ALWAYS AS (call_fact_kind(aggregate_type, event_type, event_version)) STORED,
    ADD COLUMN fact_text text GENERATED ALWAYS AS (
        CASE WHEN aggregate_type = 'call' THEN CASE event_type
            WHEN 'CallRequested' THEN json_string(payload -> 'CallRequested' -> 'user_id')
            WHEN 'CallPlaced' THEN json_string(payload -> 'CallPlaced' -> 'call_sid')
            WHEN 'CallEnded' THEN json_string(payload -> 'CallEnded' -> 'outcome')
            WHEN 'CostRecorded' THEN json_string(payload -> 'CostRecorded' -> 'service')
            WHEN 'PaymentReversed' THEN json_string(payload -> 'PaymentReversed' -> 'kind')
        END END) STORED,
    ADD COLUMN fact_text2 text GENERATED ALWAYS AS (
        CASE WHEN aggregate_type = 'call' AND event_type = 'CallRequested'
             THEN json_string(payload -> 'CallRequested' -> 'payment' -> 'payment_intent_id')
        END) STORED,
    ADD COLUMN fact_int bigint GENERATED ALWAYS AS (
        CASE WHEN aggregate_type = 'call' THEN CASE event_type
            WHEN 'CallRequested' THEN
                CASE json_string(payload -> 'CallRequested' -> 'payment' -> 'method')
                    WHEN 'credits' THEN 0 WHEN 'card' THEN 1 END
            WHEN 'CallEnded' THEN json_bigint(payload -> 'CallEnded' -> 'price_cents')
            WHEN 'CostRecorded' THEN json_bigint(payload -> 'CostRecorded' -> 'total_micros')
            WHEN 'CallSettled' THEN json_bigint(payload -> 'CallSettled' -> 'charged_cents')
            WHEN 'PaymentReversed' THEN json_bigint(payload -> 'PaymentReversed' -> 'amount_cents')
        END END) STORED,
    ADD COLUMN fact_int2 bigint GENERATED ALWAYS AS (
        CASE WHEN aggregate_type = 'call' THEN CASE event_type
            WHEN 'CallEnded' THEN json_bigint(payload -> 'CallEnded' -> 'answered_secs')
            WHEN 'CostRecorded' THEN
                CASE COALESCE(jsonb_typeof(payload -> 'CostRecorded' -> 'billed_reference'), 'null')
                    WHEN 'null' THEN 0 WHEN 'string' THEN 1 END
        END END) STORED;

-- The call events that tell the reconcile something, and each call's first event (every
-- aggregate's events start at sequence 1, so every call is seen), in call and sequence order;
-- the commit position and time go with them for the requests (where a refund is matched and
-- the call placed in time).
CREATE INDEX events_call_facts ON events (aggregate_id, sequence)
    INCLUDE (fact_kind, fact_text, fact_text2, fact_int, fact_int2, xact_id, global_position,
             recorded_at)
    WHERE fact_kind <> 0 OR (fact_kind = 0 AND sequence = 1);
