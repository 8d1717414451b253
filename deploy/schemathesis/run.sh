#!/usr/bin/env bash
# Fuzzes the API against its own OpenAPI document with schemathesis (pip install schemathesis):
# every operation, positive and negative data, signed in and anonymous, and reports any 5xx or
# answer the document does not describe. Starts its own `serve` (development mode, simulators,
# database cmb_schemathesis, its own NATS stream) and stops it at the end.
#   deploy/schemathesis/run.sh [extra schemathesis options, e.g. -n 50]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bin=${CALLMEBACK_BIN:-$root/target/debug/callmeback}
port=${PORT:-18080}
base=http://127.0.0.1:$port
export DATABASE_URL=${DATABASE_URL_SCHEMATHESIS:-postgres://postgres@127.0.0.1:5432/cmb_schemathesis}
export HTTP_ADDR=127.0.0.1:$port NATS_STREAM=CMB_SCHEMATHESIS NATS_SUBJECT_PREFIX=cmbst.events NATS_CONSUMER_PREFIX=cmbst
# The rate limits stay on: fuzzing sends far more than a person would, so many operations soon
# answer 429 (documented); give them time (`--rate-limit`, or several short runs) for depth.
"$bin" serve > /tmp/cmb-schemathesis-serve.log 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "$base/readyz" >/dev/null && break; sleep 1; done
email="fuzz-$(date +%s)@example.com"
token=$(curl -sf -XPOST "$base/api/auth/register" -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"Schemath3sis!x\",\"name\":\"Fuzz\",\"phone\":\"+14155550123\"}" \
  | python3 -c 'import sys,json;print(json.load(sys.stdin)["token"])')
cd "$here"
# Signing out or changing the password would end the run's own session: those two are left to
# tests/account_lifecycle.rs.
schemathesis run "$base/api/openapi.json" --config-file "$here/schemathesis.toml" \
  -H "Authorization: Bearer $token" --checks all --continue-on-failure -w 1 \
  --exclude-path-regex '^/api/auth/(logout-all|logout|password)$' --request-timeout 30 "$@"
