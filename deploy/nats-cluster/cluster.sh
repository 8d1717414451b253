#!/usr/bin/env bash
# Starts, stops and inspects a three-node NATS cluster with JetStream on loopback, for running
# several `callmeback serve` instances on one machine (see the README's "Running more than one
# instance").
#
#   deploy/nats-cluster/cluster.sh start     # three nodes, prints the NATS_URL to use
#   deploy/nats-cluster/cluster.sh status    # each node's JetStream view (/jsz)
#   deploy/nats-cluster/cluster.sh kill 2    # kill -9 node 2 (to see the rest carry on)
#   deploy/nats-cluster/cluster.sh restart 2 # start node 2 again on its own files
#   deploy/nats-cluster/cluster.sh stop      # stop all three (their files stay in $DIR)
#
# Ports: clients 14222-14224, routes 16222-16224, monitoring 18222-18224 (override with
# CLIENT_BASE, CLUSTER_BASE, HTTP_BASE). Files and logs: $NATS_CLUSTER_DIR (default
# ${TMPDIR:-/tmp}/cmb-nats-cluster).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
DIR=${NATS_CLUSTER_DIR:-${TMPDIR:-/tmp}/cmb-nats-cluster}
CLIENT_BASE=${CLIENT_BASE:-14222}
CLUSTER_BASE=${CLUSTER_BASE:-16222}
HTTP_BASE=${HTTP_BASE:-18222}
mkdir -p "$DIR"

start_node() {
  local i=$1 n=$(($1 - 1))
  if [ -f "$DIR/n$i.pid" ] && kill -0 "$(cat "$DIR/n$i.pid")" 2>/dev/null; then
    echo "node $i already running (pid $(cat "$DIR/n$i.pid"))"; return
  fi
  mkdir -p "$DIR/n$i"
  NODE_NAME=cmb-n$i CLIENT_PORT=$((CLIENT_BASE + n)) CLUSTER_PORT=$((CLUSTER_BASE + n)) \
  HTTP_PORT=$((HTTP_BASE + n)) STORE_DIR="$DIR/n$i" \
  ROUTE_1=nats-route://127.0.0.1:$CLUSTER_BASE \
  ROUTE_2=nats-route://127.0.0.1:$((CLUSTER_BASE + 1)) \
  ROUTE_3=nats-route://127.0.0.1:$((CLUSTER_BASE + 2)) \
    nohup nats-server -c "$here/node.conf" >>"$DIR/n$i.log" 2>&1 &
  echo $! >"$DIR/n$i.pid"
  echo "node $i: nats://127.0.0.1:$((CLIENT_BASE + n)) (pid $!, log $DIR/n$i.log)"
}

stop_node() {
  local i=$1 signal=${2:-TERM}
  if [ -f "$DIR/n$i.pid" ]; then
    kill "-$signal" "$(cat "$DIR/n$i.pid")" 2>/dev/null || true
    rm -f "$DIR/n$i.pid"
  fi
}

urls() {
  echo "nats://127.0.0.1:$CLIENT_BASE,nats://127.0.0.1:$((CLIENT_BASE + 1)),nats://127.0.0.1:$((CLIENT_BASE + 2))"
}

case "${1:-}" in
  start)
    for i in 1 2 3; do start_node "$i"; done
    # JetStream is ready once a meta leader is elected.
    for _ in $(seq 1 60); do
      if curl -fsS "http://127.0.0.1:$HTTP_BASE/jsz" 2>/dev/null | grep -q '"leader"'; then break; fi
      sleep 0.5
    done
    echo "export NATS_URL=$(urls) NATS_REPLICAS=3"
    ;;
  stop) for i in 1 2 3; do stop_node "$i"; done ;;
  kill) stop_node "${2:?which node (1-3)}" KILL ;;
  restart) start_node "${2:?which node (1-3)}" ;;
  status)
    for i in 1 2 3; do
      echo "node $i: $(curl -fsS "http://127.0.0.1:$((HTTP_BASE + i - 1))/jsz" 2>/dev/null \
        | tr -d '\n ' | grep -o '"meta_cluster":{[^}]*' || echo down)"
    done
    ;;
  url) urls ;;
  *) sed -n '2,16p' "$0"; exit 2 ;;
esac
