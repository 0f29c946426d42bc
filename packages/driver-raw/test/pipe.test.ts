/**
 * The fused file-to-file copy (copyTo/copyFrom over fileio.pipe): one thread-pool job
 * reads a chunk, finds its zero runs and writes the rest. Its scan must agree with the
 * core's ZeroScanner, bit for bit, since convert treats the runs it returns as its own;
 * qemu-img compare is the oracle for whole copies.
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
  ZeroScanner,
  convert,
  forwardBackend,
  ungated,
  type BlockBackend,
  type BlockError,
  type CopyRequest,
} from '@blockconv/core';
import * as fileio from '@blockconv/fileio';
import { drivers } from '../src/index.js';
import { canMount, dataBytes, diskTempDir, identical, removeDir, scratchMount } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
let shm = '';
let disk = '';
const reg = new DriverRegistry().register(...drivers);

test.before(() => {
  shm = fs.mkdtempSync('/dev/shm/blockconv-pipe-');
  disk = diskTempDir('blockconv-pipe-');
});
test.after(() => {
  removeDir(shm);
  removeDir(disk);
});

/** xorshift: the same cases on every run. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

test('fileio.pipe finds exactly the zero runs ZeroScanner finds, writes only the rest, and never reads the holes', async () => {
  const next = rng(16);
  const src = path.join(shm, 'scan-src');
  const dst = path.join(shm, 'scan-dst');
  const cap = 2 * MiB;
  const buffer = Buffer.alloc(cap);
  const reference = Buffer.alloc(cap);
  for (let round = 0; round < 60; round++) {
    const unit = [512, 4 * KiB, 64 * KiB][round % 3]!;
    const minRun = unit * (1 + Math.floor(next() * 4));
    // Whole units, or an unaligned tail (the image's end) every fourth case.
    const units = 1 + Math.floor(next() * (cap / unit - 1));
    const length = round % 4 === 3 ? units * unit - 1 - Math.floor(next() * (unit - 1)) : units * unit;
    const data = randomBytes(length);
    // Zero runs of every size, some a byte short of a unit, some touching the end.
    for (let k = Math.floor(next() * 12); k > 0; k--) {
      const at = Math.floor(next() * length);
      const len = Math.floor(next() * 6 * unit) + (next() < 0.3 ? -1 : 0);
      data.fill(0, at, Math.min(length, at + Math.max(0, len)));
    }
    // A zero word at the start of a non-zero unit must not fool the scan.
    if (length > 16) data.fill(0, 0, 8);
    // Known holes on whole units, ascending; their bytes in the file are garbage that must not be read.
    const holes = new Float64Array(2 * 8);
    let holeCount = 0;
    for (let at = 0; holeCount < 8 && length >= unit; ) {
      at += unit * Math.floor(next() * (units / 4 + 1));
      const end = at + unit * (1 + Math.floor(next() * 3));
      if (end > Math.floor(length / unit) * unit || next() < 0.3) break;
      holes[2 * holeCount] = at;
      holes[2 * holeCount + 1] = end;
      holeCount++;
      at = end;
    }
    const pieces = new Float64Array(3 * (holeCount + 1));
    let pieceCount = 0;
    let pos = 0;
    for (let h = 0; h <= holeCount; h++) {
      const end = h < holeCount ? holes[2 * h]! : length;
      if (end > pos) {
        pieces.set([1000 + pos, end - pos, pos], 3 * pieceCount);
        pieceCount++;
      }
      if (h < holeCount) pos = holes[2 * h + 1]!;
    }
    const file = Buffer.from(data);
    for (let h = 0; h < holeCount; h++) file.fill(0x66, holes[2 * h]!, holes[2 * h + 1]!);
    fs.writeFileSync(src, Buffer.concat([Buffer.alloc(1000, 1), file]));
    fs.writeFileSync(dst, Buffer.alloc(length + 3000, 0xee));

    const runs = new Float64Array(2 * (Math.ceil(cap / unit) + holeCount + 1));
    const sfd = fs.openSync(src, 'r');
    const dfd = fs.openSync(dst, 'r+');
    let count: number;
    try {
      count = await fileio.pipe(
        sfd,
        dfd,
        2000,
        length,
        { pieces, buffer, holes, holeCount, unit, minRun, runs },
        pieceCount,
      );
    } finally {
      fs.closeSync(sfd);
      fs.closeSync(dfd);
    }
    // The reference: the core's scan of the same bytes, the holes never looked at.
    reference.set(file);
    for (let h = 0; h < holeCount; h++) reference.fill(0x77, holes[2 * h]!, holes[2 * h + 1]!);
    const scanner = new ZeroScanner(reference, unit, minRun);
    const known = new SegmentList(holeCount);
    for (let h = 0; h < holeCount; h++) known.push(holes[2 * h]!, holes[2 * h + 1]! - holes[2 * h]!, holes[2 * h]!);
    scanner.scan(length, 0, known);
    const expected: number[] = [];
    for (let i = 0; i < scanner.zeroes.count; i++)
      expected.push(scanner.zeroes.positionAt(i), scanner.zeroes.positionAt(i) + scanner.zeroes.lengthAt(i));
    const label = `round ${round}: unit ${unit}, minRun ${minRun}, length ${length}, ${holeCount} holes`;
    assert.equal(Array.from(runs.subarray(0, 2 * count)), expected, label);
    const out = fs.readFileSync(dst);
    assert.ok(
      out.subarray(0, 2000).every((b) => b === 0xee) && out.subarray(2000 + length).every((b) => b === 0xee),
      `${label}: nothing outside the chunk`,
    );
    let at = 0;
    for (let i = 0; i <= count; i++) {
      const end = i < count ? runs[2 * i]! : length;
      assert.ok(
        out.subarray(2000 + at, 2000 + end).equals(data.subarray(at, end)),
        `${label}: data [${at}, ${end}) written`,
      );
      if (i < count) {
        assert.ok(
          out.subarray(2000 + end, 2000 + runs[2 * i + 1]!).every((b) => b === 0xee),
          `${label}: zero run ${i} left alone`,
        );
        at = runs[2 * i + 1]!;
      }
    }
  }
});

test('fileio.pipe: minRun 0 writes the chunk whole; bad lists are refused before any I/O', async () => {
  const src = path.join(shm, 'whole-src');
  const dst = path.join(shm, 'whole-dst');
  const data = Buffer.concat([randomBytes(8 * KiB), Buffer.alloc(64 * KiB)]);
  fs.writeFileSync(src, data);
  fs.writeFileSync(dst, Buffer.alloc(data.length, 0xee));
  const sfd = fs.openSync(src, 'r');
  const dfd = fs.openSync(dst, 'r+');
  try {
    const chunk = {
      pieces: new Float64Array([0, data.length, 0]),
      buffer: Buffer.alloc(data.length),
      holes: new Float64Array(2),
      holeCount: 0,
      unit: 4096,
      minRun: 0,
      runs: new Float64Array(2),
    };
    assert.is(await fileio.pipe(sfd, dfd, 0, data.length, chunk, 1), 0);
    assert.ok(fs.readFileSync(dst).equals(data), 'zeroes written as data');
    assert.throws(() => fileio.pipe(sfd, dfd, 0, data.length, { ...chunk, minRun: 4096 }, 1), /run list is too short/);
    assert.throws(() => fileio.pipe(sfd, dfd, 0, data.length + 1, chunk, 1), /length exceeds the buffer/);
    assert.throws(() => fileio.pipe(sfd, dfd, 0, data.length, chunk, 2), /pieceCount exceeds/);
    assert.throws(
      () => fileio.pipe(sfd, dfd, 0, 4096, { ...chunk, pieces: new Float64Array([0, 8192, 0]) }, 1),
      /piece 0 is outside the chunk/,
    );
    const holes = new Float64Array([8192, 12288, 4096, 8192]);
    assert.throws(
      () =>
        fileio.pipe(
          sfd,
          dfd,
          0,
          data.length,
          { ...chunk, holes, holeCount: 2, minRun: 4096, runs: new Float64Array(100) },
          1,
        ),
      /hole 1 is not ascending/,
    );
  } finally {
    fs.closeSync(sfd);
    fs.closeSync(dfd);
  }
});

/** A sparse raw image: data runs with zero runs inside, 64 KiB pieces between 64 KiB holes, an unaligned tail. */
function makeSource(dir: string, name: string): string {
  const file = path.join(dir, name);
  fs.rmSync(file, { force: true });
  execFileSync('truncate', ['-s', String(12 * MiB + 512), file]);
  const fd = fs.openSync(file, 'r+');
  const write = (off: number, len: number): void => {
    fs.writeSync(fd, randomBytes(len), 0, len, off);
  };
  write(0, 3 * MiB);
  for (let off = 4 * MiB; off < 7 * MiB; off += 128 * KiB) write(off, 64 * KiB);
  write(11 * MiB, MiB + 512);
  fs.writeSync(fd, Buffer.alloc(MiB), 0, MiB, MiB); // written zeroes inside data
  fs.closeSync(fd);
  return file;
}

