import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BlockError,
  checksumImage,
  compareImages,
  convert,
  forwardBackend,
  MemoryBackend,
  startConvert,
  type BlockBackend,
  type ConvertProgress,
  type CopyRequest,
} from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A source with data at the given [offset, length] ranges, zeroes elsewhere. */
async function source(
  size: number,
  ranges: ReadonlyArray<readonly [number, number]>,
  extra: Partial<ConstructorParameters<typeof MemoryBackend>[0]> = {},
): Promise<MemoryBackend> {
  const m = new MemoryBackend({ size, location: 'mem://src', ...extra, readOnly: false });
  for (const [off, len] of ranges) await m.write(off, pattern(len, off + 1));
  return m;
}

async function assertSame(a: BlockBackend, b: BlockBackend): Promise<void> {
  const r = await compareImages(a, b);
  assert.equal(r, { identical: true });
}

test('copies data and holes; the target equals the source', async () => {
  const src = await source(16 * MiB, [
    [0, 64 * KiB],
    [3 * MiB, 5 * MiB + 64 * KiB],
    [15 * MiB, MiB],
  ]);
  const dst = new MemoryBackend({ size: 16 * MiB });
  const r = await convert({ sources: [src], target: dst });
  await assertSame(src, dst);
  assert.is(r.done, 16 * MiB);
  assert.is(r.bytesRead, 64 * KiB + 5 * MiB + 64 * KiB + MiB, 'only allocated data is read');
  assert.is(dst.flushes, 1, 'target flushed once at the end');
});

test('writes are issued in order by default, several in flight, while reads run ahead', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]], {
    latency: (op, off) => (op === 'read' ? 1 + (((off / MiB) * 7) % 5) : 0),
    record: true,
  });
  // Later writes finish sooner: issue order must hold even when completion order does not.
  const dst = new MemoryBackend({
    size: 8 * MiB,
    latency: (_op, off) => 2 + ((off / (256 * KiB)) % 4) * 3,
    record: true,
  });
  await convert({ sources: [src], target: dst, workers: 4, bufferSize: 256 * KiB });
  const writes = dst.log.filter((r) => r.op === 'write');
  assert.is(writes.length, 32);
  for (let i = 1; i < writes.length; i++)
    assert.ok(writes[i]!.offset > writes[i - 1]!.offset, 'issued in ascending offset order');
  assert.ok(dst.maxInFlight > 1, `writes overlap (max in flight ${dst.maxInFlight})`);
  assert.ok(src.maxInFlight > 1, `reads overlap (max in flight ${src.maxInFlight})`);
  await assertSame(src, dst);
});

test('a target that cannot overlap writes gets them one at a time, also the pieces of a chunk split by zeroes', async () => {
  // Data and 64 KiB zero runs alternate inside each 1 MiB chunk; the target may hold old data, so the zeroes are written too.
  const ranges: Array<[number, number]> = [];
  for (let off = 0; off < 4 * MiB; off += 128 * KiB) ranges.push([off, 64 * KiB]);
  const src = await source(4 * MiB, ranges, { latency: 1 });
  const dst = new MemoryBackend({
    size: 4 * MiB,
    canWriteOutOfOrder: false,
    zeroInitialized: false,
    latency: 1,
    record: true,
  });
  await dst.write(0, pattern(4 * MiB, 99));
  await convert({ sources: [src], target: dst, workers: 4, bufferSize: MiB });
  assert.is(dst.maxInFlight, 1);
  assert.ok(
    dst.log.some((r) => r.op === 'writeZeroes'),
    'zero runs written as zeroes',
  );
  await assertSame(src, dst);
});

test('workers start one after another: the first reads do not share the source at once', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]], { latency: 3, record: true });
  const dst = new MemoryBackend({ size: 8 * MiB });
  await convert({ sources: [src], target: dst, workers: 4, bufferSize: 256 * KiB });
  const reads = src.log.filter((r) => r.op === 'read');
  // All four at once, the first would finish only with the others; here it goes alone.
  assert.ok(reads[1]!.started >= reads[0]!.completed!, 'the second read starts after the first completed');
  assert.ok(src.maxInFlight > 1, 'later reads overlap');
  await assertSame(src, dst);
});

