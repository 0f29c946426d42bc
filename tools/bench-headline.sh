#!/usr/bin/env bash
# The headline benchmark (issue 7): deploy a qcow2 template from NFS to an iSCSI LUN over
# the lab's shaped links (tools/lab.sh), blockconv side by side with qemu-img convert.
# A benchmark, not a test: it prints numbers; it fails only when a tool fails or a copy
# does not verify.
#
# Usage: tools/bench-headline.sh [--help]
#
# The template: gen_sparse.py --layout mixed --fill random --size SIZE --seed 1 (~50%
# random data in large and many 64 KiB extents) in /dev/shm, made into a qcow2 with 64 KiB
# clusters by qemu-img, on the lab's NFS export (reused while newer than the raw source).
# Scenarios, tools taking turns (A B C D E A B C D E ...) so drift hits all alike:
#   nfs-iscsi  qcow2 on NFS  -> raw on the LUN (-n)   both links: NFS in, iSCSI out
#   nfs-ram    qcow2 on NFS  -> raw in /dev/shm       the NFS link only
#   ram-iscsi  qcow2 in /dev/shm (a copy of the template) -> raw on the LUN (-n)
# The LUN is re-created with exactly the template's virtual size (tools/lab.sh lun-size),
# and deallocated (hole-punched through its backing file, then synced) before every run,
# so every run starts from the same empty thin LUN. Every tool's first copy of each
# scenario is verified with `qemu-img compare -f qcow2 -F raw TEMPLATE TARGET`; the LUN is
# compared through its backing file (what tgtd wrote; compare over iscsi:// asks GET LBA
# STATUS one extent a time, which tgtd answers by walking the rest of the LUN: minutes).
#
# Link limit = the template's allocated bytes (qcow2 clusters) / the link rate: the time
# the data alone needs on one link (nfs-iscsi uses two links at once, one each way, so its
# limit is the same). Each figure is printed with its fraction of that limit (limit / wall:
# 1.00 = the wire's own speed; tbf counts TCP/IP headers, so ~0.95 is the practical top).
#
# Then the sweep (SWEEP=1): nfs-iscsi throughput against worker count, blockconv -m N
# (in-order writes, its default) for N in SWEEP_BC plus -m auto, qemu-img convert -m N -W
# for N in SWEEP_QEMU (16 is its maximum), SWEEP_RUNS runs each, plotted into SVG_OUT.
#
# Environment:
#   RATE=1gbit        lab link rate (tc syntax: 1gbit, 500mbit; none = unshaped). If the lab
#                     is not up it is brought up at RATE (and down again at the end unless
#                     LAB_KEEP=1); if it is up at another rate it is re-shaped. Without
#                     RATE, a lab that is up is used at its own rate.
#   RUNS=5            runs per tool and scenario (median reported)
#   SIZE=2G           virtual size of the template
#   SCENARIOS="nfs-iscsi nfs-ram ram-iscsi"
#   SWEEP=1           run the worker sweep (0: skip); SWEEP_RUNS=1
#   SWEEP_BC="1 2 4 8 16 32"  SWEEP_QEMU="1 2 4 8 16"
#   QUIET_WAIT=60     seconds to wait for the machine to go idle before each run
#   (per run, the CPU the lab's ganesha and tgtd used is recorded: "servers CPU s";
#   "other CPU s" is all other CPU the machine spent, servers included)
#   LINK_SAMPLES=1    sample both links' byte counters and the CPU (machine, ganesha,
#                     tgtd) every 0.1 s during each run (tools/bench/link_sampler.py,
#                     into WORK/samples/) and print, per run, where each link stood
#                     still and whether the other moved meanwhile (0: off, default)
#   OUT_DIR=bench-out   tables: headline-RATE.md (+ .json, -sweep.tsv); per-run data in
#                     OUT_DIR/headline-RATE-work/
#   SVG_OUT=docs/headline-sweep-RATE.svg
#   TOOLS             the built-in tools to run, one label a line (default: all of them:
#                     tcp stream, blockconv -m 1, blockconv (default), blockconv -W,
#                     qemu-img -m 1, qemu-img -m 8 -W)
#   EXTRA_TOOLS       more tools, one a line: "label|command" with {SRC} {DST} {N}, e.g. another
#                     checkout's CLI: 'before|node /work/wt/packages/cli/bin/blockconv.js convert {N} -f qcow2 -O raw {SRC} {DST}'
# blockconv convert always gets --output json added, to record its own elapsed time.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Without RATE, a lab that is up keeps its rate (and names the output files); else 1gbit.
RATE=${RATE:-$(bash "$ROOT/tools/lab.sh" env 2>/dev/null | sed -n 's/^LAB_RATE=//p')}
RATE=${RATE:-1gbit}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-0}
SIZE=${SIZE:-2G}
SCENARIOS=${SCENARIOS:-nfs-iscsi nfs-ram ram-iscsi}
SWEEP=${SWEEP:-1}
SWEEP_RUNS=${SWEEP_RUNS:-1}
SWEEP_BC=${SWEEP_BC:-1 2 4 8 16 32}
SWEEP_QEMU=${SWEEP_QEMU:-1 2 4 8 16}
QUIET_WAIT=${QUIET_WAIT:-60}
OUT_DIR=${OUT_DIR:-$ROOT/bench-out}
OUT_JSON=$OUT_DIR/headline-$RATE.json
SVG_OUT=${SVG_OUT:-$ROOT/docs/headline-sweep-$RATE.svg}
BENCH_NAME=bench-headline
# shellcheck source=tools/bench/lib.sh
source "$ROOT/tools/bench/lib.sh"

