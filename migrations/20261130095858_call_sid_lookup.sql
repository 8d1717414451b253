-- A call found by its Twilio CallSid from the event log itself (a webhook or media stream
-- without our call id, the dialer telling its own lost call from others): the read model may
-- lag, the log does not.
CREATE INDEX IF NOT EXISTS events_call_sid
    ON events ((payload -> 'CallPlaced' ->> 'call_sid'))
    WHERE aggregate_type = 'call' AND event_type = 'CallPlaced';