test('in order, a target that cannot overlap writes gets them one at a time', async () => {
  const src = await source(4 * MiB, [[0, 4 * MiB]], { latency: 1 });
  const dst = new MemoryBackend({
    size: 4 * MiB,
    canWriteOutOfOrder: false,
    latency: (_op, off) => 1 + ((off / (256 * KiB)) % 3),
    record: true,
  });
  await convert({ sources: [src], target: dst, workers: 4, bufferSize: 256 * KiB });
  const writes = dst.log.filter((r) => r.op === 'write');
  for (let i = 1; i < writes.length; i++) {
    assert.ok(writes[i]!.offset > writes[i - 1]!.offset, 'offsets ascend');
    assert.ok(writes[i]!.started >= writes[i - 1]!.completed!, 'each write starts after the previous one completed');
  }
  assert.is(dst.maxInFlight, 1);
  await assertSame(src, dst);
});

test('-W lets writes overlap and complete out of order', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]]);
  const dst = new MemoryBackend({
    size: 8 * MiB,
    latency: (_op, off) => 1 + ((off / (256 * KiB)) % 3) * 3,
    record: true,
  });
  const r = await convert({ sources: [src], target: dst, workers: 4, bufferSize: 256 * KiB, outOfOrder: true });
  assert.ok(r.outOfOrder);
  assert.ok(dst.maxInFlight > 1, 'several writes in flight');
  await assertSame(src, dst);
});

test('-W is ignored for a target that cannot write out of order', async () => {
  const src = await source(2 * MiB, [[0, 2 * MiB]]);
  const dst = new MemoryBackend({ size: 2 * MiB, canWriteOutOfOrder: false, latency: 1 });
  const r = await convert({ sources: [src], target: dst, workers: 4, bufferSize: 256 * KiB, outOfOrder: true });
  assert.is(r.outOfOrder, false);
  assert.is(dst.maxInFlight, 1);
});

test('zero extents are skipped on a zero-initialised target', async () => {
  const src = await source(32 * MiB, [[MiB, MiB]]);
  const dst = new MemoryBackend({ size: 32 * MiB, record: true });
  const r = await convert({ sources: [src], target: dst });
  assert.equal(dst.log.filter((x) => x.op === 'writeZeroes').length, 0);
  assert.is(r.bytesSkipped, 31 * MiB);
  assert.is(dst.allocatedBytes, MiB, 'target stays sparse');
});

test('zero extents become writeZeroes when the target may hold old data', async () => {
  const src = await source(32 * MiB, [[MiB, MiB]]);
  const dst = new MemoryBackend({ size: 32 * MiB, zeroInitialized: false, record: true });
  await dst.write(20 * MiB, pattern(MiB, 9)); // stale data that must be wiped
  const r = await convert({ sources: [src], target: dst });
  assert.is(r.bytesZeroed, 31 * MiB);
  await assertSame(src, dst);
});

test('--target-is-zero skips zeroes on a target that does not say it is zeroed', async () => {
  const src = await source(8 * MiB, [[0, MiB]]);
  const dst = new MemoryBackend({ size: 8 * MiB, zeroInitialized: false, record: true });
  const r = await convert({ sources: [src], target: dst, targetIsZero: true });
  assert.is(r.bytesZeroed, 0);
  assert.is(r.bytesSkipped, 7 * MiB);
});

test('a target without writeZeroes gets written zero buffers', async () => {
  const src = await source(4 * MiB, [[0, MiB]]);
  const dst = new MemoryBackend({ size: 4 * MiB, zeroInitialized: false, canZero: false, record: true });
  await dst.write(2 * MiB, pattern(MiB, 3));
  await convert({ sources: [src], target: dst });
  assert.equal(dst.log.filter((x) => x.op === 'writeZeroes').length, 0);
  await assertSame(src, dst);
});

