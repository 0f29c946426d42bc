/**
 * zstd decompression off the main thread: a small pool of worker threads running
 * libzstd compiled to WebAssembly (the zstddec package). Why this one: Node 20's
 * zlib has no zstd; the native npm bindings (@mongodb-js/zstd, zstd-napi) fetch
 * prebuilt binaries or zstd sources at install time, which fails offline and on
 * unusual platforms; pure-JS decoders (fzstd) accept some corrupted frames that
 * libzstd (and so QEMU) rejects, returning garbage instead of an error. zstddec is
 * the reference libzstd decoder with its WASM embedded (no install step, no native
 * build), widely used (three.js), MIT/BSD. Its one-shot API does not report errors,
 * so the worker calls the module's own ZSTD_decompress and ZSTD_isError exports.
 * Running it in workers keeps the event loop free for I/O and decompresses clusters
 * in parallel; zlib needs none of this, as node:zlib's async API already runs on
 * libuv's thread pool.
 *
 * Workers are started on demand (up to POOL_SIZE), hold a reference on the event
 * loop only while they have work, and are shared by every image in the process.
 */
import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';

const POOL_SIZE = Math.max(1, Math.min(4, availableParallelism()));

/**
 * The worker: decompresses a batch of frames, each into exactly `size` bytes. Input
 * and output live in one SharedArrayBuffer (input first, clusters after `outAt`),
 * recycled by the pool: per-batch buffers would otherwise be garbage the size of
 * the data. The caller measured the frames (zstdFrameLength), so no trailing bytes
 * reach libzstd; each output slot is one cluster, so libzstd cannot produce more.
 * One message per batch (a group of neighbouring clusters), not per cluster.
 */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
