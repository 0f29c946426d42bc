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
import { createHash, type Hash } from 'node:crypto';

export const BLKHASH_BLOCK_SIZE = 64 * 1024;
export const BLKHASH_ALGORITHM = 'blkhash-sha256';
export const DIGEST_LENGTH = 32;

let zeroDigest: Buffer | undefined;

/** SHA-256 of a whole block of zeroes. */
export function zeroBlockDigest(): Buffer {
  return (zeroDigest ??= createHash('sha256').update(Buffer.alloc(BLKHASH_BLOCK_SIZE)).digest());
}

/** The outer hash: block digests in order, then the length. */
export class BlockHash {
  readonly #outer: Hash = createHash('sha256');
  #length = 0;
  #finished = false;

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
    for (let done = 0; done < whole;) {
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
    return this.#outer.update(len).digest('hex');
  }

  #check(): void {
    if (this.#finished) throw new Error('blkhash: already finished');
  }
}
