-- Cost read models for the business, over the calls and cost-event projections.
-- Money: user prices in cents, provider costs in micro-dollars (1 cent = 10,000 micros).

CREATE VIEW costs_per_call AS
SELECT c.id AS call_id, c.user_id, c.persona_id, c.status, c.created_at,
       c.price_cents, COALESCE(c.charged_cents, 0) AS charged_cents,
       COALESCE(sum(k.total_micros), 0)::bigint AS cost_micros,
       (COALESCE(c.charged_cents, 0) * 10000 - COALESCE(sum(k.total_micros), 0))::bigint AS margin_micros
  FROM rm_calls c LEFT JOIN rm_call_costs k ON k.call_id = c.id
 GROUP BY c.id;

CREATE VIEW costs_per_user AS
SELECT user_id, count(*) AS calls, sum(charged_cents)::bigint AS charged_cents,
       sum(cost_micros)::bigint AS cost_micros, sum(margin_micros)::bigint AS margin_micros
  FROM costs_per_call GROUP BY user_id;

CREATE VIEW costs_per_provider AS
SELECT service, operation, unit, sum(quantity)::bigint AS quantity,
       sum(total_micros)::bigint AS cost_micros, bool_or(estimated) AS any_estimated
  FROM rm_call_costs GROUP BY service, operation, unit;

CREATE VIEW costs_per_day AS
SELECT (at AT TIME ZONE 'UTC')::date AS day, service, sum(total_micros)::bigint AS cost_micros
  FROM rm_call_costs GROUP BY 1, 2;
