#!/usr/bin/env bash
# Installs the system packages blockconv's build, tests and benchmarks need (Debian 12).
# Idempotent and quick when everything is present; apt-get runs only for what is missing.
set -euo pipefail

packages=(
  qemu-utils        # qemu-img / qemu-io: the reference oracle and benchmark peer
  qemu-block-extra  # qemu-img's nfs:// and iscsi:// support (the oracle reads the servers)
  libnbd-bin        # nbdcopy, nbdinfo: the fastest benchmark peer, and NBD test clients
  nbdkit            # NBD test servers (memory, sparse-random, error and delay filters)
  nginx-light openssl  # the HTTP(S) test server of driver-http (Range, TLS, Basic auth)
  g++ make python3  # node-gyp builds of native/
  time              # GNU time: wall time and peak RSS in the benchmarks
  util-linux-extra  # fincore: page-cache residency in the write-behind tests
  libnfs-dev        # native/libnfs: headers and pkg-config for the NFS binding
  libnfs-utils      # nfs-ls: readiness probe of tools/nfs-server.sh
  nfs-ganesha nfs-ganesha-vfs rpcbind  # the loopback NFS server of tools/nfs-server.sh
  libiscsi-dev      # native/libiscsi: headers and pkg-config for the iSCSI binding
  libiscsi-bin      # iscsi-inq: readiness probe of tools/iscsi-server.sh
  tgt               # tgtd: the loopback iSCSI target of tools/iscsi-server.sh
  btrfs-progs       # the small NFS export with a qgroup limit (ENOSPC, EDQUOT from a real server)
  zlib1g-dev libzstd-dev libdeflate-dev  # native/codec: qcow2 cluster (de)compression
  iproute2          # ip, tc: the lab's namespaces and shaped links (tools/lab.sh, faults tests)
  redis-server      # the job store of @blockconv/fleet (BullMQ), tools/redis-server.sh
  chromium          # a real headless browser for the fleet dashboard test
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
