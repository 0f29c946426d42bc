/**
 * Checkpoints and resume against a target that models a crash: what was written before
 * a flush started survives; of the writes issued after it, any subset may survive too
 * (a volatile cache written back in part). The resumed copy must equal the source
 * whatever survived.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import {
  type SegmentList,
  type BlockError,
  checksumImage,
  compareImages,
  convert,
  forwardBackend,
  MemoryBackend,
  startConvert,
  type BlockBackend,
  type ConvertOptions,
  type ResumeState,
} from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A little PRNG, so that failures can be replayed from the seed in the test name. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 0x1_0000_0000;
  };
}

type Intent = { offset: number; data?: Uint8Array; zeroes?: number };

/** A MemoryBackend target whose unflushed writes may be lost in a crash. */
class CrashableTarget {
  readonly live: MemoryBackend;
  readonly durable: MemoryBackend;
  readonly backend: BlockBackend;
  /** Writes issued since their flush, in issue order; `done` once completed. */
  #pending: Array<Intent & { done: boolean }> = [];

  constructor(size: number, readsZeroes = true) {
    this.live = new MemoryBackend({
      size,
      location: 'mem://target',
      zeroInitialized: readsZeroes,
      latency: (op) => (op === 'flush' ? 2 : op === 'read' ? 0 : 1),
    });
    this.durable = new MemoryBackend({ size });
    const record = async (intent: Intent, op: Promise<void>): Promise<void> => {
      const entry = { ...intent, done: false };
      this.#pending.push(entry);
      await op;
      entry.done = true;
    };
    this.backend = forwardBackend(this.live, {
      write: (offset: number, data: Uint8Array) =>
        record({ offset, data: new Uint8Array(data) }, this.live.write(offset, data)),
      writeSegments: (from: Uint8Array, segments: SegmentList) => {
        const pieces = segments.toArray();
        return Promise.all(
          pieces.map(({ offset, length, position }) => {
            const data = from.subarray(position, position + length);
            return record({ offset, data: new Uint8Array(data) }, this.live.write(offset, data));
          }),
        ).then(() => {});
      },
      writeZeroes: (offset: number, length: number) =>
        record({ offset, zeroes: length }, this.live.writeZeroes(offset, length)),
      discard: (offset: number, length: number) =>
        record({ offset, zeroes: length }, this.live.discard(offset, length)),
      flush: async () => {
        const before = this.#pending.filter((e) => e.done);
        await this.live.flush();
        for (const e of before) await this.#apply(this.durable, e);
        this.#pending = this.#pending.filter((e) => !before.includes(e));
      },
    });
  }

  /** The image after a crash now: the durable part and a random subset of the rest. */
  async crash(random: () => number): Promise<{ image: MemoryBackend; strays: Intent[] }> {
    const image = new MemoryBackend({ size: this.live.size, location: 'mem://target', zeroInitialized: false });
    await image.write(0, await this.durable.read(0, this.durable.size));
    const strays = this.#pending.filter(() => random() < 0.5);
    for (const e of strays) await this.#apply(image, e);
    return { image, strays };
  }

  async #apply(to: MemoryBackend, e: Intent): Promise<void> {
    if (e.data) await to.write(e.offset, e.data);
    else await to.writeZeroes(e.offset, e.zeroes!);
  }
}

/** 48 MiB: data, holes, data that is all zeroes, a short tail. */
async function makeSource(): Promise<MemoryBackend> {
  const size = 48 * MiB + 12 * KiB;
  const m = new MemoryBackend({ size, location: 'mem://src' });
  for (const [off, len] of [
    [0, 5 * MiB],
    [7 * MiB, 9 * MiB + 64 * KiB],
    [20 * MiB, 3 * MiB],
    [30 * MiB, 12 * MiB],
    [47 * MiB, MiB + 12 * KiB],
  ] as const) {
    await m.write(off, pattern(len, off + 7));
  }
  await m.write(24 * MiB, new Uint8Array(2 * MiB)); // allocated zeroes
  return m;
}

async function assertSame(a: BlockBackend, b: BlockBackend, msg?: string): Promise<void> {
  assert.equal(await compareImages(a, b), { identical: true }, msg);
}

const base = (src: BlockBackend, target: BlockBackend, extra: Partial<ConvertOptions> = {}): ConvertOptions => ({
  sources: [src],
  target,
  workers: 4,
  bufferSize: 256 * KiB,
  progressInterval: 0,
  ...extra,
  checkpoint: { everyBytes: 4 * MiB, everySeconds: 0, ...extra.checkpoint },
});

