#!/usr/bin/env bash
# NFS conversion benchmark: blockconv against qemu-img convert, both speaking NFS (their
# own libnfs clients, no kernel mount) to the loopback NFS-Ganesha of
# tools/nfs-server.sh (issue 5).
# A benchmark, not a test: it prints numbers; it fails only when a tool fails, a target
# does not verify, or blockconv goes over the RSS budget.
#
# Usage: tools/bench-nfs.sh [--help]
#
# Source: bench-raw.sh's "mixed" raw image in /dev/shm (gen_sparse.py --layout mixed
# --size SIZE --seed 1: ~50% random data in large and many 64 KiB extents), reused if
# already there. Scenarios, tools taking turns (A B C A B C ...) so drift hits all alike,
# every target deleted before each run:
#   from-nfs     qcow2 on the export -> /dev/shm raw. The qcow2 (64 KiB clusters) is made
#                once from the source by qemu-img into the export's directory and reused
#                while newer than the source. Both tools read the same nfs:// URL.
#                Verified by qemu-img compare of target and raw source.
#   to-nfs-raw   /dev/shm raw -> raw file on the export (created by the tool).
#   to-nfs-qcow2 /dev/shm raw -> qcow2 (64 KiB clusters) on the export.
#                Targets on the export are verified through its local directory (qemu-img
#                compare with the source; qcow2 also qemu-img check).
# The issue's targets: blockconv / qemu-img median wall <= 1.0 in every scenario, and
# raw -> qcow2 on NFS at least 80% of raw -> raw-on-NFS throughput (printed at the end:
# blockconv's to-nfs-raw median / its to-nfs-qcow2 median).
#
# The server runs on the same 2 cores as the tools: ganesha's CPU shows up in the
# "other CPU s" column (it is work done for the tool), as does anyone else's.
#
# Environment:
#   RUNS=5              runs per tool and scenario
#   WARMUP=0            untimed rounds of all tools before the timed ones
#   SIZE=2G             virtual size of the source (K/M/G/T suffixes, binary)
#   SCENARIOS="from-nfs to-nfs-raw to-nfs-qcow2"
#   CONNECTIONS=4       connections of the "blockconv connections=N" rows (0: no such rows)
#   RSS_BUDGET_MIB=150  blockconv's peak RSS limit (every scenario)
#   QUIET_WAIT=120      seconds to wait for the machine to go idle before each run
#   NFS_EXPORT_DIR      the export's local directory (default /var/tmp/blockconv-nfs/export,
#                       as tools/nfs-server.sh); served as nfs://127.0.0.1/export
#   OUT_JSON=bench-out/nfs.json   where the JSON goes (per-run data in ${OUT_JSON%.json}-work/)
#   TOOLS               replace the tool list; EXTRA_TOOLS appends to it. One tool a line:
#                       "label|command" with {SRC}, {DST} and {OUT} (the target as the
#                       command names it: the nfs:// URL for targets on the export), or a
#                       built-in label (qemu-img, "blockconv -m 8 -W -t unsafe",
#                       "blockconv connections=N", "blockconv (default)"); {FMT} is the
#                       scenario's output options (-O raw, -O qcow2 -o cluster_size=64k).
# blockconv convert always gets --output json added, to record its own elapsed time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
SCENARIOS=${SCENARIOS:-from-nfs to-nfs-raw to-nfs-qcow2}
CONNECTIONS=${CONNECTIONS:-4}
RSS_BUDGET_MIB=${RSS_BUDGET_MIB:-150}
QUIET_WAIT=${QUIET_WAIT:-120}
OUT_JSON=${OUT_JSON:-$ROOT/bench-out/nfs.json}
BENCH_NAME=bench-nfs
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

bench_args "$@"

EXPORT_DIR=${NFS_EXPORT_DIR:-/var/tmp/blockconv-nfs/export}
EXPORT_URL=nfs://127.0.0.1/export

# Built-in tools. qemu-img's default target cache is "unsafe" (no flush at the end, and
# over NFS no COMMIT), so "blockconv -m 8 -W -t unsafe" is the like-for-like row (the
# issue's ratio); "blockconv (default)" writes in order and flushes (COMMIT) at the end.
# {IN} is the source as the command names it, {OUT} the target.
declare -A BUILTIN=(
  [qemu-img]='qemu-img convert -m 8 -W {FMT} {IN} {OUT}'
  [blockconv -m 8 -W -t unsafe]='blockconv convert -m 8 -W -t unsafe {FMT} {IN} {OUT}'
  [blockconv connections=N]='blockconv convert -m 8 -W -t unsafe {FMT} {IN}{CONN} {OUT}{CONN}'
  [blockconv (default)]='blockconv convert {FMT} {IN} {OUT}'
)
DEFAULT_TOOLS=$'qemu-img\nblockconv -m 8 -W -t unsafe'
((CONNECTIONS > 0)) && DEFAULT_TOOLS+=$'\nblockconv connections=N'
TOOLS=${TOOLS:-$DEFAULT_TOOLS}${EXTRA_TOOLS:+$'\n'$EXTRA_TOOLS}
RATIO_TOOL='blockconv -m 8 -W -t unsafe'

require_tools qemu-img node python3 /usr/bin/time
SIZE_BYTES=$(to_bytes "$SIZE")
bash "$ROOT/tools/nfs-server.sh" start
[ -d "$EXPORT_DIR" ] || die "$EXPORT_DIR (the export's directory) does not exist"

