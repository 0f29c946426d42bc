/** The file protocol with buffered I/O: sparseness, zeroing, EOF handling, create/open. */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { DriverRegistry, SegmentList, gateBackend } from '@blockconv/core';
import { createFile, drivers, fileDriver, openFile } from '../src/index.js';
import { cachedBytes, canMount, diskTempDir, extents, filled, rejects, removeDir, scratchMount } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';

test.before(() => {
  dir = diskTempDir();
});
test.after(() => removeDir(dir));

test('driver shape', () => {
  assert.is(fileDriver.kind, 'protocol');
  assert.is(fileDriver.name, 'file');
  assert.equal(fileDriver.schemes, ['file']);
  assert.type(fileDriver.create, 'function');
});

test('create makes a sparse file of exactly the size, replacing an existing one', async () => {
  const f = path.join(dir, 'create.img');
  fs.writeFileSync(f, filled(3 * MiB, 7));
  await createFile(f, 5 * MiB + 123, {});
  const st = fs.statSync(f);
  assert.is(st.size, 5 * MiB + 123);
  assert.is(st.blocks, 0);
});

test('create says a new file reads zeroes; the registry tells the backend it returns, a later open is not told', async () => {
  const f = path.join(dir, 'fresh.img');
  assert.equal(await fileDriver.create!(f, MiB, {}), { zeroInitialized: true });
  const reg = new DriverRegistry().register(...drivers);
  const created = await reg.create(f, MiB);
  assert.ok(created.zeroInitialized);
  await created.close();
  const again = await reg.open(f);
  assert.not.ok(again.zeroInitialized);
  await again.close();
  // A file made by someone else is never assumed to be zero.
  const other = path.join(dir, 'other.img');
  fs.writeFileSync(other, '');
  fs.truncateSync(other, MiB);
  const img = await fileDriver.open(other, {});
  assert.not.ok(img.zeroInitialized);
  await img.close();
});

test('buffered limits and flags', async () => {
  const f = path.join(dir, 'limits.img');
  await createFile(f, MiB);
  const img = await openFile(f);
  assert.is(img.driverName, 'file');
  assert.is(img.size, MiB);
  assert.is(img.limits.requestAlignment, 1);
  assert.is(img.limits.minMemAlignment, 1);
  assert.ok(img.limits.maxTransfer >= 16 * MiB);
  assert.is(img.allocBuffer, undefined);
  assert.ok(img.canZero && img.canDiscard && img.canBlockStatus && img.canWriteOutOfOrder);
  assert.not.ok(img.canCompress);
  assert.equal(await img.info(), {});
  await img.close();
});

test('write, read back, read into a larger buffer', async () => {
  const f = path.join(dir, 'rw.img');
  await createFile(f, 4 * MiB);
  const img = await openFile(f);
  await img.write(MiB + 3, filled(100_000, 0xab));
  const got = await img.read(MiB, 100_010);
  assert.is(got.length, 100_010);
  assert.equal([got[0], got[2], got[3], got[100_002], got[100_003]], [0, 0, 0xab, 0xab, 0]);
  const big = new Uint8Array(200_000).fill(9);
  const view = await img.read(MiB + 3, 1000, big);
  assert.is(view.buffer, big.buffer);
  assert.is(view.length, 1000);
  assert.ok(view.every((b) => b === 0xab));
  assert.is(big[1000], 9, 'bytes past length untouched');
  await img.flush();
  await img.close();
  await img.close(); // idempotent
});