/** The target, with its copyFrom calls counted: the zero runs each found, -1 for a declined one. */
function counted(target: BlockBackend): { target: BlockBackend; results: number[] } {
  const results: number[] = [];
  const inner = target.copyFrom!;
  return {
    results,
    target: forwardBackend(target, {
      copyFrom: async (o: number, n: number, s: BlockBackend, r: CopyRequest) => {
        const v = await inner(o, n, s, r);
        results.push(v ? r.zeroRuns.count : -1);
        return v;
      },
    }),
  };
}

/** A fused-copy request with room for `units` zero runs. */
function pipeRequest(bytes: number, units: number, issued: () => void = () => {}): CopyRequest {
  return {
    offload: false,
    buffer: Buffer.alloc(bytes),
    holes: new SegmentList(1),
    unit: 512,
    minRun: 4096,
    pieces: new SegmentList(1),
    zeroRuns: new SegmentList(units + 2),
    issued,
  };
}

test('convert file to file pipes every data chunk: identical, zero runs and holes stay holes in a new target', async () => {
  for (const dir of [shm, disk]) {
    const source = makeSource(dir, 'src.raw');
    const out = path.join(dir, 'dst.raw');
    const src = await reg.open(source, { readOnly: true, format: 'raw' });
    const dst = await reg.create(out, src.size, { format: 'raw' });
    const { target, results } = counted(ungated(dst));
    try {
      assert.type(src.copyTo, 'function', 'raw over a file can pipe');
      const r = await convert({ sources: [src], target, workers: 4, targetIsZero: true });
      assert.ok(results.length >= 4 && results.every((v) => v >= 0), `every chunk piped (${results.join(' ')})`);
      assert.ok(
        results.some((v) => v > 0),
        'zero runs found',
      );
      assert.is(r.bytesWritten, (await dataBytes(source)) - MiB, 'the written zeroes were not written');
    } finally {
      await src.close();
      await dst.close();
    }
    identical(source, out);
    assert.is(await dataBytes(out), (await dataBytes(source)) - MiB);
  }
});

