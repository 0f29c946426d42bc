/**
 * The blkhash construction (nirs/blkhash, the `blksum` tool), so that digests can be
 * compared with theirs: the message is cut into 64 KiB blocks (the last may be short);
 * the digest is
 *
 *     SHA-256( SHA-256(block 1) || ... || SHA-256(block N) || le64(message length) )
 *
 * A block of zeroes always has the same digest, computed once: holes and zero extents
 * are hashed without being read. This class only takes the block digests, in order;
 * who computes them (worker threads, see pool.ts) is the caller's choice.
 */
import { createHash } from 'node:crypto';
import type { IHasher } from 'hash-wasm';

export const BLKHASH_BLOCK_SIZE = 64 * 1024;
export const BLKHASH_ALGORITHM = 'blkhash-sha256';
export const DIGEST_LENGTH = 32;

let zeroDigest: Buffer | undefined;

/** SHA-256 of a whole block of zeroes. */
export function zeroBlockDigest(): Buffer {
  return (zeroDigest ??= createHash('sha256').update(Buffer.alloc(BLKHASH_BLOCK_SIZE)).digest());
}

/**
 * Where a hash stopped, so that a resumed convert can go on with it: the outer
 * SHA-256's internal state and the bytes hashed. JSON-safe.
 */
export interface BlockHashState {
  readonly algorithm: typeof BLKHASH_ALGORITHM;
  /** Bytes hashed; a multiple of the block size. */
  readonly length: number;
  /** The outer SHA-256 state (hash-wasm's save()), base64. */
  readonly outer: string;
}

let createOuter: (() => Promise<IHasher>) | undefined;

/**
 * The outer hash: block digests in order, then the length. The outer SHA-256 is
 * hash-wasm's because its state can be saved and loaded (node:crypto's cannot), which a
 * resumed convert needs; it hashes 32 bytes per 64 KiB block, so its speed hardly counts.
 * Loaded on first use: runs without a checksum do not pay for it.
 */
export class BlockHash {
  readonly #outer: IHasher;
  #length = 0;
  #finished = false;

  private constructor(outer: IHasher, length: number) {
    this.#outer = outer;
    this.#length = length;
  }

  /** A new hash, or one that goes on from a saved state. */
  static async create(from?: BlockHashState): Promise<BlockHash> {
    createOuter ??= (await import('hash-wasm')).createSHA256;
    const outer = await createOuter();
    outer.init();
    if (!from) return new BlockHash(outer, 0);
    if (
      from.algorithm !== BLKHASH_ALGORITHM ||
      !Number.isSafeInteger(from.length) ||
      from.length < 0 ||
      from.length % BLKHASH_BLOCK_SIZE !== 0
    ) {
      throw new Error(`blkhash: not a saved ${BLKHASH_ALGORITHM} state at a block boundary`);
    }
    try {
      outer.load(Buffer.from(from.outer, 'base64'));
    } catch (err) {
      throw new Error(`blkhash: the saved hash state cannot be loaded (${(err as Error).message})`);
    }
    return new BlockHash(outer, from.length);
  }

  /** The state now, to go on from later (only on a block boundary). */
  save(): BlockHashState {
    this.#check();
    if (this.#length % BLKHASH_BLOCK_SIZE !== 0) throw new Error('blkhash: a state is saved on block boundaries only');
    return {
      algorithm: BLKHASH_ALGORITHM,
      length: this.#length,
      outer: Buffer.from(this.#outer.save()).toString('base64'),
    };
  }

  /** Bytes hashed so far. */
  get length(): number {
    return this.#length;
  }

  /** Adds the digests of `count` consecutive blocks covering `bytes` bytes (32 bytes a digest). */
  addDigests(digests: Uint8Array, count: number, bytes: number): void {
    this.#check();
    this.#outer.update(digests.subarray(0, count * DIGEST_LENGTH));
    this.#length += bytes;
  }

  /**
   * Adds `length` bytes of zeroes, starting on a block boundary: whole blocks by the
   * precomputed digest, a short last block by its own (only at the message's end).
   */
  addZeroes(length: number): void {
    this.#check();
    if (this.#length % BLKHASH_BLOCK_SIZE !== 0) throw new Error('blkhash: zeroes must start on a block boundary');
    const whole = Math.floor(length / BLKHASH_BLOCK_SIZE);
    const zero = zeroBlockDigest();
    // In batches, so a 1 TiB hole is a few thousand updates, not 16 million.
    const batch = Buffer.alloc(Math.min(whole, 4096) * DIGEST_LENGTH);
    for (let i = 0; i < batch.length; i += DIGEST_LENGTH) zero.copy(batch, i);
    for (let done = 0; done < whole; ) {
      const n = Math.min(whole - done, 4096);
      this.#outer.update(batch.subarray(0, n * DIGEST_LENGTH));
      done += n;
    }
    const rest = length - whole * BLKHASH_BLOCK_SIZE;
    if (rest > 0) this.#outer.update(createHash('sha256').update(Buffer.alloc(rest)).digest());
    this.#length += length;
  }

  /** The digest, hex; the hash takes nothing more afterwards. */
  hexdigest(): string {
    this.#check();
    this.#finished = true;
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(this.#length));
    this.#outer.update(len);
    return this.#outer.digest('hex');
  }

  #check(): void {
    if (this.#finished) throw new Error('blkhash: already finished');
  }
}
