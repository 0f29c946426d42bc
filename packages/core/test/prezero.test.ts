// Fast zero (WriteZeroesFlags.fast, canFastZero): the gate's refusals, and convert's
// pre-zeroing of a target that can zero fast (qemu-img's BDRV_REQ_NO_FALLBACK).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { compareImages, convert, gateBackend, MemoryBackend } from '../src/index.js';
import { pattern } from '../src/testkit/index.js';

const MiB = 1024 * 1024;

/** A memory backend that declares fast zeroing (zeroing memory is as fast as it gets). */
class FastZeroMemory extends MemoryBackend {
  readonly canFastZero = true;
}

async function code(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    return (err as { code?: string }).code;
  }
}

test('the gate refuses a fast zero to a backend without canFastZero, and an unaligned one', async () => {
  const slow = gateBackend(new MemoryBackend({ size: MiB, record: true }));
  assert.is(await code(slow.writeZeroes(0, 65536, { fast: true })), 'ENOTSUP');
  const inner = new FastZeroMemory({ size: MiB, limits: { requestAlignment: 4096 }, record: true });
  const fast = gateBackend(inner);
  assert.is(
    await code(fast.writeZeroes(100, 8192, { fast: true })),
    'ENOTSUP',
    'unaligned: it would need a read-modify-write',
  );
  assert.is(inner.log.length, 0, 'nothing reached the backend');
  assert.is(await code(fast.writeZeroes(0, 8192, { fast: true })), undefined);
});

async function sourceAndDirtyTarget(Target: typeof MemoryBackend): Promise<{ src: MemoryBackend; dst: MemoryBackend }> {
  const src = new MemoryBackend({ size: 16 * MiB, location: 'mem://src' });
  await src.write(2 * MiB, pattern(MiB, 1));
  const dst = new Target({
    size: 16 * MiB,
    location: 'mem://dst',
    canZero: true,
    zeroInitialized: false,
    record: true,
  });
  await dst.write(8 * MiB, pattern(MiB, 2)); // old data where the source reads zeroes
  dst.log.length = 0;
  return { src, dst };
}

test('convert zeroes a fast-zero target whole first, then writes only the data', async () => {
  const { src, dst } = await sourceAndDirtyTarget(FastZeroMemory);
  const r = await convert({ sources: [gateBackend(src)], target: gateBackend(dst), workers: 4 });
  assert.is(r.preZeroed, true);
  assert.equal((await compareImages(src, dst)).identical, true);
  const zeroes = dst.log.filter((e) => e.op === 'writeZeroes');
  assert.equal(
    zeroes.map((e) => [e.offset, e.length]),
    [[0, 16 * MiB]],
    'one fast zero of the whole target',
  );
  assert.ok(
    dst.log.filter((e) => e.op === 'write').every((e) => e.offset >= 2 * MiB && e.offset < 3 * MiB),
    'then only the data',
  );
});

test('no pre-zeroing without canFastZero, with -S 0 (fully allocated), or with a target known to read zeroes', async () => {
  for (const [Target, extra, why] of [
    [MemoryBackend, {}, 'no canFastZero'],
    [FastZeroMemory, { minSparse: 0 }, '-S 0'],
    [FastZeroMemory, { targetIsZero: true }, '--target-is-zero'],
  ] as const) {
    const { src, dst } = await sourceAndDirtyTarget(Target);
    if ('targetIsZero' in extra) await dst.writeZeroes(0, 16 * MiB);
    dst.log.length = 0;
    const r = await convert({ sources: [gateBackend(src)], target: gateBackend(dst), workers: 4, ...extra });
    assert.is(r.preZeroed, undefined, why);
    assert.equal((await compareImages(src, dst)).identical, true, why);
    assert.ok(!dst.log.some((e) => e.op === 'writeZeroes' && e.length === 16 * MiB), `${why}: no whole-target zero`);
  }
});

test.run();
