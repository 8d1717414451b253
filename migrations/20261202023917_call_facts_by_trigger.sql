-- The call facts (`fact_*`, 20261130214600_call_facts.sql) worked out by a trigger on call
-- events instead of as generated columns. Postgres prepares a table's generation expressions
-- again for every INSERT statement, inlining each SQL function they call (json_string,
-- json_bigint, call_fact_kind: parsed and analysed afresh each time): about 0.4 ms of CPU per
-- statement on the machine of the README's figures, whatever the event — the most of a
-- persona command's cost in `bench events`. The trigger runs for call events only, its
-- expressions planned once per connection; every other event's facts are NULL, as the
-- generation expressions made them. The stored values stay (DROP EXPRESSION rewrites nothing).
ALTER TABLE events
    ALTER COLUMN fact_kind DROP EXPRESSION,
    ALTER COLUMN fact_text DROP EXPRESSION,
    ALTER COLUMN fact_text2 DROP EXPRESSION,
    ALTER COLUMN fact_int DROP EXPRESSION,
    ALTER COLUMN fact_int2 DROP EXPRESSION;

CREATE FUNCTION events_call_facts() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    NEW.fact_kind := call_fact_kind(NEW.aggregate_type, NEW.event_type, NEW.event_version);
    NEW.fact_text := CASE WHEN NEW.aggregate_type = 'call' THEN CASE NEW.event_type
        WHEN 'CallRequested' THEN json_string(NEW.payload -> 'CallRequested' -> 'user_id')
        WHEN 'CallPlaced' THEN json_string(NEW.payload -> 'CallPlaced' -> 'call_sid')
        WHEN 'CallEnded' THEN json_string(NEW.payload -> 'CallEnded' -> 'outcome')
        WHEN 'CostRecorded' THEN json_string(NEW.payload -> 'CostRecorded' -> 'service')
        WHEN 'PaymentReversed' THEN json_string(NEW.payload -> 'PaymentReversed' -> 'kind')
    END END;
    NEW.fact_text2 := CASE WHEN NEW.aggregate_type = 'call' AND NEW.event_type = 'CallRequested'
        THEN json_string(NEW.payload -> 'CallRequested' -> 'payment' -> 'payment_intent_id')
    END;
    NEW.fact_int := CASE WHEN NEW.aggregate_type = 'call' THEN CASE NEW.event_type
        WHEN 'CallRequested' THEN
            CASE json_string(NEW.payload -> 'CallRequested' -> 'payment' -> 'method')
                WHEN 'credits' THEN 0 WHEN 'card' THEN 1 END
        WHEN 'CallEnded' THEN json_bigint(NEW.payload -> 'CallEnded' -> 'price_cents')
        WHEN 'CostRecorded' THEN json_bigint(NEW.payload -> 'CostRecorded' -> 'total_micros')
        WHEN 'CallSettled' THEN json_bigint(NEW.payload -> 'CallSettled' -> 'charged_cents')
        WHEN 'PaymentReversed' THEN json_bigint(NEW.payload -> 'PaymentReversed' -> 'amount_cents')
    END END;
    NEW.fact_int2 := CASE WHEN NEW.aggregate_type = 'call' THEN CASE NEW.event_type
        WHEN 'CallEnded' THEN json_bigint(NEW.payload -> 'CallEnded' -> 'answered_secs')
        WHEN 'CostRecorded' THEN
            CASE COALESCE(jsonb_typeof(NEW.payload -> 'CostRecorded' -> 'billed_reference'), 'null')
                WHEN 'null' THEN 0 WHEN 'string' THEN 1 END
    END END;
    RETURN NEW;
END
$$;

-- Every other event's facts are NULL, written so by nobody.
CREATE TRIGGER events_call_facts_insert
    BEFORE INSERT ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'call')
EXECUTE FUNCTION events_call_facts();

-- A payload rewritten in place (`privacy migrate`, an erasure) has its facts worked out again.
CREATE TRIGGER events_call_facts_update
    BEFORE UPDATE OF aggregate_type, event_type, event_version, payload ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'call' OR OLD.aggregate_type = 'call')
EXECUTE FUNCTION events_call_facts();
