#!/bin/sh
# Builds the addon when libiscsi is present; without it, warns and succeeds so that the
# rest of the workspace still installs and tests (iscsi:// is then unavailable and the
# CLI says which package and system library it needs).
#   scripts/native.sh install   (npm install: configure + build)
#   scripts/native.sh build     (nx build: incremental when configured)
if ! pkg-config --exists libiscsi 2>/dev/null; then
  echo "@blockconv/libiscsi: libiscsi not found (Debian: libiscsi-dev, see tools/install-deps.sh); addon not built, iscsi:// unavailable" >&2
  exit 0
fi
if [ "$1" = build ] && [ -f build/Makefile ]; then exec node-gyp build; fi
exec node-gyp rebuild
