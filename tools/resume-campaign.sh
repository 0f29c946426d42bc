#!/usr/bin/env bash
# The resume campaign of issues 13 and 15: KILLS SIGKILLs at random instants of a 1 GiB
# convert for each target kind (file raw, file qcow2, NFS raw, NFS qcow2, the two qcow2
# with -c, iSCSI LUN; KINDS=qcow2 keeps the kinds whose name has it), half with -W, each
# resumed with --resume and checked (qemu-img compare, qemu-img check, the checksum);
# then a table of what was copied again after each resume against the bound.
#
#   tools/resume-campaign.sh [KILLS (default 20)] [SEED (default 1)]
#
# It runs packages/cli/test/resume.test.ts (CI runs the same test with 2 kills per kind),
# starting the loopback NFS and iSCSI servers as the tests do. Build first (npm test, or
# npx nx run-many -t build). Report lines: $REPORT (default /tmp/blockconv-resume-campaign.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
kills=${1:-20}
seed=${2:-1}
report=${REPORT:-/tmp/blockconv-resume-campaign.jsonl}
: >"$report"
echo "resume campaign: $kills kills per target kind, seed $seed, $(nproc) CPUs, $(date -u +%FT%TZ)" >&2
(cd packages/cli && BLOCKCONV_RESUME_KILLS=$kills BLOCKCONV_RESUME_SEED=$seed BLOCKCONV_RESUME_REPORT=$report BLOCKCONV_RESUME_KINDS=${KINDS:-} \
  npx tsx ../../node_modules/uvu/bin.js --no-color test 'resume\.test\.ts$')
node - "$report" <<'EOF'
const fs = require('node:fs');
const rows = fs.readFileSync(process.argv[2], 'utf8').trim().split('\n').map((l) => JSON.parse(l));
const MiB = 1024 * 1024;
const by = new Map();
for (const r of rows) (by.get(r.kind) ?? by.set(r.kind, []).get(r.kind)).push(r);
console.log('| target | kills | killed mid-copy | resumed past 0 | re-copied max | re-copied median | bound (interval + workers x buffer) | qcow2 leaks after the kill (max clusters) | repaired by check -r leaks first |');
console.log('|---|---|---|---|---|---|---|---|---|');
for (const [kind, rs] of by) {
  const killed = rs.filter((r) => r.killed);
  const re = killed.map((r) => r.recopied).sort((a, b) => a - b);
  const med = re.length ? re[Math.floor(re.length / 2)] : 0;
  console.log(`| ${kind} | ${rs.length} | ${killed.length} | ${killed.filter((r) => r.resumedFrom > 0).length} | ${(Math.max(0, ...re) / MiB).toFixed(1)} MiB | ${(med / MiB).toFixed(1)} MiB | ${(rs[0].bound / MiB).toFixed(0)} MiB | ${kind.includes('qcow2') ? Math.max(0, ...rs.map((r) => r.leaks ?? 0)) : '-'} | ${kind.includes('qcow2') ? rs.filter((r) => r.repaired).length : '-'} |`);
}
EOF