test('-S: zero runs inside data of at least minSparse bytes are not written', async () => {
  const data = pattern(MiB, 1);
  data.fill(0, 64 * KiB, 64 * KiB + 8 * KiB); // 8 KiB run: skipped with -S 4k
  data.fill(0, 200 * KiB, 200 * KiB + 2 * KiB); // 2 KiB run: too short, written as data
  const src = new MemoryBackend({ size: MiB });
  await src.write(0, data);
  const dst = new MemoryBackend({ size: MiB, record: true });
  const r = await convert({ sources: [src], target: dst });
  assert.is(r.bytesSkipped, 8 * KiB);
  assert.is(r.bytesWritten, MiB - 8 * KiB);
  // Both data pieces go in one vectored request that spans the skipped run.
  const writes = dst.log
    .filter((x) => x.op === 'write' || x.op === 'writeSegments')
    .map((x) => [x.op, x.offset, x.length]);
  assert.equal(writes, [['writeSegments', 0, MiB]]);
  await assertSame(src, dst);

  const dst2 = new MemoryBackend({ size: MiB, zeroInitialized: false, record: true });
  const r2 = await convert({ sources: [src], target: dst2, minSparse: 16 * KiB });
  assert.is(r2.bytesSkipped + r2.bytesZeroed, 0, 'an 8 KiB run is below -S 16k');
});

test('-S 0 writes every byte: the target is fully allocated', async () => {
  const src = await source(4 * MiB, [[MiB, 64 * KiB]]);
  const dst = new MemoryBackend({ size: 4 * MiB, record: true });
  const r = await convert({ sources: [src], target: dst, minSparse: 0 });
  assert.is(r.bytesWritten, 4 * MiB);
  assert.is(dst.allocatedBytes, 4 * MiB);
  assert.equal(dst.log.filter((x) => x.op === 'writeZeroes').length, 0);
});

test('small holes between data are read with it (cheap hole reads) and still not written', async () => {
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < 64; i++) ranges.push([i * 128 * KiB, 64 * KiB]);
  const src = await source(8 * MiB, ranges, { record: true });
  src.log.length = 0;
  const dst = new MemoryBackend({ size: 8 * MiB, record: true });
  const r = await convert({ sources: [src], target: dst, bufferSize: MiB });
  const reads = src.log.filter((x) => x.op === 'read' || x.op === 'readSegments');
  assert.ok(reads.length <= 9, `${reads.length} reads for 64 extents`);
  // One vectored read per chunk, of the data alone: the merged holes are not read.
  assert.is(
    reads.reduce((n, x) => n + x.length, 0),
    64 * 64 * KiB,
  );
  const writes = dst.log.filter((x) => x.op === 'write' || x.op === 'writeSegments');
  assert.ok(writes.length <= 9, `${writes.length} vectored writes for 64 extents`);
  assert.is(r.bytesWritten, 64 * 64 * KiB);
  assert.is(dst.allocatedBytes, 64 * 64 * KiB, 'holes stay holes');
  await assertSame(src, dst);
  // The holes left unread in the buffers never reach the digest or a -B comparison.
  const summed = new MemoryBackend({ size: 8 * MiB });
  const withSum = await convert({ sources: [src], target: summed, bufferSize: MiB, checksum: true });
  assert.is(withSum.checksum, (await checksumImage(src)).checksum);
  await assertSame(src, summed);
  const backing = new MemoryBackend({ size: 8 * MiB });
  await backing.write(0, pattern(8 * MiB, 9));
  const overlay = Object.assign(new MemoryBackend({ size: 8 * MiB, zeroInitialized: false }), { backing });
  await convert({ sources: [src], target: overlay, bufferSize: MiB, diffAgainstBacking: true });
  await assertSame(src, overlay);
  // A hole below -S cannot be found again by the zero scan, so it is not merged.
  const r2 = await convert({
    sources: [src],
    target: new MemoryBackend({ size: 8 * MiB }),
    bufferSize: MiB,
    minSparse: 128 * KiB,
  });
  assert.is(r2.bytesRead, 64 * 64 * KiB);
});

