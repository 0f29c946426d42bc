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
 *
 * One chunk's way through: plan.ts derives every size once; the cursor (cursor.ts)
 * carves the next chunk; the worker's ChunkCopier (copier.ts) reads it into its buffer;
 * the write order (order.ts) lets it issue its writes in turn; the copier writes its
 * pieces and counts the bytes. This file starts the workers and ends the job.
 */
import { EventEmitter } from 'node:events';
import { BlockError, cancelled, toBlockError } from '../errors.js';
import { WorkerGovernor } from '../autotune.js';
import { ChunkCopier, CopyOffload, CopyStats } from './copier.js';
import { ChunkCursor, type Chunk } from './cursor.js';
import type { ConvertOptions, ConvertProgress, ConvertResult } from './options.js';
import { WriteOrder } from './order.js';
import { planConvert, type ConvertPlan } from './plan.js';
import { ChecksumTap } from './checksum-tap.js';
import { checksumImage } from '../checksum/index.js';
import { Checkpointer } from './checkpoints.js';
import { checkResume, identifyConvert, type ResumeState } from './resume.js';
import { FanoutTarget } from './fanout.js';
import { preZero } from './prezero.js';
import { gateBackend } from '../gate.js';

export * from './options.js';
export { checkCopyOffload } from './plan.js';
export { FanoutTarget, UnopenedTarget, type FailedTarget, type TargetOutcome } from './fanout.js';
export { openTargets, type OpenTargetsOptions } from './targets.js';
export { DEFAULT_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_SECONDS, ProgressLedger } from './checkpoints.js';
export { HEAD_BYTES, RESUME_STATE_KIND, RESUME_STATE_VERSION, checkResume, checkStateShape, identifyConvert, type ConvertIdentity, type ImageIdentity, type ResumeState } from './resume.js';

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
 * A running convert. Emits 'progress' (ConvertProgress) and, with checkpoints,
 * 'checkpoint' (ResumeState, once saved); `done` settles with the result; `progress()`
 * iterates progress updates until the end.
 */
export class ConvertJob extends EventEmitter<{ progress: [ConvertProgress]; checkpoint: [ResumeState] }> {
  readonly total: number;
  readonly done: Promise<ConvertResult>;
  readonly #controller = new AbortController();
  readonly #stop = new StopRequest();
  #finished = false;

