-- One name per kind of cost (`cmb_domain::cost::CostKind`). Histories that `simulate` and
-- `synthetic` wrote before the names were unified say `stt-streaming` and `llm-tokens` where
-- live calls say `streaming-stt` and `chat-tokens`. The calls projection now records the
-- production name (`cmb_domain::cost::canonical_operation`); the rows already projected follow
-- here, so the cost views group simulated and live lines together. Events keep what they said.
UPDATE rm_call_costs SET operation = 'streaming-stt' WHERE operation = 'stt-streaming';
UPDATE rm_call_costs SET operation = 'chat-tokens' WHERE operation = 'llm-tokens';