test("requests respect the target's max transfer and both sides' alignment", async () => {
  // A source that reports extents at odd 1000-byte boundaries.
  const inner = await source(4 * MiB, [[0, 4 * MiB]]);
  const odd: BlockBackend = Object.assign(Object.create(null), {
    driverName: 'odd',
    location: 'odd',
    size: inner.size,
    readOnly: true,
    limits: { requestAlignment: 1, maxTransfer: 8 * MiB, optimalTransfer: MiB },
    canZero: false,
    canDiscard: false,
    zeroInitialized: false,
    canCompress: false,
    canBlockStatus: true,
    read: (o: number, l: number, into?: Uint8Array) => inner.read(o, l, into),
    write: () => Promise.reject(new Error('ro')),
    writeZeroes: () => Promise.reject(new Error('ro')),
    discard: () => Promise.resolve(),
    flush: () => Promise.resolve(),
    close: () => Promise.resolve(),
    blockStatus: async (o: number) => ({
      kind: Math.floor(o / 1000) % 2 ? 'zero' : 'data',
      length: Math.min(1000 - (o % 1000), inner.size - o),
    }),
  });
  await inner.writeZeroes(0, 4 * MiB); // so that the "zero" extents really are zero
  await inner.write(
    0,
    pattern(4 * MiB, 2).map((v, i) => (Math.floor(i / 1000) % 2 ? 0 : v)),
  );
  const dst = new MemoryBackend({
    size: 4 * MiB,
    limits: { requestAlignment: 4096, maxTransfer: 64 * KiB },
    zeroInitialized: false,
    record: true,
  });
  await convert({ sources: [odd], target: dst, workers: 3 });
  for (const r of dst.log) {
    if (r.op === 'flush') continue;
    assert.ok(r.offset % 4096 === 0 && r.length % 4096 === 0, `${r.op} at ${r.offset}+${r.length} is aligned`);
    if (r.op === 'write') assert.ok(r.length <= 64 * KiB, 'write within max transfer');
  }
  await assertSame(odd, dst);
});

test('several sources concatenate into one target', async () => {
  const a = await source(3 * MiB, [[0, 3 * MiB]]);
  const b = await source(2 * MiB, [[64 * KiB, 128 * KiB]]);
  const dst = new MemoryBackend({ size: 5 * MiB });
  await convert({ sources: [a, b], target: dst });
  const got = await dst.read(3 * MiB, 2 * MiB);
  const want = await b.read(0, 2 * MiB);
  assert.ok(Buffer.from(got).equals(Buffer.from(want)));
  const head = await dst.read(0, 3 * MiB);
  assert.ok(Buffer.from(head).equals(Buffer.from(await a.read(0, 3 * MiB))));
});

test('a target smaller than the sources is refused before any write', async () => {
  const src = await source(4 * MiB, [[0, MiB]]);
  const dst = new MemoryBackend({ size: 2 * MiB, record: true });
  const err = await convert({ sources: [src], target: dst }).catch((e: unknown) => e);
  assert.instance(err, BlockError);
  assert.is((err as BlockError).code, 'ERANGE');
  assert.match((err as BlockError).message, /smaller than the source/);
  assert.is(dst.log.length, 0);
});

test('the first error stops the job and names the operation and offset; the target is not flushed', async () => {
  const src = await source(16 * MiB, [[0, 16 * MiB]], {
    latency: 1,
    fail: (op, off) =>
      op === 'read' && off === 6 * MiB ? Object.assign(new Error('EIO: i/o error'), { code: 'EIO' }) : undefined,
  });
  const dst = new MemoryBackend({ size: 16 * MiB, record: true });
  const err = await convert({ sources: [src], target: dst, workers: 4, bufferSize: MiB }).catch((e: unknown) => e);
  assert.instance(err, BlockError);
  const e = err as BlockError;
  assert.is(e.code, 'EIO');
  assert.is(e.op, 'read');
  assert.is(e.offset, 6 * MiB);
  assert.match(e.message, /mem:\/\/src read at offset 6291456/);
  assert.is(dst.flushes, 0, 'no flush after a failure');
  assert.ok(
    !dst.log.some((r) => r.op === 'write' && r.offset >= 6 * MiB),
    'in-order: nothing after the failed chunk was written',
  );
});

