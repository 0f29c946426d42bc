// Convert through the CLI (packages/cli/bin/blockconv.js): local raw and qcow2 -> LUN
// (-n) and LUN -> local raw and qcow2, checked by qemu-img (which reads iscsi:// with
// its own libiscsi) and through the LUN's backing file. CHAP through the CLI, with the
// password looked for in everything it prints.
import * as fs from 'node:fs';
import * as path from 'node:path';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, checksumImage, convert } from '@blockconv/core';
import { drivers as raw } from '@blockconv/driver-raw';
import { drivers as iscsi, type IscsiBackend } from '../../src/index.js';
import { CHAP_PASSWORD_FILE, CHAP_USER, LUNS, chapPassword, cli, ensureServer, run, wipeLun } from '../helpers.js';

ensureServer();
const MiB = 1024 * 1024;

/** A sparse raw image: data at the start, at an odd (block-aligned) spot, and at the end. */
function localImage(file: string, size: number): void {
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  for (const [off, len] of [
    [0, MiB],
    [3 * MiB + 8192, 700 * 1024],
    [size - 65536, 65536],
  ] as const) {
    const b = Buffer.alloc(len);
    for (let i = 0; i < len; i++) b[i] = ((off + i) * 13 + (i >> 9)) & 0xff;
    fs.writeSync(fd, b, 0, len, off);
  }
  fs.closeSync(fd);
}

function expectOk(r: ReturnType<typeof cli>, what: string): void {
  assert.is(r.status, 0, `${what}: exit ${r.status}\n${r.stderr}`);
}

const test = suite('convert to and from LUNs through the CLI');
let dir: string;
test.before.each(() => {
  dir = fs.mkdtempSync('/var/tmp/blockconv-iscsi-test-');
});
test.after.each(() => fs.rmSync(dir, { recursive: true, force: true }));

for (const lun of [LUNS.disk512, LUNS.disk4k]) {
  test(`an odd-sized source onto a ${lun.blockSize}-byte-block LUN (-n): the tail is padded, the rest of the LUN kept`, async () => {
    wipeLun(lun.file);
    const fd = fs.openSync(lun.file, 'r+');
    fs.writeSync(fd, Buffer.alloc(2 * MiB, 0xee), 0, 2 * MiB, 0);
    fs.closeSync(fd);
    for (const size of [1_000_001, 2 * MiB - 1]) {
      const src = path.join(dir, `odd-${size}.raw`);
      const data = Buffer.alloc(size);
      for (let i = 0; i < size; i++) data[i] = (i * 7 + (i >> 12)) & 0xff;
      fs.writeFileSync(src, data);
      expectOk(cli(['convert', '-n', '-f', 'raw', '-O', 'raw', src, lun.url]), `${size} bytes to LUN`);
      const got = Buffer.alloc(2 * MiB);
      const back = fs.openSync(lun.file, 'r');
      fs.readSync(back, got, 0, 2 * MiB, 0);
      fs.closeSync(back);
      assert.ok(got.subarray(0, size).equals(data), `${size} bytes: the source, byte for byte`);
      assert.ok(
        got.subarray(size).every((b) => b === 0xee),
        `${size} bytes: the LUN past the source untouched`,
      );
    }
  });

  test(`local raw -> LUN (${lun.blockSize}-byte blocks, -n) -> local raw`, async () => {
    wipeLun(lun.file);
    // Old data on the LUN where the source has a hole: it must be zeroed.
    const fd = fs.openSync(lun.file, 'r+');
    fs.writeSync(fd, Buffer.alloc(MiB, 0xee), 0, MiB, 20 * MiB);
    fs.closeSync(fd);
    const src = path.join(dir, 'src.raw');
    localImage(src, lun.size);
    expectOk(cli(['convert', '-n', '-f', 'raw', '-O', 'raw', src, lun.url]), 'to LUN');
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, lun.url]);
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, lun.file]);
    // Thin LUN: zeroes went out as WRITE SAME with UNMAP, so the backing file stays sparse.
    const used = fs.statSync(lun.file).blocks * 512;
    assert.ok(used < 8 * MiB, `backing file uses ${used} bytes`);
    const back = path.join(dir, 'back.raw');
    expectOk(cli(['convert', '-f', 'raw', '-O', 'raw', lun.url, back]), 'from LUN');
    run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, back]);
    // Block status of the thin LUN kept the copy sparse.
    assert.ok(fs.statSync(back).blocks * 512 < 8 * MiB, 'local copy is sparse');
  });
}