bench_args "$@"

LAB="bash $ROOT/tools/lab.sh"
require_tools qemu-img node python3 /usr/bin/time fallocate
SIZE_BYTES=$(to_bytes "$SIZE")

# --- the lab -------------------------------------------------------------------------
LAB_MADE=0
if ! $LAB status >/dev/null 2>&1; then
  $LAB up --rate "$RATE" >&2
  LAB_MADE=1
else
  current=$($LAB env | sed -n 's/^LAB_RATE=//p')
  [ "$current" = "$RATE" ] || $LAB up --rate "$RATE" >&2
fi
eval "$($LAB env)"
finish() {
  cleanup_targets
  if [ "$LAB_MADE" = 1 ] && [ "${LAB_KEEP:-0}" != 1 ]; then $LAB down || true; fi
}
mkdir -p "$OUT_DIR"
init_work
trap finish EXIT

# Link rate in bytes/s (0 = unshaped).
rate_bytes() {
  python3 - "$1" <<'EOF'
import re, sys
r = sys.argv[1].lower()
if r == "none": print(0); sys.exit()
m = re.fullmatch(r"([0-9.]+)([kmgt]?)(bit|bps)?", r)
if not m: sys.exit(f"cannot parse rate {r}")
v = float(m[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m[2]]
print(int(v / 8 if m[3] in (None, "bit") else v))
EOF
}
RATE_BPS=$(rate_bytes "$RATE")

# --- the template --------------------------------------------------------------------
shm=/dev/shm/blockconv-headline
mkdir -p "$shm"
src=$shm/mixed-$SIZE.raw
[ -e "$src" ] || [ "$(avail_bytes "$shm")" -gt $((SIZE_BYTES + (1 << 30))) ] || die "$shm: not enough free space"
raw_info=$(gen_source "$src" --layout mixed --fill random --size "$SIZE_BYTES" --seed 1)

img_name=template-$SIZE.qcow2
img=$LAB_NFS_EXPORT_DIR/$img_name
img_info=$(make_qcow2 "$raw_info" "$img" -o cluster_size=64k)
ALLOC=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["allocated_bytes"])' "$img.json")
# ganesha reads the export through the page cache: warm it, so no run pays the disk.
cat "$img" >/dev/null
IMG_URL=$LAB_NFS_URL/$img_name

# The LUN: exactly the template's size, so qemu-img compare sees two images of one size.
$LAB lun-size "$SIZE_BYTES"
# What lives in RAM besides the raw source: the LUN's data and (ram-iscsi only) a
# copy of the template. A 16 GiB template needs about 16-24 GiB of it: check first, since a
# full tmpfs makes the machine swap and the runs meaningless rather than fail.
need=$ALLOC
case " $SCENARIOS " in *" ram-iscsi "*) need=$((need + ALLOC)) ;; esac
[ "$(avail_bytes "$shm")" -gt $((need + (2 << 30))) ] ||
  die "$shm: $(( (need >> 20) + 2048 )) MiB of free RAM needed for the LUN's data (and the template's copy for ram-iscsi) at SIZE=$SIZE; free /dev/shm or choose fewer scenarios"
ram_img=$shm/$img_name
case " $SCENARIOS " in
  *" ram-iscsi "*) cp --sparse=always "$img" "$ram_img"; TARGETS+=("$ram_img") ;;
  *) rm -f "$ram_img" ;;
esac
wipe_lun() {
  fallocate --punch-hole --offset 0 --length "$(stat -c %s "$LAB_LUN_FILE")" "$LAB_LUN_FILE"
  sync -f "$LAB_LUN_FILE"
}