test('a write error (ENOSPC) is reported with the target offset', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]]);
  const dst = new MemoryBackend({
    size: 8 * MiB,
    location: 'mem://dst',
    fail: (op, off) =>
      op === 'write' && off >= 5 * MiB ? Object.assign(new Error('no space'), { code: 'ENOSPC' }) : undefined,
  });
  const err = (await convert({ sources: [src], target: dst, bufferSize: MiB }).catch((e: unknown) => e)) as BlockError;
  assert.is(err.code, 'ENOSPC');
  assert.is(err.offset, 5 * MiB);
  assert.match(err.message, /mem:\/\/dst write at offset 5242880.*no space left on device/);
});

test('a failing flush fails the job', async () => {
  const src = await source(MiB, [[0, MiB]]);
  const dst = new MemoryBackend({
    size: MiB,
    fail: (op) => (op === 'flush' ? Object.assign(new Error('x'), { code: 'EIO' }) : undefined),
  });
  const err = (await convert({ sources: [src], target: dst }).catch((e: unknown) => e)) as BlockError;
  assert.is(err.op, 'flush');
});

test('cancellation through an AbortSignal stops the job promptly and cleanly', async () => {
  const src = await source(64 * MiB, [[0, 64 * MiB]], { latency: 2 });
  const dst = new MemoryBackend({ size: 64 * MiB });
  const ac = new AbortController();
  const job = startConvert({ sources: [src], target: dst, signal: ac.signal, bufferSize: 256 * KiB });
  setTimeout(() => ac.abort(), 20);
  const err = (await job.done.catch((e: unknown) => e)) as BlockError;
  assert.instance(err, BlockError);
  assert.is(err.code, 'ECANCELED');
  assert.is(dst.flushes, 0);
  assert.ok(dst.allocatedBytes < 64 * MiB, 'stopped before the end');
  await new Promise((r) => setTimeout(r, 20));
  assert.is(src.inFlight + dst.inFlight, 0, 'no I/O left running');
});

test('an already aborted signal fails at once', async () => {
  const src = await source(MiB, []);
  const err = (await convert({
    sources: [src],
    target: new MemoryBackend({ size: MiB }),
    signal: AbortSignal.abort(),
  }).catch((e) => e)) as BlockError;
  assert.is(err.code, 'ECANCELED');
});

test('bounded work list: a 1 TiB sparse source is walked lazily, one block-status query at a time', async () => {
  const TiB = 1024 * 1024 * MiB;
  const ranges: Array<[number, number]> = [];
  for (let i = 0; i < 2000; i++) ranges.push([i * 128 * KiB, 64 * KiB]);
  const src = await source(TiB, ranges, { record: true });
  src.log.length = 0;
  const dst = new MemoryBackend({ size: TiB });
  const r = await convert({ sources: [src], target: dst });
  assert.is(r.bytesWritten, 2000 * 64 * KiB);
  const firstRead = src.log.findIndex((x) => x.op === 'read' || x.op === 'readSegments');
  const statusCount = src.log.filter((x) => x.op === 'blockStatus').length;
  const statusBeforeFirstRead = src.log.slice(0, firstRead).filter((x) => x.op === 'blockStatus').length;
  // Look-ahead is bounded by one buffer (hole merging peeks at most 2 MiB ahead), never the image.
  assert.ok(
    statusBeforeFirstRead <= 2 + (2 * (2 * MiB)) / (128 * KiB),
    `reads start after ${statusBeforeFirstRead} of ${statusCount} status queries`,
  );
  let inFlight = 0;
  for (const x of [
    ...src.log
      .filter((x) => x.op === 'blockStatus')
      .flatMap((x) => [
        [x.started, 1],
        [x.completed!, -1],
      ]),
  ].sort((a, b) => a[0]! - b[0]!)) {
    inFlight += x[1]!;
    assert.ok(inFlight <= 1, 'one status query in flight');
  }
  assert.is(dst.allocatedBytes, 2000 * 64 * KiB);
});

