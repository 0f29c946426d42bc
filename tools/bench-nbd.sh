#!/usr/bin/env bash
# NBD benchmark: blockconv's NBD client against nbdcopy and qemu-img convert, the same
# servers for all (Debian's qemu-nbd, shared, multi-conn), in /dev/shm so that what is
# measured is the tools' own cost. A benchmark, not a test: it prints numbers; it fails
# only when a tool fails or a copy does not verify (qemu-img compare).
#
# Usage: tools/bench-nbd.sh [--help]
#
# Scenarios, each with the mixed SIZE source of bench-raw.sh (~50% data, large and
# 64 KiB extents), tools taking turns (A B C D A B C D ...):
#   file-to-nbd  the raw file → an export of qemu-nbd over an all-zero raw file
#   nbd-to-nbd   qemu-nbd -r over the raw file → the same target export
#   nbd-to-file  qemu-nbd -r over the raw file → a new raw file
# The target export is reset to all zeroes (holes) before every run, and every tool is
# told so (qemu-img --target-is-zero, nbdcopy --destination-is-zero; blockconv learns it
# from block status, and gets --target-is-zero too in the like-for-like row). No tool
# flushes: qemu-img's convert and nbdcopy do not by default; blockconv gets -t unsafe.
#
# Environment:
#   RUNS=5  SIZE=2G  WARMUP=0  QUIET_WAIT=120
#   SCENARIOS="file-to-nbd nbd-to-nbd nbd-to-file"
#   OUT_JSON=bench-out/nbd.json   (raw per-run data in ${OUT_JSON%.json}-work/)
#   TOOLS       replace the tool list ("label|command" lines, {SRC} {DST}; see bench-raw.sh)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
QUIET_WAIT=${QUIET_WAIT:-120}
SCENARIOS=${SCENARIOS:-file-to-nbd nbd-to-nbd nbd-to-file}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/nbd.json}
BENCH_NAME=bench-nbd
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"
bench_args "$@"

declare -A BUILTIN=(
  [qemu-img]='qemu-img convert -n --target-is-zero -f raw -O raw -m 8 -W {SRC} {DST}'
  [nbdcopy]='nbdcopy --destination-is-zero {SRC} {DST}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert -n --target-is-zero -m 8 -W -t unsafe {SRC} {DST}'
  [blockconv (default)]='blockconv convert -n {SRC} {DST}'
)
TO_NBD_TOOLS=$'qemu-img\nnbdcopy\nblockconv -m 8 -W -t unsafe\nblockconv (default)'
# To a new file: the same labels (the report's ratios go by them), no -n.
TO_FILE_TOOLS=$'qemu-img|qemu-img convert -f raw -O raw -m 8 -W {SRC} {DST}
nbdcopy|nbdcopy {SRC} {DST}
blockconv -m 8 -W -t unsafe|blockconv convert -m 8 -W -t unsafe {SRC} {DST}
blockconv (default)|blockconv convert {SRC} {DST}'

require_tools qemu-img qemu-nbd nbdcopy node python3 /usr/bin/time fallocate
SIZE_BYTES=$(to_bytes "$SIZE")
init_work
write_env "\"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"size\": $SIZE_BYTES, \"scenarios\": \"$SCENARIOS\","

dir=$(location_dir shm)
mkdir -p "$dir"
src=$dir/mixed-$SIZE.raw
[ "$(avail_bytes "$dir")" -gt $((SIZE_BYTES * 14 / 10)) ] || die "$dir: not enough free space"
info=$(gen_source "$src" --layout mixed --size "$SIZE_BYTES" --seed 1)

servers=$(mktemp -d "$dir/nbd-servers.XXXXXX")
target_file=$servers/target.raw
truncate -s "$SIZE_BYTES" "$target_file"
pids=()
stop_servers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$servers"; cleanup_targets; }
trap stop_servers EXIT
# qemu-nbd: persistent (-t), up to 8 clients at once (-e 8, which also advertises multi-conn).
serve() {
  local sock=$1; shift
  qemu-nbd -t -e 8 -k "$sock" -f raw --cache=writeback "$@" & pids+=($!)
  for _ in $(seq 100); do [ -S "$sock" ] && return 0; sleep 0.05; done
  die "qemu-nbd did not start: $*"
}
serve "$servers/src.sock" -r "$src"
serve "$servers/dst.sock" "$target_file"
SRC_URL="nbd+unix:///?socket=$servers/src.sock"
DST_URL="nbd+unix:///?socket=$servers/dst.sock"
log "nbdcopy to the export: $(nbdcopy -v --destination-is-zero "$SRC_URL" null: 2>&1 | grep -Eo 'connections=[0-9]+ requests=[0-9]+ threads=[0-9]+' | head -n1) (its defaults)"
RESET_TARGET="fallocate --punch-hole --offset 0 --length $SIZE_BYTES '$target_file'"

for sc in $SCENARIOS; do
  record_source "$sc" "$dir" "$info"
  case $sc in
    file-to-nbd) run_scenario "$sc" "$dir" "$src" "$DST_URL" "$RUNS" "${TOOLS:-$TO_NBD_TOOLS}" ;;
    nbd-to-nbd) run_scenario "$sc" "$dir" "$SRC_URL" "$DST_URL" "$RUNS" "${TOOLS:-$TO_NBD_TOOLS}" "$src" ;;
    nbd-to-file) run_scenario "$sc" "$dir" "$SRC_URL" "$dir/nbd-target.raw" "$RUNS" "${TOOLS:-$TO_FILE_TOOLS}" "$src" ;;
    *) die "unknown scenario $sc" ;;
  esac
  python3 "$HELPERS/report.py" table "$WORK" "$sc" "$dir"
done

finish || exit $?