write_env "\"title\": \"Headline: NFS -> iSCSI (tools/bench-headline.sh)\",
  \"runs\": $RUNS, \"size\": $SIZE_BYTES, \"rate\": \"$RATE\", \"rate_bytes_per_s\": $RATE_BPS,
  \"allocated_bytes\": $ALLOC, \"scenarios\": \"$SCENARIOS\",
  \"nfs\": \"$LAB_NFS_URL -> $LAB_NFS_EXPORT_DIR ($(fstype "$LAB_NFS_EXPORT_DIR"))\",
  \"iscsi\": \"$LAB_ISCSI_URL -> $LAB_LUN_FILE ($(fstype "$LAB_LUN_FILE"))\",
  \"ganesha\": \"$(dpkg-query -W -f '${Version}' nfs-ganesha 2>/dev/null)\",
  \"tgtd\": \"$(dpkg-query -W -f '${Version}' tgt 2>/dev/null)\",
  \"libnfs\": \"$(pkg-config --modversion libnfs)\", \"libiscsi\": \"$(pkg-config --modversion libiscsi)\","
record_source headline "$LAB_NFS_EXPORT_DIR" "$img_info"

# Tools. {N} becomes -n when the target is the LUN. qemu-img's target cache default is
# "unsafe" (no final flush); blockconv's default flushes (SYNCHRONIZE CACHE / fdatasync).
# "tcp stream" is no copy: plain TCP streams of the template's allocated bytes over the
# same links (tools/bench/tcp_stream.py), what a bare TCP payload gets through the shaping.
TOOL_LABELS=('tcp stream' 'blockconv -m 1' 'blockconv (default)' 'blockconv -W' 'qemu-img -m 1' 'qemu-img -m 8 -W')
declare -A BUILTIN=(
  ['tcp stream']="python3 $HELPERS/tcp_stream.py {LINKS} $ALLOC"
  ['blockconv -m 1']='blockconv convert -m 1 {N} -f qcow2 -O raw {SRC} {DST}'
  ['blockconv (default)']='blockconv convert {N} -f qcow2 -O raw {SRC} {DST}'
  ['blockconv -W']='blockconv convert -W {N} -f qcow2 -O raw {SRC} {DST}'
  ['qemu-img -m 1']='qemu-img convert -m 1 {N} -f qcow2 -O raw {SRC} {DST}'
  ['qemu-img -m 8 -W']='qemu-img convert -m 8 -W {N} -f qcow2 -O raw {SRC} {DST}'
)

