-- The persona a call is with, so deleting a persona can refuse while anyone's scheduled call
-- with it still waits, from the ledger rather than the `calls` read model.
ALTER TABLE call_ledger ADD COLUMN persona_id text;
UPDATE call_ledger l SET persona_id = e.payload -> 'CallRequested' ->> 'persona_id'
  FROM events e
 WHERE e.aggregate_type = 'call' AND e.event_type = 'CallRequested' AND e.aggregate_id = l.call_id;
CREATE INDEX call_ledger_persona_waiting ON call_ledger (persona_id) WHERE waiting;

CREATE OR REPLACE FUNCTION call_ledger_apply() RETURNS trigger
    LANGUAGE plpgsql AS
$$
DECLARE
    p json;
BEGIN
    IF TG_OP = 'UPDATE' THEN
        -- `simulate` dates the events it wrote back to the simulated time.
        UPDATE call_ledger SET requested_at = NEW.recorded_at WHERE call_id = NEW.aggregate_id;
    ELSIF NEW.event_type = 'CallRequested' THEN
        p := NEW.payload -> 'CallRequested';
        INSERT INTO call_ledger (call_id, user_id, persona_id, requested_at, max_price_cents,
                                 scheduled_for, waiting)
        VALUES (NEW.aggregate_id, p ->> 'user_id', p ->> 'persona_id', NEW.recorded_at,
                (p ->> 'max_price_cents')::bigint, (p ->> 'scheduled_for')::timestamptz,
                p ->> 'scheduled_for' IS NOT NULL)
        ON CONFLICT (call_id) DO NOTHING;
    ELSIF NEW.event_type = 'ScheduledCallFired' THEN
        UPDATE call_ledger SET waiting = false WHERE call_id = NEW.aggregate_id;
    ELSIF NEW.event_type = 'CallEnded' THEN
        UPDATE call_ledger
           SET waiting = false, ended = true,
               price_cents = (NEW.payload -> 'CallEnded' ->> 'price_cents')::bigint
         WHERE call_id = NEW.aggregate_id;
    END IF;
    RETURN NULL;
END
$$;
