#!/usr/bin/env bash
# The fleet benchmark (issue 14), side by side in one run:
#
# 1. fan-out: COPIES raw targets in /dev/shm from one qcow2 template on the lab's NFS
#    server over its shaped link (tools/lab.sh, RATE), made by
#      fleet      one `blockconv worker`, one job of COPIES targets (read once: --tee)
#      qemu-seq   COPIES `qemu-img convert -m 8 -W` one after another
#      qemu-par   COPIES `qemu-img convert -m 8 -W` at once
#    Figures: wall time, and bytes the NFS server sent (received on this host's end of the link).
# 2. concurrency: JOBS jobs of the template in /dev/shm to /dev/shm targets (CPU-bound,
#    no link), run by one worker with --concurrency JOBS against JOBS workers with
#    --concurrency 1: wall time from submit to the last job's end.
# Tools take turns (fleet, qemu-seq, qemu-par, fleet, ...), RUNS rounds, medians printed.
# Every first copy of each tool is verified with qemu-img compare against the template.
# A benchmark, not a test: it prints numbers (markdown) and fails only when a tool fails.
#
# Environment: RATE=1gbit  SIZE=1G (template's virtual size; ~50 % data)  COPIES=8  JOBS=4
#   RUNS=3  PARTS="fanout concurrency"  QUIET_WAIT=30  OUT_DIR=bench-out (fleet-RATE.md)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RATE=${RATE:-1gbit}
SIZE=${SIZE:-1G}
COPIES=${COPIES:-8}
JOBS=${JOBS:-4}
RUNS=${RUNS:-3}
PARTS=${PARTS:-fanout concurrency}
QUIET_WAIT=${QUIET_WAIT:-30}
WARMUP=0
OUT_DIR=${OUT_DIR:-$ROOT/bench-out}
OUT_JSON=$OUT_DIR/fleet-$RATE.json
BENCH_NAME=bench-fleet
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"
[ "${1:-}" = --help ] && { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0; }
require_tools qemu-img node python3 redis-cli
BC="node $BC_BIN"
LAB="bash $ROOT/tools/lab.sh"
SIZE_BYTES=$(to_bytes "$SIZE")

mkdir -p "$OUT_DIR"
init_work
LAB_MADE=0
if ! $LAB status >/dev/null 2>&1; then $LAB up --rate "$RATE" >&2; LAB_MADE=1
elif [ "$($LAB env | sed -n 's/^LAB_RATE=//p')" != "$RATE" ]; then $LAB up --rate "$RATE" >&2; fi
eval "$($LAB env)"
REDIS_MADE=0
bash "$ROOT/tools/redis-server.sh" status >/dev/null 2>&1 || { bash "$ROOT/tools/redis-server.sh" start >&2; REDIS_MADE=1; }
export BLOCKCONV_REDIS=$(bash "$ROOT/tools/redis-server.sh" url)
export BLOCKCONV_STATE_DIR=$WORK/state
WORKER_PIDS=()
shm=/dev/shm/blockconv-fleet-bench
stop_workers() {
  local p
  for p in "${WORKER_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${WORKER_PIDS[@]}"; do while kill -0 "$p" 2>/dev/null; do sleep 0.1; done; done
  WORKER_PIDS=()
}
finish() {
  stop_workers
  rm -rf "$shm"
  [ "$REDIS_MADE" = 1 ] && bash "$ROOT/tools/redis-server.sh" stop >&2 || true
  if [ "$LAB_MADE" = 1 ] && [ "${LAB_KEEP:-0}" != 1 ]; then $LAB down || true; fi
}
trap finish EXIT
mkdir -p "$shm"

raw_info=$(gen_source "$shm/mixed-$SIZE.raw" --layout mixed --fill random --size "$SIZE_BYTES" --seed 1)
img=$LAB_NFS_EXPORT_DIR/template-$SIZE.qcow2
make_qcow2 "$raw_info" "$img" -o cluster_size=64k >/dev/null
rm -f "$shm/mixed-$SIZE.raw"
cat "$img" >/dev/null  # ganesha reads through the page cache: no run pays the disk
ALLOC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["allocated_bytes"])' "$img.json")
IMG_URL=$LAB_NFS_URL/template-$SIZE.qcow2
ram_img=$shm/template.qcow2
cp --sparse=always "$img" "$ram_img"

# What the NFS server sent = what this host received on its end of the NFS link.
nfs_tx() { cat /sys/class/net/"$LAB_NFS_IF"/statistics/rx_bytes; }
now() { date +%s.%N; }
start_workers() {  # N CONCURRENCY
  local i
  for ((i = 0; i < $1; i++)); do
    $BC worker -q --name "bench-$i" --concurrency "$2" 2>>"$WORK/workers.log" &
    WORKER_PIDS+=($!)
  done
  for ((i = 0; i < 100; i++)); do
    [ "$(grep -c 'taking convert jobs' "$WORK/workers.log" 2>/dev/null)" -ge "$STARTED_WORKERS" ] && break
    sleep 0.1
  done
}
reset_queue() { redis-cli -u "$BLOCKCONV_REDIS" FLUSHDB >/dev/null; }
batch_file() {  # SOURCE FORMAT PER_JOB TARGET...
  local src=$1 fmt=$2 per=$3; shift 3
  python3 - "$src" "$fmt" "$per" "$@" <<'EOF'
import json, sys
src, fmt, per, *targets = sys.argv[1:]
print(json.dumps({"source": src, "sourceFormat": fmt, "options": {"targetFormat": "raw", "workers": 8}, "targets": targets, "targetsPerJob": int(per)}))
EOF
}

