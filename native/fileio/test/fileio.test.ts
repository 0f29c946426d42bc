/** The native addon: extents, fallocate modes, ioctls, aligned memory, error shapes. */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import * as fileio from '../src/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let dir = '';

test.before(() => {
  dir = fs.mkdtempSync(path.join('/var/tmp', 'blockconv-fileio-'));
});
test.after(() => fs.rmSync(dir, { recursive: true, force: true }));

/** A sparse file of `size` bytes with `fill` written at each [offset, length]. */
function sparseFile(name: string, size: number, writes: Array<[number, number]>): { file: string; fd: number } {
  const file = path.join(dir, name);
  fs.writeFileSync(file, '');
  fs.truncateSync(file, size);
  const fd = fs.openSync(file, 'r+');
  for (const [offset, length] of writes) fs.writeSync(fd, Buffer.alloc(length, 0xaa), 0, length, offset);
  fs.fsyncSync(fd);
  return { file, fd };
}

async function walk(fd: number, size: number): Promise<Array<[boolean, number, number]>> {
  const out: Array<[boolean, number, number]> = [];
  for (let pos = 0; pos < size; ) {
    const r = await fileio.blockStatus(fd, pos, size);
    assert.ok(r.length > 0);
    out.push([r.data, pos, r.length]);
    pos += r.length;
  }
  return out;
}

async function rejection(p: Promise<unknown>): Promise<fileio.FileIoError> {
  try {
    await p;
  } catch (err) {
    return err as fileio.FileIoError;
  }
  throw new Error('expected a rejection');
}

function tryExec(cmd: string, args: string[]): string | undefined {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}

test('falloc constants match linux/falloc.h', () => {
  assert.equal(
    [
      fileio.FALLOC_FL_KEEP_SIZE,
      fileio.FALLOC_FL_PUNCH_HOLE,
      fileio.FALLOC_FL_NO_HIDE_STALE,
      fileio.FALLOC_FL_COLLAPSE_RANGE,
      fileio.FALLOC_FL_ZERO_RANGE,
      fileio.FALLOC_FL_INSERT_RANGE,
      fileio.FALLOC_FL_UNSHARE_RANGE,
    ],
    [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40],
  );
});

test('blockStatus walks data and holes of a sparse file', async () => {
  const size = 8 * MiB;
  const { fd } = sparseFile('sparse.img', size, [
    [MiB, 64 * KiB],
    [4 * MiB, 8 * KiB],
  ]);
  const p = fileio.blockStatus(fd, 0, size);
  assert.instance(p, Promise);
  assert.equal(await walk(fd, size), [
    [false, 0, MiB],
    [true, MiB, 64 * KiB],
    [false, MiB + 64 * KiB, 3 * MiB - 64 * KiB],
    [true, 4 * MiB, 8 * KiB],
    [false, 4 * MiB + 8 * KiB, 4 * MiB - 8 * KiB], // no data after: ENXIO, hole to EOF
  ]);
  assert.equal(await fileio.blockStatus(fd, MiB + 4 * KiB, size), { data: true, length: 60 * KiB });
  // fileSize clamps both kinds, and nothing is left at or past it.
  assert.equal(await fileio.blockStatus(fd, 0, MiB / 2), { data: false, length: MiB / 2 });
  assert.equal(await fileio.blockStatus(fd, MiB, MiB + 4 * KiB), { data: true, length: 4 * KiB });
  assert.equal(await fileio.blockStatus(fd, size, size), { data: false, length: 0 });
  assert.equal(await fileio.blockStatus(fd, 2 ** 53 - 1, 2 ** 53 - 1), { data: false, length: 0 });
  // Past the real EOF (the caller's size is stale) reads as a hole.
  assert.equal(await fileio.blockStatus(fd, size, size + MiB), { data: false, length: MiB });
  fs.closeSync(fd);
});

test('fallocate: allocate, punch a hole, zero a range', async () => {
  const { file, fd } = sparseFile('falloc.img', 4 * MiB, [[0, 4 * MiB]]);
  const blocks = () => fs.fstatSync(fd).blocks * 512;
  assert.is(blocks(), 4 * MiB);

  await fileio.fallocate(fd, fileio.FALLOC_FL_PUNCH_HOLE | fileio.FALLOC_FL_KEEP_SIZE, MiB, MiB);
  assert.is(blocks(), 3 * MiB);
  assert.equal(await fileio.blockStatus(fd, MiB, 4 * MiB), { data: false, length: MiB });
  assert.ok(
    fs
      .readFileSync(file)
      .subarray(MiB, 2 * MiB)
      .every((b) => b === 0),
  );

  await fileio.fallocate(fd, 0, MiB, MiB);
  assert.is(blocks(), 4 * MiB);

  await fileio.fallocate(fd, fileio.FALLOC_FL_ZERO_RANGE, 3 * MiB + 100, 1000);
  const data = fs.readFileSync(file);
  assert.ok(data.subarray(3 * MiB + 100, 3 * MiB + 1100).every((b) => b === 0));
  assert.is(data[3 * MiB + 99], 0xaa);
  assert.is(data[3 * MiB + 1100], 0xaa);
  assert.is(fs.statSync(file).size, 4 * MiB);
  fs.closeSync(fd);
});

