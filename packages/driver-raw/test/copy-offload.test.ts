/**
 * Copy offload (convert's copyOffload, the CLI's -C) between real files: copy_file_range
 * on one file system, the fallback to read and write across two (ext4 and tmpfs), and
 * what it refuses. qemu-img compare is the oracle.
 */
import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  DriverRegistry,
  SegmentList,
  convert,
  forwardBackend,
  ungated,
  type BlockBackend,
  type CopyRequest,
} from '@blockconv/core';
import { drivers } from '../src/index.js';
import { dataBytes, diskTempDir, identical, rejects, removeDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let disk = '';
let shm = '';
const reg = new DriverRegistry().register(...drivers);

test.before(() => {
  disk = diskTempDir('blockconv-offload-');
  shm = fs.mkdtempSync('/dev/shm/blockconv-offload-');
});
test.after(() => {
  removeDir(disk);
  removeDir(shm);
});

/** A 24 MiB sparse raw image: random data runs, a written run of zeroes, holes, an unaligned tail. */
function makeSource(dir: string, name = 'src.raw'): string {
  const file = path.join(dir, name);
  fs.rmSync(file, { force: true });
  execFileSync('truncate', ['-s', String(24 * MiB + 512), file]);
  for (const [off, len] of [
    [0, 3 * MiB],
    [5 * MiB, 64 * KiB],
    [9 * MiB + 64 * KiB, 2 * MiB],
    [23 * MiB, MiB + 512],
  ] as const) {
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, randomBytes(len), 0, len, off);
    fs.closeSync(fd);
  }
  execFileSync('qemu-io', ['-f', 'raw', '-c', `write -P 0 ${14 * MiB} ${MiB}`, file], { stdio: 'ignore' });
  return file;
}

/** Opens a source read-only and creates a raw target of its size, as the CLI does. */
async function pair(
  source: string,
  target: string,
  cache?: 'none',
): Promise<{ src: BlockBackend; dst: BlockBackend; close(): Promise<void> }> {
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.create(target, src.size, { format: 'raw', cache });
  return {
    src,
    dst,
    close: async () => {
      await src.close();
      await dst.close();
    },
  };
}

test('file to file on one file system: the kernel copies the data, zero extents stay holes', async () => {
  const source = makeSource(disk);
  const { src, dst, close } = await pair(source, path.join(disk, 'dst.raw'));
  try {
    assert.type(src.copyTo, 'function', 'raw over a file can offload');
    assert.type(dst.copyFrom, 'function');
    const r = await convert({ sources: [src], target: dst, copyOffload: true, workers: 4 });
    const data = await dataBytes(source);
    assert.is(r.bytesOffloaded, data, 'every data extent was offloaded');
    assert.is(r.bytesWritten, data);
    assert.is(r.bytesRead, data);
    assert.is(r.done, src.size);
  } finally {
    await close();
  }
  identical(source, path.join(disk, 'dst.raw'));
  // Holes of the source stay holes (a new target reads zeroes); the written zeroes are data, as -C copies data as it is.
  assert.is(await dataBytes(path.join(disk, 'dst.raw')), await dataBytes(source));
});

test('across file systems (tmpfs to ext4) the kernel declines: read and write instead, same result', async () => {
  const source = makeSource(shm);
  const { src, dst, close } = await pair(source, path.join(disk, 'from-shm.raw'));
  try {
    const r = await convert({ sources: [src], target: dst, copyOffload: true });
    assert.is(r.bytesOffloaded, 0, 'EXDEV: nothing offloaded');
    assert.is(r.bytesWritten, await dataBytes(source));
  } finally {
    await close();
  }
  identical(source, path.join(disk, 'from-shm.raw'));
});

test('into an existing target with old content (-n): pre-zeroed, or its zero extents zeroed; data copied by the kernel', async () => {
  const source = makeSource(disk, 'src-n.raw');
  const target = path.join(disk, 'old.raw');
  fs.writeFileSync(target, Buffer.alloc(24 * MiB + 512, 0x5a));
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.open(target, { format: 'raw' });
  try {
    const r = await convert({ sources: [src], target: dst, copyOffload: true, outOfOrder: true });
    assert.ok(r.bytesOffloaded! > 0);
    assert.is(r.preZeroed, true, 'a file zeroes fast: zeroed whole first');
    // Without fast zero (hidden here), the zero extents are zeroed one by one.
    fs.writeFileSync(target, Buffer.alloc(24 * MiB + 512, 0x5a));
    const r2 = await convert({
      sources: [src],
      target: forwardBackend(ungated(dst), { canFastZero: false }),
      copyOffload: true,
      outOfOrder: true,
    });
    assert.ok(r2.bytesOffloaded! > 0);
    assert.ok(r2.bytesZeroed > 0, 'the holes were zeroed');
  } finally {
    await src.close();
    await dst.close();
  }
  identical(source, target);
});

