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
# Fuzzing sends far more than a person would: with the rate limits on, most operations would
# soon answer only 429 (documented, but shallow). RATE_LIMITS=off (development mode only;
# production refuses to start with it) and generous daily call limits let every operation be
# exercised in depth. The document still states the limits, and the 429s they give.
export RATE_LIMITS=off CALL_NUMBER_DAILY_LIMIT=100000 CALL_USER_DAILY_LIMIT=100000
"$bin" serve > /tmp/cmb-schemathesis-serve.log 2>&1 &
serve=$!
trap 'kill $serve 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do curl -sf "$base/readyz" >/dev/null && break; sleep 1; done
# A fresh account (its email and phone number must be new to the database), with a card on
# file so that holds and credit packs go through and the calls get past payment.
register() {
  local token= n
  for _ in 1 2 3 4 5; do
    n=$(( (RANDOM << 15 | RANDOM) % 10000 ))
    token=$(curl -s -XPOST "$base/api/auth/register" -H 'content-type: application/json' \
      -d "{\"email\":\"fuzz-$(date +%s)-$n@example.com\",\"password\":\"Schemath3sis!x\",\"name\":\"Fuzz\",\"phone\":\"+1415555$(printf %04d $n)\"}" \
      | python3 -c 'import sys,json;print(json.load(sys.stdin).get("token",""))' || true)
    [ -n "$token" ] && break
  done
  [ -n "$token" ] || { echo "could not register a fuzzing account" >&2; exit 1; }
  curl -sf -XPOST "$base/api/user/payment-method" -H "Authorization: Bearer $token" \
    -H 'content-type: application/json' -d '{"payment_method_id":"pm_card_visa","set_default":true}' >/dev/null
  echo "$token"
}
cd "$here"
ending='^/api/(auth/(logout-all|logout|password)|user)$'
status=0
# Every operation but the four that end the run's own session (signing out, changing the
# password, erasing the account): a session ended midway would leave the rest only 401s.
schemathesis --config-file "$here/schemathesis.toml" run "$base/api/openapi.json" \
  -H "Authorization: Bearer $(register)" --continue-on-failure -w 1 \
  --exclude-path-regex "$ending" --request-timeout 30 "$@" || status=$?
# Then those four, one account each, so that each starts signed in (once its session is
# ended, the rest of its cases are answered 401, which the document states).
for op in 'auth/logout' 'auth/logout-all' 'auth/password' 'user'; do
  schemathesis --config-file "$here/schemathesis.toml" run "$base/api/openapi.json" \
    -H "Authorization: Bearer $(register)" --continue-on-failure -w 1 \
    --include-path-regex "^/api/$op\$" --request-timeout 30 "$@" || status=$?
done
exit $status