test('progress: events, an async iterator that ends, a final event at 100%', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]], { latency: 1 });
  const dst = new MemoryBackend({ size: 8 * MiB });
  const job = startConvert({ sources: [src], target: dst, progressInterval: 0, bufferSize: 256 * KiB });
  const events: ConvertProgress[] = [];
  job.on('progress', (p) => events.push(p));
  const seen: number[] = [];
  for await (const p of job.progress()) seen.push(p.done);
  const r = await job.done;
  assert.ok(events.length > 2);
  assert.is(events.at(-1)!.done, 8 * MiB);
  assert.is(r.total, 8 * MiB);
  assert.ok(seen.length > 2 && seen.at(-1) === 8 * MiB);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i]! >= seen[i - 1]!);
});

test("the progress iterator throws the job's error", async () => {
  const src = await source(4 * MiB, [[0, 4 * MiB]], { fail: (op) => (op === 'read' ? new Error('boom') : undefined) });
  const job = startConvert({ sources: [src], target: new MemoryBackend({ size: 4 * MiB }) });
  const err = await (async () => {
    for await (const _ of job.progress()) {
      /* drain */
    }
  })().catch((e) => e);
  assert.instance(err, BlockError);
});

test('rate limit slows the copy to about the asked rate', async () => {
  const src = await source(MiB, [[0, MiB]]);
  const t0 = performance.now();
  await convert({ sources: [src], target: new MemoryBackend({ size: MiB }), rateLimit: 4 * MiB, bufferSize: 64 * KiB });
  assert.ok(performance.now() - t0 >= 150, 'a quarter second of budget, mostly waited');
});

test('copy offload (-C): data chunks are copied by the storage, in order; zero extents still zeroed', async () => {
  const src = await source(
    8 * MiB,
    [
      [0, 3 * MiB],
      [5 * MiB, 64 * KiB],
    ],
    { canCopy: true, record: true },
  );
  const dst = new MemoryBackend({
    size: 8 * MiB,
    canCopy: true,
    zeroInitialized: false,
    latency: (_op, off) => 1 + ((off / MiB) % 3),
    record: true,
  });
  await dst.write(0, pattern(8 * MiB, 7));
  dst.log.length = 0;
  const r = await convert({ sources: [src], target: dst, copyOffload: true, workers: 4, bufferSize: MiB });
  assert.ok(!src.log.some((e) => e.op === 'read'), 'nothing read through blockconv');
  await assertSame(src, dst);
  assert.is(r.bytesOffloaded, 3 * MiB + 64 * KiB);
  assert.is(r.bytesWritten, 3 * MiB + 64 * KiB);
  const copies = dst.log.filter((e) => e.op === 'copy');
  assert.ok(!dst.log.some((e) => e.op === 'write'), 'no plain writes');
  for (let i = 1; i < copies.length; i++) assert.ok(copies[i]!.offset > copies[i - 1]!.offset, 'issued in order');
  assert.ok(dst.maxInFlight > 1, 'several in flight');
  assert.ok(r.bytesZeroed >= 4 * MiB, 'zero extents zeroed on a target with old data');
});

test('copy offload falls back to reading and writing: a target that cannot, a pair that declines midway', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]], { canCopy: true });
  const plain = new MemoryBackend({ size: 8 * MiB, record: true });
  const r = await convert({ sources: [src], target: plain, copyOffload: true, bufferSize: MiB });
  assert.is(r.bytesOffloaded, 0);
  assert.ok(plain.log.some((e) => e.op === 'write'));
  await assertSame(src, plain);
  // Two copies accepted, then declined: off for the rest of the job, nothing lost.
  let accepted = 0;
  const declining = forwardBackend(src, {
    copyTo: (o: number, n: number, t: BlockBackend, to: number, req: CopyRequest) =>
      accepted++ < 2 ? src.copyTo!(o, n, t, to, req) : Promise.resolve(false),
  });
  const dst = new MemoryBackend({ size: 8 * MiB, canCopy: true, record: true });
  const r2 = await convert({ sources: [declining], target: dst, copyOffload: true, workers: 1, bufferSize: MiB });
  assert.is(r2.bytesOffloaded, 2 * MiB);
  assert.is(r2.bytesWritten, 8 * MiB);
  assert.is(r2.bytesRead, 8 * MiB);
  await assertSame(src, dst);
});