test('sparse file block status: holes are zero, writes are data', async () => {
  const f = path.join(dir, 'sparse.img');
  await createFile(f, 16 * MiB);
  const img = await openFile(f);
  assert.equal(await extents(img), [{ start: 0, length: 16 * MiB, kind: 'zero' }]);
  await img.write(MiB, filled(64 * KiB, 1));
  await img.write(5 * MiB, filled(128 * KiB, 2));
  await img.write(16 * MiB - 4 * KiB, filled(4 * KiB, 3));
  await img.flush();
  assert.equal(await extents(img), [
    { start: 0, length: MiB, kind: 'zero' },
    { start: MiB, length: 64 * KiB, kind: 'data' },
    { start: MiB + 64 * KiB, length: 4 * MiB - 64 * KiB, kind: 'zero' },
    { start: 5 * MiB, length: 128 * KiB, kind: 'data' },
    { start: 5 * MiB + 128 * KiB, length: 11 * MiB - 128 * KiB - 4 * KiB, kind: 'zero' },
    { start: 16 * MiB - 4 * KiB, length: 4 * KiB, kind: 'data' },
  ]);
  // An extent starting inside one is measured from the asked offset.
  assert.equal(await img.blockStatus(MiB + 4 * KiB, 1), { kind: 'data', length: 60 * KiB, offset: MiB + 4 * KiB });
  await rejects(() => gateBackend(img).blockStatus(16 * MiB, 1), { code: 'ERANGE' });
  await img.close();
});

test('writeZeroes with mayUnmap punches a hole that reads back zero', async () => {
  const f = path.join(dir, 'punch.img');
  await createFile(f, 4 * MiB);
  const img = await openFile(f);
  await img.write(0, filled(4 * MiB, 0x55));
  await img.flush();
  const before = (await img.allocatedSize())!;
  await img.writeZeroes(MiB, MiB, { mayUnmap: true });
  assert.ok((await img.read(MiB, MiB)).every((b) => b === 0));
  assert.ok((await img.read(MiB - 1, 1))[0] === 0x55 && (await img.read(2 * MiB, 1))[0] === 0x55);
  assert.is((await img.allocatedSize())!, before - MiB);
  assert.equal(await img.blockStatus(MiB, MiB), { kind: 'zero', length: MiB, offset: MiB });
  await img.close();
});

test('writeZeroes without mayUnmap (ZERO_RANGE) keeps the blocks allocated', async () => {
  const f = path.join(dir, 'zerorange.img');
  await createFile(f, 4 * MiB);
  const img = await openFile(f);
  await img.write(0, filled(4 * MiB, 0x66));
  await img.flush();
  const before = (await img.allocatedSize())!;
  await img.writeZeroes(MiB + 512, MiB);
  assert.ok((await img.read(MiB + 512, MiB)).every((b) => b === 0));
  assert.is((await img.read(MiB + 511, 1))[0], 0x66);
  assert.is((await img.read(2 * MiB + 512, 1))[0], 0x66);
  assert.is((await img.allocatedSize())!, before);
  await img.close();
});

test('discard punches a hole', async () => {
  const f = path.join(dir, 'discard.img');
  await createFile(f, 2 * MiB);
  const img = await openFile(f);
  await img.write(0, filled(2 * MiB, 1));
  await img.discard(0, MiB);
  assert.ok((await img.read(0, MiB)).every((b) => b === 0));
  assert.equal(await img.blockStatus(0, 2 * MiB), { kind: 'zero', length: MiB, offset: 0 });
  await img.close();
});

test('reads past EOF (the file shrank) come back as zeroes', async () => {
  const f = path.join(dir, 'shrunk.img');
  fs.writeFileSync(f, filled(10_000, 0x77));
  const img = await openFile(f);
  fs.truncateSync(f, 6000);
  const got = await img.read(4000, 6000, new Uint8Array(6000).fill(0xee));
  assert.ok(got.subarray(0, 2000).every((b) => b === 0x77));
  assert.ok(got.subarray(2000).every((b) => b === 0));
  assert.equal(await img.blockStatus(6000, 4000), { kind: 'zero', length: 4000, offset: 6000 });
  await img.close();
});

test("requests beyond the end or after close are refused (by the core's gate)", async () => {
  const f = path.join(dir, 'range.img');
  await createFile(f, 4096);
  const img = gateBackend(await openFile(f));
  await rejects(() => img.read(4000, 97), { name: 'BlockError', code: 'ERANGE', offset: 4000 });
  await rejects(() => img.write(4095, filled(2, 1)), { code: 'ERANGE' });
  await rejects(() => img.read(0, 10, new Uint8Array(5)), { code: 'EINVAL' });
  await img.close();
  await rejects(() => img.read(0, 1), { code: 'EBADF' });
  assert.is(fs.statSync(f).size, 4096);
});

