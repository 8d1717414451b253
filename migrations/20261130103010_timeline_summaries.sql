-- The call timeline tells its story: what each event changed (a status from → to, money held,
-- captured or released, a provider's usage, a turn's latency), for the call detail.
ALTER TABLE rm_timeline ADD COLUMN status text;
ALTER TABLE rm_timeline ADD COLUMN summary text;
