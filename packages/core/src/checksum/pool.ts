/**
 * Block digests off the main thread: a pool of worker threads, one per core, each
 * hashing whole buffers of blocks. Buffers are transferred to the worker and back, not
 * copied; an all-zero block takes the precomputed digest (Buffer.equals is a memcmp).
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { BLKHASH_BLOCK_SIZE, DIGEST_LENGTH } from './blkhash.js';

// The worker, as source: the core is bundled, so a separate worker file would not be found.
const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
const B = ${BLKHASH_BLOCK_SIZE};
const ZERO = Buffer.alloc(B);
const ZERO_DIGEST = createHash('sha256').update(ZERO).digest();
parentPort.on('message', ({ id, buffer, length }) => {
  const data = Buffer.from(buffer, 0, length);
  const count = Math.ceil(length / B);
  const digests = Buffer.allocUnsafeSlow(count * ${DIGEST_LENGTH});
  for (let i = 0; i < count; i++) {
    const block = data.subarray(i * B, Math.min(length, (i + 1) * B));
    if (block.length === B && block.equals(ZERO)) ZERO_DIGEST.copy(digests, i * ${DIGEST_LENGTH});
    else createHash('sha256').update(block).digest().copy(digests, i * ${DIGEST_LENGTH});
  }
  parentPort.postMessage({ id, buffer, digests: digests.buffer }, [buffer, digests.buffer]);
});
`;

interface Pending {
  resolve: (r: { buffer: ArrayBuffer; digests: Uint8Array }) => void;
  reject: (err: unknown) => void;
}

export class HashPool {
  readonly #workers: Worker[] = [];
  readonly #idle: Worker[] = [];
  readonly #queue: Array<() => void> = [];
  readonly #pending = new Map<number, Pending>();
  #nextId = 0;
  #failed: unknown;

  constructor(threads = availableParallelism()) {
    for (let i = 0; i < Math.max(1, threads); i++) {
      const w = new Worker(WORKER_SOURCE, { eval: true });
      w.on('message', (m: { id: number; buffer: ArrayBuffer; digests: ArrayBuffer }) => {
        const p = this.#pending.get(m.id);
        this.#pending.delete(m.id);
        this.#release(w);
        p?.resolve({ buffer: m.buffer, digests: new Uint8Array(m.digests) });
      });
      w.on('error', (err) => this.#fail(err));
      this.#workers.push(w);
      this.#idle.push(w);
    }
  }

  get threads(): number {
    return this.#workers.length;
  }

  /**
   * Hashes the first `length` bytes of `buffer` (whole blocks, a short one at the end),
   * which is transferred (unusable here) until the promise gives it back.
   */
  hash(buffer: ArrayBuffer, length: number): Promise<{ buffer: ArrayBuffer; digests: Uint8Array }> {
    if (this.#failed) return Promise.reject(this.#failed);
    return new Promise((resolve, reject) => {
      const run = (w: Worker): void => {
        const id = this.#nextId++;
        this.#pending.set(id, { resolve, reject });
        w.postMessage({ id, buffer, length }, [buffer]);
      };
      const w = this.#idle.pop();
      if (w) run(w);
      else this.#queue.push(() => run(this.#idle.pop()!));
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.#workers.map((w) => w.terminate()));
  }

  #release(w: Worker): void {
    this.#idle.push(w);
    this.#queue.shift()?.();
  }

  #fail(err: unknown): void {
    this.#failed ??= err;
    for (const p of this.#pending.values()) p.reject(err);
    this.#pending.clear();
  }
}
