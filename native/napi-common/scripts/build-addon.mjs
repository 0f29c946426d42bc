#!/usr/bin/env node
// Builds the addon of the package in the current directory with node-gyp: the one build
// script of every blockconv addon, run from its package.json by path (a workspace's bin
// is not linked before its dependents' install scripts run on `npm install`):
//   node ../napi-common/scripts/build-addon.mjs install   npm install: configure and build
//   node ../napi-common/scripts/build-addon.mjs build     nx build: only what changed once configured
// An addon that needs system libraries names them in its package.json:
//   "systemLibraries": { "pkgConfig": { "libnfs": "libnfs-dev" }, "without": "nfs:// is unavailable" }
// (pkg-config module -> Debian package). When one is missing this warns and succeeds, so
// that the rest of the workspace still installs and tests; the package's JS then reports
// `available: false` and says what to install. A failed build of a present library fails.
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';

const mode = process.argv[2];
if (mode !== 'install' && mode !== 'build') {
  console.error('usage: build-addon.mjs install|build');
  process.exit(2);
}

const pkg = JSON.parse(fs.readFileSync('package.json', 'utf8'));
const libraries = pkg.systemLibraries?.pkgConfig ?? {};
const missing = Object.keys(libraries).filter((m) => spawnSync('pkg-config', ['--exists', m]).status !== 0);
if (missing.length > 0) {
  const debian = missing.map((m) => libraries[m]).join(' ');
  console.error(
    `${pkg.name}: ${missing.join(', ')} not found (Debian: ${debian}, see tools/install-deps.sh); addon not built, ${pkg.systemLibraries.without}`,
  );
  process.exit(0);
}

// Once configured, `node-gyp build` recompiles what changed (its Makefile regenerates
// itself when a .gyp or .gypi file changes); a first build configures.
const command = mode === 'build' && fs.existsSync('build/Makefile') ? 'build' : 'rebuild';
const run = spawnSync('node-gyp', [command], { stdio: 'inherit' });
if (run.error) {
  console.error(`${pkg.name}: cannot run node-gyp: ${run.error.message}`);
  process.exit(1);
}
process.exit(run.status ?? 1);