for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
  const outOfOrder = seed % 2 === 0;
  test(`crash at a random instant and resume (seed ${seed}${outOfOrder ? ', -W' : ''}): equal to the source, checksum equal to an uninterrupted one`, async () => {
    const random = rng(seed);
    const src = await makeSource();
    const want = (await checksumImage(src)).checksum;
    const t = new CrashableTarget(src.size);
    let last: ResumeState | undefined;
    let highest = 0;
    const ac = new AbortController();
    const stopAfter = 4 * MiB + random() * 36 * MiB;
    const job = startConvert({ ...base(src, t.backend, { outOfOrder, checksum: true }), signal: ac.signal });
    job.on('checkpoint', (s) => {
      last = s;
    });
    job.on('progress', (p) => {
      highest = Math.max(highest, p.done);
      if (p.done >= stopAfter) ac.abort();
    });
    const err = await job.done.then(
      () => undefined,
      (e: unknown) => e as BlockError,
    );
    assert.ok(err, 'interrupted');
    assert.is(err!.code, 'ECANCELED');
    assert.ok(last, 'a checkpoint was taken');
    const { image, strays } = await t.crash(random);
    // Nothing written past dirtyEnd: beyond it the target reads back zeroes as at the start.
    for (const s of strays)
      assert.ok(
        s.offset < last!.progress.dirtyEnd,
        `stray write at ${s.offset} before dirtyEnd ${last!.progress.dirtyEnd}`,
      );
    const resumed = await convert({ ...base(src, image, { outOfOrder, checksum: true }), resume: last });
    await assertSame(src, image, 'the resumed copy equals the source');
    assert.is(resumed.checksum, want, 'the digest of a resumed copy is that of an uninterrupted one');
    assert.is(resumed.resumedFrom, last!.progress.done);
    // What was copied twice: at most one interval plus what the workers hold.
    assert.ok(last!.progress.dirtyEnd - last!.progress.done <= 4 * MiB + 4 * 256 * KiB);
  });
}

test('stray writes in [done, dirtyEnd) where the source has zeroes are overwritten, though the first run skipped zeroes', async () => {
  const src = await makeSource();
  const t = new CrashableTarget(src.size);
  let last: ResumeState | undefined;
  const ac = new AbortController();
  const job = startConvert({ ...base(src, t.backend), signal: ac.signal });
  job.on('checkpoint', (s) => {
    last = s;
    if (s.progress.done >= 5 * MiB) ac.abort();
  });
  await job.done.catch(() => {});
  assert.ok(last?.progress.targetZero);
  const { image } = await t.crash(() => 1);
  // Garbage where the source reads zeroes, inside the range the first run might have written.
  const junk = last!.progress.done + 64 * KiB;
  await image.write(junk, new Uint8Array(64 * KiB).fill(0xee));
  assert.ok(junk + 64 * KiB <= last!.progress.dirtyEnd);
  await convert({ ...base(src, image), resume: last });
  await assertSame(src, image);
});

test('a finished state resumes to nothing more; an empty run still checkpoints its start', async () => {
  const src = await makeSource();
  const t = new CrashableTarget(src.size);
  const states: ResumeState[] = [];
  await convert({ ...base(src, t.backend, { checksum: true }), onCheckpoint: (s) => states.push(s) });
  assert.ok(states.length >= 2);
  assert.is(states[0]!.progress.done, 0, 'the starting state is saved before anything is written');
  for (let i = 1; i < states.length; i++)
    assert.ok(states[i]!.progress.done >= states[i - 1]!.progress.done, 'done never goes back');
});

test('a checkpoint is saved before the writes it allows: save() is awaited', async () => {
  const src = await makeSource();
  const dst = new MemoryBackend({ size: src.size, record: true });
  let saved = 0;
  let maxWrite = 0;
  const orig = dst.write.bind(dst);
  const target = forwardBackend(dst, {
    write: (o: number, d: Uint8Array) => {
      maxWrite = Math.max(maxWrite, o + d.length);
      assert.ok(o + d.length <= saved, `write to ${o + d.length} beyond the saved dirtyEnd ${saved}`);
      return orig(o, d);
    },
    writeSegments: undefined,
  });
  await convert({
    ...base(src, target),
    checkpoint: {
      everyBytes: 2 * MiB,
      save: async (s) => {
        await new Promise((r) => setTimeout(r, 3));
        saved = s.progress.dirtyEnd;
      },
    },
  });
  await assertSame(src, dst);
  assert.ok(maxWrite > 0);
});

test('a resume is refused when the source changed, the options differ, or the target is another', async () => {
  const src = await makeSource();
  const t = new CrashableTarget(src.size);
  let last: ResumeState | undefined;
  const ac = new AbortController();
  const job = startConvert({ ...base(src, t.backend, { checksum: true }), signal: ac.signal });
  job.on('checkpoint', (s) => {
    last = s;
    if (s.progress.done >= 8 * MiB) ac.abort();
  });
  await job.done.catch(() => {});
  const { image } = await t.crash(() => 0);
  const refused = async (o: ConvertOptions, re: RegExp): Promise<void> => {
    const err = await convert(o).then(
      () => undefined,
      (e: unknown) => e as BlockError,
    );
    assert.ok(err, `refused: ${re}`);
    assert.is(err!.code, 'EINVAL');
    assert.match(err!.message, re);
  };
  const changed = await makeSource();
  await changed.write(100, Uint8Array.of(1, 2, 3));
  await refused(
    { ...base(changed, image, { checksum: true }), resume: last },
    /cannot resume: the first 1048576 bytes of the sources was SHA-256/,
  );
  await refused(
    { ...base(src, image, { checksum: true, minSparse: 0 }), resume: last },
    /cannot resume: option minSparse was 4096, is now 0/,
  );
  await refused(
    { ...base(src, image, { checksum: false, compress: false }), resume: last },
    /option checksum was true, is now false/,
  );
  const other = new MemoryBackend({ size: src.size + MiB, location: 'mem://other' });
  await refused(
    { ...base(src, other, { checksum: true }), resume: last },
    /cannot resume: the target was mem:\/\/target/,
  );
  const wiped = new MemoryBackend({ size: src.size, location: 'mem://target', zeroInitialized: false });
  await refused(
    { ...base(src, wiped, { checksum: true }), resume: last },
    /the target's first 1048576 bytes are not the sources'/,
  );
  await refused(
    { ...base(src, image, { checksum: true }), resume: { ...last!, version: 7 } as unknown as ResumeState },
    /not a resume state of this version/,
  );
  // And the real thing still works after all those refusals.
  await convert({ ...base(src, image, { checksum: true }), resume: last });
  await assertSame(src, image);
});