test('into an existing target with old data the zero runs are zeroed; -S 0 writes them as data', async () => {
  const source = makeSource(shm, 'src-n.raw');
  const out = path.join(shm, 'old.raw');
  fs.writeFileSync(out, Buffer.alloc(12 * MiB + 512, 0x5a));
  let src = await reg.open(source, { readOnly: true, format: 'raw' });
  let dst = await reg.open(out, { format: 'raw' });
  try {
    // Fast zero hidden: a file would be zeroed whole first, and no run would need zeroing.
    const r = await convert({
      sources: [src],
      target: forwardBackend(ungated(dst), { canFastZero: false }),
      outOfOrder: true,
    });
    assert.ok(r.bytesZeroed >= MiB, 'the zero run and the holes were zeroed');
  } finally {
    await src.close();
    await dst.close();
  }
  identical(source, out);
  fs.rmSync(out);
  src = await reg.open(source, { readOnly: true, format: 'raw' });
  dst = await reg.create(out, src.size, { format: 'raw' });
  try {
    const r = await convert({ sources: [src], target: dst, minSparse: 0 });
    assert.is(r.bytesWritten, src.size, 'every byte written');
  } finally {
    await src.close();
    await dst.close();
  }
  identical(source, out);
  assert.is(await dataBytes(out), 12 * MiB + 512);
});

