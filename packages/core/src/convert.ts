/**
 * The convert scheduler: copies one or more sources (concatenated) into a target with
 * N workers. Design points, each a requirement:
 * - No request list: workers pull the next chunk from a block-status cursor as they
 *   go, so memory is O(workers x buffer) whatever the image size or fragmentation.
 * - Each worker owns one preallocated buffer; the hot path allocates no buffers.
 * - Reads run ahead; writes are issued in chunk order unless out-of-order (-W) is
 *   allowed. In order means issue order, so that a growable target allocates
 *   sequentially: a chunk's writes start once the previous chunk's have started, and
 *   several stay in flight (a link's round trip is not paid per chunk). Only a target
 *   that cannot take overlapping writes (canWriteOutOfOrder false) gets them one by one.
 * - Zero extents become writeZeroes, or nothing on a target that reads back zeroes;
 *   data is scanned for zero runs of at least minSparse bytes (-S), handled likewise.
 * - The first error or an abort stops every worker; the target is then not flushed
 *   and the job rejects with the offset that failed.
 */
import { EventEmitter } from 'node:events';
import { BlockError, cancelled, toBlockError } from './errors.js';
import { roundDown } from './registry.js';
import { chainStatus } from './status.js';
import type { BlockBackend, ExtentKind } from './types.js';
import { gateBackend } from './gate.js';
import { WorkerGovernor } from './autotune.js';
import { ZeroScanner, isZero, sameBytes } from './zeroscan.js';

export const DEFAULT_WORKERS = 8;
export const DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024;
export const DEFAULT_MIN_SPARSE = 4096;
export const MAX_WORKERS = 256;
/** Most workers -m auto uses: memory stays AUTO_MAX_WORKERS x buffer at worst. */
export const AUTO_MAX_WORKERS = 32;
/** Zero-detection granularity when the target allows finer: one sector, as qemu-img. */
const SECTOR = 512;
/**
 * Holes up to this size between data extents of a source with cheap hole reads are
 * read along with the data (and found again by the zero scan): one request instead of
 * two for images fragmented at cluster granularity.
 */
const MAX_MERGED_HOLE = 128 * 1024;

export interface ConvertOptions {
  /** Opened sources; their contents are concatenated into the target. */
  readonly sources: readonly BlockBackend[];
  /** Opened target, at least as large as the sources together. */
  readonly target: BlockBackend;
  /**
   * Parallel workers (-m), each with one buffer. Default 8. 'auto': adapted during the
   * copy (see autotune.ts), up to AUTO_MAX_WORKERS.
   */
  readonly workers?: number | 'auto';
  /** Bytes per worker buffer, the largest chunk; capped by both sides' max transfer. Default 2 MiB. */
  readonly bufferSize?: number;
  /** Allow writes to complete out of order (-W). Ignored if the target cannot. */
  readonly outOfOrder?: boolean;
  /**
   * Zero runs of at least this many bytes in data are not written as data (-S).
   * 0: no scanning and no skipping: every byte is written, the target fully allocated.
   * Default 4096. A multiple of 512.
   */
  readonly minSparse?: number;
  /** The target is known to read back zeroes (--target-is-zero); otherwise its capability decides. */
  readonly targetIsZero?: boolean;
  /** Bytes per second (-r); unlimited when absent or 0. */
  readonly rateLimit?: number;
  /**
   * Write only what differs from the target's backing image (qemu-img convert -B): the
   * target reads through to it, so equal clusters are left unallocated.
   */
  readonly diffAgainstBacking?: boolean;
  /** Store data compressed (-c): the target must be able to (canCompress). */
  readonly compress?: boolean;
  /** Flush the target at the end (default true). The job does not resolve until it succeeds. */
  readonly flush?: boolean;
  readonly signal?: AbortSignal;
  /** Minimum milliseconds between progress events. Default 100. */
  readonly progressInterval?: number;
}

export interface ConvertProgress {
  /** Bytes of the target image covered so far (read, written, zeroed or skipped). */
  readonly done: number;
  readonly total: number;
  readonly bytesRead: number;
  readonly bytesWritten: number;
  /** Bytes handed to writeZeroes. */
  readonly bytesZeroed: number;
  /** Zero bytes left alone because the target reads them back as zeroes. */
  readonly bytesSkipped: number;
  readonly elapsedMs: number;
  /** Bytes per second over the job so far. */
  readonly rate: number;
}