/** Bytes of `file` in the page cache, by fincore (util-linux). */
function cachedBytes(file: string): number {
  return Number(
    execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim(),
  );
}

test('writeBehind starts writeback of one range and drops an older one from the cache', async () => {
  const file = path.join(dir, 'behind.img');
  const fd = fs.openSync(file, 'w+');
  const data = Buffer.alloc(4 * MiB);
  for (let i = 0; i < data.length; i += 4096) data.writeUInt32LE(i, i);
  fs.writeSync(fd, data, 0, 2 * MiB, 0);
  await fileio.writeBehind(fd, 0, 2 * MiB, 0, 0); // start only: nothing evicted
  assert.is(cachedBytes(file), 2 * MiB);
  fs.writeSync(fd, data, 2 * MiB, 2 * MiB, 2 * MiB);
  await fileio.writeBehind(fd, 2 * MiB, 2 * MiB, 0, 2 * MiB);
  assert.is(cachedBytes(file), 2 * MiB, 'the first range left the cache, the second stayed');
  assert.ok(fs.readFileSync(file).equals(data), 'the evicted range reads back from the disk');
  fs.closeSync(fd);
});

test('writeBehind failures reject like Node fs errors', async () => {
  const [r] = fs
    .readdirSync('/proc/self/fd')
    .map(Number)
    .sort((a, b) => b - a);
  const bad = (r ?? 1000) + 100;
  const err = await rejection(fileio.writeBehind(bad, 0, 4096, 0, 0));
  assert.is(err.code, 'EBADF');
  assert.is(err.syscall, 'sync_file_range');
  assert.throws(
    () => fileio.writeBehind(0, -1, 0, 0, 0),
    (e: Error) => e instanceof RangeError && /"offset"/.test(e.message),
  );
});

test('copyRange copies inside the kernel, stops where the source ends, and says EXDEV across file system types', async () => {
  const a = sparseFile('copy-src.img', 4 * MiB, [[MiB, 2 * MiB + 512]]);
  const b = sparseFile('copy-dst.img', 4 * MiB, []);
  try {
    assert.is(await fileio.copyRange(a.fd, MiB, b.fd, 0, 2 * MiB + 512), 2 * MiB + 512);
    const got = Buffer.alloc(2 * MiB + 1024);
    fs.readSync(b.fd, got, 0, got.length, 0);
    assert.ok(got.subarray(0, 2 * MiB + 512).every((x) => x === 0xaa));
    assert.ok(got.subarray(2 * MiB + 512).every((x) => x === 0));
    assert.is(await fileio.copyRange(a.fd, 4 * MiB - 4096, b.fd, 0, 8192), 4096, 'short at the end of the source');
    const shmDir = fs.mkdtempSync('/dev/shm/blockconv-fileio-');
    const c = fs.openSync(path.join(shmDir, 'c.img'), 'w+');
    try {
      const e = await rejection(fileio.copyRange(a.fd, 0, c, 0, 4096));
      assert.is(e.code, 'EXDEV');
      assert.is(e.syscall, 'copy_file_range');
    } finally {
      fs.closeSync(c);
      fs.rmSync(shmDir, { recursive: true, force: true });
    }
    assert.is(
      (await rejection(fileio.copyRange(a.fd, 0, a.fd, 4096, 8192))).code,
      'EINVAL',
      'overlapping ranges of one file',
    );
    assert.throws(() => void fileio.copyRange(a.fd, -1, b.fd, 0, 1), RangeError);
  } finally {
    fs.closeSync(a.fd);
    fs.closeSync(b.fd);
  }
});

test('errors look like Node fs errors', async () => {
  const { fd } = sparseFile('err.img', MiB, []);
  fs.closeSync(fd);
  const e = await rejection(fileio.blockStatus(fd, 0, MiB));
  assert.instance(e, Error);
  assert.is(e.code, 'EBADF');
  assert.is(e.errno, -os.constants.errno.EBADF);
  assert.is(e.syscall, 'lseek');
  assert.is(e.message, 'EBADF: bad file descriptor, lseek');

  const fd2 = fs.openSync(path.join(dir, 'err.img'), 'r');
  const notty = await rejection(fileio.blockDeviceSize(fd2));
  assert.equal([notty.code, notty.syscall], ['ENOTTY', 'ioctl']);
  const ro = await rejection(fileio.fallocate(fd2, 0, 0, 4096));
  assert.is(ro.code, 'EBADF'); // opened read-only
  fs.closeSync(fd2);
  const fd3 = fs.openSync(path.join(dir, 'err.img'), 'r+');
  const zero = await rejection(fileio.fallocate(fd3, 0, 0, 0));
  assert.equal([zero.code, zero.syscall], ['EINVAL', 'fallocate']);
  fs.closeSync(fd3);
});

