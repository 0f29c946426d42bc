#!/usr/bin/env bash
# iSCSI conversion benchmark: blockconv against qemu-img convert, both speaking iSCSI
# to the loopback tgtd of tools/iscsi-server.sh (issue 6).
# A benchmark, not a test: it prints numbers; it fails only when a tool fails or a copy
# does not verify.
#
# Usage: tools/bench-iscsi.sh [--help]
#
# Source: bench-raw.sh's "mixed" raw image in /dev/shm (gen_sparse.py --layout mixed
# --size 2G --seed 1: ~50% random data in large and many 64 KiB extents), reused if
# already there. LUN: iqn.2026-11.org.blockconv:disk512 LUN 4 (2 GiB, 512-byte blocks,
# thin), a sparse file in /var/tmp/blockconv-iscsi/lun. Scenarios, tools taking turns
# (A B C A B C ...) so drift hits all alike:
#   to-lun    /dev/shm raw -> LUN (-n). The LUN is deallocated (hole-punched through its
#             backing file) before every run, so every tool starts from the same LUN.
#             Verified by qemu-img compare of the source with the LUN's backing file.
#   from-lun  LUN -> /dev/shm raw. The LUN holds the source, copied into its backing file
#             with dd conv=sparse bs=FROM_FILL_BS: with the default 64K, the same 6,813
#             extents (holes are deallocated blocks for GET LBA STATUS); with 1M, the
#             64 KiB holes of the fine regions are written as zeroes (21 extents).
#             Verified by qemu-img compare of the source with the target.
# (qemu-img compare on iscsi:// itself is not used here: it asks GET LBA STATUS one
# extent a time, which tgtd answers by walking the rest of the LUN: minutes for this
# LUN. The tests compare through iscsi:// on small LUNs.)
#
# Environment:
#   RUNS=5              runs per tool and scenario
#   FROM_RUNS=$RUNS     runs per tool of from-lun (qemu-img takes minutes a run there)
#   WARMUP=0            untimed rounds of all tools before the timed ones
#   SCENARIOS="to-lun from-lun"
#   FROM_FILL_BS=64K    dd block size filling the LUN for from-lun (see above)
#   QUIET_WAIT=120      seconds to wait for the machine to go idle before each run
#   OUT_JSON=bench-out/iscsi.json   where the JSON goes (per-run data in ${OUT_JSON%.json}-work/)
#   TOOLS               replace the tool list; EXTRA_TOOLS appends to it. One tool a
#                       line: "label|command" with {SRC} and {DST}, or a built-in label
#                       (qemu-img, "blockconv -m 8 -W -t unsafe", "blockconv (default)").
#                       Commands get -n added for to-lun (the LUN exists).
# blockconv convert always gets --output json added, to record its own elapsed time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNS=${RUNS:-5}
FROM_RUNS=${FROM_RUNS:-$RUNS}
WARMUP=${WARMUP:-0}
SIZE=2G
SCENARIOS=${SCENARIOS:-to-lun from-lun}
FROM_FILL_BS=${FROM_FILL_BS:-64K}
QUIET_WAIT=${QUIET_WAIT:-120}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/iscsi.json}
BENCH_NAME=bench-iscsi
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

bench_args "$@"

LUN_URL=iscsi://127.0.0.1:3260/iqn.2026-11.org.blockconv:disk512/4
LUN_FILE=${ISCSI_DIR:-/var/tmp/blockconv-iscsi}/lun/disk512-bench.img

# Built-in tools ({N} becomes -n for to-lun). qemu-img's default target cache is
# "unsafe" (no final flush), so "blockconv -m 8 -W -t unsafe" is the like-for-like row
# (the issue's ratio); "blockconv (default)" writes in order and flushes.
declare -A BUILTIN=(
  [qemu-img]='qemu-img convert {N} -f raw -O raw -m 8 -W {SRC} {DST}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert {N} -f raw -O raw -m 8 -W -t unsafe {SRC} {DST}'
  [blockconv (default)]='blockconv convert {N} -f raw -O raw {SRC} {DST}'
)
DEFAULT_TOOLS=$'qemu-img\nblockconv -m 8 -W -t unsafe\nblockconv (default)'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
RATIO_TOOL='blockconv -m 8 -W -t unsafe'

