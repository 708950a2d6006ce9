"""Runs Sightline's modern-server DDL and read queries on chdb (in-process current ClickHouse).

Input: a JSON file {"ddl": [...], "database": "...", "queries": {name: {"sql": ..., "rows": N}}}.
Inserts as the collector does, through the Null `*_input` tables with batch ids and row
counts (so the materialized views run, and write only whole INSERTs): two spans of one trace, a latency row and an edge row twice each (so
SummingMergeTree has something to sum), a stage row; checks the write ledger recorded each
INSERT's batches, then runs each query and checks its row count. Exits non-zero with the failing
statement on any error.
"""

import json
import sys

from chdb import session

spec = json.load(open(sys.argv[1]))
s = session.Session()


def run(sql, fmt="JSONEachRow"):
    try:
        return s.query(sql, fmt)
    except Exception as e:  # noqa: BLE001 - report which statement failed
        sys.exit(f"FAILED: {e}\n--- statement ---\n{sql}")


print("server", str(run("SELECT version()", "CSV")).strip())
run(f"CREATE DATABASE IF NOT EXISTS {spec['database']}")
for statement in spec["ddl"]:
    run(statement)
run(f"USE {spec['database']}")

trace = "0af7651916cd43dd8448eb211c80319c"
run(f"""INSERT INTO spans_input VALUES
  (unhex('{trace}'), 1, 0, 'auth', '1.4.2', 'auth-1', 'POST /login', 2, 'http', '', 'Login',
   1700000000000000, 120000, 1, '', '', ['http.route'], ['/login'], 7, 7, 2),
  (unhex('{trace}'), 2, 1, 'auth', '1.4.2', 'auth-1', 'SELECT users', 3, 'db', 'postgresql:users', 'Login',
   1700000000010000, 90000, 2, 'Timeout', 'lock wait', ['db.system'], ['postgresql'], 7, 7, 2)""")
# An INSERT cut short (it says 3 rows, 1 arrived): no view may write any of it.
run(f"""INSERT INTO spans_input VALUES
  (unhex('{trace}'), 3, 1, 'auth', '1.4.2', 'auth-1', 'GET cache', 3, 'redis', 'redis', 'Login',
   1700000000020000, 1000, 1, '', '', [], [], 6, 6, 3)""")
partial = json.loads(str(run("SELECT (SELECT count() FROM spans WHERE span_id = 3) AS spans, "
                             "(SELECT count() FROM write_ledger WHERE batch_lo = 6) AS ledger, "
                             "(SELECT count() FROM service_instances WHERE spans > 2) AS instances")).strip())
if any(int(n) for n in partial.values()):
    sys.exit(f"FAILED: a partial INSERT was written ({partial})")
for batch in (8, 9):
    run(f"""INSERT INTO latency_1m_input (minute, service, service_version, bt, operation, kind, status,
             calls, errors, duration_us_sum, `histMap.bucket`, `histMap.count`, batch_lo, batch_hi, batch_rows)
           VALUES (toDateTime(1700000000), 'auth', '1.4.2', 'Login', 'POST /login', 2, 1,
                   2, 0, 240000, [119807, 120831], [1, 1], {batch}, {batch}, 1)""")
run("OPTIMIZE TABLE latency_1m FINAL")
merged = json.loads(str(run("SELECT sum(calls) AS calls, sumMap(`histMap.bucket`, `histMap.count`) AS hist FROM latency_1m")).strip())
if int(merged["calls"]) != 4 or [int(c) for c in merged["hist"][1]] != [2, 2]:
    sys.exit(f"FAILED: latency_1m did not sum: {merged}")

for batch in (8, 9):
    run(f"""INSERT INTO edges_1m_input (minute, caller, caller_type, callee, callee_type, bt, caller_version,
             callee_version, calls, errors, duration_us_sum, `histMap.bucket`, `histMap.count`, batch_lo, batch_hi,
             batch_rows)
           VALUES (toDateTime(1700000000), 'web', 2, 'auth', 2, 'Login', '2.0', '1.4.2',
                   3, 1, 360000, [119807], [3], {batch}, {batch}, 1)""")
run("OPTIMIZE TABLE edges_1m FINAL")
merged = json.loads(str(run("SELECT sum(calls) AS calls, count() AS rows FROM edges_1m")).strip())
if int(merged["calls"]) != 6 or int(merged["rows"]) != 1:
    sys.exit(f"FAILED: edges_1m did not sum: {merged}")

run("""INSERT INTO stages_1m_input (minute, service, service_version, bt, stage, spans, self_us_sum, batch_lo, batch_hi,
         batch_rows)
       VALUES (toDateTime(1700000000), 'auth', '1.4.2', 'Login', 'db', 2, 180000, 7, 9, 1)""")

ledger = [json.loads(line) for line in str(run(
    "SELECT target, batch_lo, batch_hi, rows FROM write_ledger ORDER BY target, batch_lo")).strip().splitlines()]
got = [(r["target"], int(r["batch_lo"]), int(r["batch_hi"]), int(r["rows"])) for r in ledger]
expected = [("edges_1m", 8, 8, 1), ("edges_1m", 9, 9, 1), ("latency_1m", 8, 8, 1), ("latency_1m", 9, 9, 1),
            ("spans", 7, 7, 2), ("stages_1m", 7, 9, 1)]
if got != expected:
    sys.exit(f"FAILED: write ledger {got}, expected {expected}")

failures = []
for name, query in spec["queries"].items():
    out = str(run(query["sql"])).strip()
    rows = [json.loads(line) for line in out.splitlines() if line]
    print(f"{name}: {len(rows)} rows {rows[:1]}")
    if len(rows) != query["rows"]:
        failures.append(f"{name}: expected {query['rows']} rows, got {len(rows)}\n{query['sql']}")
if failures:
    sys.exit("FAILED:\n" + "\n".join(failures))
print("all statements ran on", str(run("SELECT version()", "CSV")).strip())