test('O_DIRECT target (cache=none): copied or declined, never wrong; several sources concatenate', async () => {
  const a = makeSource(disk, 'a.raw');
  execFileSync('truncate', ['-s', String(24 * MiB), a]); // a join on a 4 KiB boundary
  const b = makeSource(disk, 'b.raw');
  const sa = await reg.open(a, { readOnly: true, format: 'raw' });
  const sb = await reg.open(b, { readOnly: true, format: 'raw' });
  const dst = await reg.create(path.join(disk, 'ab.raw'), sa.size + sb.size, { format: 'raw', cache: 'none' });
  try {
    await convert({ sources: [sa, sb], target: dst, copyOffload: true });
  } finally {
    await sa.close();
    await sb.close();
    await dst.close();
  }
  fs.writeFileSync(path.join(disk, 'ab.ref'), Buffer.concat([fs.readFileSync(a), fs.readFileSync(b)]));
  identical(path.join(disk, 'ab.ref'), path.join(disk, 'ab.raw'));
});

test('several targets (--tee) cannot take a copy: read once, written to each', async () => {
  const source = makeSource(disk, 'src-tee.raw');
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const t1 = await reg.create(path.join(disk, 't1.raw'), src.size, { format: 'raw' });
  const t2 = await reg.create(path.join(disk, 't2.raw'), src.size, { format: 'raw' });
  try {
    const r = await convert({ sources: [src], targets: [t1, t2], copyOffload: true });
    assert.is(r.bytesOffloaded, 0);
  } finally {
    await Promise.all([src.close(), t1.close(), t2.close()]);
  }
  identical(source, path.join(disk, 't1.raw'));
  identical(source, path.join(disk, 't2.raw'));
});

test('refused with what needs the bytes in memory: -c, -B, -S, checksum, verify', async () => {
  const source = makeSource(disk, 'src-r.raw');
  const { src, dst, close } = await pair(source, path.join(disk, 'refused.raw'));
  try {
    for (const [extra, why] of [
      [{ compress: true }, /cannot compress \(-c\)/],
      [{ diffAgainstBacking: true }, /differs from a backing image \(-B\)/],
      [{ minSparse: 8192 }, /zero runs in data \(-S\)/],
      [{ checksum: true }, /checksum or verify/],
      [{ verify: true }, /checksum or verify/],
    ] as const) {
      const e = await rejects(() => convert({ sources: [src], target: dst, copyOffload: true, ...extra }), {
        code: 'EINVAL',
      });
      assert.match(e.message, why);
      assert.match(e.message, /copy offload \(-C\)/);
    }
  } finally {
    await close();
  }
});

test('the request gate checks offloaded copies as reads and writes', async () => {
  const source = makeSource(disk, 'src-g.raw');
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const ro = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.create(path.join(disk, 'g.raw'), MiB, { format: 'raw' });
  // An offload: the storage copies; no buffer, no scan.
  const offload: CopyRequest = {
    offload: true,
    buffer: new Uint8Array(0),
    holes: new SegmentList(1),
    unit: 4096,
    minRun: 0,
    pieces: new SegmentList(1),
    zeroRuns: new SegmentList(0),
    issued: () => {},
  };
  try {
    await rejects(() => src.copyTo!(0, 4096, ro, 0, offload), { code: 'EROFS' });
    await rejects(() => src.copyTo!(src.size - 4096, 8192, dst, 0, offload), { code: 'ERANGE' });
    await rejects(() => src.copyTo!(0, 8192, dst, MiB - 4096, offload), { code: 'ERANGE' });
    assert.is(await src.copyTo!(0, MiB, dst, 0, offload), true);
    const got = await dst.read(0, MiB);
    const want = await src.read(0, MiB);
    assert.ok(Buffer.from(got).equals(Buffer.from(want)));
    // A backend that is not a local file is declined, not an error.
    const memory = { ...ungated(dst), copyFrom: undefined } as unknown as BlockBackend;
    assert.is(await ungated(src).copyTo!(0, 4096, memory, 0, offload), false);
    await dst.close();
    await rejects(() => src.copyTo!(0, 4096, dst, 0, offload), { code: 'EBADF' });
  } finally {
    await src.close();
    await ro.close();
    await dst.close();
  }
});

test.run();
