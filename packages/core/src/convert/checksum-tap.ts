/**
 * convert --checksum: the blkhash digest of what is copied, from the data as it passes
 * (no second read). Workers hand each chunk over in whatever order they finish: data is
 * copied into one of the tap's own buffers and hashed on the worker pool, zero chunks
 * are known zeroes; the digests join the outer hash in chunk order. Chunks start on
 * 64 KiB block boundaries (the plan aligns them so), so no block spans two chunks.
 * Memory: at most `maxPending` copies in flight, each one chunk's buffer.
 */
import { BlockHash, BLKHASH_BLOCK_SIZE } from '../checksum/blkhash.js';
import { HashPool } from '../checksum/pool.js';

type Entry = { zero: number } | { digests: Promise<{ buffer: ArrayBuffer; digests: Uint8Array }>; length: number };

export class ChecksumTap {
  readonly #hash = new BlockHash();
  readonly #pool = new HashPool();
  readonly #entries = new Map<number, Entry>();
  readonly #free: ArrayBuffer[] = [];
  readonly #bufferSize: number;
  readonly #maxPending: number;
  #next = 0;
  #pending = 0;
  #draining: Promise<void> = Promise.resolve();
  #failure: unknown;
  /** Workers waiting for a free copy buffer. */
  #waiters: Array<() => void> = [];

  constructor(bufferSize: number, maxPending: number) {
    this.#bufferSize = bufferSize;
    this.#maxPending = Math.max(2, maxPending);
  }

  /** Takes chunk `seq`'s data (copied: the caller reuses its buffer at once). */
  async data(seq: number, bytes: Uint8Array): Promise<void> {
    this.#throwIfFailed();
    // The chunk the hash needs next never waits: the others wait for it to drain.
    while (this.#pending >= this.#maxPending && seq !== this.#next) await new Promise<void>((r) => this.#waiters.push(r));
    this.#pending++;
    const buffer = this.#free.pop() ?? new ArrayBuffer(this.#bufferSize);
    new Uint8Array(buffer, 0, bytes.length).set(bytes);
    const digests = this.#pool.hash(buffer, bytes.length);
    digests.catch((err: unknown) => { this.#failure ??= err; });
    this.#entries.set(seq, { digests, length: bytes.length });
    this.#drain();
  }

  /** Chunk `seq` is `length` bytes of zeroes. */
  zero(seq: number, length: number): void {
    this.#entries.set(seq, { zero: length });
    this.#drain();
  }

  /** The digest, once every chunk up to the end has been handed over. */
  async hexdigest(): Promise<string> {
    await this.#draining;
    this.#throwIfFailed();
    if (this.#entries.size) throw new Error(`checksum: chunk ${this.#next} never arrived`);
    return this.#hash.hexdigest();
  }

  async close(): Promise<void> {
    await this.#draining.catch(() => {});
    await this.#pool.close();
  }

  /** Feeds the chunks that are next in order, one drain at a time. */
  #drain(): void {
    this.#draining = this.#draining.then(async () => {
      for (let e = this.#entries.get(this.#next); e; e = this.#entries.get(this.#next)) {
        this.#entries.delete(this.#next);
        this.#next++;
        if ('zero' in e) {
          this.#hash.addZeroes(e.zero);
          continue;
        }
        try {
          const { buffer, digests } = await e.digests;
          this.#hash.addDigests(digests, Math.ceil(e.length / BLKHASH_BLOCK_SIZE), e.length);
          this.#free.push(buffer);
        } catch (err) {
          this.#failure ??= err;
        } finally {
          this.#pending--;
        }
      }
      // Everyone looks again: the one holding the new next chunk may go.
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const w of waiters) w();
    });
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure;
  }
}