# verify_target SCENARIO LABEL TARGET: compare with the template; record allocation.
verify_target() {
  local sc=$1 label=$2 dst=$3 file=$3 status=OK rc=0 why=""
  [[ $dst == iscsi://* ]] && file=$LAB_LUN_FILE
  qemu-img compare -q -f qcow2 -F raw "$img" "$file" 2>"$WORK/compare.err" || rc=$?
  if [ "$rc" -ne 0 ]; then
    status=FAIL
    why=$([ "$rc" = 1 ] && echo "contents differ" || cat "$WORK/compare.err")
    log "VERIFY FAILED: $label ($sc): $why"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$sc" lab "$label" "$status" "$(($(stat -c %b "$file") * 512))" >>"$WORK/verify.tsv"
}

# CPU time (clock ticks) the lab's two servers have used: the work they do for a copy,
# which "other CPU" would otherwise mix with everyone else's load.
server_cpu() {
  local t=0 pid v
  for pid in "$LAB_GANESHA_PID" "$LAB_TGTD_PID"; do
    v=$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)
    t=$((t + v))
  done
  echo "$t"
}

# fill_template TEMPLATE N SCENARIO: {N} (-n for the LUN) and {LINKS} (the scenario) filled in.
fill_template() { echo "$1" | sed "s/{N}/$2/; s/{LINKS}/$3/"; }

# run_tools SCENARIO RUNS VERIFY LABEL=TEMPLATE...: alternating runs of the given tools.
run_tools() {
  local sc=$1 runs=$2 do_verify=$3 run label template src dst n= s0; shift 3
  case $sc in
    nfs-iscsi|sweep) src=$IMG_URL dst=$LAB_ISCSI_URL n=-n ;;
    nfs-ram) src=$IMG_URL dst=$shm/target.raw ;;
    ram-iscsi) src=$ram_img dst=$LAB_ISCSI_URL n=-n ;;
  esac
  [[ $dst == /* ]] && TARGETS+=("$dst")
  local -a specs=("$@")
  local spec
  for spec in "${specs[@]}"; do
    printf '%s\t%s\t%s\n' "$sc" "${spec%%=*}" "$(fill_template "${spec#*=}" "$n" "$sc")" >>"$WORK/tools.tsv"
  done
  sync
  if [[ $dst == /* ]]; then
    # As lib.sh's run_scenario: the first run must not be the only one to get fresh guest memory.
    dd if=/dev/zero of="$dst" bs=4M count=$(((ALLOC >> 22) + 1)) status=none
  fi
  for ((run = 1 - WARMUP; run <= runs; run++)); do
    for spec in "${specs[@]}"; do
      label=${spec%%=*}
      template=$(fill_template "${spec#*=}" "$n" "$sc")
      [ -n "$n" ] && wipe_lun
      s0=$(server_cpu)
      timed_run "$sc" lab "$label" "$template" "$src" "$dst" "$run" "$runs"
      ((run <= 0)) || printf '%s\t%s\t%s\t%s\n' "$sc" "$label" "$run" \
        "$(awk -v t=$(($(server_cpu) - s0)) -v hz="$HZ" 'BEGIN { printf "%.2f", t / hz }')" >>"$WORK/servers.tsv"
      if ((run == 1)) && [ "$do_verify" = 1 ] && [ "$label" != 'tcp stream' ]; then verify_target "$sc" "$label" "$dst"; fi
    done
  done
  [[ $dst == /* ]] && rm -f "$dst"
  return 0
}

log "blockconv build $FP_START; rate=$RATE size=$SIZE ($ALLOC bytes allocated) runs=$RUNS"
if ((RATE_BPS > 0)); then
  log "link limit: $ALLOC B / $RATE = $(python3 -c "print(f'{$ALLOC / $RATE_BPS:.2f}')") s"
fi
specs=()
if [ -n "${TOOLS:-}" ]; then mapfile -t TOOL_LABELS <<<"$TOOLS"; fi
for l in "${TOOL_LABELS[@]}"; do
  [ -n "${BUILTIN[$l]:-}" ] || die "unknown tool '$l' in TOOLS (built in: ${!BUILTIN[*]})"
  specs+=("$l=${BUILTIN[$l]}")
done
while IFS= read -r line; do
  [ -n "$line" ] && specs+=("${line%%|*}=${line#*|}")
done <<<"${EXTRA_TOOLS:-}"
if [ "${LINK_SAMPLES:-0}" = 1 ]; then
  # Host ends: NFS data arrives on the NFS link (rx), iSCSI data leaves on the iSCSI link
  # (tx); the CPU of the machine and of each server tells a slow link from a busy host.
  RUN_SAMPLER="python3 $HELPERS/link_sampler.py sample {OUT} $LAB_NFS_IF:rx $LAB_ISCSI_IF:tx cpu ganesha=pid:$LAB_GANESHA_PID tgtd=pid:$LAB_TGTD_PID"
fi
for sc in $SCENARIOS; do
  case $sc in nfs-iscsi|nfs-ram|ram-iscsi) ;; *) die "unknown scenario $sc" ;; esac
  run_tools "$sc" "$RUNS" 1 "${specs[@]}"
  python3 "$HELPERS/headline_report.py" table "$WORK" "$sc"
  if [ -n "${RUN_SAMPLER:-}" ] && ((RATE_BPS > 0)); then
    for f in "$WORK/samples/$sc"-*.tsv; do
      [ -e "$f" ] && python3 "$HELPERS/link_sampler.py" summary "$f" --rate $((RATE_BPS * 8)) >&2
    done
  fi
done

if [ "$SWEEP" = 1 ]; then
  sw=()
  for m in $SWEEP_BC; do sw+=("blockconv -m $m=blockconv convert -m $m {N} -f qcow2 -O raw {SRC} {DST}"); done
  sw+=("blockconv -m auto=blockconv convert -m auto {N} -f qcow2 -O raw {SRC} {DST}")
  for m in $SWEEP_QEMU; do sw+=("qemu-img -m $m -W=qemu-img convert -m $m -W {N} -f qcow2 -O raw {SRC} {DST}"); done
  # Every sweep target is checked too (cheap: a local compare of the LUN's file).
  run_tools sweep "$SWEEP_RUNS" 1 "${sw[@]}"
fi

fp=$(build_fingerprint)
[ "$fp" = "$FP_START" ] || warn "blockconv's build changed since the start ($FP_START -> $fp)"
status=0
python3 "$HELPERS/headline_report.py" final "$WORK" "$OUT_DIR/headline-$RATE" || status=$?
if [ "$SWEEP" = 1 ]; then
  python3 "$HELPERS/plot_svg.py" "$OUT_DIR/headline-$RATE-sweep.tsv" "$SVG_OUT" \
    --title "nfs -> iscsi, $(numfmt --to=iec "$SIZE_BYTES") qcow2 template ($(numfmt --to=iec "$ALLOC") allocated), links: $RATE" \
    --limit-bps "$RATE_BPS" && log "plot: $SVG_OUT"
fi
log "tables: $OUT_DIR/headline-$RATE.md, JSON: $OUT_JSON; per-run data: $WORK/"
[ "$status" = 0 ] || log "a copy failed or did not verify"
exit "$status"
