#!/usr/bin/env bash
# Runs a loopback NFS server for tests and benchmarks: rpcbind + NFS-Ganesha (VFS FSAL)
# on 127.0.0.1, exporting a local directory as the pseudo path /export (NFSv3 and v4),
# and a small file system with user quotas as /small (below).
#
#   tools/nfs-server.sh start|stop|status|restart
#
# Environment: NFS_EXPORT_DIR (default /var/tmp/blockconv-nfs/export), NFS_STATE_DIR
# (default /var/tmp/blockconv-nfs/state), NFS_READY_TIMEOUT (seconds, default 30).
# It installs nothing (see tools/install-deps.sh), records the PIDs it starts in the
# state dir and stops exactly those; an rpcbind it did not start is left alone.
set -euo pipefail
# shellcheck source=tools/ganesha.sh
source "$(dirname "${BASH_SOURCE[0]}")/ganesha.sh"

export_dir=${NFS_EXPORT_DIR:-/var/tmp/blockconv-nfs/export}
state=${NFS_STATE_DIR:-/var/tmp/blockconv-nfs/state}
timeout=${NFS_READY_TIMEOUT:-30}
url=nfs://127.0.0.1/export
# Two more exports, each a 128 MiB btrfs file system on a loop device: /small, which fills
# up (ENOSPC), and /quota, under an 8 MiB qgroup limit (EDQUOT), so that tests
# see a full target and a quota from a real server. (This kernel has no CONFIG_QUOTA, so
# no ext4/XFS user quotas; btrfs qgroups work without it.) Left out where loop devices or
# btrfs do not work.
small_dir=${NFS_SMALL_DIR:-/var/tmp/blockconv-nfs/small}
quota_dir=${NFS_QUOTA_DIR:-/var/tmp/blockconv-nfs/quota}

log() { echo "nfs-server: $*" >&2; }
die() { log "$*"; exit 1; }

