/**
 * The checksum of an image's guest-visible content (blkhash, see blkhash.ts): block
 * status tells which ranges read as zeroes, and those are hashed without being read, so
 * a 1 TiB image with 1 GiB of data costs about what its data does. Data is read in
 * chunks, several in flight, and hashed by the worker pool on every core; digests join
 * the outer hash in order. Memory: `inFlight` buffers of `bufferSize`.
 */
import { BlockError, cancelled, toBlockError } from '../errors.js';
import { gateBackend } from '../gate.js';
import { chainStatus } from '../status.js';
import type { BlockBackend, Extent } from '../types.js';
import { BLKHASH_ALGORITHM, BLKHASH_BLOCK_SIZE, BlockHash } from './blkhash.js';
import { HashPool } from './pool.js';

export { BLKHASH_ALGORITHM, BLKHASH_BLOCK_SIZE, BlockHash, zeroBlockDigest, type BlockHashState } from './blkhash.js';
export { HashPool } from './pool.js';

export interface ChecksumOptions {
  /** Bytes per read (a multiple of 64 KiB). Default 4 MiB. */
  readonly bufferSize?: number;
  /** Reads in flight. Default 4 (two per hashing thread on two cores keeps both busy). */
  readonly inFlight?: number;
  /** Hashing threads. Default: one per core. */
  readonly threads?: number;
  /**
   * Threads to hash on, kept open by their owner for many checksums (a worker thread
   * costs tens of milliseconds to start); `threads` is then ignored. Default: a pool
   * made for this call and closed at its end.
   */
  readonly pool?: HashPool;
  readonly signal?: AbortSignal;
  /** Called with the bytes hashed so far, at most every `progressInterval` ms. */
  readonly onProgress?: (done: number, total: number) => void;
  readonly progressInterval?: number;
  /** Hash only the first `length` bytes (a target larger than what was copied to it). Default: all. */
  readonly length?: number;
}

export interface ChecksumResult {
  readonly algorithm: typeof BLKHASH_ALGORITHM;
  readonly blockSize: number;
  readonly checksum: string;
  readonly size: number;
  /** Bytes read and hashed; the rest was zero by block status. */
  readonly bytesRead: number;
  readonly elapsedMs: number;
}

/** One piece of the image in order: zeroes (known), or data being read and hashed. */
type Piece = { zero: number } | { data: Promise<{ buffer: ArrayBuffer; digests: Uint8Array; length: number }> };

export async function checksumImage(image: BlockBackend, options: ChecksumOptions = {}): Promise<ChecksumResult> {
  const started = performance.now();
  const b = gateBackend(image);
  const B = BLKHASH_BLOCK_SIZE;
  const bufferSize = options.bufferSize ?? 4 << 20;
  if (!Number.isSafeInteger(bufferSize) || bufferSize < B || bufferSize % B !== 0 || bufferSize > 1 << 30) {
    throw new BlockError(
      'EINVAL',
      `checksum buffer size must be a multiple of ${B} bytes up to 1 GiB, got ${bufferSize}`,
    );
  }
  const inFlight = Math.max(1, options.inFlight ?? 4);
  const size = options.length ?? b.size;
  if (!Number.isSafeInteger(size) || size < 0 || size > b.size)
    throw new BlockError('EINVAL', `checksum length ${size} is outside the image (size ${b.size})`);
  const hash = await BlockHash.create();
  const pool = options.pool ?? new HashPool(options.threads);
  const free: ArrayBuffer[] = [];
  const queue: Piece[] = [];
  let reading = 0;
  let bytesRead = 0;
  let lastProgress = 0;
  const interval = options.progressInterval ?? 200;

  /** Feeds the oldest piece into the outer hash. */
  const consume = async (): Promise<void> => {
    const piece = queue.shift()!;
    if ('zero' in piece) {
      hash.addZeroes(piece.zero);
    } else {
      const { buffer, digests, length } = await piece.data;
      reading--;
      hash.addDigests(digests, Math.ceil(length / B), length);
      free.push(buffer);
    }
    const now = performance.now();
    if (options.onProgress && now - lastProgress >= interval) {
      lastProgress = now;
      options.onProgress(hash.length, size);
    }
  };

  const readAndHash = async (
    pos: number,
    length: number,
  ): Promise<{ buffer: ArrayBuffer; digests: Uint8Array; length: number }> => {
    const buffer = free.pop() ?? new ArrayBuffer(bufferSize);
    try {
      await b.read(pos, length, new Uint8Array(buffer, 0, length));
    } catch (err) {
      throw toBlockError(err, { op: 'read', location: b.location, offset: pos, length });
    }
    const r = await pool.hash(buffer, length);
    return { ...r, length };
  };

  try {
    for (let pos = 0; pos < size; ) {
      if (options.signal?.aborted) throw cancelled(options.signal.reason);
      let ext: Extent;
      try {
        ext = await chainStatus(b, pos, size - pos);
      } catch (err) {
        throw toBlockError(err, { op: 'blockStatus', location: b.location, offset: pos });
      }
      const extEnd = Math.min(size, pos + ext.length);
      // Zeroes only in whole blocks (or up to the end); a block that is partly data is read.
      const zeroEnd = extEnd === size ? size : extEnd - (extEnd % B);
      let piece: Piece;
      let end: number;
      if (ext.kind === 'zero' && zeroEnd > pos) {
        end = zeroEnd;
        piece = { zero: end - pos };
      } else {
        end = Math.min(size, pos + bufferSize, Math.ceil(extEnd / B) * B);
        const p = readAndHash(pos, end - pos);
        p.catch(() => {}); // awaited in order by consume(); an early failure must not be unhandled
        piece = { data: p };
        reading++;
        bytesRead += end - pos;
      }
      queue.push(piece);
      while (reading >= inFlight || (queue.length > 0 && 'zero' in queue[0]!)) await consume();
      pos = end;
    }
    while (queue.length) await consume();
    const checksum = hash.hexdigest();
    options.onProgress?.(size, size);
    return {
      algorithm: BLKHASH_ALGORITHM,
      blockSize: B,
      checksum,
      size,
      bytesRead,
      elapsedMs: performance.now() - started,
    };
  } finally {
    // Pieces still in flight (after an error) settle before the pool goes.
    await Promise.allSettled(queue.map((p) => ('data' in p ? p.data : undefined)));
    if (!options.pool) await pool.close();
  }
}
