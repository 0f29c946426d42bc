/** Block devices, on a loop device over a file (skipped where losetup does not work). */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createFile, openFile } from '../src/index.js';
import { attachLoop, canLoop, diskTempDir, extents, filled, rejects, removeDir } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;
const it = canLoop ? test : test.skip;
let dir = '';
let loop: { dev: string; detach(): void } | undefined;

test.before(() => {
  if (!canLoop) return;
  dir = diskTempDir();
  const backing = path.join(dir, 'backing.img');
  fs.writeFileSync(backing, filled(SIZE, 0xcc));
  loop = attachLoop(backing);
});
test.after(() => {
  loop?.detach();
  if (dir) removeDir(dir);
});

it('opens with the device size, all data, nothing known to be zero', async () => {
  const img = await openFile(loop!.dev);
  assert.is(img.size, SIZE);
  assert.not.ok(img.canBlockStatus);
  assert.not.ok(img.zeroInitialized);
  assert.is(img.limits.requestAlignment, 1);
  assert.equal(await extents(img), [{ start: 0, length: SIZE, kind: 'data' }]);
  assert.is(await img.allocatedSize(), undefined);
  assert.is((await img.read(SIZE - 1, 1))[0], 0xcc);
  await img.close();
});

it('create checks the size and keeps the contents', async () => {
  await rejects(() => createFile(loop!.dev, SIZE + 512), { code: 'ENOSPC', op: 'create', location: loop!.dev });
  await createFile(loop!.dev, SIZE - MiB);
  const img = await openFile(loop!.dev);
  assert.is(img.size, SIZE, 'a device is not truncated');
  assert.not.ok(img.zeroInitialized);
  assert.is((await img.read(0, 1))[0], 0xcc);
  await img.close();
});

it('writeZeroes (BLKZEROOUT) with unaligned edges, and discard', async () => {
  const img = await openFile(loop!.dev);
  await img.write(0, filled(SIZE, 0xcc));
  await img.writeZeroes(100, 2 * MiB + 5, { mayUnmap: false });
  await img.writeZeroes(3 * MiB, MiB, { mayUnmap: true });
  const got = await img.read(0, SIZE);
  assert.is(got[99], 0xcc);
  assert.ok(got.subarray(100, 2 * MiB + 105).every((b) => b === 0));
  assert.is(got[2 * MiB + 105], 0xcc);
  assert.ok(got.subarray(3 * MiB, 4 * MiB).every((b) => b === 0));
  assert.is(got[4 * MiB], 0xcc);
  await img.discard(5 * MiB + 1, MiB); // advisory: only has to succeed
  await img.flush();
  await img.close();
});

it('O_DIRECT uses the logical block size', async () => {
  const img = await openFile(loop!.dev, { cache: 'none' });
  assert.is(img.limits.requestAlignment, 512);
  assert.is(img.limits.minMemAlignment, 4096);
  const data = img.allocBuffer!(MiB).fill(0x3c);
  await img.write(512, data);
  await img.writeZeroes(512, 512);
  const back = await img.read(0, MiB + 1024, img.allocBuffer!(MiB + 1024));
  assert.ok(back.subarray(512, 1024).every((b) => b === 0));
  assert.ok(back.subarray(1024, MiB + 512).every((b) => b === 0x3c));
  await img.close();
});

test.run();
