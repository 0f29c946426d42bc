#!/usr/bin/env bash
# Runs a loopback iSCSI target for tests and benchmarks: tgtd (userspace, no kernel
# modules) on 127.0.0.1:3260 with sparse-file LUNs, all thin-provisioned.
#
#   tools/iscsi-server.sh start|stop|status|restart
#
# Targets (LUN 0 of each is tgtd's controller; the disks start at LUN 1):
#   iqn.2026-11.org.blockconv:disk512   LUN 1  64 MiB, 512-byte blocks   (tests)
#                                       LUN 2   4 MiB, 512-byte blocks   (a LUN too small)
#                                       LUN 3  16 MiB, 512-byte blocks   (binding tests)
#                                       LUN 4   2 GiB, 512-byte blocks   (benchmark)
#   iqn.2026-11.org.blockconv:disk4k    LUN 1  64 MiB, 4096-byte blocks
#   iqn.2026-11.org.blockconv:chap      LUN 1  16 MiB, 512-byte blocks, CHAP required
# The CHAP user is "blockconv"; its password is made at the first start and kept in
# $ISCSI_DIR/chap-password (mode 600), which is also the file format the driver reads
# (BLOCKCONV_ISCSI_PASSWORD_FILE), so no password ever sits on a command line of ours.
# (tgtadm itself takes it as an argument: it is visible in ps for the instant it runs.)
#
# thin_provisioning=1 makes each LUN report LBPME/LBPRZ and turns WRITE SAME with
# UNMAP and UNMAP into hole punches in the backing file (see ../shared/LAB.md).
#
# Environment: ISCSI_DIR (default /var/tmp/blockconv-iscsi: LUN files in lun/, state in
# state/), ISCSI_READY_TIMEOUT (seconds, default 20). It installs nothing (see
# tools/install-deps.sh), records the tgtd PID it starts and stops exactly that one.
set -euo pipefail

dir=${ISCSI_DIR:-/var/tmp/blockconv-iscsi}
luns=$dir/lun
state=$dir/state
timeout=${ISCSI_READY_TIMEOUT:-20}
portal=127.0.0.1:3260
iqn=iqn.2026-11.org.blockconv
chap_user=blockconv

PATH=$PATH:/usr/sbin:/sbin

log() { echo "iscsi-server: $*" >&2; }
die() { log "$*"; exit 1; }

