/**
 * Content comparison of two images of any formats (qemu-img compare): ranges both
 * sides report as zero are equal without reading; the rest is read in parallel. When
 * sizes differ, the larger image's extra range must read as zeroes (unless strict).
 */
import { gateBackend } from './gate.js';
import { cancelled, toBlockError } from './errors.js';
import { chainStatus } from './status.js';
import type { BlockBackend, GatedBackend } from './types.js';

export interface CompareOptions {
  readonly workers?: number;
  readonly bufferSize?: number;
  /** Images of different sizes are different (qemu-img compare -s). */
  readonly strict?: boolean;
  readonly signal?: AbortSignal;
}

export type CompareResult =
  | { readonly identical: true }
  | { readonly identical: false; readonly offset: number; readonly reason: 'content' | 'size' };

export async function compareImages(
  first: BlockBackend,
  second: BlockBackend,
  options: CompareOptions = {},
): Promise<CompareResult> {
  const a = gateBackend(first);
  const b = gateBackend(second);
  if (a.size !== b.size && options.strict)
    return { identical: false, offset: Math.min(a.size, b.size), reason: 'size' };
  const end = Math.max(a.size, b.size);
  const align = Math.max(a.limits.requestAlignment, b.limits.requestAlignment);
  const bufferSize = Math.max(
    align,
    Math.floor(Math.min(options.bufferSize ?? 1 << 20, a.limits.maxTransfer, b.limits.maxTransfer) / align) * align,
  );
  const workers = Math.max(1, Math.min(options.workers ?? 8, Math.ceil(end / bufferSize) || 1));

  let pos = 0;
  let extentEnd = 0;
  let bothZero = false;
  let pending: Promise<void> | null = null;
  let mismatch = Infinity;
  let failure: unknown;

  /** Status of one side at pos: zero-or-beyond-end, and how far it holds. */
  const sideStatus = async (img: GatedBackend, at: number): Promise<{ zero: boolean; length: number }> => {
    if (at >= img.size) return { zero: true, length: end - at };
    const ext = img.canBlockStatus
      ? await chainStatus(img, at, img.size - at)
      : { kind: 'data', length: img.size - at };
    return { zero: ext.kind === 'zero', length: ext.length };
  };
  const next = async (): Promise<{ offset: number; length: number } | null> => {
    for (;;) {
      if (pending) {
        await pending;
        continue;
      }
      if (pos >= end || pos >= mismatch || failure !== undefined) return null;
      if (pos < extentEnd) {
        const offset = pos;
        const stop = bothZero ? extentEnd : Math.min(extentEnd, pos + bufferSize);
        pos = stop;
        if (bothZero) continue;
        return { offset, length: stop - offset };
      }
      pending = (async () => {
        const [sa, sb] = await Promise.all([sideStatus(a, pos), sideStatus(b, pos)]);
        let len = Math.min(sa.length, sb.length, end - pos);
        let zero = sa.zero && sb.zero;
        // Keep chunks aligned for both sides, except at an image end; a block that
        // straddles two extents is read.
        const e = pos + len;
        if (e < end && e % align !== 0) {
          const down = e - (e % align) - pos;
          if (down > 0) len = down;
          else {
            len = Math.min(align, end - pos);
            zero = false;
          }
        }
        bothZero = zero;
        extentEnd = pos + len;
      })().finally(() => {
        pending = null;
      });
    }
  };

  const readSide = async (img: BlockBackend, offset: number, length: number, buf: Buffer): Promise<Buffer> => {
    const view = buf.subarray(0, length);
    if (offset >= img.size) return view.fill(0);
    const n = Math.min(length, img.size - offset);
    const got = await img.read(offset, n, view);
    if (got.buffer !== view.buffer || got.byteOffset !== view.byteOffset) view.set(got.subarray(0, n));
    if (n < length) view.fill(0, n);
    return view;
  };

  const alloc = (img: BlockBackend): Buffer => {
    const u = img.allocBuffer ? img.allocBuffer(bufferSize) : new Uint8Array(bufferSize);
    return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
  };

  const worker = async (): Promise<void> => {
    const bufA = alloc(a);
    const bufB = alloc(b);
    let chunk: { offset: number; length: number } | null = null;
    try {
      while ((chunk = await next())) {
        if (options.signal?.aborted) throw cancelled(options.signal.reason);
        const [va, vb] = await Promise.all([
          readSide(a, chunk.offset, chunk.length, bufA),
          readSide(b, chunk.offset, chunk.length, bufB),
        ]);
        if (!va.equals(vb)) {
          let i = 0;
          while (va[i] === vb[i]) i++;
          mismatch = Math.min(mismatch, chunk.offset + i);
        }
      }
    } catch (err) {
      failure ??= toBlockError(
        err,
        chunk ? { op: 'compare', offset: chunk.offset, length: chunk.length } : { op: 'compare' },
      );
    }
  };

  await Promise.all(Array.from({ length: workers }, worker));
  if (failure !== undefined) throw failure;
  if (mismatch !== Infinity) {
    const reason = mismatch >= Math.min(a.size, b.size) ? 'size' : 'content';
    return { identical: false, offset: mismatch, reason };
  }
  return { identical: true };
}