test('cache modes writethrough and unsafe open and work', async () => {
  const f = path.join(dir, 'cache.img');
  await createFile(f, MiB);
  for (const cache of ['writethrough', 'unsafe', 'writeback'] as const) {
    const img = await openFile(f, { cache });
    await img.write(0, filled(4096, 3), { fua: true });
    await img.flush();
    assert.is((await img.read(0, 1))[0], 3);
    await img.close();
  }
});

test('write-behind: a long write keeps ~32 large writes in the cache; small writes, write-behind=off and unsafe short copies are left alone', async () => {
  const f = path.join(dir, 'behind.img');
  const chunk = filled(MiB, 5);
  const cached: Record<string, number> = {};
  const modes = { on: {}, off: { options: { 'write-behind': 'off' } }, unsafe: { cache: 'unsafe' } } as const;
  for (const [mode, opts] of Object.entries(modes)) {
    await createFile(f, 80 * MiB);
    const img = await openFile(f, opts);
    for (let i = 0; i < 64; i++) await img.write(i * MiB, chunk);
    // Data runs of one chunk (writeSegments) count as one write of their span.
    for (let i = 64; i < 72; i++)
      await img.writeSegments!(
        chunk,
        SegmentList.of([i * MiB, 256 * KiB, 0], [i * MiB + 512 * KiB, 512 * KiB, 512 * KiB]),
      );
    for (let i = 0; i < 64; i++) await img.write(72 * MiB + i * 64 * KiB, chunk.subarray(0, 64 * KiB));
    cached[mode] = cachedBytes(f);
    const back = await img.read(0, 80 * MiB);
    assert.ok(back.subarray(0, 64 * MiB).every((b) => b === 5));
    assert.ok(back.subarray(64 * MiB + 256 * KiB, 64 * MiB + 512 * KiB).every((b) => b === 0));
    await img.close();
  }
  // 64 MiB, 8 x 768 KiB of data runs, 4 MiB of small writes.
  assert.is(cached.off, 74 * MiB, 'without write-behind everything written stays cached');
  // cache=unsafe on a file below the kernel's background dirty threshold (GiBs): left alone.
  assert.is(cached.unsafe, cached.off);
  // 32 large writes (1 MiB or a 1 MiB span) behind, plus the 4 MiB of small ones.
  assert.ok(cached.on! <= 32 * MiB + 4 * MiB, `write-behind left ${cached.on} bytes cached`);
  assert.ok(cached.on! >= 4 * MiB, 'small writes were not waited for');
});

test("write-behind with cache=unsafe starts once the file outgrows the kernel's background dirty threshold", async () => {
  const f = path.join(dir, 'behind-grown.img');
  await createFile(f, 80 * MiB);
  const img = await openFile(f, { cache: 'unsafe' });
  const chunk = filled(MiB, 6);
  for (let i = 0; i < 16; i++) await img.write(i * MiB, chunk);
  assert.is(cachedBytes(f), 16 * MiB, 'a small unsafe file is left to the kernel');
  await img.resize(2 ** 40); // sparse: past any threshold (a few GiB), no space used
  for (let i = 16; i < 80; i++) await img.write(i * MiB, chunk);
  // The 16 MiB from before, and at most 32 of the 64 written since.
  assert.ok(cachedBytes(f) <= 48 * MiB, `write-behind left ${cachedBytes(f)} bytes cached`);
  assert.ok((await img.read(0, 80 * MiB)).every((b) => b === 6));
  await img.close();
  fs.rmSync(f);
});

test('write-behind=maybe is refused naming the option', async () => {
  const f = path.join(dir, 'behind-opt.img');
  await createFile(f, MiB);
  const e = await rejects(() => openFile(f, { options: { 'write-behind': 'maybe' } }), { code: 'EINVAL' });
  assert.match(e.message, /write-behind.*"maybe"/);
  assert.ok(fileDriver.openOptions?.some((o) => o.name === 'write-behind' && o.default === 'on'));
});