test('copy offload: a failed copy fails the job with the target offset; one-at-a-time targets get one copy at a time', async () => {
  const src = await source(8 * MiB, [[0, 8 * MiB]], { canCopy: true });
  const dst = new MemoryBackend({
    size: 8 * MiB,
    location: 'mem://dst',
    canCopy: true,
    fail: (op, off) =>
      op === 'copy' && off === 5 * MiB ? Object.assign(new Error('no space'), { code: 'ENOSPC' }) : undefined,
  });
  const err = (await convert({ sources: [src], target: dst, copyOffload: true, bufferSize: MiB }).catch(
    (e: unknown) => e,
  )) as BlockError;
  assert.is(err.code, 'ENOSPC');
  assert.is(err.op, 'write');
  assert.is(err.offset, 5 * MiB);
  assert.is(dst.flushes, 0);
  const serial = new MemoryBackend({ size: 8 * MiB, canCopy: true, canWriteOutOfOrder: false, latency: 1 });
  const r = await convert({ sources: [src], target: serial, copyOffload: true, workers: 4, bufferSize: MiB });
  assert.is(serial.maxInFlight, 1);
  assert.is(r.bytesOffloaded, 8 * MiB);
  await assertSame(src, serial);
});

/** Data with a written run of zeroes inside it, and 64 KiB data pieces between 64 KiB holes (merged into chunks). */
async function pipeSource(extra: Partial<ConstructorParameters<typeof MemoryBackend>[0]> = {}): Promise<MemoryBackend> {
  const ranges: Array<[number, number]> = [[0, 3 * MiB]];
  for (let off = 4 * MiB; off < 6 * MiB; off += 128 * KiB) ranges.push([off, 64 * KiB]);
  const src = await source(8 * MiB, ranges, { canPipe: true, record: true, ...extra });
  await src.write(MiB, new Uint8Array(256 * KiB));
  src.log.length = 0;
  return src;
}

test('fused copy (copyTo/copyFrom): each data chunk is one step, issued in order; zero runs and holes skipped on a zero target', async () => {
  const src = await pipeSource();
  const dst = new MemoryBackend({
    size: 8 * MiB,
    canPipe: true,
    latency: (_op, off) => 1 + ((off / MiB) % 3),
    record: true,
  });
  const r = await convert({ sources: [src], target: dst, workers: 4, bufferSize: MiB });
  assert.ok(!src.log.some((e) => e.op === 'read' || e.op === 'readSegments'), 'nothing read by the core');
  assert.ok(
    !dst.log.some((e) => e.op === 'write' || e.op === 'writeSegments' || e.op === 'writeZeroes'),
    'no other writes',
  );
  const pipes = dst.log.filter((e) => e.op === 'pipe');
  assert.is(pipes.length, 5, '3 chunks of the data run, 2 of the merged pieces');
  for (let i = 1; i < pipes.length; i++) assert.ok(pipes[i]!.offset > pipes[i - 1]!.offset, 'issued in order');
  assert.ok(dst.maxInFlight > 1, 'several in flight');
  assert.is(r.bytesWritten, 3 * MiB - 256 * KiB + 16 * 64 * KiB, 'the zero run and the holes were not written');
  assert.is(r.bytesRead, 3 * MiB + 2 * MiB - 128 * KiB, 'data chunks count whole, the holes merged into them included');
  assert.is(r.done, 8 * MiB);
  await assertSame(src, dst);
});