export interface ConvertResult extends ConvertProgress {
  /** Workers used (with 'auto': the count it settled on). */
  readonly workers: number;
  /** With 'auto': the worker counts tried, in order. */
  readonly workersTried?: readonly number[];
  readonly bufferSize: number;
  readonly outOfOrder: boolean;
}

/** A chunk of work: one extent piece of one source, mapped to target offsets. */
interface Chunk {
  seq: number;
  source: BlockBackend;
  sourceOffset: number;
  targetOffset: number;
  length: number;
  /** 'data' must be read; 'zero' is known zeroes. */
  kind: Exclude<ExtentKind, 'unallocated'>;
}

/**
 * Walks the sources in order, asking block status lazily, and carves the next chunk.
 * Only one block-status query is in flight; other workers wait for it.
 */
class ChunkCursor {
  #index = 0;
  #pos = 0;
  #base = 0;
  #extentEnd = 0;
  #extentKind: 'data' | 'zero' = 'data';
  #pending: Promise<void> | null = null;
  #seq = 0;

  constructor(
    private readonly sources: readonly BlockBackend[],
    private readonly align: number,
    private readonly maxData: number,
    private readonly maxZero: number,
    private readonly allData: boolean,
    /** Smallest hole that may be merged into a data chunk (the zero scan must find it again); 0: never. */
    private readonly minMergedHole: number,
    /** The zero scan's unit: a merged hole must sit on unit boundaries of the chunk. */
    private readonly unit: number,
  ) {}

