/**
 * Reads and writes of a backend at any offset and length, honouring its limits: what a format
 * driver needs for metadata and partial-cluster reads from the protocol below it.
 * The core aligns only the requests it makes itself; a driver layered on another
 * backend (e.g. qcow2 on an O_DIRECT file) must respect that backend's limits too,
 * as QEMU does with bounce buffers in bdrv_co_preadv.
 */
import { BlockError } from './errors.js';
import { roundDown, roundUp } from './registry.js';
import type { BlockBackend } from './types.js';

/** One request of a transfer split to a backend's limits. */
interface Piece {
  /** Bytes of the caller's range done before this piece. */
  readonly done: number;
  /** The caller's bytes: [pos, pos + n). */
  readonly pos: number;
  readonly n: number;
  /** The aligned request around them: [start, end). */
  readonly start: number;
  readonly end: number;
  /** Whether the caller's bytes can go to the backend as they are (aligned offset, length and memory). */
  readonly direct: boolean;
}

/**
 * Splits [offset, offset+length) into requests of at most maxTransfer, each either
 * aligned as it stands or widened to the alignment (a bounce), and runs `each` on
 * them in order. `memory` is the caller's buffer, for the memory alignment check.
 */
async function eachPiece(backend: BlockBackend, offset: number, length: number, memory: Uint8Array, each: (p: Piece, alloc: (n: number) => Uint8Array) => Promise<void>): Promise<void> {
  const align = Math.max(1, backend.limits.requestAlignment);
  const memAlign = Math.max(1, backend.limits.minMemAlignment ?? 1);
  const maxChunk = Math.max(align, roundDown(backend.limits.maxTransfer, align));
  const alloc = (n: number): Uint8Array => (backend.allocBuffer && memAlign > 1 ? backend.allocBuffer(n) : new Uint8Array(n));
  for (let done = 0; done < length;) {
    const pos = offset + done;
    const start = roundDown(pos, align);
    // Never more than one maxTransfer per request, counting the rounding at the start.
    const n = Math.min(length - done, start + maxChunk - pos);
    const end = Math.min(roundUp(pos + n, align), backend.size);
    const direct = start === pos && end === pos + n && (memory.byteOffset + done) % memAlign === 0;
    await each({ done, pos, n, start, end, direct }, alloc);
    done += n;
  }
}

/**
 * Reads `length` bytes at `offset` of `backend` into `into` (or a new buffer) and
 * returns the filled view. Requests are split at the backend's maxTransfer; parts
 * that are not aligned to its requestAlignment, or whose memory does not start on a
 * minMemAlignment boundary (as far as the view's byteOffset tells), go through an
 * aligned bounce buffer. The range must lie inside the backend.
 */
export async function readAligned(backend: BlockBackend, offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > backend.size) {
    throw new BlockError('ERANGE', `read beyond the end (size ${backend.size})`, { op: 'read', location: backend.location, offset, length });
  }
  if (into && into.length < length) {
    throw new BlockError('EINVAL', `buffer of ${into.length} bytes cannot hold ${length}`, { op: 'read', location: backend.location, offset, length });
  }
  const out = into ? into.subarray(0, length) : new Uint8Array(length);
  await eachPiece(backend, offset, length, out, async ({ done, pos, n, start, end, direct }, alloc) => {
    const dest = out.subarray(done, done + n);
    if (direct) {
      const got = await backend.read(pos, n, dest);
      if (got.buffer !== dest.buffer || got.byteOffset !== dest.byteOffset) dest.set(got.subarray(0, n));
    } else {
      const bounce = await backend.read(start, end - start, alloc(end - start));
      dest.set(bounce.subarray(pos - start, pos - start + n));
    }
  });
  return out;
}

/**
 * Writes `data` at `offset` of `backend`, honouring its limits: the counterpart of
 * readAligned for a format driver's metadata (headers, table entries) on a backend
 * that needs aligned requests. Unaligned edges are read, patched and written back,
 * so the caller must not write the same aligned block concurrently.
 */
export async function writeAligned(backend: BlockBackend, offset: number, data: Uint8Array): Promise<void> {
  const length = data.length;
  if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > backend.size) {
    throw new BlockError('ERANGE', `write beyond the end (size ${backend.size})`, { op: 'write', location: backend.location, offset, length });
  }
  await eachPiece(backend, offset, length, data, async ({ done, pos, n, start, end, direct }, alloc) => {
    const src = data.subarray(done, done + n);
    if (direct) {
      await backend.write(pos, src);
    } else {
      const bounce = await readAligned(backend, start, end - start, alloc(end - start));
      bounce.set(src, pos - start);
      await backend.write(start, bounce);
    }
  });
}
