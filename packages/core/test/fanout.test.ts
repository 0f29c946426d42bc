/** Read once, write many: convert({ targets }) and FanoutTarget. */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  BlockError,
  checksumImage,
  compareImages,
  convert,
  MemoryBackend,
  startConvert,
  type ResumeState,
} from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

async function source(size: number): Promise<MemoryBackend> {
  const m = new MemoryBackend({ size, location: 'mem://src', record: true });
  await m.write(0, pattern(3 * MiB, 1));
  await m.write(9 * MiB, pattern(2 * MiB + 64 * KiB, 2));
  m.log.length = 0;
  return m;
}

async function same(a: MemoryBackend, b: MemoryBackend): Promise<boolean> {
  return (await compareImages(a, b)).identical;
}

const readBytes = (m: MemoryBackend): number => m.log.filter((r) => r.op === 'read').reduce((n, r) => n + r.length, 0);

test('every target gets the copy; the source is read once', async () => {
  const src = await source(16 * MiB);
  const targets = [0, 1, 2].map((i) => new MemoryBackend({ size: 16 * MiB, location: `mem://t${i}` }));
  const r = await convert({ sources: [src], targets, checksum: true });
  assert.is(readBytes(src), 3 * MiB + 2 * MiB + 64 * KiB, 'each allocated byte read once');
  for (const t of targets) assert.ok(await same(src, t));
  assert.equal(
    r.targets!.map((t) => t.ok),
    [true, true, true],
  );
  assert.is(r.checksum, (await checksumImage(src)).checksum);
  for (const t of targets) assert.is(t.flushes, 1);
});

test('a target that fails mid-copy fails alone; the others complete', async () => {
  const src = await source(16 * MiB);
  const bad = new MemoryBackend({
    size: 16 * MiB,
    location: 'mem://bad',
    fail: (op, off) =>
      op === 'write' && off >= 9 * MiB
        ? Object.assign(new Error('No space left on device'), { code: 'ENOSPC' })
        : undefined,
  });
  const good = [0, 1].map((i) => new MemoryBackend({ size: 16 * MiB, location: `mem://good${i}` }));
  const r = await convert({ sources: [src], targets: [good[0]!, bad, good[1]!], workers: 4 });
  assert.equal(
    r.targets!.map((t) => t.ok),
    [true, false, true],
  );
  assert.match(r.targets![1]!.error!, /mem:\/\/bad/);
  assert.match(r.targets![1]!.error!, /no space left/i, r.targets![1]!.error);
  assert.match(r.targets![1]!.error!, /9437184|offset/);
  for (const t of good) assert.ok(await same(src, t));
});

test('a target too small or read-only is dropped at the start; the copy goes on', async () => {
  const src = await source(16 * MiB);
  const small = new MemoryBackend({ size: 8 * MiB, location: 'mem://small' });
  const ro = new MemoryBackend({ size: 16 * MiB, location: 'mem://ro', readOnly: true });
  const good = new MemoryBackend({ size: 16 * MiB, location: 'mem://good' });
  const r = await convert({ sources: [src], targets: [small, ro, good] });
  assert.equal(
    r.targets!.map((t) => [t.ok, t.code]),
    [
      [false, 'ERANGE'],
      [false, 'EROFS'],
      [true, undefined],
    ],
  );
  assert.ok(await same(src, good));
  assert.is(small.log.length + ro.log.length, 0);
});

test('when every target fails, the convert fails with the first reason', async () => {
  const src = await source(16 * MiB);
  const fail = (): Error => Object.assign(new Error('Input/output error'), { code: 'EIO' });
  const targets = [0, 1].map(
    (i) =>
      new MemoryBackend({
        size: 16 * MiB,
        location: `mem://t${i}`,
        fail: (op) => (op === 'write' ? fail() : undefined),
      }),
  );
  const err = await convert({ sources: [src], targets }).then(
    () => null,
    (e: unknown) => e,
  );
  assert.ok(err instanceof BlockError);
  assert.match((err as BlockError).message, /every target failed; the first: .*mem:\/\/t/);
  const none = await convert({ sources: [src], targets: [new MemoryBackend({ size: MiB })] }).then(
    () => null,
    (e: unknown) => e as BlockError,
  );
  assert.is(none?.code, 'ERANGE');
});

test('limits are those every target accepts: each receives only requests within its own', async () => {
  const src = await source(16 * MiB);
  const a = new MemoryBackend({
    size: 16 * MiB,
    location: 'mem://a',
    record: true,
    limits: { requestAlignment: 4096, maxTransfer: 512 * KiB },
  });
  const b = new MemoryBackend({
    size: 16 * MiB,
    location: 'mem://b',
    record: true,
    limits: { requestAlignment: 512, maxTransfer: 4 * MiB },
  });
  await convert({ sources: [src], targets: [a, b] });
  for (const t of [a, b]) {
    assert.ok(
      t.log.every((r) => r.op !== 'write' || (r.length <= 512 * KiB && r.offset % 4096 === 0)),
      `${t.location}: within the smallest max transfer`,
    );
    assert.ok(await same(src, t));
  }
});