(fs.existsSync('/dev/shm') ? test : test.skip)(
  'EOPNOTSUPP where the file system lacks a mode (tmpfs, ZERO_RANGE)',
  async () => {
    const f = fs.mkdtempSync('/dev/shm/blockconv-fileio-');
    try {
      const fd = fs.openSync(path.join(f, 'img'), 'w+');
      const e = await rejection(fileio.fallocate(fd, fileio.FALLOC_FL_ZERO_RANGE, 0, 4096));
      assert.is(e.code, 'EOPNOTSUPP');
      assert.is(e.errno, -os.constants.errno.EOPNOTSUPP);
      assert.is(e.syscall, 'fallocate');
      assert.match(e.message, /^EOPNOTSUPP: operation not supported, fallocate$/);
      fs.closeSync(fd);
    } finally {
      fs.rmSync(f, { recursive: true, force: true });
    }
  },
);

test('bad arguments throw synchronously: TypeError for types, RangeError for values', () => {
  const f = fileio.blockStatus as unknown as (...args: unknown[]) => unknown;
  assert.throws(
    () => f('3', 0, 10),
    (e: Error) => e instanceof TypeError && /"fd"/.test(e.message),
  );
  assert.throws(() => f(3, 0), TypeError);
  assert.throws(() => f(3, 0n, 10), TypeError);
  assert.throws(() => f(3, -1, 10), RangeError);
  assert.throws(() => f(3, 1.5, 10), RangeError);
  assert.throws(() => f(3, NaN, 10), RangeError);
  assert.throws(() => f(3, 2 ** 53, 10), RangeError);
  assert.throws(() => f(-1, 0, 10), RangeError);
  const fa = fileio.fallocate as unknown as (...args: unknown[]) => unknown;
  assert.throws(() => fa(3, 'x', 0, 1), TypeError);
  const al = fileio.allocAligned as unknown as (...args: unknown[]) => unknown;
  assert.throws(() => al(4096), TypeError);
  assert.throws(() => al(4096, 3), RangeError);
  assert.throws(() => al(4096, 4), RangeError); // below sizeof(void *)
  assert.throws(() => al(-1, 4096), RangeError);
});

test('allocAligned: zeroed Buffer of the size, counted as external memory', () => {
  const before = process.memoryUsage().external;
  const b = fileio.allocAligned(32 * MiB, 4096);
  assert.ok(Buffer.isBuffer(b));
  assert.is(b.length, 32 * MiB);
  assert.is(b.byteOffset, 0);
  assert.ok(b.every((x) => x === 0));
  assert.ok(process.memoryUsage().external - before >= 32 * MiB);
  assert.is(fileio.allocAligned(0, 512).length, 0);
});

test('allocAligned memory satisfies O_DIRECT where unaligned memory does not', () => {
  const file = path.join(dir, 'direct.img');
  fs.writeFileSync(file, Buffer.alloc(64 * KiB, 0x42));
  let fd: number;
  try {
    fd = fs.openSync(file, fs.constants.O_RDWR | fs.constants.O_DIRECT);
  } catch {
    return; // no O_DIRECT on this file system
  }
  const buf = fileio.allocAligned(8 * KiB, 4096);
  assert.is(fs.readSync(fd, buf, 0, buf.length, 4096), 8 * KiB);
  assert.ok(buf.every((x) => x === 0x42));
  buf.fill(0x43);
  assert.is(fs.writeSync(fd, buf, 0, buf.length, 0), 8 * KiB);
  fs.closeSync(fd);
  assert.is(fs.readFileSync(file)[100], 0x43);
});

// Loop devices need root and /dev/loop-control; attached inside the test so nothing leaks.
const canLoop =
  process.getuid?.() === 0 && fs.existsSync('/dev/loop-control') && tryExec('losetup', ['--version']) !== undefined;

(canLoop ? test : test.skip)('block device ioctls on a loop device', async () => {
  const backing = path.join(dir, 'loop.img');
  fs.writeFileSync(backing, Buffer.alloc(4 * MiB, 0x99));
  const dev = tryExec('losetup', ['-f', '--show', backing]);
  assert.ok(dev, 'losetup failed');
  const fd = fs.openSync(dev!, 'r+');
  try {
    assert.is(await fileio.blockDeviceSize(fd), 4 * MiB);
    assert.is(await fileio.logicalBlockSize(fd), 512);
    await fileio.blockDeviceZeroOut(fd, 512, MiB);
    const buf = Buffer.alloc(MiB + 1024);
    fs.readSync(fd, buf, 0, buf.length, 0);
    assert.is(buf[511], 0x99);
    assert.ok(buf.subarray(512, MiB + 512).every((b) => b === 0));
    assert.is(buf[MiB + 512], 0x99);
    await fileio.blockDeviceDiscard(fd, 2 * MiB, MiB);
    const e = await rejection(fileio.blockDeviceZeroOut(fd, 100, 512));
    assert.equal([e.code, e.syscall], ['EINVAL', 'ioctl']);
  } finally {
    fs.closeSync(fd);
    tryExec('losetup', ['-d', dev!]);
  }
});

test.run();