test('a failing save stops the copy with a clear error; nothing is reported complete', async () => {
  const src = await makeSource();
  const dst = new MemoryBackend({ size: src.size });
  let n = 0;
  const err = await convert({
    ...base(src, dst),
    checkpoint: {
      everyBytes: 2 * MiB,
      save: () => {
        if (++n === 3) throw new Error('disk full');
      },
    },
  }).then(
    () => undefined,
    (e: unknown) => e as BlockError,
  );
  assert.ok(err);
  assert.match(err!.message, /checkpoint: the state could not be saved: disk full/);
});

test('stop(): the chunks in flight finish, a last checkpoint holds all of them, nothing is left to copy twice', async () => {
  const src = await makeSource();
  const t = new CrashableTarget(src.size);
  let last: ResumeState | undefined;
  const job = startConvert({ ...base(src, t.backend, { checksum: true }), checkpoint: { everyBytes: 64 * MiB } });
  job.on('checkpoint', (s) => {
    last = s;
  });
  job.on('progress', (p) => {
    if (p.done >= 10 * MiB) job.stop(new Error('asked to stop'));
  });
  const err = await job.done.then(
    () => undefined,
    (e: unknown) => e as BlockError,
  );
  assert.is(err?.code, 'ECANCELED');
  assert.match(err!.message, /asked to stop/);
  assert.ok(
    last && last.progress.done >= 10 * MiB,
    `the last checkpoint covers what was copied (${last?.progress.done})`,
  );
  // Everything written was flushed before that checkpoint: a crash now loses nothing of it.
  const { image, strays } = await t.crash(() => 1);
  assert.is(strays.length, 0);
  const r = await convert({ ...base(src, image, { checksum: true }), resume: last });
  await assertSame(src, image);
  assert.is(r.checksum, (await checksumImage(src)).checksum);
});

test('a checksummed copy whose end is not on a 64 KiB block finishes (no checkpoint is taken at the end)', async () => {
  // Slow writes, so that the last chunk's completion (the watermark at the odd end) starts a checkpoint.
  const src = new MemoryBackend({ size: 5 * MiB - 100, location: 'mem://odd' });
  await src.write(0, pattern(src.size, 9));
  const dst = new MemoryBackend({
    size: src.size,
    limits: { requestAlignment: 1 },
    latency: (op) => (op === 'write' ? 40 : 0),
  });
  const states: ResumeState[] = [];
  const r = await convert({
    sources: [src],
    target: dst,
    workers: 1,
    bufferSize: MiB,
    checksum: true,
    checkpoint: { everyBytes: MiB },
    onCheckpoint: (s) => states.push(s),
  });
  assert.is(r.checksum, (await checksumImage(src)).checksum);
  assert.ok(states.length >= 3);
  assert.ok(states.every((s) => s.progress.done < src.size));
});

test('concatenated sources resume across the join', async () => {
  const a = new MemoryBackend({ size: 8 * MiB, location: 'mem://a' });
  await a.write(0, pattern(8 * MiB, 3));
  const b = await makeSource();
  const whole = new MemoryBackend({ size: a.size + b.size });
  await whole.write(0, await a.read(0, a.size));
  await whole.write(a.size, await b.read(0, b.size));
  for (const stopAt of [6 * MiB, 12 * MiB, 30 * MiB]) {
    const t = new CrashableTarget(a.size + b.size);
    let last: ResumeState | undefined;
    const ac = new AbortController();
    const job = startConvert({ ...base(a, t.backend, { checksum: true }), sources: [a, b], signal: ac.signal });
    job.on('checkpoint', (s) => {
      last = s;
    });
    job.on('progress', (p) => {
      if (p.done >= stopAt) ac.abort();
    });
    await job.done.catch(() => {});
    const { image } = await t.crash(rng(stopAt));
    const r = await convert({ ...base(a, image, { checksum: true }), sources: [a, b], resume: last });
    await assertSame(whole, image, `stopped at ${stopAt}`);
    assert.is(r.checksum, (await checksumImage(whole)).checksum);
  }
});

test.run();