need_binaries() {
  local missing=() b
  for b in tgtd tgtadm iscsi-inq; do command -v "$b" >/dev/null 2>&1 || missing+=("$b"); done
  ((${#missing[@]} == 0)) || die "missing ${missing[*]}: run tools/install-deps.sh (as root) to install tgt and libiscsi-bin"
}

# The recorded PID counts only while that process still runs tgtd (PIDs get reused).
alive() {
  local pid
  [ -f "$state/tgtd.pid" ] || return 1
  pid=$(cat "$state/tgtd.pid")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q '^[^ ]*tgtd '
}

# Ready = the last target of start() answers an INQUIRY (with CHAP, so setup is complete).
ready() {
  [ -f "$state/chap-password" ] || return 1
  LIBISCSI_CHAP_PASSWORD=$(cat "$state/chap-password") \
    timeout 5 iscsi-inq "iscsi://$chap_user@$portal/$iqn:chap/1" >/dev/null 2>&1
}
listening() { timeout 5 iscsi-inq "iscsi://$portal/$iqn:disk512/1" >/dev/null 2>&1; }

tgt() { tgtadm --lld iscsi "$@"; }

# new_lun TID LUN FILE SIZE BLOCKSIZE: a sparse backing file (kept across restarts so
# a benchmark LUN need not be rewritten; resized when the wanted size changed).
new_lun() {
  local tid=$1 lun=$2 file=$luns/$3 size=$4 bs=$5
  [ -f "$file" ] || : >"$file"
  [ "$(stat -c %s "$file")" = "$size" ] || truncate -s "$size" "$file"
  tgt --op new --mode logicalunit --tid "$tid" --lun "$lun" -b "$file" --blocksize "$bs"
  tgt --op update --mode logicalunit --tid "$tid" --lun "$lun" --params thin_provisioning=1
}

setup() {
  tgt --op new --mode target --tid 1 -T "$iqn:disk512"
  new_lun 1 1 disk512-1.img $((64 << 20)) 512
  new_lun 1 2 disk512-small.img $((4 << 20)) 512
  new_lun 1 3 disk512-binding.img $((16 << 20)) 512
  new_lun 1 4 disk512-bench.img $((2 << 30)) 512
  tgt --op bind --mode target --tid 1 -I ALL

  tgt --op new --mode target --tid 2 -T "$iqn:disk4k"
  new_lun 2 1 disk4k-1.img $((64 << 20)) 4096
  tgt --op bind --mode target --tid 2 -I ALL

  tgt --op new --mode target --tid 3 -T "$iqn:chap"
  new_lun 3 1 chap-1.img $((16 << 20)) 512
  tgt --op new --mode account --user "$chap_user" --password "$(cat "$state/chap-password")"
  tgt --op bind --mode account --tid 3 --user "$chap_user"
  tgt --op bind --mode target --tid 3 -I ALL
}

start() {
  need_binaries
  if alive && ready; then
    log "already running (tgtd pid $(cat "$state/tgtd.pid")), iscsi://$portal/$iqn:*"
    return 0
  fi
  if ! alive && listening; then
    die "something not started by this script already serves iSCSI on $portal; stop it first"
  fi
  mkdir -p "$luns" "$state"
  chmod 700 "$state"
  if [ ! -s "$state/chap-password" ]; then
    (umask 077; head -c 12 /dev/urandom | base64 | tr -d '/+=' | head -c 16 >"$state/chap-password")
  fi
  # Leftovers of a crashed run: stop what we recorded, then start clean.
  stop_tgtd
  : >"$state/tgtd.log"
  # -f: foreground, so $! is tgtd's PID. fd 9 (the lock) closed, or tgtd would hold it.
  tgtd -f --iscsi "portal=$portal" >>"$state/tgtd.log" 2>&1 9>&- &
  echo $! >"$state/tgtd.pid"
  local deadline=$((SECONDS + timeout))
  # tgtadm answers once tgtd's control socket is up.
  until tgtadm --op show --mode sys >/dev/null 2>&1; do
    alive || die "tgtd exited during start-up: $(grep -v -e RDMA -e oom "$state/tgtd.log" | tail -5)"
    ((SECONDS < deadline)) || { stop_tgtd; die "tgtd did not start within ${timeout}s"; }
    sleep 0.1
  done
  setup >>"$state/tgtd.log" 2>&1 || { stop_tgtd; die "target setup failed: $(tail -5 "$state/tgtd.log")"; }
  until ready; do
    ((SECONDS < deadline)) || { stop_tgtd; die "tgtd did not answer within ${timeout}s: $(tail -5 "$state/tgtd.log")"; }
    sleep 0.2
  done
  log "serving iscsi://$portal/$iqn:{disk512,disk4k,chap}/1 from $luns (tgtd pid $(cat "$state/tgtd.pid"))"
}

# tgtd ignores SIGTERM by design: take it offline and delete it through tgtadm, then
# SIGKILL our recorded PID if it is still there.
stop_tgtd() {
  local pid
  [ -f "$state/tgtd.pid" ] || return 0
  pid=$(cat "$state/tgtd.pid")
  if alive; then
    tgtadm --op update --mode sys --name State -v offline >/dev/null 2>&1 || true
    tgtadm --lld iscsi --mode system --op delete >/dev/null 2>&1 || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$state/tgtd.pid"
}

stop() {
  stop_tgtd
  log "stopped"
}

status() {
  if alive && ready; then
    echo "running: tgtd pid $(cat "$state/tgtd.pid"), iscsi://$portal/$iqn:{disk512,disk4k,chap}/1 -> $luns"
  else
    echo "stopped"
    return 3
  fi
}

# One start/stop at a time: concurrent test runs may both find the server stopped.
mkdir -p "$state"
exec 9>"$state/lock"
flock 9

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) status ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