  get issued(): number { return this.#seq; }

  async next(): Promise<Chunk | null> {
    for (;;) {
      if (this.#pending) { await this.#pending; continue; }
      const src = this.sources[this.#index];
      if (!src) return null;
      if (this.#pos >= src.size) {
        this.#base += src.size;
        this.#index++;
        this.#pos = 0;
        this.#extentEnd = 0;
        continue;
      }
      if (this.#pos < this.#extentEnd) return this.#carve(src);
      this.#pending = this.#query(src).finally(() => { this.#pending = null; });
    }
  }

  async #query(src: BlockBackend): Promise<void> {
    const pos = this.#pos;
    let at = pos;
    try {
      if (this.allData || !src.hasBlockStatus) {
        this.#extentEnd = src.size;
        this.#extentKind = 'data';
        return;
      }
      const ext = await chainStatus(src, pos, src.size - pos);
      let end = pos + Math.min(ext.length, src.size - pos);
      this.#extentKind = ext.kind === 'data' ? 'data' : 'zero';
      // Merge small holes and the data after them into this data extent, up to one buffer.
      if (ext.kind === 'data' && this.minMergedHole > 0 && src.cheapHoleReads) {
        while (end < src.size && end - pos < this.maxData) {
          at = end;
          const hole = await chainStatus(src, end, src.size - end);
          const holeEnd = end + hole.length;
          if (hole.kind !== 'zero' || hole.length > MAX_MERGED_HOLE || hole.length < this.minMergedHole ||
              (end - pos) % this.unit !== 0 || hole.length % this.unit !== 0 || holeEnd >= src.size || holeEnd - pos >= this.maxData) break;
          at = holeEnd;
          const data = await chainStatus(src, holeEnd, src.size - holeEnd);
          if (data.kind !== 'data') break;
          end = Math.min(holeEnd + data.length, pos + this.maxData);
        }
      }
      this.#extentEnd = end;
    } catch (err) {
      throw toBlockError(err, { op: 'blockStatus', location: src.location, offset: at });
    }
  }

  #carve(src: BlockBackend): Chunk {
    const start = this.#pos;
    let kind = this.#extentKind;
    let end = Math.min(this.#extentEnd, start + (kind === 'data' ? this.maxData : this.maxZero));
    if (end < src.size && end % this.align !== 0) {
      const aligned = roundDown(end, this.align);
      if (aligned > start) {
        end = aligned;
      } else {
        // The extent ends inside one aligned block: copy that block as data.
        end = Math.min(aligned + this.align, src.size);
        kind = 'data';
      }
    }
    this.#pos = end;
    return { seq: this.#seq++, source: src, sourceOffset: start, targetOffset: this.#base + start, length: end - start, kind };
  }
}

/** Lets chunk N issue its writes only after chunk N-1 issued (or, serialized, finished) its own. */
class WriteOrder {
  #next = 0;
  readonly #waiters = new Map<number, () => void>();

  turn(seq: number): Promise<void> | undefined {
    if (seq === this.#next) return undefined;
    return new Promise((resolve) => this.#waiters.set(seq, resolve));
  }

  done(seq: number): void {
    this.#next = seq + 1;
    const w = this.#waiters.get(this.#next);
    if (w) { this.#waiters.delete(this.#next); w(); }
  }

  /** Wakes everyone (on failure), so that workers can see the error and exit. */
  releaseAll(): void {
    for (const w of this.#waiters.values()) w();
    this.#waiters.clear();
  }
}

/**
 * One worker's writes for one chunk, in flight together: `add` issues, `settle` waits for
 * all and throws the first error. The catch handler is attached at once, so a write that
 * fails while an earlier one is still pending is never an unhandled rejection.
 */
class WriteBatch {
  readonly #pending: Array<Promise<unknown>> = [];
  #failed = false;
  #error: unknown;
  readonly #onError = (err: unknown): void => {
    if (!this.#failed) { this.#failed = true; this.#error = err; }
  };

  add(write: Promise<unknown>): void {
    this.#pending.push(write.catch(this.#onError));
  }

  async settle(): Promise<void> {
    if (this.#pending.length === 1) await this.#pending[0];
    else if (this.#pending.length > 1) await Promise.all(this.#pending);
    this.#pending.length = 0;
    if (this.#failed) {
      const err = this.#error;
      this.#failed = false;
      this.#error = undefined;
      throw err;
    }
  }
}

/** Token bucket on copied bytes (-r). */
class RateLimiter {
  #nextFree = 0;
  constructor(private readonly bytesPerSecond: number) {}

  delay(bytes: number): number {
    const now = performance.now();
    const start = Math.max(now, this.#nextFree);
    this.#nextFree = start + (bytes * 1000) / this.bytesPerSecond;
    return start - now;
  }
}

/**
 * A running convert. Emits 'progress' (ConvertProgress); `done` settles with the
 * result; `progress()` iterates progress updates until the end.
 */
export class ConvertJob extends EventEmitter<{ progress: [ConvertProgress] }> {
  readonly total: number;
  readonly done: Promise<ConvertResult>;
  readonly #controller = new AbortController();
  #finished = false;

  constructor(options: ConvertOptions) {
    super();
    this.total = options.sources.reduce((s, b) => s + b.size, 0);
    this.done = run(options, this, this.#controller.signal).finally(() => { this.#finished = true; });
    // Callers that only use events must not get an unhandled rejection.
    this.done.catch(() => {});
  }

  /** Stops the job; `done` rejects with ECANCELED. */
  cancel(reason?: unknown): void {
    this.#controller.abort(reason);
  }

  /** Progress updates as an async iterator, ending when the job ends (or throwing its error). */
  async *progress(): AsyncGenerator<ConvertProgress> {
    const queue: ConvertProgress[] = [];
    let wake: (() => void) | null = null;
    const onProgress = (p: ConvertProgress): void => { queue.push(p); wake?.(); };
    this.on('progress', onProgress);
    const ended = this.done.then(() => {}, () => {}).finally(() => wake?.());
    try {
      for (;;) {
        while (queue.length) yield queue.shift()!;
        if (this.#finished) break;
        await Promise.race([new Promise<void>((r) => { wake = r; }), ended]);
        wake = null;
      }
      await this.done;
    } finally {
      this.off('progress', onProgress);
    }
  }
}

/** Starts a convert and returns the job (progress events, cancel). */
export function startConvert(options: ConvertOptions): ConvertJob {
  return new ConvertJob(options);
}

/** Converts and resolves with the result: the one call for library users. */
export function convert(options: ConvertOptions & { onProgress?: (p: ConvertProgress) => void }): Promise<ConvertResult> {
  const job = new ConvertJob(options);
  if (options.onProgress) job.on('progress', options.onProgress);
  return job.done;
}

function validate(o: ConvertOptions): void {
  const int = (name: string, v: number | undefined, min: number, max = Number.MAX_SAFE_INTEGER): void => {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < min || v > max)) {
      throw new BlockError('EINVAL', `${name} must be an integer from ${min} to ${max}, got ${v}`);
    }
  };
  if (o.sources.length === 0) throw new BlockError('EINVAL', 'no source image');
  if (o.workers !== 'auto') int('workers', o.workers, 1, MAX_WORKERS);
  int('bufferSize', o.bufferSize, SECTOR, 1 << 30);
  int('minSparse', o.minSparse, 0);
  int('rateLimit', o.rateLimit, 0);
  if (o.minSparse !== undefined && o.minSparse % SECTOR !== 0) {
    throw new BlockError('EINVAL', `minSparse must be a multiple of ${SECTOR} bytes, got ${o.minSparse}`);
  }
  if (o.target.readOnly) {
    throw new BlockError('EROFS', `the target is read-only${o.target.readOnlyReason ? `: ${o.target.readOnlyReason}` : ''}`, { location: o.target.location });
  }
  if (o.compress && !o.target.canCompress) {
    throw new BlockError('EINVAL', `the target (${o.target.driverName}) cannot store compressed data`, { location: o.target.location });
  }
}

async function run(o: ConvertOptions, job: ConvertJob, internal: AbortSignal): Promise<ConvertResult> {
  await Promise.resolve(); // let the caller attach listeners before the first event
  validate(o);
  // Backends from the registry are gated already; an embedder's own get the same rules.
  const target = gateBackend(o.target);
  const sources = o.sources.map((s) => gateBackend(s));
  const total = job.total;
  if (target.size < total) {
    throw new BlockError('ERANGE', `target is smaller than the source (${target.size} < ${total} bytes)`, { location: target.location });
  }
  const align = Math.max(target.limits.requestAlignment, ...sources.map((s) => s.limits.requestAlignment));
  let base = 0;
  for (const s of sources.slice(0, -1)) {
    base += s.size;
    if (base % align !== 0) {
      throw new BlockError('EINVAL', `source ${s.location} ends at ${base}, not a multiple of the ${align}-byte alignment; sources cannot be concatenated`);
    }
  }

  const minSparse = o.minSparse ?? DEFAULT_MIN_SPARSE;
  const allData = minSparse === 0;
  const backing = o.diffAgainstBacking && target.backing ? gateBackend(target.backing) : undefined;
  if (o.diffAgainstBacking && !backing) throw new BlockError('EINVAL', 'the target has no backing image to compare with', { location: target.location });
  const targetZero = !backing && (o.targetIsZero === true || target.readsZeroesInitially);
  const outOfOrder = (o.outOfOrder ?? false) && target.canWriteOutOfOrder !== false;
  // In order, writes of consecutive chunks overlap unless the target cannot take that.
  const serialized = !outOfOrder && target.canWriteOutOfOrder === false;
  const maxTransfer = Math.min(target.limits.maxTransfer, ...sources.map((s) => s.limits.maxTransfer));
  const bufferSize = Math.max(align, roundDown(Math.min(o.bufferSize ?? DEFAULT_BUFFER_SIZE, maxTransfer), align));
  // Chunks and zero runs on the target's preferred granularity (qcow2 clusters) spare it
  // copy-on-write, as long as a buffer holds one such unit; sources only need `align`.
  // Compressed writes go by whole compression units (qcow2 clusters).
  const preferred = (o.compress ? target.limits.compressionUnit : undefined) ?? target.limits.preferredAlignment ?? 1;
  const chunkAlign = preferred > align && preferred <= bufferSize && preferred % align === 0 ? preferred : align;
  const chunksAtMost = Math.ceil(total / bufferSize) || 1;
  const governor = o.workers === 'auto' ? new WorkerGovernor(Math.min(AUTO_MAX_WORKERS, chunksAtMost)) : undefined;
  const workers = governor ? Math.min(AUTO_MAX_WORKERS, chunksAtMost) : Math.max(1, Math.min((o.workers as number | undefined) ?? DEFAULT_WORKERS, chunksAtMost));
  // -m auto: workers beyond the governor's count wait here (holding no buffer) until it grows.
  let parked: Array<() => void> = [];
  let exhausted = false;
  const wakeParked = (): void => { const p = parked; parked = []; for (const w of p) w(); };
  const mayRun = async (index: number): Promise<void> => {
    while (governor && index >= governor.active && !failure && !exhausted) await new Promise<void>((r) => parked.push(r));
  };
  const maxZeroes = target.limits.maxWriteZeroes ?? target.limits.maxTransfer;
  // A zero chunk skipped on a zero target costs nothing, so it may be huge; written zeroes are split later.
  // Zero chunks compared with a backing image are read like data: one buffer at most.
  const maxZeroChunk = backing ? bufferSize : targetZero ? Number.MAX_SAFE_INTEGER : Math.max(bufferSize, roundDown(Math.min(maxZeroes, 1 << 30), chunkAlign));
  const unit = Math.max(SECTOR, target.limits.requestAlignment, chunkAlign);
  // A merged hole must come back from the zero scan as a run the target need not write.
  const minMergedHole = Math.max(minSparse, unit);
  const cursor = new ChunkCursor(sources, chunkAlign, roundDown(bufferSize, chunkAlign), maxZeroChunk, allData, allData ? 0 : minMergedHole, unit);
  const order = outOfOrder ? undefined : new WriteOrder();
  const limiter = o.rateLimit ? new RateLimiter(o.rateLimit) : undefined;
  const memAlign = Math.max(target.limits.minMemAlignment ?? 1, ...sources.map((s) => s.limits.minMemAlignment ?? 1));
  const alignedOwner = memAlign > 1 ? [target, ...sources].find((b) => b.allocBuffer && (b.limits.minMemAlignment ?? 1) >= memAlign) : undefined;
  const allocate = (n: number): Uint8Array => (alignedOwner ? alignedOwner.allocBuffer!(n) : Buffer.allocUnsafeSlow(n));
  let zeroBuffer: Uint8Array | undefined; // shared, read-only: for targets that cannot writeZeroes, and -S 0
  const zeroes = (): Uint8Array => {
    if (!zeroBuffer) { zeroBuffer = allocate(bufferSize); zeroBuffer.fill(0); }
    return zeroBuffer;
  };

  const started = performance.now();
  const stats = { done: 0, bytesRead: 0, bytesWritten: 0, bytesZeroed: 0, bytesSkipped: 0 };
  const snapshot = (): ConvertProgress => {
    const elapsedMs = performance.now() - started;
    return { ...stats, total, elapsedMs, rate: elapsedMs > 0 ? (stats.done * 1000) / elapsedMs : 0 };
  };
  const interval = o.progressInterval ?? 100;
  let lastEmit = 0;
  const progressed = (n: number): void => {
    stats.done += n;
    const now = performance.now();
    if (now - lastEmit >= interval && job.listenerCount('progress') > 0) {
      lastEmit = now;
      job.emit('progress', snapshot());
    }
  };

  let failure: BlockError | undefined;
  const fail = (err: unknown, details?: { op: string; location: string; offset: number; length: number }): void => {
    if (failure) return;
    failure = toBlockError(err, details);
    order?.releaseAll();
    wakeParked();
  };
  const onAbort = (signal: AbortSignal) => (): void => fail(cancelled(signal.reason));
  const aborters: Array<[AbortSignal, () => void]> = [];
  for (const s of [o.signal, internal]) {
    if (!s) continue;
    if (s.aborted) throw cancelled(s.reason);
    const h = onAbort(s);
    s.addEventListener('abort', h, { once: true });
    aborters.push([s, h]);
  }

  /** Zeroes [offset, offset+length) of the target, split to its limits. */
  const writeZeroes = async (offset: number, length: number): Promise<void> => {
    if (allData || !target.canWriteZeroes) {
      const buf = zeroes();
      for (let done = 0; done < length; done += buf.length) {
        const n = Math.min(buf.length, length - done);
        await target.write(offset + done, n === buf.length ? buf : buf.subarray(0, n));
        stats.bytesWritten += n;
      }
      return;
    }
    const step = Math.max(align, roundDown(maxZeroes, align));
    for (let done = 0; done < length; done += step) {
      await target.writeZeroes(offset + done, Math.min(step, length - done), { mayUnmap: true });
    }
    stats.bytesZeroed += length;
  };

  const writeFlags = o.compress ? { compress: true } : undefined;
  const pieceByPiece = serialized || writeFlags !== undefined;

  /**
   * -B: writes the units of [offset, +length) whose contents (`data`, or zeroes when
   * absent) differ from the backing image's, read into `theirs`.
   */
  const writeDifferences = async (offset: number, length: number, data: Uint8Array | undefined, theirs: Uint8Array): Promise<void> => {
    const avail = Math.max(0, Math.min(length, backing!.size - offset));
    if (avail > 0) await backing!.read(offset, avail, theirs);
    theirs.fill(0, avail, length);
    let runStart = 0;
    let runKind: 'same' | 'zero' | 'data' = 'same';
    const flushRun = async (end: number): Promise<void> => {
      if (end === runStart || runKind === 'same') return;
      if (runKind === 'data') {
        await target.write(offset + runStart, data!.subarray(runStart, end), writeFlags);
        stats.bytesWritten += end - runStart;
      } else {
        await writeZeroes(offset + runStart, end - runStart);
      }
    };
    for (let at = 0; at < length; at += unit) {
      const n = Math.min(unit, length - at);
      const ours = data?.subarray(at, at + n);
      const kind = (ours ? sameBytes(ours, theirs.subarray(at, at + n)) : isZero(theirs.subarray(at, at + n))) ? 'same'
        : !ours || isZero(ours) ? 'zero' : 'data';
      if (kind !== runKind) {
        await flushRun(at);
        runStart = at;
        runKind = kind;
      }
      if (kind === 'same') stats.bytesSkipped += n;
    }
    await flushRun(length);
  };

  // Workers start one after another: worker i takes its first chunk once worker i-1 has
  // read its own. Started together, the first reads share the source's link, all finish
  // late at once, and the target idles meanwhile (measured on 1 Gbit/s links: ~0.15 s
  // lost at the start of an NFS -> iSCSI copy). The cost: one read's latency per worker, once.
  const firstReads = Array.from({ length: workers }, () => {
    let resolve!: () => void;
    const promise = new Promise<void>((r) => { resolve = r; });
    return { promise, resolve };
  });
  const worker = async (_: unknown, index: number): Promise<void> => {
    const readFirst = firstReads[index]!.resolve;
    try {
      await mayRun(index);
      if (index > 0) await firstReads[index - 1]!.promise;
      await copyLoop(index, readFirst);
    } finally {
      readFirst();
    }
  };

  const copyLoop = async (index: number, readFirst: () => void): Promise<void> => {
    if (failure || exhausted) return;
    const buffer = allocate(bufferSize);
    const theirs = backing ? allocate(bufferSize) : undefined;
    const scanner = allData ? undefined : new ZeroScanner(buffer, unit, Math.max(minSparse, unit));
    const writes = new WriteBatch();
    let releasedSeq = -1;
    /** Lets the next chunk write (once per chunk: a second done() would move the turn back). */
    const release = (seq: number): void => {
      if (releasedSeq !== seq) { releasedSeq = seq; order?.done(seq); }
    };
    /**
     * Issues one write of the chunk. A chunk's writes go out together, except to a target
     * that takes one at a time, and compressed ones: each of those holds a compression
     * buffer and a codec thread, and a chunk's dozens at once took RSS from 110 to 275 MiB;
     * there the next chunk may start once this one's first write is out.
     */
    const issue = (write: Promise<unknown>, seq: number): Promise<void> | undefined => {
      writes.add(write);
      if (!pieceByPiece) return undefined;
      if (!serialized) release(seq);
      return writes.settle();
    };
    let op = 'read';
    let chunk: Chunk | null = null;
    try {
      for (;;) {
        chunk = null;
        await mayRun(index);
        if (failure || (chunk = await cursor.next()) === null || failure) break;
        const { length, targetOffset } = chunk;
        let segments = 0;
        let written = 0;
        if (chunk.kind === 'data') {
          if (limiter) {
            const wait = limiter.delay(length);
            if (wait > 1) await new Promise((r) => setTimeout(r, wait));
          }
          op = 'read';
          const data = await chunk.source.read(chunk.sourceOffset, length, buffer);
          if (data.buffer !== buffer.buffer || data.byteOffset !== buffer.byteOffset) buffer.set(data.subarray(0, length));
          stats.bytesRead += length;
          segments = scanner ? scanner.scan(length) : 0;
        }
        readFirst();
        if (failure) break;
        if (order) {
          const wait = order.turn(chunk.seq);
          if (wait) await wait;
        }
        if (failure) break;
        op = 'write';
        if (theirs) {
          // -B reads the backing image first; its writes go out in turn, one chunk at a time.
          await writeDifferences(targetOffset, length, chunk.kind === 'data' ? buffer : undefined, theirs);
        } else if (chunk.kind === 'zero') {
          if (targetZero) stats.bytesSkipped += length;
          else await issue(writeZeroes(targetOffset, length), chunk.seq);
        } else if (!scanner) {
          await issue(target.write(targetOffset, buffer.subarray(0, length), writeFlags), chunk.seq);
          written = length;
        } else if (target.writeSegments && scanner.dataCount > 1 && !writeFlags) {
          // Data split by zero runs: all of it in one vectored request, then the zeroes.
          await issue(target.writeSegments(targetOffset, buffer, scanner.dataSegments, scanner.dataCount), chunk.seq);
          for (let i = 0; i < segments; i++) {
            const len = scanner.segments[2 * i + 1]! - scanner.segments[2 * i]!;
            if (!scanner.segmentIsZero[i]) written += len;
            else if (targetZero) stats.bytesSkipped += len;
            else await issue(writeZeroes(targetOffset + scanner.segments[2 * i]!, len), chunk.seq);
          }
        } else {
          for (let i = 0; i < segments; i++) {
            const start = scanner.segments[2 * i]!;
            const end = scanner.segments[2 * i + 1]!;
            if (!scanner.segmentIsZero[i]) {
              await issue(target.write(targetOffset + start, segments === 1 ? buffer.subarray(0, length) : buffer.subarray(start, end), writeFlags), chunk.seq);
              written += end - start;
            } else if (targetZero) {
              stats.bytesSkipped += end - start;
            } else {
              await issue(writeZeroes(targetOffset + start, end - start), chunk.seq);
            }
          }
        }
        // Issued: the next chunk may issue its own while these are in flight.
        release(chunk.seq);
        await writes.settle();
        stats.bytesWritten += written;
        progressed(length);
        if (governor) {
          const before = governor.active;
          // This chunk's own data, now read and written: the copy's rate, without counting
          // the reads that merely fill new workers' buffers, or other workers' bytes.
          if (governor.sample(chunk.kind === 'data' ? length : 0) > before) wakeParked();
        }
      }
      exhausted ||= chunk === null;
      wakeParked();
    } catch (err) {
      const c = chunk;
      fail(err, c ? { op, location: op === 'read' ? c.source.location : target.location, offset: op === 'read' ? c.sourceOffset : c.targetOffset, length: c.length } : undefined);
    }
  };

  try {
    await Promise.all(Array.from({ length: workers }, worker));
    if (failure) throw failure;
    if (o.flush !== false) {
      try {
        await target.flush();
      } catch (err) {
        throw toBlockError(err, { op: 'flush', location: target.location });
      }
      if (failure) throw failure;
    }
    const result = governor
      ? { ...snapshot(), workers: governor.chosen, workersTried: [...governor.history], bufferSize, outOfOrder }
      : { ...snapshot(), workers, bufferSize, outOfOrder };
    job.emit('progress', result);
    return result;
  } finally {
    for (const [s, h] of aborters) s.removeEventListener('abort', h);
  }
}
