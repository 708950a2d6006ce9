#!/usr/bin/env bash
# Instructions per request of examples' hello-service, bare, with a layer that does nothing (what
# axum's per-route layering costs any middleware), and with the agent exporting to an
# acknowledging sink, its layer on the router and on each handler (`--traced-handlers`), and
# traced by its peers instead (`--peer fastrace|opentelemetry`: a `from_fn` middleware on the
# router, spans discarded; `--peer middleware`: that middleware tracing nothing), counted by callgrind (all threads, after 300 warm-up requests). Counts do
# not move with the machine's load, unlike CPU time: the agent's share is a stable figure.
#
# Needs valgrind (apt-get install valgrind) and the release binaries:
#   cargo build --release -p sightline-examples -p sightline-benches
# Run: benches/scripts/instructions-per-request.sh [REQUESTS]   (default 3000)
# With CACHE_SIM=1, callgrind also simulates the caches and branch predictor (slower) and the
# script prints, for the request's thread of each mode, its first-level instruction and data
# misses and mispredicted branches a request: what the code's size and data cost beyond its
# instruction count, deterministic like it. SAMPLING_RATIO (default 1) is the agent's and the
# peers' share of traces recorded.
set -euo pipefail
requests=${1:-3000}
bin=${CARGO_TARGET_DIR:-target}/release
simulate=()
[ "${CACHE_SIM:-0}" = 1 ] && simulate=(--cache-sim=yes --branch-sim=yes)
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

sink_port=$((30000 + RANDOM % 10000))
"$bin/service-overhead" --serve-sink "127.0.0.1:$sink_port" > "$work/sink.log" &
sleep 1

cat > "$work/load.py" <<'PY'
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(600):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60); c.connect(); break
    except OSError:
        time.sleep(0.1)
for i in range(n):
    c.request("GET", f"/users/{i}")
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
PY

# Prints the instructions per measured request of one mode.
measure() {
  local mode=$1 port=$((20000 + RANDOM % 10000))
  local args=(--listen "127.0.0.1:$port" --sampling-ratio "${SAMPLING_RATIO:-1}")
  [ "$mode" = agent ] && args+=(--collector "http://127.0.0.1:$sink_port")
  [ "$mode" = handlers ] && args+=(--collector "http://127.0.0.1:$sink_port" --traced-handlers)
  [ "$mode" = identity ] && args+=(--identity-layer)
  [ "$mode" = fastrace ] && args+=(--peer fastrace)
  [ "$mode" = otel ] && args+=(--peer opentelemetry)
  [ "$mode" = middleware ] && args+=(--peer middleware)
  valgrind --tool=callgrind --separate-threads=yes --instr-atstart=no "${simulate[@]}" \
    --callgrind-out-file="$work/$mode.%p" "$bin/hello-service" "${args[@]}" 2> "$work/$mode.valgrind.log" &
  local pid=$!
  python3 "$work/load.py" "$port" 300
  # The exporter drains and flushes every second (and drains as soon as 512 spans wait): the
  # warm-up's spans go out before counting starts, and the measured requests' spans before it
  # ends, so the exporter's count is of these requests.
  sleep 2
  callgrind_control -i on "$pid" > /dev/null 2>&1
  python3 "$work/load.py" "$port" "$requests"
  sleep 2
  callgrind_control -i off "$pid" > /dev/null 2>&1
  kill -INT "$pid"; wait "$pid" || true
  local total=0 thread
  for file in "$work/$mode".*-*; do
    thread=$(awk '/^totals:/ {print $2; exit}' "$file")
    total=$((total + thread))
  done
  echo $((total / requests))
}

bare=$(measure bare)
identity=$(measure identity)
agent=$(measure agent)
handlers=$(measure handlers)
middleware=$(measure middleware)
fastrace=$(measure fastrace)
otel=$(measure otel)
percent() { echo "+$(( ($1 - bare) * 1000 / bare / 10 )).$(( ($1 - bare) * 1000 / bare % 10 ))%"; }
echo "instructions per request: bare $bare, identity layer $identity ($(percent "$identity")), agent $agent ($(percent "$agent")), agent on the handlers $handlers ($(percent "$handlers"))"
echo "peers, a from_fn middleware on the router, spans discarded: the middleware alone $middleware ($(percent "$middleware")), fastrace $fastrace ($(percent "$fastrace")), OpenTelemetry SDK $otel ($(percent "$otel"))"
echo "per thread and request: $(for mode in agent fastrace otel; do
  printf '%s ' "$mode"; for f in "$work/$mode".*-*; do
  awk -v n="$requests" '/^totals:/ {if ($2 / n >= 1) printf "%d ", $2 / n; exit}' "$f"; done; done)"
if [ ${#simulate[@]} -gt 0 ]; then
  for mode in bare identity agent handlers middleware fastrace otel; do
    # The request's thread: the one that executed the most.
    awk -v n="$requests" -v mode="$mode" '
      /^events:/ { for (i = 2; i <= NF; i++) col[$i] = i - 1 }
      /^totals:/ {
        if ($2 > best) {
          best = $2
          line = sprintf("%s, request thread, per request: %d instructions, %.0f instruction misses, %.0f data misses, %.0f mispredicted branches",
            mode, $2 / n, $(col["I1mr"] + 1) / n, ($(col["D1mr"] + 1) + $(col["D1mw"] + 1)) / n,
            ($(col["Bcm"] + 1) + $(col["Bim"] + 1)) / n)
        }
        nextfile
      }
      END { print line }' "$work/$mode".*-*
  done
fi