test('O_DIRECT on either side declines the pipe: read and write instead, same result', async () => {
  const source = makeSource(disk, 'src-direct.raw');
  for (const [srcCache, dstCache] of [
    ['none', undefined],
    [undefined, 'none'],
  ] as const) {
    const out = path.join(disk, 'direct.raw');
    fs.rmSync(out, { force: true });
    const src = await reg.open(source, { readOnly: true, format: 'raw', cache: srcCache });
    const dst = await reg.create(out, src.size, { format: 'raw', cache: dstCache });
    const { target, results } = counted(ungated(dst));
    try {
      await convert({ sources: [src], target });
      assert.ok(results.length === 0 || results.every((v) => v === -1), 'declined');
    } finally {
      await src.close();
      await dst.close();
    }
    identical(source, out);
  }
});

test('a source that shrank reads as zeroes past its end, as a read does', async () => {
  const source = makeSource(shm, 'shrinks.raw');
  const out = path.join(shm, 'shrunk.raw');
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.create(out, src.size, { format: 'raw' });
  try {
    fs.truncateSync(source, 2 * MiB);
    let issued = 0;
    const request = pipeRequest(2 * MiB, 4096, () => {
      issued++;
    });
    assert.is(await src.copyTo!(MiB, 2 * MiB, dst, 0, request), true);
    assert.is(request.zeroRuns.count, 1);
    assert.is(issued, 1, 'the target said when the step started');
    assert.equal(
      request.zeroRuns.toArray(),
      [{ offset: 0, length: 2 * MiB, position: 0 }],
      'the written zeroes and the cut-off part',
    );
  } finally {
    await src.close();
    await dst.close();
  }
});

test('a failing read names the source, a failing write (ENOSPC) the target and its offset', async () => {
  const source = makeSource(shm, 'src-err.raw');
  const src = await reg.open(source, { readOnly: true, format: 'raw' });
  const dst = await reg.create(path.join(shm, 'err.raw'), src.size, { format: 'raw' });
  const request = pipeRequest(MiB, 2048);
  const raw = ungated(src);
  await src.close(); // its fd is gone: the job's pread fails
  const err = (await raw.copyTo!(0, MiB, dst, 0, request).catch((e: unknown) => e)) as BlockError;
  assert.is(err.code, 'EBADF');
  assert.is(err.op, 'read');
  assert.is(err.location, source);
  await dst.close();
  if (!canMount) return;
  const m = scratchMount('tmpfs', 'size=2m')!;
  try {
    const s2 = await reg.open(makeSource(shm, 'src-full.raw'), { readOnly: true, format: 'raw' });
    const full = path.join(m.dir, 'full.raw');
    const d2 = await reg.create(full, s2.size, { format: 'raw' });
    try {
      const e = (await convert({ sources: [s2], target: d2, workers: 1 }).catch((x: unknown) => x)) as BlockError;
      assert.is(e.code, 'ENOSPC', String(e));
      assert.is(e.op, 'write');
      assert.is(e.location, full);
      assert.ok(typeof e.offset === 'number' && e.offset >= 2 * MiB && e.offset < 12 * MiB, `offset ${e.offset}`);
      assert.match(e.message, /no space left on device/);
    } finally {
      await s2.close();
      await d2.close();
    }
  } finally {
    m.unmount();
  }
});

test.run();
