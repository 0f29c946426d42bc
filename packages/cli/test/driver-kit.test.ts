/**
 * The third-party driver path, as packages/core/README.md tells it: its worked example
 * (a read-only protocol driver) is taken from the README itself, compiled, installed
 * beside a core the way a user would have it, found through each form of
 * BLOCKCONV_DRIVERS, run through the CLI and through the conformance kit. A README
 * that drifts from the code fails here.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { transform } from 'esbuild';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { ProtocolDriver } from '@blockconv/core';
import { conformance } from '@blockconv/core/testkit';

const here = dirname(fileURLToPath(import.meta.url));
const BIN = join(here, '..', 'bin', 'blockconv.js');
const CORE = resolve(here, '../../core');
const dir = mkdtempSync(join(tmpdir(), 'blockconv-driver-kit-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

/** The README's worked protocol driver: the TypeScript block under its heading. */
function readmeExample(): string {
  const readme = readFileSync(join(CORE, 'README.md'), 'utf8');
  const section = readme.slice(readme.indexOf('### A worked example: a read-only protocol driver'));
  const m = /```ts\n([\s\S]*?)```/.exec(section);
  if (!m) throw new Error('packages/core/README.md has no worked example');
  return m[1]!;
}

const code = (await transform(readmeExample(), { loader: 'ts', format: 'esm' })).code;
// The core installed beside the driver, as npm would (a link to this repository's build).
mkdirSync(join(dir, 'node_modules', '@blockconv'), { recursive: true });
symlinkSync(CORE, join(dir, 'node_modules', '@blockconv', 'core'));
// The three forms BLOCKCONV_DRIVERS takes: an entry file, a package folder, a package name.
writeFileSync(join(dir, 'slice-driver.mjs'), code);
const manifest = (name: string) =>
  JSON.stringify({
    name,
    version: '1.0.0',
    type: 'module',
    exports: { '.': { import: './dist/index.js' } },
    peerDependencies: { '@blockconv/core': '^0.1.0' },
  });
for (const pkg of [join(dir, 'slice-folder'), join(dir, 'node_modules', 'slice-by-name')]) {
  mkdirSync(join(pkg, 'dist'), { recursive: true });
  writeFileSync(join(pkg, 'package.json'), manifest(pkg.endsWith('name') ? 'slice-by-name' : 'slice-folder'));
  writeFileSync(join(pkg, 'dist', 'index.js'), code);
}

// A "disk image" whose middle is the partition to extract.
const disk = join(dir, 'disk.img');
const bytes = Buffer.alloc(3 << 20);
for (let i = 0; i < bytes.length; i++) bytes[i] = (i * 7 + (i >> 11)) & 0xff;
writeFileSync(disk, bytes);
const url = `slice://${disk}`;

function run(drivers: string, ...args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], {
    cwd: dir,
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, BLOCKCONV_DRIVERS: drivers },
  });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

for (const spec of ['./slice-driver.mjs', './slice-folder', 'slice-by-name']) {
  test(`BLOCKCONV_DRIVERS=${spec}: the README's driver converts, and says what it cannot`, () => {
    const out = join(dir, `part-${spec.replace(/\W/g, '')}.raw`);
    const ok = run(spec, 'convert', '--source-opts', 'start=1M,length=1M', url, out);
    assert.is(ok.code, 0, ok.stderr);
    assert.ok(readFileSync(out).equals(bytes.subarray(1 << 20, 2 << 20)), 'the slice, byte for byte');

    const drivers = run(spec, 'drivers');
    assert.match(drivers.stdout, /protocol slice\s+schemes: slice \(read-only\)/);
    assert.match(drivers.stdout, /open options: start, length/);

    const typo = run(spec, 'info', '--opts', 'begin=1M', url);
    assert.is(typo.code, 1);
    assert.match(typo.stderr, /unknown open option "begin" \(slice takes start, length; raw takes none\)/);

    const asTarget = run(spec, 'convert', '-n', out, url);
    assert.is(asTarget.code, 1);
    assert.match(asTarget.stderr, /the target is read-only: the slice driver only reads \(a source, never a target\)/);
    const created = run(spec, 'convert', out, `slice://${join(dir, 'new.img')}`);
    assert.is(created.code, 1);
    assert.match(created.stderr, /cannot create images/);

    const tooLong = run(spec, 'info', '--opts', 'start=2M,length=2M', url);
    assert.is(tooLong.code, 1);
    assert.match(tooLong.stderr, /the range ends past the end of the file/);
  });
}

test('a missing BLOCKCONV_DRIVERS entry is reported, not fatal', () => {
  const r = run('./nowhere.mjs,no-such-package', 'drivers');
  assert.is(r.code, 0, r.stderr);
  assert.match(r.stdout, /failed\s+\.\/nowhere\.mjs/);
  assert.match(r.stdout, /failed\s+no-such-package: package no-such-package not found/);
});

test.run();

// The conformance kit, as the README shows it, on the same driver.
const { sliceDriver } = (await import(pathToFileURL(join(dir, 'slice-driver.mjs')).href)) as {
  sliceDriver: ProtocolDriver;
};
conformance("slice (the core README's example)", {
  readOnly: true,
  open: async () => ({
    backend: await sliceDriver.open(url, { readOnly: true, options: { start: '4096', length: String(2 << 20) } }),
  }),
});