init_work
write_env "\"title\": \"NFS benchmark (tools/bench-nfs.sh)\",
  \"baselines\": [\"qemu-img\"], \"rss_budget_scope\": \"\",
  \"ratio_target\": {\"tool\": \"$RATIO_TOOL\", \"max\": 1.0},
  \"runs\": $RUNS, \"warmup_rounds\": $WARMUP, \"size\": $SIZE_BYTES, \"connections\": $CONNECTIONS,
  \"scenarios\": \"$SCENARIOS\", \"args\": \"$*\", \"rss_budget_mib\": $RSS_BUDGET_MIB,
  \"export\": \"$EXPORT_URL -> $EXPORT_DIR ($(fstype "$EXPORT_DIR"))\",
  \"ganesha\": \"$(dpkg-query -W -f '${Version}' nfs-ganesha 2>/dev/null)\",
  \"libnfs\": \"$(pkg-config --modversion libnfs)\","

shm=$(location_dir shm)
mkdir -p "$shm"
src=$shm/mixed-$SIZE.raw
need=$((SIZE_BYTES / 2 + 512 * 1024 * 1024))
[ -e "$src" ] || need=$((need * 2))
[ "$(avail_bytes "$shm")" -gt "$need" ] || die "$shm: not enough free space (need ~$((need >> 30)) GiB)"
[ "$(avail_bytes "$EXPORT_DIR")" -gt $((SIZE_BYTES + (1 << 30))) ] || die "$EXPORT_DIR: not enough free space"
raw_info=$(gen_source "$src" --layout mixed --size "$SIZE_BYTES" --seed 1)

# The qcow2 source on the export, made by qemu-img (untimed), reused while newer than
# the raw source and made from it with the same options.
img=$EXPORT_DIR/bench-mixed-$SIZE.qcow2
img_info=$(make_qcow2 "$raw_info" "$img" -o cluster_size=64k)
# The export's directory is read through ganesha: keep the image in the page cache so
# that the first run does not pay the disk alone.
cat "$img" >/dev/null

log "blockconv build $FP_START; runs=$RUNS size=$SIZE scenarios: $SCENARIOS"

# Tool list of one scenario with {FMT} {IN} {OUT} {CONN} resolved; {CONN} (the
# connections option) stays only on the side that is on NFS (4th arg: in or out).
resolve_tools() {
  local fmt=$1 in=$2 out=$3 nfs_side=$4 spec resolved=""
  while IFS= read -r spec; do
    [ -n "$spec" ] || continue
    spec=$(resolve_spec "$spec")
    if [ "$nfs_side" = in ]; then spec=${spec//'{OUT}{CONN}'/'{OUT}'}; else spec=${spec//'{IN}{CONN}'/'{IN}'}; fi
    spec=${spec//'{FMT}'/$fmt}
    spec=${spec//'{IN}'/$in}
    spec=${spec//'{OUT}'/$out}
    spec=${spec//'{CONN}'/"?connections=$CONNECTIONS"}
    spec=${spec//'blockconv connections=N|'/"blockconv connections=$CONNECTIONS|"}
    resolved+=$spec$'\n'
  done <<<"$TOOLS"
  echo "$resolved"
}

declare -A MEDIAN=()
for sc in $SCENARIOS; do
  case $sc in
    from-nfs)
      record_source "$sc" "$EXPORT_DIR" "$img_info"
      dst=$shm/nfs-target.raw
      tools=$(resolve_tools "-O raw" "$EXPORT_URL/$(basename "$img")" "{DST}" in)
      run_scenario "$sc" "$EXPORT_DIR" "$EXPORT_URL/$(basename "$img")" "$dst" "$RUNS" "$tools" "$src" raw raw ;;
    to-nfs-raw)
      record_source "$sc" "$shm" "$raw_info"
      dst=$EXPORT_DIR/bench-target.raw
      tools=$(resolve_tools "-O raw" "{SRC}" "$EXPORT_URL/$(basename "$dst")" out)
      run_scenario "$sc" "$shm" "$src" "$dst" "$RUNS" "$tools" "$src" raw raw ;;
    to-nfs-qcow2)
      record_source "$sc" "$shm" "$raw_info"
      dst=$EXPORT_DIR/bench-target.qcow2
      tools=$(resolve_tools "-O qcow2 -o cluster_size=64k" "{SRC}" "$EXPORT_URL/$(basename "$dst")" out)
      run_scenario "$sc" "$shm" "$src" "$dst" "$RUNS" "$tools" "$src" raw qcow2 ;;
    *) die "unknown scenario $sc (known: from-nfs to-nfs-raw to-nfs-qcow2)" ;;
  esac
  python3 "$HELPERS/report.py" table "$WORK" "$sc" "$(tail -n1 "$WORK/sources.tsv" | cut -f2)"
done

status=0
final_report || status=$?
# raw -> qcow2 on NFS against raw -> raw on NFS, same tool (the issue asks >= 80%).
python3 - "$WORK" "$RATIO_TOOL" <<'EOF' | tee -a "$WORK/summary.txt" >&2 || true
import csv, statistics, sys
work, tool = sys.argv[1:]
walls = {}
for row in csv.reader(open(f"{work}/runs.tsv"), delimiter="\t"):
    if row[2] == tool and row[4] == "0":
        walls.setdefault(row[0], []).append(float(row[5]))
if "to-nfs-raw" in walls and "to-nfs-qcow2" in walls:
    r, q = statistics.median(walls["to-nfs-raw"]), statistics.median(walls["to-nfs-qcow2"])
    print(f"{tool}: raw -> qcow2 on NFS runs at {100 * r / q:.0f}% of raw -> raw-on-NFS "
          f"throughput ({q:.2f} s against {r:.2f} s; target >= 80%: {'met' if r / q >= 0.8 else 'MISSED'})")
EOF
case $status in
  0) ;;
  1) log "a copy failed or did not verify" ;;
  3) log "blockconv went over the ${RSS_BUDGET_MIB} MiB RSS budget" ;;
esac
exit "$status"
