#!/usr/bin/env bash
# The server and network fault campaign of issue 15: packages/cli/test/faults.test.ts in
# the lab (tools/lab.sh: NFS-Ganesha and tgtd in network namespaces behind tbf-shaped
# links), ROUNDS times, with the timeout option TIMEOUT (seconds, or "default": the
# drivers' own 30 s). Prints one line per scenario: outcome, and the seconds from the
# fault to the exit (min/median/max over the rounds).
#
#   [RATE=2mbit] [QEMU=1] tools/fault-campaign.sh [ROUNDS (default 3)] [TIMEOUT (default 3)]
#
# QEMU=1 adds qemu-img through the dropped links, side by side (up to 180 s each).
#
# CI runs the same test once with a 3 s timeout. Build first (npm test, or
# npx nx run-many -t build). Report lines: $REPORT (default /tmp/blockconv-fault-campaign.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
timeout=${2:-3}
report=${REPORT:-/tmp/blockconv-fault-campaign.jsonl}
: >"$report"
echo "fault campaign: $rounds rounds, timeout $timeout, $(nproc) CPUs, $(uname -r), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%FT%TZ)" >&2
for ((i = 1; i <= rounds; i++)); do
  (cd packages/cli && BLOCKCONV_FAULT_TIMEOUT=$timeout BLOCKCONV_FAULT_REPORT=$report BLOCKCONV_FAULT_RATE=${RATE:-8mbit} BLOCKCONV_FAULT_QEMU=${QEMU:-} \
    npx tsx ../../node_modules/uvu/bin.js --no-color test 'faults\.test\.ts$') >&2
done
node - "$report" <<'JS'
const fs = require('node:fs');
const rows = fs.readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const by = new Map();
for (const r of rows) (by.get(r.scenario) ?? by.set(r.scenario, []).get(r.scenario)).push(r);
console.log('| scenario | rounds | outcome | seconds after the fault (min / median / max) |');
console.log('|---|---|---|---|');
for (const [s, rs] of by) {
  const t = rs.map((r) => r.secondsAfterFault ?? r.seconds ?? r.restartSeconds).filter((x) => x !== undefined).sort((a, b) => a - b);
  const outcomes = [...new Set(rs.map((r) => r.outcome))].join(', ');
  if (s.startsWith('qemu-img') && !t.length) { console.log(`| ${s} | ${rs.length} | ${outcomes} | - |`); continue; }
  const fmt = t.length ? `${t[0].toFixed(1)} / ${t[Math.floor(t.length / 2)].toFixed(1)} / ${t.at(-1).toFixed(1)}` : '-';
  console.log(`| ${s} (timeout ${rs[0].timeoutS} s, ${rs[0].rate}) | ${rs.length} | ${outcomes} | ${s.includes('slow link') ? `copy took ${fmt}` : s.includes('restarted') && outcomes.startsWith('rode') ? `restart took ${fmt}` : fmt} |`);
}
JS