test('zeroes are skipped only when every target reads back zeroes', async () => {
  const src = await source(16 * MiB);
  const zeroing = new MemoryBackend({ size: 16 * MiB, location: 'mem://z', zeroInitialized: true, record: true });
  const dirty = new MemoryBackend({ size: 16 * MiB, location: 'mem://d', zeroInitialized: false });
  await dirty.write(5 * MiB, pattern(MiB, 9));
  await convert({ sources: [src], targets: [zeroing, dirty] });
  assert.ok(await same(src, dirty), 'the old data of the target that does not read zeroes is zeroed');
  assert.ok(zeroing.log.some((r) => r.op === 'writeZeroes'));
  const z2 = [0, 1].map(
    (i) => new MemoryBackend({ size: 16 * MiB, location: `mem://z${i}`, zeroInitialized: true, record: true }),
  );
  await convert({ sources: [src], targets: z2 });
  assert.ok(
    z2.every((t) => !t.log.some((r) => r.op === 'writeZeroes')),
    'all read zeroes: none written',
  );
});

test('verify reads each target back; one that reads back wrong fails alone', async () => {
  const src = await source(16 * MiB);
  const liar = new MemoryBackend({ size: 16 * MiB, location: 'mem://liar' });
  const realRead = liar.read.bind(liar);
  let copying = true;
  liar.read = async (off, len, into) => {
    const out = await realRead(off, len, into);
    if (!copying && off === 0) out[0] ^= 1;
    return out;
  };
  const good = new MemoryBackend({ size: 16 * MiB, location: 'mem://good' });
  const job = startConvert({ sources: [src], targets: [liar, good], verify: true });
  job.on('progress', (p) => {
    if (p.done === p.total) copying = false;
  });
  setTimeout(() => {
    copying = false;
  }, 0);
  const r = await job.done;
  assert.equal(
    r.targets!.map((t) => t.ok),
    [false, true],
  );
  assert.match(r.targets![0]!.error!, /verify failed/);
  assert.is(r.verified, true);
});

test('checkpoints record a dropped target; the resume leaves it out and completes the others', async () => {
  const src = await source(64 * MiB);
  await src.write(40 * MiB, pattern(8 * MiB, 3));
  let failNow = false;
  const bad = new MemoryBackend({
    size: 64 * MiB,
    location: 'mem://bad',
    fail: (op) => (failNow && op === 'write' ? new Error('gone') : undefined),
  });
  const good = new MemoryBackend({ size: 64 * MiB, location: 'mem://good' });
  const states: ResumeState[] = [];
  const job = startConvert({
    sources: [src],
    targets: [bad, good],
    workers: 2,
    bufferSize: MiB,
    checkpoint: {
      everyBytes: 4 * MiB,
      save: (s) => {
        states.push(s);
      },
    },
  });
  job.on('checkpoint', (s) => {
    if (s.progress.done >= 8 * MiB) failNow = true;
    if (s.failedTargets?.length) job.stop();
  });
  const err = await job.done.then(
    () => null,
    (e: unknown) => e as BlockError,
  );
  assert.is(err?.code, 'ECANCELED');
  const last = states[states.length - 1]!;
  assert.equal(
    last.failedTargets?.map((f) => f.index),
    [0],
  );
  const r = await convert({
    sources: [src],
    targets: [bad, good],
    workers: 2,
    bufferSize: MiB,
    checkpoint: { everyBytes: 4 * MiB },
    resume: last,
  });
  assert.ok(r.resumedFrom! > 0);
  assert.equal(
    r.targets!.map((t) => t.ok),
    [false, true],
  );
  assert.match(r.targets![0]!.error!, /interrupted run/);
  assert.ok(await same(src, good));
});

test('targets and target together are refused; so is -B', async () => {
  const src = await source(16 * MiB);
  const t = new MemoryBackend({ size: 16 * MiB });
  const e1 = await convert({ sources: [src], target: t, targets: [t] }).then(
    () => null,
    (e: unknown) => e as BlockError,
  );
  assert.is(e1?.code, 'EINVAL');
  const e2 = await convert({ sources: [src], targets: [t], diffAgainstBacking: true }).then(
    () => null,
    (e: unknown) => e as BlockError,
  );
  assert.is(e2?.code, 'EINVAL');
});

test.run();
