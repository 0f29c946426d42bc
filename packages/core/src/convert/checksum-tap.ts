/**
 * convert --checksum: the blkhash digest of what is copied, from the data as it passes
 * (no second read). Workers hand each chunk over in whatever order they finish: data is
 * copied into one of the tap's own buffers and hashed on the worker pool, zero chunks
 * are known zeroes; the digests join the outer hash in chunk order. Chunks start on
 * 64 KiB block boundaries (the plan aligns them so), so no block spans two chunks.
 * Memory: at most `maxPending` copies in flight, each one chunk's buffer.
 *
 * With checkpoints the hash takes a chunk only once its writes have completed
 * (`written`), so that the hash never runs ahead of the watermark and `stateAt` can
 * give the state at exactly a checkpoint's offset.
 */
import { BlockHash, BLKHASH_BLOCK_SIZE, type BlockHashState } from '../checksum/blkhash.js';
import { HashPool } from '../checksum/pool.js';

type Entry = { zero: number } | { digests: Promise<{ buffer: ArrayBuffer; digests: Uint8Array }>; length: number };

export class ChecksumTap {
  readonly #hash: BlockHash;
  readonly #pool = new HashPool();
  readonly #entries = new Map<number, Entry>();
  readonly #free: ArrayBuffer[] = [];
  readonly #bufferSize: number;
  readonly #maxPending: number;
  #next = 0;
  /** Chunks the hash has taken. */
  #fed = 0;
  /** Chunks below this have been written (Infinity: no checkpoints, no waiting). */
  #written: number;
  /** stateAt() calls waiting for the hash to reach their chunk. */
  readonly #stateWaiters = new Map<
    number,
    Array<{ resolve: (s: BlockHashState) => void; reject: (e: unknown) => void }>
  >();
  #pending = 0;
  #draining: Promise<void> = Promise.resolve();
  #failure: unknown;
  /** Workers waiting for a free copy buffer. */
  #waiters: Array<() => void> = [];

  private constructor(hash: BlockHash, bufferSize: number, maxPending: number, gated: boolean) {
    this.#hash = hash;
    this.#bufferSize = bufferSize;
    this.#maxPending = Math.max(2, maxPending);
    this.#written = gated ? 0 : Infinity;
  }

  /**
   * A tap, going on from a saved hash state when resuming. `gated`: chunks join the
   * hash only once written (checkpoints need it).
   */
  static async create(
    bufferSize: number,
    maxPending: number,
    options: { from?: BlockHashState; gated?: boolean } = {},
  ): Promise<ChecksumTap> {
    return new ChecksumTap(await BlockHash.create(options.from), bufferSize, maxPending, options.gated === true);
  }

  /** Chunks below `seq` have been written: the hash may take them. */
  written(seq: number): void {
    if (seq <= this.#written) return;
    this.#written = seq;
    this.#drain();
  }

  /** The hash state once it has taken every chunk before `seq` (which must not be passed yet). */
  stateAt(seq: number): Promise<BlockHashState> {
    if (seq < this.#fed) return Promise.reject(new Error(`checksum: the hash is past chunk ${seq}`));
    if (seq === this.#fed) {
      try {
        return Promise.resolve(this.#hash.save());
      } catch (err) {
        return Promise.reject(err);
      }
    }
    if (this.#failure !== undefined) return Promise.reject(this.#failure);
    return new Promise((resolve, reject) => {
      const list = this.#stateWaiters.get(seq);
      if (list) list.push({ resolve, reject });
      else this.#stateWaiters.set(seq, [{ resolve, reject }]);
    });
  }

  /** Takes chunk `seq`'s data (copied: the caller reuses its buffer at once). */
  async data(seq: number, bytes: Uint8Array): Promise<void> {
    this.#throwIfFailed();
    // The chunk the hash needs next never waits: the others wait for it to drain.
    while (this.#pending >= this.#maxPending && seq !== this.#next)
      await new Promise<void>((r) => this.#waiters.push(r));
    this.#pending++;
    const buffer = this.#free.pop() ?? new ArrayBuffer(this.#bufferSize);
    new Uint8Array(buffer, 0, bytes.length).set(bytes);
    const digests = this.#pool.hash(buffer, bytes.length);
    digests.catch((err: unknown) => {
      this.#failure ??= err;
    });
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
    this.#rejectWaiters(new Error('checksum: closed'));
    await this.#pool.close();
  }

  /** Feeds the chunks that are next in order, one drain at a time. */
  #drain(): void {
    this.#draining = this.#draining.then(async () => {
      for (let e = this.#entries.get(this.#next); e && this.#next < this.#written; e = this.#entries.get(this.#next)) {
        this.#entries.delete(this.#next);
        this.#next++;
        if ('zero' in e) {
          this.#hash.addZeroes(e.zero);
        } else {
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
        this.#fed++;
        const waiting = this.#stateWaiters.get(this.#fed);
        if (waiting && this.#failure === undefined) {
          this.#stateWaiters.delete(this.#fed);
          try {
            const state = this.#hash.save();
            for (const w of waiting) w.resolve(state);
          } catch (err) {
            for (const w of waiting) w.reject(err);
          }
        }
      }
      if (this.#failure !== undefined) this.#rejectWaiters(this.#failure);
      // Everyone looks again: the one holding the new next chunk may go.
      const waiters = this.#waiters;
      this.#waiters = [];
      for (const w of waiters) w();
    });
  }

  #rejectWaiters(err: unknown): void {
    for (const list of this.#stateWaiters.values()) for (const w of list) w.reject(err);
    this.#stateWaiters.clear();
  }

  #throwIfFailed(): void {
    if (this.#failure !== undefined) throw this.#failure;
  }
}
