-- What the write path decides on about calls, written in the very transaction that appends a
-- call's events (a trigger on `events`), so it is never behind the log as a read model may be
-- (issue 14): the budget's spend (open calls at their held maximum, ended ones at their
-- price, by the time they were requested), the 50-waiting-calls limit, and the scheduler's
-- search for due calls. Read and written only through `usecases::calls::ledger`.
CREATE TABLE call_ledger
(
    call_id         text PRIMARY KEY,
    user_id         text        NOT NULL,
    requested_at    timestamptz NOT NULL,
    max_price_cents bigint      NOT NULL,
    scheduled_for   timestamptz,
    -- Scheduled and neither fired nor ended (cancelled, expired).
    waiting         boolean     NOT NULL,
    ended           boolean     NOT NULL DEFAULT false,
    price_cents     bigint
);
CREATE INDEX call_ledger_user_requested ON call_ledger (user_id, requested_at);
CREATE INDEX call_ledger_due ON call_ledger (scheduled_for) WHERE waiting;
CREATE INDEX call_ledger_user_waiting ON call_ledger (user_id) WHERE waiting;

CREATE FUNCTION call_ledger_apply() RETURNS trigger
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
        INSERT INTO call_ledger (call_id, user_id, requested_at, max_price_cents, scheduled_for, waiting)
        VALUES (NEW.aggregate_id, p ->> 'user_id', NEW.recorded_at, (p ->> 'max_price_cents')::bigint,
                (p ->> 'scheduled_for')::timestamptz, p ->> 'scheduled_for' IS NOT NULL)
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

CREATE TRIGGER call_ledger_insert
    AFTER INSERT ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'call'
          AND NEW.event_type IN ('CallRequested', 'ScheduledCallFired', 'CallEnded'))
EXECUTE FUNCTION call_ledger_apply();

CREATE TRIGGER call_ledger_redate
    AFTER UPDATE OF recorded_at ON events
    FOR EACH ROW
    WHEN (NEW.aggregate_type = 'call' AND NEW.event_type = 'CallRequested'
          AND NEW.recorded_at IS DISTINCT FROM OLD.recorded_at)
EXECUTE FUNCTION call_ledger_apply();

-- The calls already in the log.
INSERT INTO call_ledger (call_id, user_id, requested_at, max_price_cents, scheduled_for, waiting)
SELECT aggregate_id, payload -> 'CallRequested' ->> 'user_id', recorded_at,
       (payload -> 'CallRequested' ->> 'max_price_cents')::bigint,
       (payload -> 'CallRequested' ->> 'scheduled_for')::timestamptz,
       payload -> 'CallRequested' ->> 'scheduled_for' IS NOT NULL
  FROM events
 WHERE aggregate_type = 'call' AND event_type = 'CallRequested'
ON CONFLICT (call_id) DO NOTHING;
UPDATE call_ledger l SET waiting = false
  FROM events e
 WHERE e.aggregate_type = 'call' AND e.event_type = 'ScheduledCallFired' AND e.aggregate_id = l.call_id;
UPDATE call_ledger l
   SET waiting = false, ended = true, price_cents = (e.payload -> 'CallEnded' ->> 'price_cents')::bigint
  FROM events e
 WHERE e.aggregate_type = 'call' AND e.event_type = 'CallEnded' AND e.aggregate_id = l.call_id;
