#!/usr/bin/env bash
# qcow2 → raw conversion benchmark: blockconv against qemu-img convert (issue 3).
# A benchmark, not a test: it prints numbers; it fails only when a tool fails, a
# copy does not verify, or blockconv goes over the RSS budget.
#
# Usage: tools/bench-qcow2.sh [--help]
#
# The raw source is bench-raw.sh's "mixed" one (gen_sparse.py --layout mixed --size
# SIZE --seed 1: ~50% data in large and many 64 KiB extents), reused if already there.
# qemu-img turns it (untimed; reused while newer than the raw source) into qcow2 images
# next to it, and each image is converted back to raw RUNS times per tool, tools taking
# turns (A B C A B C ...) so drift hits all alike. Every tool's first copy is compared
# (qemu-img compare) with the raw source the image was made from.
#
# Scenarios (SCENARIOS, in this order by default: plain zlib zstd):
#   plain        qemu-img convert -O qcow2 -o cluster_size=64k       of the random source
#   zlib         qemu-img convert -c -O qcow2 -o cluster_size=64k,compression_type=zlib
#   zstd         ... compression_type=zstd
#   zlib-random  as zlib, but of the random source (not run by default)
# qemu-img -c stores a cluster uncompressed when compressing does not shrink it, so the
# random source would give a "compressed" image without a compressed cluster
# (zlib-random shows it). zlib and zstd are therefore made from a source with the same
# extent map filled with random hex digits (gen_sparse.py --fill hex), which both
# shrink to ~60%: every data cluster of those images is compressed.
#
# Environment:
#   RUNS=5              runs per tool and scenario
#   WARMUP=0            untimed rounds of all tools before the timed ones
#   SIZE=2G             virtual size of the sources (K/M/G/T suffixes, binary)
#   SCENARIOS="plain zlib zstd"  which images to convert (see above)
#   LOCATIONS=shm       where sources, images and targets live; shm = /dev/shm/blockconv-bench,
#                       disk = /var/tmp/blockconv-bench, anything else = a directory
#   BENCH_DIR=DIR       shorthand for LOCATIONS=DIR
#   RSS_BUDGET_MIB=150  blockconv's peak RSS limit (every scenario)
#   QUIET_WAIT=120      seconds to wait for the machine to go idle before each run
#   CLEAN=1             also delete the generated sources and images at the end
#   OUT_JSON=bench-out/qcow2.json   where the JSON goes (raw per-run data in ${OUT_JSON%.json}-work/)
#   TOOLS               replace the tool list; EXTRA_TOOLS appends to it. One tool a
#                       line: "label|command" with {SRC} and {DST}, or a built-in label
#                       (qemu-img, "blockconv -m 8 -W -t unsafe", "blockconv -m 8 -W",
#                       "blockconv (default)"). The word "blockconv" runs this checkout's CLI.
# blockconv convert always gets --output json added, to record its own elapsed time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
SCENARIOS=${SCENARIOS:-plain zlib zstd}
LOCATIONS=${LOCATIONS:-${BENCH_DIR:-shm}}
RSS_BUDGET_MIB=${RSS_BUDGET_MIB:-150}
QUIET_WAIT=${QUIET_WAIT:-120}
CLEAN=${CLEAN:-0}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/qcow2.json}
BENCH_NAME=bench-qcow2
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

bench_args "$@"

# Built-in tools. qemu-img's default target cache is "unsafe" (no flush at the end),
# so "blockconv -m 8 -W -t unsafe" is the like-for-like row (issue 3's ratio);
# "blockconv (default)" writes in order and flushes, what a user gets without options.
declare -A BUILTIN=(
  [qemu-img]='qemu-img convert -m 8 -W -O raw {SRC} {DST}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert -m 8 -W -t unsafe -O raw {SRC} {DST}'
  [blockconv -m 8 -W]='blockconv convert -m 8 -W -O raw {SRC} {DST}'
  [blockconv (default)]='blockconv convert -O raw {SRC} {DST}'
)
DEFAULT_TOOLS=$'qemu-img\nblockconv -m 8 -W -t unsafe\nblockconv (default)'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
RATIO_TOOL='blockconv -m 8 -W -t unsafe'

# Scenario → "fill of the raw source|qemu-img convert options making the qcow2".
declare -A QCOW2_SCENARIOS=(
  [plain]='random|-o cluster_size=64k'
  [zlib]='hex|-c -o cluster_size=64k,compression_type=zlib'
  [zstd]='hex|-c -o cluster_size=64k,compression_type=zstd'
  [zlib-random]='random|-c -o cluster_size=64k,compression_type=zlib'
)
for s in $SCENARIOS; do
  [[ -n ${QCOW2_SCENARIOS[$s]+x} ]] || die "unknown scenario '$s' (known: ${!QCOW2_SCENARIOS[*]})"
done

require_tools qemu-img node python3 /usr/bin/time
SIZE_BYTES=$(to_bytes "$SIZE")

init_work
write_env "\"title\": \"qcow2 → raw benchmark (tools/bench-qcow2.sh)\",
  \"baselines\": [\"qemu-img\"], \"rss_budget_scope\": \"\",
  \"ratio_target\": {\"tool\": \"$RATIO_TOOL\", \"max\": 1.0},
  \"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"size\": $SIZE_BYTES,
  \"scenarios\": \"$SCENARIOS\", \"locations\": \"$LOCATIONS\", \"args\": \"$*\",
  \"rss_budget_mib\": $RSS_BUDGET_MIB,"

MADE=()
log "blockconv build $FP_START; runs=$RUNS size=$SIZE scenarios: $SCENARIOS; locations: $LOCATIONS"

for l in $LOCATIONS; do
  dir=$(location_dir "$l")
  mkdir -p "$dir"
  for s in $SCENARIOS; do
    fill=${QCOW2_SCENARIOS[$s]%%|*} opts=${QCOW2_SCENARIOS[$s]#*|}
    base=mixed-$SIZE; [ "$fill" = random ] || base=$base-$fill
    src=$dir/$base.raw
    img=$dir/$base-${s%-random}.qcow2
    sc=qcow2-${s%-random}-$base
    # Room for a ~50% source and an image (if not made yet), and one target.
    need=$((SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ -e "$src" ] || need=$((need + SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ -e "$img" ] || need=$((need + SIZE_BYTES / 2 + 512 * 1024 * 1024))
    [ "$(avail_bytes "$dir")" -gt "$need" ] || die "$dir: not enough free space (need ~$((need >> 30)) GiB)"
    info=$(gen_source "$src" --layout mixed --size "$SIZE_BYTES" --seed 1 --fill "$fill")
    # shellcheck disable=SC2086
    info=$(make_qcow2 "$info" "$img" $opts)
    record_source "$sc" "$dir" "$info"
    run_scenario "$sc" "$dir" "$img" "$dir/target-qcow2.raw" "$RUNS" "$TOOLS" "$src" raw
    python3 "$HELPERS/report.py" table "$WORK" "$sc" "$dir"
    MADE+=("$src" "$src.json" "$img" "$img.json")
  done
  if [ "$CLEAN" = 1 ]; then rm -f "${MADE[@]}"; rmdir "$dir" 2>/dev/null || true; fi
done

finish || exit $?