test('local qcow2 -> LUN, and LUN -> local qcow2', async () => {
  const lun = LUNS.disk512;
  wipeLun(lun.file);
  const qcow = path.join(dir, 'src.qcow2');
  run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, String(lun.size)]);
  run('qemu-io', [
    '-f',
    'qcow2',
    '-c',
    'write -P 0x5a 1M 3M',
    '-c',
    'write -P 0x11 9M 64k',
    '-c',
    'write -z 2M 512k',
    qcow,
  ]);
  expectOk(cli(['convert', '-n', '-O', 'raw', qcow, lun.url]), 'qcow2 to LUN');
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', qcow, lun.url]);
  run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'raw', qcow, lun.file]);
  const out = path.join(dir, 'out.qcow2');
  expectOk(cli(['convert', '-O', 'qcow2', lun.url, out]), 'LUN to qcow2');
  run('qemu-img', ['check', '-q', out]);
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'qcow2', lun.url, out]);
});

test('without -n: a clear error saying LUNs are not created', () => {
  const src = path.join(dir, 'src.raw');
  localImage(src, 8 * MiB);
  const r = cli(['convert', src, LUNS.disk512.url]);
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, /iscsi cannot create images; use an existing one with -n/);
});

test('a LUN smaller than the source is an error, and nothing is written', () => {
  wipeLun(LUNS.small.file);
  const src = path.join(dir, 'src.raw');
  localImage(src, 8 * MiB);
  const r = cli(['convert', '-n', src, LUNS.small.url]);
  assert.is(r.status, 1, r.stderr);
  assert.match(r.stderr, /target is smaller than the source \(4194304 < 8388608 bytes\)/);
  assert.is(fs.statSync(LUNS.small.file).blocks, 0, 'LUN untouched');
});

test('CHAP through the CLI: password from a file or the environment works, a wrong one is refused; never printed', () => {
  const lun = LUNS.chap;
  const password = chapPassword();
  const wrong = `${password}Wrong`;
  wipeLun(lun.file);
  const src = path.join(dir, 'src.raw');
  localImage(src, lun.size);
  const runs = [
    cli(['convert', '-n', '-p', src, lun.url], {
      LIBISCSI_CHAP_USERNAME: CHAP_USER,
      BLOCKCONV_ISCSI_PASSWORD_FILE: CHAP_PASSWORD_FILE,
    }),
    cli(['info', lun.url], { LIBISCSI_CHAP_USERNAME: CHAP_USER, LIBISCSI_CHAP_PASSWORD: password }),
    cli(['compare', src, lun.url.replace('iscsi://', `iscsi://${CHAP_USER}%${password}@`)]),
  ];
  runs.forEach((r, i) => {
    expectOk(r, `CHAP run ${i}`);
  });
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, lun.file]);
  const refused = [
    cli(['info', lun.url], { LIBISCSI_CHAP_USERNAME: CHAP_USER, LIBISCSI_CHAP_PASSWORD: wrong }),
    cli(['info', '--debug', lun.url.replace('iscsi://', `iscsi://${CHAP_USER}%${wrong}@`)]),
    cli(['convert', '-n', src, lun.url.replace('iscsi://', `iscsi://${CHAP_USER}%${wrong}@`)]),
    cli(['info', lun.url]),
  ];
  for (const r of refused) {
    assert.is(r.status, 1, r.stderr);
    assert.match(r.stderr, /CHAP authentication failed/);
  }
  for (const r of [...runs, ...refused]) {
    for (const secret of [password, wrong]) {
      assert.not.ok(
        r.stdout.includes(secret) || r.stderr.includes(secret),
        `password printed:\n${r.stdout}\n${r.stderr}`,
      );
    }
  }
});

