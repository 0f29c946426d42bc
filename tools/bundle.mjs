#!/usr/bin/env node
// Bundles a package's compiled ESM entry (dist/, from tsc) into one file, so that the
// CLI links a handful of modules instead of some fifty: each ESM module costs about a
// millisecond to resolve and link here, and start-up counts in every short convert.
// Other @blockconv packages always stay external (one instance of @blockconv/core and
// its classes per process). Third-party packages stay external too, unless
// --inline-deps (the CLI inlines commander, loaded on every run).
//
// Usage: node tools/bundle.mjs <entry.js> <out.js> [--inline-deps]
import { build } from 'esbuild';

const [entry, outfile, ...flags] = process.argv.slice(2);
if (!entry || !outfile) {
  console.error('usage: node tools/bundle.mjs <entry.js> <out.js> [--inline-deps]');
  process.exit(2);
}
const inlineDeps = flags.includes('--inline-deps');
await build({
  entryPoints: [entry],
  outfile,
  bundle: true,
  platform: 'node',
  format: 'esm',
  target: 'node20',
  sourcemap: 'linked',
  logLevel: 'warning',
  ...(inlineDeps
    ? {
        external: ['@blockconv/*'],
        // Inlined CommonJS packages call require(): give the ES module one.
        banner: {
          js: "import { createRequire as __blockconvRequire } from 'node:module'; const require = __blockconvRequire(import.meta.url);",
        },
      }
    : { packages: 'external' }),
});