(canMount ? test : test.skip)('tmpfs: no ZERO_RANGE, so punch then reallocate', async () => {
  const m = scratchMount('tmpfs', 'size=8m')!;
  try {
    const f = path.join(m.dir, 'img');
    await createFile(f, 2 * MiB);
    const img = await openFile(f);
    await img.write(0, filled(2 * MiB, 9));
    await img.writeZeroes(4096, MiB);
    assert.ok((await img.read(4096, MiB)).every((b) => b === 0));
    assert.is((await img.read(4095, 1))[0], 9);
    assert.is(await img.allocatedSize(), 2 * MiB, 'range reallocated');
    await img.writeZeroes(4096, MiB, { mayUnmap: true });
    assert.is(await img.allocatedSize(), MiB);
    await img.close();
  } finally {
    m.unmount();
  }
});

(canMount ? test : test.skip)('ramfs: no fallocate or holes, falls back to writing zeroes', async () => {
  const m = scratchMount('ramfs')!;
  try {
    const f = path.join(m.dir, 'img');
    await createFile(f, 3 * MiB);
    const img = await openFile(f);
    await img.write(0, filled(3 * MiB, 4));
    for (const mayUnmap of [true, false, true]) {
      await img.writeZeroes(100, 2 * MiB + 5, { mayUnmap });
      const got = await img.read(0, 3 * MiB);
      assert.ok(got.subarray(100, 2 * MiB + 105).every((b) => b === 0));
      assert.is(got[99], 4);
      assert.is(got[2 * MiB + 105], 4);
      await img.write(0, filled(3 * MiB, 4));
    }
    await img.discard(0, MiB); // a no-op where nothing can be deallocated
    assert.is((await img.read(0, 1))[0], 4);
    assert.equal(await extents(img), [{ start: 0, length: 3 * MiB, kind: 'data' }]);
    await img.close();
  } finally {
    m.unmount();
  }
});

test('block status over more extents than one read-ahead batch, random probes, and after writes', async () => {
  const f = path.join(dir, 'many.img');
  await createFile(f, 160 * MiB, {});
  const fd = fs.openSync(f, 'r+');
  const block = filled(64 * KiB, 5);
  for (let i = 0; i < 1200; i++) fs.writeSync(fd, block, 0, block.length, i * 128 * KiB); // 1200 data extents
  fs.closeSync(fd);
  const img = await openFile(f, {});
  try {
    const walked = await extents(img);
    assert.is(walked.length, 2400, 'data and hole alternate');
    walked.forEach((e, i) => {
      assert.is(e.start, i * 64 * KiB);
      assert.is(e.kind, i % 2 ? 'zero' : 'data');
    });
    // Probes out of order, backwards and mid-extent, served from or past the batch.
    for (const off of [150 * MiB, 3 * 64 * KiB + 100, 1199 * 128 * KiB + 1, 64 * KiB]) {
      const e = await img.blockStatus(off, 1);
      const inData = Math.floor(off / (64 * KiB)) % 2 === 0 && off < 1200 * 128 * KiB;
      assert.is(e.kind, inData ? 'data' : 'zero', `kind at ${off}`);
      assert.is(
        off + e.length,
        off >= 1200 * 128 * KiB ? 160 * MiB : (Math.floor(off / (64 * KiB)) + 1) * 64 * KiB,
        `end at ${off}`,
      );
    }
    // A write fills a hole: block status must not answer from the stale batch.
    await img.write(64 * KiB, filled(64 * KiB, 9));
    assert.equal(await img.blockStatus(0, 1), { kind: 'data', length: 3 * 64 * KiB, offset: 0 });
    await img.writeZeroes(0, 3 * 64 * KiB, { mayUnmap: true });
    assert.is((await img.blockStatus(0, 1)).kind, 'zero');
  } finally {
    await img.close();
  }
});

test.run();
