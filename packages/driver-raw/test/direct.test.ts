/**
 * O_DIRECT (cache=none/directsync) on a disk file system: aligned limits, aligned
 * buffers, the unaligned tail at an unaligned image end, unaligned caller memory.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, convert } from '@blockconv/core';
import { createFile, drivers, openFile } from '../src/index.js';
import { canMount, diskTempDir, filled, rejects, removeDir, scratchMount } from './helpers.js';

const MiB = 1024 * 1024;

/** Whether /var/tmp takes O_DIRECT here (tmpfs before Linux 6.6 does not). */
const directWorks: boolean = (() => {
  const dir = diskTempDir();
  try {
    const f = path.join(dir, 'probe');
    fs.writeFileSync(f, '');
    fs.closeSync(fs.openSync(f, fs.constants.O_RDWR | fs.constants.O_DIRECT));
    return true;
  } catch {
    return false;
  } finally {
    removeDir(dir);
  }
})();

const it = directWorks ? test : test.skip;
let dir = '';

test.before(() => {
  dir = diskTempDir();
});
test.after(() => removeDir(dir));

it('limits: aligned requests and memory, allocBuffer', async () => {
  const f = path.join(dir, 'limits.img');
  await createFile(f, MiB);
  const img = await openFile(f, { cache: 'none' });
  assert.is(img.limits.requestAlignment, 4096);
  assert.is(img.limits.minMemAlignment, 4096);
  assert.is(img.limits.optimalTransfer % 4096, 0);
  assert.type(img.allocBuffer, 'function');
  const buf = img.allocBuffer!(8192);
  assert.is(buf.length, 8192);
  assert.ok(buf.every((b) => b === 0));
  await img.close();
});

it('aligned write and read round trip, and a read without a buffer', async () => {
  const f = path.join(dir, 'rw.img');
  await createFile(f, 8 * MiB);
  const img = await openFile(f, { cache: 'none' });
  const data = img.allocBuffer!(2 * MiB);
  for (let i = 0; i < data.length; i++) data[i] = i % 251;
  await img.write(MiB, data);
  await img.flush();
  const back = await img.read(MiB, 2 * MiB, img.allocBuffer!(2 * MiB));
  assert.ok(Buffer.from(back).equals(Buffer.from(data)));
  const fresh = await img.read(MiB, 4096);
  assert.is(fresh[1], 1);
  await img.close();
  // What went direct is what a buffered reader sees.
  const plain = fs.readFileSync(f);
  assert.ok(plain.subarray(MiB, 3 * MiB).equals(Buffer.from(data)));
});

it('an unaligned tail at the image end reads and writes', async () => {
  const f = path.join(dir, 'tail.img');
  const size = 3 * 4096 + 1000;
  fs.writeFileSync(f, filled(size, 0x11));
  for (const cache of ['none', 'directsync'] as const) {
    const img = await openFile(f, { cache });
    assert.is(img.size, size);
    // The last request of an image: aligned start, unaligned length ending at the end.
    const tail = await img.read(2 * 4096, 4096 + 1000, img.allocBuffer!(8192));
    assert.is(tail.length, 5096);
    assert.ok(tail.every((b) => b === 0x11));
    const data = img.allocBuffer!(8192)
      .fill(0x22)
      .subarray(0, 4096 + 1000);
    await img.write(2 * 4096, data);
    await img.writeZeroes(3 * 4096, 1000);
    await img.flush();
    const all = await img.read(0, size, img.allocBuffer!(4 * 4096));
    assert.ok(all.subarray(0, 2 * 4096).every((b) => b === 0x11));
    assert.ok(all.subarray(2 * 4096, 3 * 4096).every((b) => b === 0x22));
    assert.ok(all.subarray(3 * 4096).every((b) => b === 0));
    await img.close();
    assert.is(fs.statSync(f).size, size, 'the tail write did not grow the file');
    fs.writeFileSync(f, filled(size, 0x11));
  }
});