// A few of libzstd's error codes (zstd_errors.h), for readable messages.
const ERRORS = { 10: 'not a zstd frame', 14: 'unsupported frame parameter', 20: 'corrupted data', 22: 'checksum mismatch', 64: 'corrupted tables', 70: 'decompresses to more than a cluster', 72: 'truncated frame' };
const ready = import(workerData.zstddec).then(async ({ ZSTDDecoder }) => {
  const decoder = new ZSTDDecoder();
  let instance;
  const init = decoder._init;
  decoder._init = (result) => { instance = result.instance; init.call(decoder, result); };
  await decoder.init();
  return instance.exports;
});
parentPort.on('message', async (job) => {
  let z, src = 0, dst = 0, index = 0;
  try {
    z = await ready;
    const frames = job.frames;
    const count = frames.length / 2;
    src = z.malloc(job.inBytes);
    dst = z.malloc(job.size);
    if (!src || !dst) throw new Error('out of memory');
    new Uint8Array(z.memory.buffer).set(new Uint8Array(job.sab, 0, job.inBytes), src);
    for (; index < count; index++) {
      const got = z.ZSTD_decompress(dst, job.size, src + frames[2 * index], frames[2 * index + 1]);
      if (z.ZSTD_isError(got)) throw new Error(ERRORS[-got] || 'libzstd error ' + (-got));
      if (got !== job.size) throw new Error('the frame decompresses to ' + got + ' bytes, expected ' + job.size);
      new Uint8Array(job.sab, job.outAt + index * job.size, job.size).set(new Uint8Array(z.memory.buffer, dst, job.size));
    }
    parentPort.postMessage({ id: job.id });
  } catch (err) {
    parentPort.postMessage({ id: job.id, error: String(err && err.message || err), index });
  } finally {
    if (z) { if (src) z.free(src); if (dst) z.free(dst); }
  }
});
`;

/** A frame of a batch failed: `index` says which. */
export class ZstdBatchError extends Error {
  constructor(
    message: string,
    readonly index: number,
  ) {
    super(message);
  }
}

/**
 * Spare shared buffers kept for reuse, at most this many bytes (in practice what the
 * batches in flight at once need). Dropping buffers is worse than keeping them: a
 * worker's isolate keeps a dropped buffer alive until its own, rare, GC (2 GB of RSS
 * were measured with a 16 MiB cap), and fresh pages are slow to fault in.
 */
const MAX_SPARE_BYTES = 128 * 1024 * 1024;
const MIN_BUFFER = 1024 * 1024;

/** A decompressed batch: its clusters end to end, valid until release(). */
export interface ZstdBatch {
  readonly clusters: Uint8Array;
  release(): void;
}

interface Job {
  resolve(): void;
  reject(err: Error): void;
  slot: Slot;
}

interface Slot {
  worker: Worker;
  inFlight: number;
}

interface Reply {
  id: number;
  error?: string;
  index?: number;
}

export class ZstdPool {
  readonly #slots: Slot[] = [];
  readonly #jobs = new Map<number, Job>();
  readonly #size: number;
  readonly #spare: SharedArrayBuffer[] = [];
  #spareBytes = 0;
  #nextId = 1;
  #modulePath: string | undefined;

  constructor(size = POOL_SIZE) {
    this.#size = size;
  }

  /**
   * Decompresses `count` frames of `input` (frame i at frames[2i], frames[2i+1] bytes
   * long) in one worker, each to exactly `size` bytes. The clusters come back end to
   * end in a shared buffer the caller hands back with release() once it has copied
   * them. A failing frame rejects with a ZstdBatchError naming its index.
   */
  async decompressBatch(input: Uint8Array, frames: readonly number[], size: number): Promise<ZstdBatch> {
    const count = frames.length / 2;
    const outAt = Math.ceil(input.length / 8) * 8;
    const sab = this.#take(outAt + count * size);
    new Uint8Array(sab, 0, input.length).set(input);
    const slot = this.#pick();
    const id = this.#nextId++;
    try {
      await new Promise<void>((resolve, reject) => {
        this.#jobs.set(id, { resolve, reject, slot });
        if (slot.inFlight++ === 0) slot.worker.ref();
        slot.worker.postMessage({ id, sab, inBytes: input.length, outAt, frames, size });
      });
    } catch (err) {
      this.#give(sab);
      throw err;
    }
    let released = false;
    return {
      clusters: new Uint8Array(sab, outAt, count * size),
      release: () => {
        if (!released) {
          released = true;
          this.#give(sab);
        }
      },
    };
  }

  /** The smallest spare buffer that fits, or a new one. */
  #take(bytes: number): SharedArrayBuffer {
    let best = -1;
    for (let i = 0; i < this.#spare.length; i++) {
      const b = this.#spare[i]!;
      if (b.byteLength >= bytes && (best < 0 || b.byteLength < this.#spare[best]!.byteLength)) best = i;
    }
    if (best >= 0) {
      const [b] = this.#spare.splice(best, 1);
      this.#spareBytes -= b!.byteLength;
      return b!;
    }
    return new SharedArrayBuffer(Math.max(MIN_BUFFER, 2 ** Math.ceil(Math.log2(bytes))));
  }

  #give(b: SharedArrayBuffer): void {
    if (this.#spareBytes + b.byteLength > MAX_SPARE_BYTES) return;
    this.#spare.push(b);
    this.#spareBytes += b.byteLength;
  }

  /** Stops every worker; later calls start new ones. */
  async close(): Promise<void> {
    const slots = this.#slots.splice(0);
    await Promise.all(slots.map((s) => s.worker.terminate()));
  }

  /** The least busy worker, starting another while all are busy and the pool has room. */
  #pick(): Slot {
    let best: Slot | undefined;
    for (const s of this.#slots) if (!best || s.inFlight < best.inFlight) best = s;
    if (best && (best.inFlight === 0 || this.#slots.length >= this.#size)) return best;
    return this.#spawn();
  }

  #spawn(): Slot {
    this.#modulePath ??= zstddecPath();
    const worker = new Worker(WORKER_SOURCE, { eval: true, workerData: { zstddec: this.#modulePath } });
    worker.unref();
    const slot: Slot = { worker, inFlight: 0 };
    worker.on('message', (reply: Reply) => {
      const job = this.#jobs.get(reply.id);
      if (!job) return;
      this.#jobs.delete(reply.id);
      if (--slot.inFlight === 0) worker.unref();
      if (reply.error === undefined) job.resolve();
      else job.reject(new ZstdBatchError(reply.error ?? 'zstd worker failed', reply.index ?? 0));
    });
    const fail = (err: Error): void => {
      const i = this.#slots.indexOf(slot);
      if (i >= 0) this.#slots.splice(i, 1);
      for (const [id, job] of this.#jobs) {
        if (job.slot !== slot) continue;
        this.#jobs.delete(id);
        job.reject(err);
      }
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`zstd worker exited (code ${code})`)));
    this.#slots.push(slot);
    return slot;
  }
}

/** zstddec's ESM entry as a URL, resolved from here: the worker (an eval'd script) imports it by URL. */
function zstddecPath(): string {
  return import.meta.resolve('zstddec');
}

let shared: ZstdPool | undefined;

/** The process-wide pool. */
export function zstdPool(): ZstdPool {
  return (shared ??= new ZstdPool());
}
