#!/bin/sh
# Builds the addon when libnfs is present; without it, warns and succeeds so that the
# rest of the workspace still installs and tests (nfs:// is then unavailable and the
# CLI says which package and system library it needs).
#   scripts/native.sh install   (npm install: configure + build)
#   scripts/native.sh build     (nx build: incremental when configured)
if ! pkg-config --exists libnfs 2>/dev/null; then
  echo "@blockconv/libnfs: libnfs not found (Debian: libnfs-dev, see tools/install-deps.sh); addon not built, nfs:// unavailable" >&2
  exit 0
fi
if [ "$1" = build ] && [ -f build/Makefile ]; then exec node-gyp build; fi
exec node-gyp rebuild
