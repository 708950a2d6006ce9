#!/usr/bin/env bash
# The README's one command: builds the web dashboard (npm) and the binaries, then runs
# `sightline demo` (the collector on a private ClickHouse, the instrumented chat app, load and
# the two incidents). Arguments go to `sightline demo` (see `sightline demo --help`).
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v clickhouse-server >/dev/null && ! command -v clickhouse >/dev/null \
   && [ ! -x /usr/sbin/clickhouse-server ]; then
  echo "ClickHouse is needed: apt-get install -y clickhouse-server protobuf-compiler" >&2
  exit 1
fi
npm --prefix dashboards/web ci --no-audit --no-fund --loglevel=error
npm --prefix dashboards/web run build
cargo build --release --bin sightline --bin demo-service
exec "${CARGO_TARGET_DIR:-target}/release/sightline" demo "$@"