test("a password in a real LUN's URL: every command and output mode succeeds and prints it nowhere", () => {
  // tgtd lets a login that offers CHAP through to a target that asks none, so the
  // open LUN takes a marker password; the CHAP LUN takes the real one. Read only: the
  // LUNs are shared with the other suites.
  const password = chapPassword();
  const marker = 'MARKERlunPw42';
  const open = LUNS.disk512.url.replace('iscsi://', `iscsi://bob%${marker}@`);
  const chap = LUNS.chap.url.replace('iscsi://', `iscsi://${CHAP_USER}%${password}@`);
  const shown = (url: string): string => url.replace(/%[^@]*@/, '@');
  const local = path.join(dir, 'copy.raw');
  const runs: Array<[string[], number]> = [];
  for (const url of [open, chap]) {
    runs.push(
      [['info', url], 0],
      [['info', '--output=json', url], 0],
      [['map', url], 0],
      [['map', '--output=json', url], 0],
      [['compare', url, url], 0],
      [['compare', '--output=json', url, url], 0],
      [['check', url], 63], // raw has no checks: 63, as qemu-img check
      [['convert', '-p', url, local], 0],
      [['convert', '--progress=json', '--output=json', url, local], 0],
      [['--debug', 'convert', '-n', url, LUNS.small.url], 1],
    );
  }
  runs.push([['--debug', 'info', chap.replace(password, `${password}Wrong`)], 1]);
  for (const [args, code] of runs) {
    const r = cli(args);
    const out = r.stdout + r.stderr;
    assert.is(r.status, code, `${args.join(' ')}: exit ${r.status}\n${out}`);
    for (const secret of [marker, password])
      assert.not.ok(out.includes(secret), `password printed by ${args.join(' ')}:\n${out}`);
    if (args[0] === 'info' || args[1] === 'info') assert.ok(out.includes(shown(args.at(-1)!)), `names the LUN: ${out}`);
  }
});

test('many tasks are in flight at once during a convert (counted in the binding)', async () => {
  const lun = LUNS.disk512;
  wipeLun(lun.file);
  const fd = fs.openSync(lun.file, 'r+');
  fs.writeSync(fd, Buffer.alloc(32 * MiB, 0x42), 0, 32 * MiB, 0);
  fs.closeSync(fd);
  const registry = new DriverRegistry().register(...raw, ...iscsi);
  const source = (await registry.openProtocol(lun.url, { readOnly: true })) as IscsiBackend;
  const out = path.join(dir, 'out.raw');
  const target = await registry.create(out, source.size, { format: 'raw' });
  try {
    await convert({ sources: [source], target, workers: 8, bufferSize: MiB });
    assert.ok(source.stats.peakOutstanding >= 4, `peak tasks in flight: ${source.stats.peakOutstanding}`);
    assert.is(source.stats.outstanding, 0);
  } finally {
    await Promise.all([source.close(), target.close()]);
  }
  run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', lun.file, out]);
});

test("checksum of a LUN equals its backing file's; convert --checksum --verify onto a LUN", async () => {
  const reg = new DriverRegistry().register(...raw, ...iscsi);
  for (const lun of [LUNS.disk512, LUNS.disk4k]) {
    wipeLun(lun.file);
    const src = path.join(dir, 'ck-src.raw');
    localImage(src, 8 * MiB + 4096);
    const source = await reg.open(src, { readOnly: true, format: 'raw' });
    const target = await reg.open(lun.url, { format: 'raw' });
    try {
      const r = await convert({ sources: [source], target, checksum: true, verify: true });
      assert.is(r.checksum, (await checksumImage(source)).checksum, `${lun.blockSize}-byte blocks: the copied data`);
      assert.ok(r.verified);
      const backing = await reg.open(lun.file, { readOnly: true, format: 'raw' });
      try {
        assert.is(
          (await checksumImage(target)).checksum,
          (await checksumImage(backing)).checksum,
          `${lun.blockSize}-byte blocks: the whole LUN`,
        );
      } finally {
        await backing.close();
      }
    } finally {
      await Promise.all([source.close(), target.close()]);
    }
  }
});

test.run();