it('a tiny image smaller than one block', async () => {
  const f = path.join(dir, 'tiny.img');
  fs.writeFileSync(f, 'hello');
  const img = await openFile(f, { cache: 'none' });
  assert.is(Buffer.from(await img.read(0, 5)).toString(), 'hello');
  await img.close();
});

it('caller memory that is not aligned still works (bounced)', async () => {
  const f = path.join(dir, 'unaligned-mem.img');
  await createFile(f, MiB);
  const img = await openFile(f, { cache: 'none' });
  // A view one byte into an ArrayBuffer cannot be page aligned.
  const data = new Uint8Array(8192 + 1).subarray(1).fill(0x5a);
  await img.write(4096, data);
  const into = new Uint8Array(8192 + 1).subarray(1);
  await img.read(4096, 8192, into);
  assert.ok(into.every((b) => b === 0x5a));
  await img.close();
});

it('writeZeroes and block status with O_DIRECT', async () => {
  const f = path.join(dir, 'zero.img');
  await createFile(f, 4 * MiB);
  const img = await openFile(f, { cache: 'none' });
  await img.write(0, img.allocBuffer!(2 * MiB).fill(1));
  await img.writeZeroes(0, MiB, { mayUnmap: true });
  await img.writeZeroes(MiB, 4096);
  // ext4 also reports the ZERO_RANGE part (unwritten extents) as a hole.
  const ext = await img.blockStatus(0, 4 * MiB);
  assert.is(ext.kind, 'zero');
  assert.ok(ext.length === MiB || ext.length === MiB + 4096, String(ext.length));
  const back = await img.read(0, 2 * MiB, img.allocBuffer!(2 * MiB));
  assert.ok(back.subarray(0, MiB + 4096).every((b) => b === 0));
  assert.ok(back.subarray(MiB + 4096).every((b) => b === 1));
  await img.close();
});

(canMount ? test : test.skip)('a file system without O_DIRECT gives a clear error', async () => {
  const m = scratchMount('ramfs')!;
  try {
    const f = path.join(m.dir, 'img');
    fs.writeFileSync(f, filled(4096, 1));
    const err = await rejects(() => openFile(f, { cache: 'none' }), {
      name: 'BlockError',
      code: 'EINVAL',
      op: 'open',
      location: f,
    });
    assert.match(err.message, /O_DIRECT/);
  } finally {
    m.unmount();
  }
});

it('convert of odd-sized sources onto O_DIRECT targets: new ones, and existing larger ones (-n) whose rest is kept', async () => {
  const reg = new DriverRegistry().register(...drivers);
  for (const size of [1_000_001, 4096 * 3 + 1, 777]) {
    const src = path.join(dir, `odd-${size}.raw`);
    const data = Buffer.alloc(size);
    for (let i = 0; i < size; i++) data[i] = (i * 31 + (i >> 10)) & 0xff;
    fs.writeFileSync(src, data);
    const source = await reg.open(src, { readOnly: true, format: 'raw' });
    // A new target of the same odd size.
    const fresh = path.join(dir, `fresh-${size}.raw`);
    let target = await reg.create(fresh, size, { format: 'raw', cache: 'none' });
    await convert({ sources: [source], target, workers: 4 });
    await target.close();
    assert.ok(fs.readFileSync(fresh).equals(data), `${size} bytes onto a new O_DIRECT file`);
    // An existing larger file with old data: the tail block is read, patched, written back.
    const existing = path.join(dir, `existing-${size}.raw`);
    fs.writeFileSync(existing, Buffer.alloc(size + 8192, 0xee));
    target = await reg.open(existing, { format: 'raw', cache: 'none' });
    await convert({ sources: [source], target, workers: 4 });
    await target.close();
    const got = fs.readFileSync(existing);
    assert.ok(got.subarray(0, size).equals(data), `${size} bytes onto an existing O_DIRECT file`);
    assert.ok(
      got.subarray(size).every((b) => b === 0xee),
      `${size} bytes: the rest of the target kept`,
    );
    await source.close();
  }
});

test.run();