redis_ops() { redis-cli -u "$BLOCKCONV_REDIS" INFO stats | sed -n 's/^total_commands_processed:\([0-9]*\).*/\1/p'; }
declare -A WALL TX OPS
record() { WALL[$1]+="$2 "; TX[$1]+="$3 "; log "  $1: $2 s, NFS sent $3 bytes"; }
verify_first() {  # LABEL TARGET
  [ -e "$WORK/verified-$1" ] && return 0
  qemu-img compare -q -f qcow2 -F raw "$ram_img" "$2" || die "$1: $2 differs from the template"
  touch "$WORK/verified-$1"
}

STARTED_WORKERS=0
for ((run = 1; run <= RUNS; run++)); do
  for tool in $( [[ " $PARTS " == *" fanout "* ]] && echo fleet qemu-seq qemu-par); do
    rm -f "$shm"/t*.raw
    sync; wait_quiet "$tool"
    tx0=$(nfs_tx); t0=$(now)
    case $tool in
      fleet)
        reset_queue; STARTED_WORKERS=$((STARTED_WORKERS + 1)); start_workers 1 1
        targets=(); for ((i = 0; i < COPIES; i++)); do targets+=("$shm/t$i.raw"); done
        batch_file "$IMG_URL" qcow2 "$COPIES" "${targets[@]}" >"$WORK/batch.json"
        tx0=$(nfs_tx); t0=$(now)
        $BC submit --batch "$WORK/batch.json" --wait >/dev/null 2>>"$WORK/submit.log" || die "fleet batch failed (see $WORK/submit.log)"
        ;;
      qemu-seq)
        for ((i = 0; i < COPIES; i++)); do qemu-img convert -m 8 -W -f qcow2 -O raw "$IMG_URL" "$shm/t$i.raw"; done ;;
      qemu-par)
        pids=(); for ((i = 0; i < COPIES; i++)); do qemu-img convert -m 8 -W -f qcow2 -O raw "$IMG_URL" "$shm/t$i.raw" & pids+=($!); done
        for p in "${pids[@]}"; do wait "$p" || die "qemu-img failed"; done ;;
    esac
    t1=$(now); tx1=$(nfs_tx)
    [ "$tool" = fleet ] && stop_workers
    record "$tool" "$(python3 -c "print(f'{$t1-$t0:.2f}')")" $((tx1 - tx0))
    verify_first "$tool" "$shm/t$((COPIES - 1)).raw"
  done
  for mode in $( [[ " $PARTS " == *" concurrency "* ]] && echo one-process many-processes); do
    rm -f "$shm"/j*.raw
    reset_queue
    if [ "$mode" = one-process ]; then STARTED_WORKERS=$((STARTED_WORKERS + 1)); start_workers 1 "$JOBS"
    else STARTED_WORKERS=$((STARTED_WORKERS + JOBS)); start_workers "$JOBS" 1; fi
    targets=(); for ((i = 0; i < JOBS; i++)); do targets+=("$shm/j$i.raw"); done
    batch_file "$ram_img" qcow2 1 "${targets[@]}" >"$WORK/batch.json"
    sync; wait_quiet "$mode"
    t0=$(now); ops0=$(redis_ops)
    $BC submit --batch "$WORK/batch.json" --wait >/dev/null 2>>"$WORK/submit.log" || die "$mode batch failed"
    t1=$(now); ops1=$(redis_ops)
    OPS[$mode]+="$((ops1 - ops0)) "
    stop_workers
    record "$mode" "$(python3 -c "print(f'{$t1-$t0:.2f}')")" 0
    verify_first "$mode" "$shm/j0.raw"
  done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
{
  echo "# Fleet benchmark, $(date -u +%FT%TZ), $(nproc) CPUs, links $RATE"
  echo
  echo "Template: $(numfmt --to=iec "$SIZE_BYTES") qcow2, $(numfmt --to=iec "$ALLOC") allocated; RUNS=$RUNS (median; all runs in brackets)."
  echo
  [ -n "${WALL[fleet]:-}" ] && {
  echo "## $COPIES raw targets in /dev/shm from the template on NFS"
  echo
  echo "| tool | wall s | NFS server sent | × template allocated |"
  echo "|---|---:|---:|---:|"
  }
  for t in fleet qemu-seq qemu-par; do
    [ -n "${WALL[$t]:-}" ] || continue
    w=$(echo "${WALL[$t]}" | median); x=$(echo "${TX[$t]}" | median)
    echo "| $t | $w [${WALL[$t]% }] | $(numfmt --to=iec "$x") | $(python3 -c "print(f'{$x/$ALLOC:.2f}')") |"
  done
  [ -n "${WALL[one-process]:-}" ] && {
  echo
  echo "## $JOBS jobs, template and targets in /dev/shm (CPU-bound)"
  echo
  }
  [ -n "${WALL[one-process]:-}" ] && echo "| workers | wall s | Redis commands (whole batch, submit --wait polling included) |"
  [ -n "${WALL[one-process]:-}" ] && echo "|---|---:|---:|"
  for t in one-process many-processes; do [ -n "${WALL[$t]:-}" ] || continue; echo "| $t | $(echo "${WALL[$t]}" | median) [${WALL[$t]% }] | $(echo "${OPS[$t]}" | median) |"; done
} | tee "$OUT_DIR/fleet-$RATE.md"