require_tools qemu-img node python3 /usr/bin/time fallocate
bash "$ROOT/tools/iscsi-server.sh" start
[ "$(stat -c %s "$LUN_FILE")" = $((2 << 30)) ] || die "$LUN_FILE is not 2 GiB"

init_work
write_env "\"runs\": $RUNS, \"from_runs\": $FROM_RUNS, \"warmup_rounds\": $WARMUP, \"size\": $(to_bytes $SIZE),
  \"lun\": \"$LUN_URL\", \"from_fill_bs\": \"$FROM_FILL_BS\", \"lun_file\": \"$LUN_FILE\", \"lun_fs\": \"$(fstype "$LUN_FILE")\",
  \"tgtd\": \"$(dpkg-query -W -f '${Version}' tgt 2>/dev/null)\",
  \"libiscsi\": \"$(pkg-config --modversion libiscsi)\",
  \"title\": \"iSCSI benchmark (tools/bench-iscsi.sh)\",
  \"baselines\": [\"qemu-img\"],
  \"rss_budget_scope\": \"(none)\",
  \"ratio_target\": {\"tool\": \"$RATIO_TOOL\", \"max\": 1.0},"

dir=$(location_dir shm)
mkdir -p "$dir"
src=$dir/mixed-$SIZE.raw
make_source to-lun "$dir" "$src" --layout mixed --size "$(to_bytes $SIZE)" --seed 1
record_source from-lun "$dir" "$SOURCE_INFO"

wipe_lun() { fallocate --punch-hole --offset 0 --length "$(stat -c %s "$LUN_FILE")" "$LUN_FILE"; }

# The LUN's content against the source, through its backing file; records allocation.
verify_lun() {
  local sc=$1 label=$2 status=OK rc=0
  qemu-img compare -q -f raw -F raw "$src" "$LUN_FILE" 2>"$WORK/compare.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    status=FAIL
    log "VERIFY FAILED: $label: $([ "$rc" = 1 ] && echo "contents differ" || cat "$WORK/compare.err")"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$sc" "$dir" "$label" "$status" "$(($(stat -c %b "$LUN_FILE") * 512))" >>"$WORK/verify.tsv"
}

specs=()
while IFS= read -r spec; do
  [ -n "$spec" ] && specs+=("$(resolve_spec "$spec")")
done <<<"$TOOLS"

for sc in $SCENARIOS; do
  case $sc in
    to-lun) runs=$RUNS n=-n s=$src d=$LUN_URL ;;
    from-lun) runs=$FROM_RUNS n= s=$LUN_URL d=$dir/iscsi-target.raw ;;
    *) die "unknown scenario $sc" ;;
  esac
  for spec in "${specs[@]}"; do
    printf '%s\t%s\t%s\n' "$sc" "${spec%%|*}" "$(echo "${spec#*|}" | sed "s/{N} \{0,1\}/${n:+$n }/")" >>"$WORK/tools.tsv"
  done
  if [ "$sc" = from-lun ]; then
    # The LUN holds the source, holes as holes; written back before the timed runs.
    wipe_lun
    dd if="$src" of="$LUN_FILE" bs="$FROM_FILL_BS" conv=sparse,notrunc status=none
    sync "$LUN_FILE"
    TARGETS+=("$d")
  fi
  sync
  for ((run = 1 - WARMUP; run <= runs; run++)); do
    for spec in "${specs[@]}"; do
      label=${spec%%|*}
      template=$(echo "${spec#*|}" | sed "s/{N} \{0,1\}/${n:+$n }/")
      [ "$sc" = to-lun ] && wipe_lun
      timed_run "$sc" "$dir" "$label" "$template" "$s" "$d" "$run" "$runs"
      if ((run == 1)); then
        if [ "$sc" = to-lun ]; then verify_lun "$sc" "$label"; else verify "$sc" "$dir" "$label" "$src" "$d"; fi
      fi
    done
  done
  [ "$sc" = from-lun ] && rm -f "$d"
  python3 "$HELPERS/report.py" table "$WORK" "$sc" "$dir"
done

fp=$(build_fingerprint)
[ "$fp" = "$FP_START" ] || warn "blockconv's build changed since the start ($FP_START -> $fp)"
finish || exit $?