  constructor(options: ConvertOptions) {
    super();
    this.total = options.sources.reduce((s, b) => s + b.size, 0);
    this.done = run(options, this, this.#controller.signal, this.#stop).finally(() => { this.#finished = true; });
    // Callers that only use events must not get an unhandled rejection.
    this.done.catch(() => {});
  }

  /** Stops the job; `done` rejects with ECANCELED. */
  cancel(reason?: unknown): void {
    this.#controller.abort(reason);
  }

  /**
   * Stops at a checkpoint: no new chunk is started, the chunks in flight finish, and
   * (with checkpoints) a last one is taken and emitted; then `done` rejects with
   * ECANCELED. It waits for the writes in flight: if they may never end (a dead
   * server), cancel() after a deadline.
   */
  stop(reason?: unknown): void {
    this.#stop.request(reason);
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

/** A graceful stop asked for by ConvertJob.stop(): seen by the workers between chunks. */
class StopRequest {
  requested = false;
  reason: unknown;
  #listeners: Array<() => void> = [];

  request(reason: unknown): void {
    if (this.requested) return;
    this.requested = true;
    this.reason = reason;
    for (const l of this.#listeners) l();
  }

  onRequest(listener: () => void): void {
    this.#listeners.push(listener);
  }
}

/** Starts a convert and returns the job (progress events, cancel). */
export function startConvert(options: ConvertOptions): ConvertJob {
  return new ConvertJob(options);
}

/** Converts and resolves with the result: the one call for library users. */
export function convert(options: ConvertOptions & { onProgress?: (p: ConvertProgress) => void; onCheckpoint?: (s: ResumeState) => void }): Promise<ConvertResult> {
  const job = new ConvertJob(options);
  if (options.onProgress) job.on('progress', options.onProgress);
  if (options.onCheckpoint) job.on('checkpoint', options.onCheckpoint);
  return job.done;
}

/** The one target standing for several (read once, write many). */
function openFanout(o: ConvertOptions): FanoutTarget {
  if (o.target) throw new BlockError('EINVAL', 'give a target or several targets, not both', { field: 'targets' });
  if (o.diffAgainstBacking) throw new BlockError('EINVAL', 'writing only what differs from a backing image (-B) takes one target', { field: 'targets' });
  const total = o.sources.reduce((n, s) => n + s.size, 0);
  return new FanoutTarget(o.targets!, { total, compress: o.compress, failed: o.resume?.failedTargets });
}

/** The options recorded in a checkpoint because they change the output. */
function outputOptions(o: ConvertOptions, plan: ConvertPlan): Record<string, string> {
  return {
    compress: String(o.compress === true),
    minSparse: String(plan.minSparse),
    targetIsZero: String(o.targetIsZero === true),
    diffAgainstBacking: String(o.diffAgainstBacking === true),
    checksum: String(plan.checksum),
    ...o.resumeTag,
  };
}

async function run(o: ConvertOptions, job: ConvertJob, internal: AbortSignal, stop: StopRequest): Promise<ConvertResult> {
  await Promise.resolve(); // let the caller attach listeners before the first event
  const fanout = o.targets ? openFanout(o) : undefined;
  if (!fanout && !o.target) throw new BlockError('EINVAL', 'no target image');
  // One target, copied whole from the start, whose zeroes are not known: zero it fast if it can.
  const preZeroed = !fanout && !o.resume && !o.diffAgainstBacking && o.targetIsZero !== true && o.minSparse !== 0
    ? await preZero(gateBackend(o.target!), o.sources.reduce((n, s) => n + s.size, 0))
    : false;
  const plan = planConvert({ ...o, target: fanout ?? o.target!, ...(preZeroed ? { targetIsZero: true } : {}) });
  const { target, total, workers, bufferSize, outOfOrder } = plan;
  const cursor = new ChunkCursor(plan.sources, plan.cursorAlign, plan.maxDataChunk, plan.maxZeroChunk, plan.allData, plan.minMergedHole, plan.unit,
    { start: plan.start, splitAt: plan.rewriteEnd });
  const order = outOfOrder ? undefined : new WriteOrder();
  const releaseOrder = order ? (seq: number): void => order.done(seq) : (): void => {};
  const limiter = plan.rateLimit ? new RateLimiter(plan.rateLimit) : undefined;
  let zeroBuffer: Uint8Array | undefined;
  const zeroes = (): Uint8Array => {
    if (!zeroBuffer) { zeroBuffer = plan.allocate(bufferSize); zeroBuffer.fill(0); }
    return zeroBuffer;
  };
  // -C: only a target that can take copies (a fanout of several cannot) starts with it on.
  const offload = new CopyOffload(plan.copyOffload && target.copyFrom !== undefined);
  const governor = plan.autoWorkers ? new WorkerGovernor(workers) : undefined;
  const checkpointing = o.checkpoint !== undefined || o.resume !== undefined;
  // Copies of chunks waiting to be hashed: twice the workers keeps them from waiting.
  const tap = plan.checksum ? await ChecksumTap.create(bufferSize, 2 * workers, { from: o.resume?.progress.checksum, gated: checkpointing }) : undefined;
  // -m auto: workers beyond the governor's count wait here (holding no buffer) until it grows.
  let parked: Array<() => void> = [];
  let exhausted = false;
  const wakeParked = (): void => { const p = parked; parked = []; for (const w of p) w(); };
  const mayRun = async (index: number): Promise<void> => {
    while (governor && index >= governor.active && !failure && !exhausted && !stop.requested) await new Promise<void>((r) => parked.push(r));
  };
  stop.onRequest(wakeParked);

  const started = performance.now();
  const stats = new CopyStats();
  stats.done = plan.start;
  const snapshot = (): ConvertProgress => {
    const elapsedMs = performance.now() - started;
    return {
      done: stats.done, bytesRead: stats.bytesRead, bytesWritten: stats.bytesWritten, bytesZeroed: stats.bytesZeroed, bytesSkipped: stats.bytesSkipped,
      total, elapsedMs, rate: elapsedMs > 0 ? ((stats.done - plan.start) * 1000) / elapsedMs : 0,
    };
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
    void checkpointer?.stop();
    order?.releaseAll();
    wakeParked();
  };
  let checkpointer: Checkpointer | undefined;
  const onAbort = (signal: AbortSignal) => (): void => fail(cancelled(signal.reason));
  const aborters: Array<[AbortSignal, () => void]> = [];
  for (const s of [o.signal, internal]) {
    if (!s) continue;
    if (s.aborted) throw cancelled(s.reason);
    const h = onAbort(s);
    s.addEventListener('abort', h, { once: true });
    aborters.push([s, h]);
  }

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

  /**
   * One worker, and one chunk's whole path: the next chunk from the cursor, its mode
   * decided once (copier.modeOf), read (and scanned) into the worker's buffer, hashed,
   * its turn in the write order awaited, room in the checkpoint span awaited, written,
   * counted. Until the cursor is done.
   */
  const copyLoop = async (index: number, readFirst: () => void): Promise<void> => {
    if (failure || exhausted) return;
    const copier = new ChunkCopier(plan, stats, zeroes, releaseOrder, offload);
    let op = 'read';
    let chunk: Chunk | null = null;
    try {
      for (;;) {
        chunk = null;
        await mayRun(index);
        if (failure || stop.requested) break;
        if ((chunk = await cursor.next(copier.holes)) === null) {
          exhausted = true;
          break;
        }
        if (failure) break;
        const mode = copier.modeOf(chunk);
        op = 'read';
        if (chunk.kind === 'data') {
          if (limiter) {
            const wait = limiter.delay(chunk.length);
            if (wait > 1) await new Promise((r) => setTimeout(r, wait));
          }
          await copier.read(chunk, mode);
          if (tap) await tap.data(chunk.seq, copier.bytes(chunk.length));
        } else {
          tap?.zero(chunk.seq, chunk.length);
        }
        readFirst();
        if (failure) break;
        if (order) {
          const wait = order.turn(chunk.seq);
          if (wait) await wait;
        }
        if (failure) break;
        op = 'write';
        const end = chunk.targetOffset + chunk.length;
        if (checkpointer && end > checkpointer.limit && (chunk.kind === 'data' || !copier.skipsZeroes(chunk))) {
          await checkpointer.allow(end);
          if (failure) break;
        }
        await copier.write(chunk, mode);
        progressed(chunk.length);
        if (checkpointer) {
          checkpointer.completed(chunk.seq, end);
          tap?.written(checkpointer.ledger.openSeq);
        }
        if (governor) {
          const before = governor.active;
          // This chunk's own data, now read and written: the copy's rate, without counting
          // the reads that merely fill new workers' buffers, or other workers' bytes.
          if (governor.sample(chunk.kind === 'data' ? chunk.length : 0) > before) wakeParked();
        }
      }
      wakeParked();
    } catch (err) {
      const c = chunk;
      fail(err, c ? { op, location: op === 'read' ? c.source.location : target.location, offset: op === 'read' ? c.sourceOffset : c.targetOffset, length: c.length } : undefined);
    }
  };

  try {
    if (checkpointing) {
      const identity = await identifyConvert(plan.sources, target, outputOptions(o, plan));
      if (o.resume) await checkResume(o.resume, identity, target);
      checkpointer = new Checkpointer({
        schedule: o.checkpoint ?? {}, identity, total, start: plan.start, dirtyEnd: plan.rewriteEnd, targetZero: plan.targetZero,
        inFlight: workers * bufferSize,
        flush: () => target.flush(),
        hashAt: tap ? (seq) => tap.stateAt(seq) : undefined,
        onCheckpoint: (state) => job.emit('checkpoint', state),
        failedTargets: fanout ? () => fanout.failed() : undefined,
        onError: (err) => fail(err),
      });
      await checkpointer.begin();
    }
    await Promise.all(Array.from({ length: workers }, worker));
    if (stop.requested && !failure && !exhausted) {
      // Stopped between chunks: what completed is made durable and recorded, then the job ends.
      await checkpointer?.final();
      if (!failure) fail(cancelled(stop.reason ?? new Error('stopped at a checkpoint')));
    }
    await checkpointer?.stop();
    if (failure) throw failure;
    tap?.written(Number.MAX_SAFE_INTEGER);
    if (o.flush !== false) {
      try {
        await target.flush();
      } catch (err) {
        throw toBlockError(err, { op: 'flush', location: target.location });
      }
      if (failure) throw failure;
    }
    const checksum = tap ? await tap.hexdigest() : undefined;
    let verified: boolean | undefined;
    if (o.verify && fanout) {
      // Each target on its own: one that reads back wrong fails alone.
      for (const t of fanout.live()) {
        const back = await checksumImage(t, { length: total, signal: o.signal });
        if (back.checksum !== checksum) fanout.drop(t, new BlockError('EIO', `verify failed: the target reads back as blkhash ${back.checksum}, the copied data was ${checksum}`, { op: 'verify', location: t.location }));
      }
      if (fanout.live().length === 0) throw new BlockError('EIO', `verify failed on every target; the first: ${fanout.outcomes()[0]!.error}`, { op: 'verify' });
      verified = true;
    } else if (o.verify) {
      // Read back through the target, as a later reader would (the digest of its first `total` bytes).
      const back = await checksumImage(target, { length: total, signal: o.signal });
      if (back.checksum !== checksum) {
        throw new BlockError('EIO', `verify failed: the target reads back as blkhash ${back.checksum}, the copied data was ${checksum}`, { op: 'verify', location: target.location });
      }
      verified = true;
    }
    const result = {
      ...snapshot(), workers: governor ? governor.chosen : workers, ...(governor ? { workersTried: [...governor.history] } : {}),
      bufferSize, outOfOrder, ...(preZeroed ? { preZeroed } : {}), ...(plan.copyOffload ? { bytesOffloaded: stats.bytesOffloaded } : {}), ...(checksum !== undefined ? { checksum } : {}), ...(verified ? { verified } : {}),
      ...(o.resume ? { resumedFrom: plan.start } : {}), ...(checkpointer ? { checkpoints: checkpointer.count } : {}),
      ...(fanout ? { targets: fanout.outcomes() } : {}),
    };
    job.emit('progress', result);
    return result;
  } finally {
    for (const [s, h] of aborters) s.removeEventListener('abort', h);
    await checkpointer?.stop();
    await tap?.close();
  }
}
