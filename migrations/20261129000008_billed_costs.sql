-- Providers' billed figures (`replay reconcile --record`): a cost line taken from a bill
-- carries the bill's reference; for that call and provider it supersedes every other line,
-- so the cost views show billed truth.
ALTER TABLE rm_call_costs ADD COLUMN billed_reference text;
ALTER TABLE rm_call_costs ADD COLUMN superseded boolean NOT NULL DEFAULT false;

CREATE OR REPLACE VIEW costs_per_call AS
SELECT c.id AS call_id, c.user_id, c.persona_id, c.status, c.created_at,
       c.price_cents, COALESCE(c.charged_cents, 0) AS charged_cents,
       COALESCE(sum(k.total_micros), 0)::bigint AS cost_micros,
       (COALESCE(c.charged_cents, 0) * 10000 - COALESCE(sum(k.total_micros), 0))::bigint AS margin_micros
  FROM rm_calls c LEFT JOIN rm_call_costs k ON k.call_id = c.id AND NOT k.superseded
 GROUP BY c.id;

CREATE OR REPLACE VIEW costs_per_provider AS
SELECT service, operation, unit, sum(quantity)::bigint AS quantity,
       sum(total_micros)::bigint AS cost_micros, bool_or(estimated) AS any_estimated
  FROM rm_call_costs WHERE NOT superseded GROUP BY service, operation, unit;

CREATE OR REPLACE VIEW costs_per_day AS
SELECT (at AT TIME ZONE 'UTC')::date AS day, service, sum(total_micros)::bigint AS cost_micros
  FROM rm_call_costs WHERE NOT superseded GROUP BY 1, 2;
