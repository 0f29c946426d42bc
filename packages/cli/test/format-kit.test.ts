/**
 * The third-party format driver path, as packages/core/README.md tells it: its worked
 * read-only VDI format driver is taken from the README itself, compiled, installed as a
 * package beside a core (found by its package.json's "blockconv" metadata, magic
 * included, with no "./package.json" in its exports), and run against images qemu-img
 * makes: through the CLI (qemu-img compare is the oracle) and through the conformance
 * kit with a reference, as the README shows it. A README that drifts fails here.
 */
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { transform } from 'esbuild';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, type FormatDriver } from '@blockconv/core';
import { conformance } from '@blockconv/core/testkit';
import { cli, compare, run } from '../../../tools/test/fixtures.js';
import { drivers as raw } from '@blockconv/driver-raw';

const here = dirname(fileURLToPath(import.meta.url));
const CORE = resolve(here, '../../core');
const dir = mkdtempSync(join(tmpdir(), 'blockconv-format-kit-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

/** The README's worked format driver: the TypeScript block under its heading. */
function readmeExample(): string {
  const readme = readFileSync(join(CORE, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('### A worked example: a read-only format driver'));
  const m = /```ts\n([\s\S]*?)```/.exec(section);
  if (!m) throw new Error('packages/core/README.md has no worked format driver');
  return m[1]!;
}

const code = (await transform(readmeExample(), { loader: 'ts', format: 'esm' })).code;
mkdirSync(join(dir, 'node_modules', '@blockconv'), { recursive: true });
symlinkSync(CORE, join(dir, 'node_modules', '@blockconv', 'core'));
// Installed as a package the CLI discovers by name and imports only for images its magic claims.
const pkg = join(dir, 'node_modules', 'blockconv-driver-vdi-reader');
mkdirSync(join(pkg, 'dist'), { recursive: true });
writeFileSync(
  join(pkg, 'package.json'),
  JSON.stringify({
    name: 'blockconv-driver-vdi-reader',
    version: '1.0.0',
    type: 'module',
    exports: { '.': { import: './dist/index.js' } },
    peerDependencies: { '@blockconv/core': '^0.1.0' },
    blockconv: { formats: ['vdi-reader'], magic: { 'vdi-reader': [{ offset: 64, hex: '7f10dabe' }] } },
  }),
);
writeFileSync(join(pkg, 'dist', 'index.js'), code);

/** A raw image with data, a run of written zeroes and holes, and its VDI copies (dynamic and fixed). */
const rawImage = join(dir, 'disk.raw');
run('qemu-img', ['create', '-f', 'raw', rawImage, '9M']);
run('qemu-io', [
  '-f',
  'raw',
  '-c',
  'write -P 0x5a 0 1536k',
  '-c',
  'write -P 0 512k 256k',
  '-c',
  'write -P 0xa5 5M 64k',
  '-c',
  'write -P 0x11 9212k 4k',
  rawImage,
]);
const dynamic = join(dir, 'dynamic.vdi');
const fixed = join(dir, 'fixed.vdi');
run('qemu-img', ['convert', '-f', 'raw', '-O', 'vdi', rawImage, dynamic]);
run('qemu-img', ['convert', '-f', 'raw', '-O', 'vdi', '-o', 'static=on', rawImage, fixed]);

/** The CLI run from the folder the package is installed in, BLOCKCONV_DRIVERS unset. */
function blockconv(...args: string[]): ReturnType<typeof cli> {
  return cli(args, { BLOCKCONV_DRIVERS: '' }, 60_000, dir);
}

for (const image of [dynamic, fixed]) {
  test(`the README's VDI driver, installed as a package: ${image.endsWith('fixed.vdi') ? 'fixed' : 'dynamic'} image probed by its magic and converted`, () => {
    const out = join(dir, `${image.endsWith('fixed.vdi') ? 'fixed' : 'dynamic'}.raw`);
    const r = blockconv('convert', '-O', 'raw', image, out);
    assert.is(r.status, 0, r.stderr);
    assert.is(compare(image, out, ['vdi', 'raw']).status, 0, 'qemu-img compare: identical');
    const info = blockconv('info', '--output', 'json', image);
    assert.is(info.status, 0, info.stderr);
    assert.match(info.stdout, /"vdi-reader"/);
    const asTarget = blockconv('convert', '-O', 'vdi-reader', rawImage, join(dir, 'new.vdi'));
    assert.is(asTarget.status, 1);
    assert.match(asTarget.stderr, /the vdi-reader format driver only reads/);
  });
}

test('a raw image is not claimed by the VDI package (its magic does not match)', () => {
  const r = blockconv('info', '--output', 'json', rawImage);
  assert.is(r.status, 0, r.stderr);
  assert.match(r.stdout, /"raw"/);
});

test.run();

// The conformance kit, as the README shows it: through a registry, against the raw image.
const { vdiReader } = (await import(pathToFileURL(join(pkg, 'dist', 'index.js')).href)) as { vdiReader: FormatDriver };
const registry = new DriverRegistry().register(...raw, vdiReader);
for (const image of [dynamic, fixed]) {
  conformance(`vdi-reader (the core README's example), ${image.endsWith('fixed.vdi') ? 'fixed' : 'dynamic'}`, {
    readOnly: true,
    reference: rawImage,
    open: async () => ({ backend: await registry.open(image, { format: 'vdi-reader', readOnly: true }) }),
  });
}