test('fused copy into a target with old data: the zero runs it found are zeroed; -S 0 pipes unscanned', async () => {
  const src = await pipeSource();
  const dst = new MemoryBackend({ size: 8 * MiB, canPipe: true, zeroInitialized: false, record: true });
  await dst.write(0, pattern(8 * MiB, 5));
  dst.log.length = 0;
  const r = await convert({ sources: [src], target: dst, outOfOrder: true, bufferSize: MiB });
  await assertSame(src, dst);
  assert.ok(
    dst.log.some((e) => e.op === 'writeZeroes' && e.offset === MiB && e.length === 256 * KiB),
    'the zero run in data zeroed',
  );
  assert.ok(!dst.log.some((e) => e.op === 'write'));
  assert.is(r.bytesZeroed, 8 * MiB - (3 * MiB - 256 * KiB) - 16 * 64 * KiB);
  const all = new MemoryBackend({ size: 8 * MiB, canPipe: true, record: true });
  const r0 = await convert({ sources: [src], target: all, minSparse: 0, bufferSize: MiB });
  await assertSame(src, all);
  assert.ok(all.log.some((e) => e.op === 'pipe'));
  assert.is(r0.bytesWritten, 8 * MiB, '-S 0: every byte written as data, through the pipe and as zero writes');
});

test('fused copy stays off where the core needs the bytes, and a declined chunk is read and written instead', async () => {
  const src = await pipeSource();
  const dst = new MemoryBackend({ size: 8 * MiB, canPipe: true, record: true });
  const r = await convert({ sources: [src], target: dst, checksum: true, bufferSize: MiB });
  assert.ok(r.checksum);
  assert.ok(!dst.log.some((e) => e.op === 'pipe'), 'a checksum reads through the core');
  await assertSame(src, dst);
  let calls = 0;
  const declining = forwardBackend(src, {
    copyTo: (o: number, n: number, t: BlockBackend, to: number, req: CopyRequest) =>
      calls++ % 2 === 0 ? Promise.resolve(false) : src.copyTo!(o, n, t, to, req),
  });
  const dst2 = new MemoryBackend({
    size: 8 * MiB,
    canPipe: true,
    record: true,
    latency: (_op, off) => 1 + ((off / MiB) % 3),
  });
  const r2 = await convert({ sources: [declining], target: dst2, workers: 4, bufferSize: MiB });
  await assertSame(src, dst2);
  assert.is(dst2.log.filter((e) => e.op === 'pipe').length, 2);
  // Declined chunks keep their turn: data goes out in order, piped or not.
  const issued = dst2.log
    .filter((e) => e.op === 'pipe' || e.op === 'write' || e.op === 'writeSegments')
    .map((e) => e.offset);
  assert.equal(
    issued,
    [...issued].sort((a, b) => a - b),
    `issued in order: ${issued.join(' ')}`,
  );
  assert.is(r2.bytesWritten, 3 * MiB - 256 * KiB + 16 * 64 * KiB);
});

test('a failed fused copy fails the job with the target offset', async () => {
  const src = await pipeSource();
  const dst = new MemoryBackend({
    size: 8 * MiB,
    location: 'mem://dst',
    canPipe: true,
    fail: (op, off) =>
      op === 'pipe' && off === 2 * MiB ? Object.assign(new Error('no space'), { code: 'ENOSPC' }) : undefined,
  });
  const err = (await convert({ sources: [src], target: dst, bufferSize: MiB }).catch((e: unknown) => e)) as BlockError;
  assert.is(err.code, 'ENOSPC');
  assert.is(err.offset, 2 * MiB);
  assert.is(dst.flushes, 0);
});

test('option validation lists what is valid', async () => {
  const src = await source(MiB, []);
  const dst = new MemoryBackend({ size: MiB });
  for (const [opts, re] of [
    [{ workers: 0 }, /workers must be an integer from 1 to 256/],
    [{ minSparse: 1000 }, /multiple of 512/],
    [{ bufferSize: 7 }, /bufferSize/],
  ] as const) {
    const err = (await convert({ sources: [src], target: dst, ...opts }).catch((e) => e)) as BlockError;
    assert.is(err.code, 'EINVAL');
    assert.match(err.message, re);
  }
});

test.run();