need_binaries() {
  local missing=()
  for b in ganesha.nfsd rpcbind rpcinfo nfs-ls; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || [ -x "/sbin/$b" ] || missing+=("$b")
  done
  # The VFS back end is a plugin of its own package (nfs-ganesha-vfs).
  compgen -G "/usr/lib*/**/ganesha/libfsalvfs.so" >/dev/null || compgen -G "/usr/lib/*/ganesha/libfsalvfs.so" >/dev/null \
    || missing+=("libfsalvfs.so (nfs-ganesha-vfs)")
  if ((${#missing[@]})); then
    die "missing ${missing[*]}: run tools/install-deps.sh (as root) to install nfs-ganesha, nfs-ganesha-vfs, rpcbind, libnfs-utils"
  fi
}

PATH=$PATH:/usr/sbin:/sbin

# A recorded PID counts only while that process still runs the same program (PIDs get reused).
alive() {
  local pidfile=$state/$1.pid prog=$2 pid
  [ -f "$pidfile" ] || return 1
  pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "$prog"
}

ready() { timeout 5 nfs-ls "$url" >/dev/null 2>&1; }
rpcbind_up() { rpcinfo -p 127.0.0.1 >/dev/null 2>&1; }

stop_pid() {
  local name=$1 pid
  [ -f "$state/$name.pid" ] || return 0
  pid=$(cat "$state/$name.pid")
  if alive "$name" "$2"; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$state/$name.pid"
}

write_config() {
  local small="" quota=""
  mountpoint -q "$small_dir" 2>/dev/null && small=$small_dir
  mountpoint -q "$quota_dir" 2>/dev/null && quota=$quota_dir
  ganesha_config 127.0.0.1 "$export_dir" "$state" tools/nfs-server.sh "$small" "$quota" >"$state/ganesha.conf"
}

# The small file systems: made afresh at every start (a previous run may have filled them).
# small_fs DIR SIZE [QGROUP_LIMIT]: a btrfs file system on a loop device mounted at DIR.
# (One file system each: ganesha cannot export a btrfs subvolume of its own.)
small_fs() {
  local dir=$1 size=$2 limit=${3:-} img dev
  mountpoint -q "$dir" && return 0
  command -v mkfs.btrfs >/dev/null 2>&1 || { log "no mkfs.btrfs (package btrfs-progs): no $dir"; return 1; }
  mkdir -p "$dir"
  img=$state/$(basename "$dir").btrfs
  rm -f "$img"
  truncate -s "$size" "$img"
  mkfs.btrfs -q -f "$img" >/dev/null 2>&1 || { log "mkfs.btrfs failed: no $dir"; return 1; }
  dev=$(losetup -f --show "$img" 2>/dev/null) || { log "no loop device: no $dir"; return 1; }
  if ! mount "$dev" "$dir" 2>/dev/null; then losetup -d "$dev"; log "cannot mount btrfs: no $dir"; return 1; fi
  if [ -n "$limit" ]; then
    btrfs quota enable "$dir" && btrfs qgroup limit "$limit" "$dir" || { log "btrfs qgroups failed: no $dir"; umount_dir "$dir"; return 1; }
  fi
  chmod 1777 "$dir"
}

mount_small() {
  small_fs "$small_dir" 128M && small_fs "$quota_dir" 128M 8M || { umount_dir "$small_dir"; umount_dir "$quota_dir"; }
  return 0
}

umount_dir() {
  mountpoint -q "$1" 2>/dev/null || return 0
  local dev
  dev=$(findmnt -n -o SOURCE "$1")
  umount "$1" && [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null || true
}

umount_small() { umount_dir "$small_dir"; umount_dir "$quota_dir"; }

start() {
  need_binaries
  if alive ganesha ganesha.nfsd && ready; then
    log "already running (ganesha pid $(cat "$state/ganesha.pid")), $url"
    return 0
  fi
  if ready; then
    log "an NFS server not started by this script already serves $url; using it"
    return 0
  fi
  mkdir -p "$export_dir" "$state/recovery"
  # Leftovers of a crashed run: stop what we recorded, then start clean.
  stop_pid ganesha ganesha.nfsd

  if ! rpcbind_up; then
    rm -f "$state/rpcbind.pid"
    # -w: warm start (keeps registrations), -f: foreground, so $! is its real PID.
    rpcbind -w -f >"$state/rpcbind.log" 2>&1 9>&- &
    echo $! >"$state/rpcbind.pid"
    for _ in $(seq 50); do rpcbind_up && break; sleep 0.1; done
    rpcbind_up || die "rpcbind did not start: $(tail -5 "$state/rpcbind.log")"
  fi

  mount_small
  write_config
  : >"$state/ganesha.log"
  # -F: foreground, so $! is ganesha's PID and stop can kill exactly it.
  ganesha.nfsd -F -L "$state/ganesha.log" -f "$state/ganesha.conf" -p "$state/ganesha.pidfile" -N NIV_EVENT \
    >>"$state/ganesha.log" 2>&1 9>&- &
  echo $! >"$state/ganesha.pid"

  local deadline=$((SECONDS + timeout))
  until ready; do
    if ! alive ganesha ganesha.nfsd; then
      log "ganesha exited during start-up; last lines of $state/ganesha.log:"
      grep -v -i dbus "$state/ganesha.log" | tail -15 >&2 || true
      rm -f "$state/ganesha.pid"
      exit 1
    fi
    if ((SECONDS >= deadline)); then
      log "ganesha did not answer $url within ${timeout}s; last lines of $state/ganesha.log:"
      grep -v -i dbus "$state/ganesha.log" | tail -15 >&2 || true
      stop_pid ganesha ganesha.nfsd
      exit 1
    fi
    sleep 0.5
  done
  log "serving $export_dir as $url (ganesha pid $(cat "$state/ganesha.pid"))"
}

stop() {
  stop_pid ganesha ganesha.nfsd
  stop_pid rpcbind rpcbind
  umount_small
  log "stopped"
}

status() {
  if alive ganesha ganesha.nfsd && ready; then
    echo "running: ganesha pid $(cat "$state/ganesha.pid"), $url -> $export_dir"
  elif ready; then
    echo "running (not started by this script): $url"
  else
    echo "stopped"
    return 3
  fi
}

# One start/stop at a time: concurrent test runs may both find the server stopped.
# (The daemons are started with fd 9 closed, or they would hold the lock forever.)
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
