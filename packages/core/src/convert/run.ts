/**
 * One convert from start to end: the plan made, the workers started, each running one
 * chunk after another through `#copyChunk` (the whole path of a chunk, in one place),
 * then the flush, the verify and the result. ConvertJob (index.ts) owns one of these.
 */
import type { EventEmitter } from 'node:events';
import { WorkerGovernor } from '../autotune.js';
import { checksumImage } from '../checksum/index.js';
import { BlockError, cancelled, toBlockError } from '../errors.js';
import { gateBackend } from '../gate.js';
import type { GatedBackend } from '../types.js';
import { Checkpointer } from './checkpoints.js';
import { ChecksumTap } from './checksum-tap.js';
import { ChunkCopier, CopyOffload, CopyStats } from './copier.js';
import { ChunkCursor, type Chunk } from './cursor.js';
import { FanoutTarget } from './fanout.js';
import type { ConvertOptions, ConvertProgress, ConvertResult } from './options.js';
import { WriteOrder } from './order.js';
import { planConvert, type ConvertPlan } from './plan.js';
import { preZero } from './prezero.js';
import { checkResume, identifyConvert, type ResumeState } from './resume.js';

/** What a run reports to its job. */
export type RunEvents = EventEmitter<{ progress: [ConvertProgress]; checkpoint: [ResumeState] }>;

/** A graceful stop asked for by ConvertJob.stop(): seen by the workers between chunks. */
export class StopRequest {
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

/** Where a failed chunk was: the source for a read, the target for a write. */
interface FailureDetails {
  op: string;
  location: string;
  offset: number;
  length: number;
}

/** The one target standing for several (read once, write many). */
function openFanout(o: ConvertOptions): FanoutTarget {
  if (o.target) throw new BlockError('EINVAL', 'give a target or several targets, not both', { field: 'targets' });
  if (o.diffAgainstBacking)
    throw new BlockError('EINVAL', 'writing only what differs from a backing image (-B) takes one target', {
      field: 'targets',
    });
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

/** Runs a convert; resolves with its result (see ConvertJob). */
export async function runConvert(
  o: ConvertOptions,
  events: RunEvents,
  internal: AbortSignal,
  stop: StopRequest,
): Promise<ConvertResult> {
  await Promise.resolve(); // let the caller attach listeners before the first event
  const fanout = o.targets ? openFanout(o) : undefined;
  if (!fanout && !o.target) throw new BlockError('EINVAL', 'no target image');
  // One target, copied whole from the start, whose zeroes are not known: zero it fast if it can.
  const preZeroed =
    !fanout && !o.resume && !o.diffAgainstBacking && o.targetIsZero !== true && o.minSparse !== 0
      ? await preZero(
          gateBackend(o.target!),
          o.sources.reduce((n, s) => n + s.size, 0),
        )
      : false;
  const plan = planConvert({ ...o, target: fanout ?? o.target!, ...(preZeroed ? { targetIsZero: true } : {}) });
  const checkpointing = o.checkpoint !== undefined || o.resume !== undefined;
  // Copies of chunks waiting to be hashed: twice the workers keeps them from waiting.
  const tap = plan.checksum
    ? await ChecksumTap.create(plan.bufferSize, 2 * plan.workers, {
        from: o.resume?.progress.checksum,
        gated: checkpointing,
      })
    : undefined;
  const run = new ConvertRun(o, plan, events, stop, { fanout, preZeroed, tap });
  return run.run(internal, checkpointing);
}

class ConvertRun {
  readonly #o: ConvertOptions;
  readonly #plan: ConvertPlan;
  readonly #target: GatedBackend;
  readonly #events: RunEvents;
  readonly #stop: StopRequest;
  readonly #fanout: FanoutTarget | undefined;
  readonly #preZeroed: boolean;
  readonly #tap: ChecksumTap | undefined;
  readonly #cursor: ChunkCursor;
  readonly #order: WriteOrder | undefined;
  readonly #releaseOrder: (seq: number) => void;
  readonly #limiter: RateLimiter | undefined;
  // -C: only a target that can take copies (a fanout of several cannot) starts with it on.
  readonly #offload: CopyOffload;
  readonly #governor: WorkerGovernor | undefined;
  readonly #stats = new CopyStats();
  readonly #started = performance.now();
  #zeroBuffer: Uint8Array | undefined;
  /** -m auto: workers beyond the governor's count wait here (holding no buffer) until it grows. */
  #parked: Array<() => void> = [];
  #exhausted = false;
  #failure: BlockError | undefined;
  #checkpointer: Checkpointer | undefined;
  #lastEmit = 0;

  constructor(
    o: ConvertOptions,
    plan: ConvertPlan,
    events: RunEvents,
    stop: StopRequest,
    parts: { fanout?: FanoutTarget; preZeroed: boolean; tap?: ChecksumTap },
  ) {
    this.#o = o;
    this.#plan = plan;
    this.#target = plan.target;
    this.#events = events;
    this.#stop = stop;
    this.#fanout = parts.fanout;
    this.#preZeroed = parts.preZeroed;
    this.#tap = parts.tap;
    this.#cursor = new ChunkCursor(
      plan.sources,
      plan.cursorAlign,
      plan.maxDataChunk,
      plan.maxZeroChunk,
      plan.allData,
      plan.minMergedHole,
      plan.unit,
      {
        start: plan.start,
        splitAt: plan.rewriteEnd,
      },
    );
    const order = plan.outOfOrder ? undefined : new WriteOrder();
    this.#order = order;
    this.#releaseOrder = order ? (seq: number): void => order.done(seq) : (): void => {};
    this.#limiter = plan.rateLimit ? new RateLimiter(plan.rateLimit) : undefined;
    this.#offload = new CopyOffload(plan.copyOffload && plan.target.copyFrom !== undefined);
    this.#governor = plan.autoWorkers ? new WorkerGovernor(plan.workers) : undefined;
    this.#stats.done = plan.start;
    stop.onRequest(this.#wakeParked);
  }

  /** The workers, then the end of the job: checkpoints, flush, verify, result. */
  async run(internal: AbortSignal, checkpointing: boolean): Promise<ConvertResult> {
    const aborters: Array<[AbortSignal, () => void]> = [];
    try {
      this.#listenForAborts(internal, aborters);
      if (checkpointing) await this.#beginCheckpoints();
      await this.#runWorkers();
      const stop = this.#stop;
      if (stop.requested && !this.#failure && !this.#exhausted) {
        // Stopped between chunks: what completed is made durable and recorded, then the job ends.
        await this.#checkpointer?.final();
        if (!this.#failure) this.#fail(cancelled(stop.reason ?? new Error('stopped at a checkpoint')));
      }
      await this.#checkpointer?.stop();
      if (this.#failure) throw this.#failure;
      this.#tap?.written(Number.MAX_SAFE_INTEGER);
      await this.#flush();
      const checksum = this.#tap ? await this.#tap.hexdigest() : undefined;
      const verified = this.#o.verify ? await this.#verify(checksum) : undefined;
      const result = this.#result(checksum, verified);
      this.#events.emit('progress', result);
      return result;
    } finally {
      for (const [s, h] of aborters) s.removeEventListener('abort', h);
      await this.#checkpointer?.stop();
      await this.#tap?.close();
    }
  }

  /** An abort of the caller's signal or the job's own (cancel()) fails the run; already aborted, it never starts. */
  #listenForAborts(internal: AbortSignal, aborters: Array<[AbortSignal, () => void]>): void {
    for (const s of [this.#o.signal, internal]) {
      if (!s) continue;
      if (s.aborted) throw cancelled(s.reason);
      const h = (): void => this.#fail(cancelled(s.reason));
      s.addEventListener('abort', h, { once: true });
      aborters.push([s, h]);
    }
  }

  async #beginCheckpoints(): Promise<void> {
    const plan = this.#plan;
    const target = this.#target;
    const o = this.#o;
    const identity = await identifyConvert(plan.sources, target, outputOptions(o, plan));
    if (o.resume) await checkResume(o.resume, identity, target);
    const tap = this.#tap;
    const fanout = this.#fanout;
    this.#checkpointer = new Checkpointer({
      schedule: o.checkpoint ?? {},
      identity,
      total: plan.total,
      start: plan.start,
      dirtyEnd: plan.rewriteEnd,
      targetZero: plan.targetZero,
      inFlight: plan.workers * plan.bufferSize,
      flush: () => target.flush(),
      hashAt: tap ? (seq) => tap.stateAt(seq) : undefined,
      onCheckpoint: (state) => this.#events.emit('checkpoint', state),
      failedTargets: fanout ? () => fanout.failed() : undefined,
      onError: (err) => this.#fail(err),
    });
    await this.#checkpointer.begin();
  }

  /**
   * Workers start one after another: worker i takes its first chunk once worker i-1 has
   * read its own. Started together, the first reads share the source's link, all finish
   * late at once, and the target idles meanwhile (measured on 1 Gbit/s links: ~0.15 s
   * lost at the start of an NFS -> iSCSI copy). The cost: one read's latency per worker, once.
   */
  async #runWorkers(): Promise<void> {
    const firstReads = Array.from({ length: this.#plan.workers }, () => {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => {
        resolve = r;
      });
      return { promise, resolve };
    });
    const worker = async (_: unknown, index: number): Promise<void> => {
      const readFirst = firstReads[index]!.resolve;
      try {
        await this.#mayRun(index);
        if (index > 0) await firstReads[index - 1]!.promise;
        await this.#copyLoop(index, readFirst);
      } finally {
        readFirst();
      }
    };
    await Promise.all(Array.from({ length: this.#plan.workers }, worker));
  }

  /** One worker: the next chunk from the cursor, copied, until the cursor is done. */
  async #copyLoop(index: number, readFirst: () => void): Promise<void> {
    if (this.#failure || this.#exhausted) return;
    const copier = new ChunkCopier(this.#plan, this.#stats, this.#zeroes, this.#releaseOrder, this.#offload);
    const where = { op: 'read' };
    let chunk: Chunk | null = null;
    try {
      for (;;) {
        chunk = null;
        await this.#mayRun(index);
        if (this.#failure || this.#stop.requested) break;
        if ((chunk = await this.#cursor.next(copier.holes)) === null) {
          this.#exhausted = true;
          break;
        }
        if (this.#failure || !(await this.#copyChunk(copier, chunk, readFirst, where))) break;
      }
      this.#wakeParked();
    } catch (err) {
      const c = chunk;
      const read = where.op === 'read';
      this.#fail(
        err,
        c
          ? {
              op: where.op,
              location: read ? c.source.location : this.#target.location,
              offset: read ? c.sourceOffset : c.targetOffset,
              length: c.length,
            }
          : undefined,
      );
    }
  }

  /**
   * One chunk's whole path: its mode decided once (copier.modeOf), read (and scanned)
   * into the worker's buffer, hashed, its turn in the write order awaited, room in the
   * checkpoint span awaited, written, counted. False when the job failed meanwhile.
   * `where.op` says which half a thrown error came from.
   */
  async #copyChunk(copier: ChunkCopier, chunk: Chunk, readFirst: () => void, where: { op: string }): Promise<boolean> {
    const mode = copier.modeOf(chunk);
    const tap = this.#tap;
    where.op = 'read';
    if (chunk.kind === 'data') {
      const wait = this.#limiter?.delay(chunk.length) ?? 0;
      if (wait > 1) await new Promise((r) => setTimeout(r, wait));
      await copier.read(chunk, mode);
      if (tap) await tap.data(chunk.seq, copier.bytes(chunk.length));
    } else {
      tap?.zero(chunk.seq, chunk.length);
    }
    readFirst();
    if (this.#failure) return false;
    const turn = this.#order?.turn(chunk.seq);
    if (turn) await turn;
    if (this.#failure) return false;
    where.op = 'write';
    const end = chunk.targetOffset + chunk.length;
    const checkpointer = this.#checkpointer;
    if (checkpointer && end > checkpointer.limit && (chunk.kind === 'data' || !copier.skipsZeroes(chunk))) {
      await checkpointer.allow(end);
      if (this.#failure) return false;
    }
    await copier.write(chunk, mode);
    this.#progressed(chunk.length);
    if (checkpointer) {
      checkpointer.completed(chunk.seq, end);
      tap?.written(checkpointer.ledger.openSeq);
    }
    const governor = this.#governor;
    if (governor) {
      const before = governor.active;
      // This chunk's own data, now read and written: the copy's rate, without counting
      // the reads that merely fill new workers' buffers, or other workers' bytes.
      if (governor.sample(chunk.kind === 'data' ? chunk.length : 0) > before) this.#wakeParked();
    }
    return true;
  }

  /** A buffer of zeroes shared by the workers (read only), made on first use. */
  readonly #zeroes = (): Uint8Array => {
    if (!this.#zeroBuffer) this.#zeroBuffer = this.#plan.allocate(this.#plan.bufferSize).fill(0);
    return this.#zeroBuffer;
  };

  readonly #wakeParked = (): void => {
    const p = this.#parked;
    this.#parked = [];
    for (const w of p) w();
  };

  async #mayRun(index: number): Promise<void> {
    const governor = this.#governor;
    while (governor && index >= governor.active && !this.#failure && !this.#exhausted && !this.#stop.requested) {
      await new Promise<void>((r) => this.#parked.push(r));
    }
  }

  /** The first error stops every worker; the target is then not flushed nor reported complete. */
  #fail(err: unknown, details?: FailureDetails): void {
    if (this.#failure) return;
    this.#failure = toBlockError(err, details);
    void this.#checkpointer?.stop();
    this.#order?.releaseAll();
    this.#wakeParked();
  }

  #snapshot(): ConvertProgress {
    const s = this.#stats;
    const elapsedMs = performance.now() - this.#started;
    return {
      done: s.done,
      bytesRead: s.bytesRead,
      bytesWritten: s.bytesWritten,
      bytesZeroed: s.bytesZeroed,
      bytesSkipped: s.bytesSkipped,
      total: this.#plan.total,
      elapsedMs,
      rate: elapsedMs > 0 ? ((s.done - this.#plan.start) * 1000) / elapsedMs : 0,
    };
  }

  #progressed(n: number): void {
    this.#stats.done += n;
    const now = performance.now();
    if (now - this.#lastEmit >= (this.#o.progressInterval ?? 100) && this.#events.listenerCount('progress') > 0) {
      this.#lastEmit = now;
      this.#events.emit('progress', this.#snapshot());
    }
  }

  async #flush(): Promise<void> {
    if (this.#o.flush === false) return;
    try {
      await this.#target.flush();
    } catch (err) {
      throw toBlockError(err, { op: 'flush', location: this.#target.location });
    }
    if (this.#failure) throw this.#failure;
  }

  /** Reads every target back, as a later reader would (the digest of its first `total` bytes). */
  async #verify(checksum: string | undefined): Promise<boolean> {
    const total = this.#plan.total;
    const mismatch = (back: string, location: string): BlockError =>
      new BlockError(
        'EIO',
        `verify failed: the target reads back as blkhash ${back}, the copied data was ${checksum}`,
        { op: 'verify', location },
      );
    const fanout = this.#fanout;
    if (!fanout) {
      const back = await checksumImage(this.#target, { length: total, signal: this.#o.signal });
      if (back.checksum !== checksum) throw mismatch(back.checksum, this.#target.location);
      return true;
    }
    // Each target on its own: one that reads back wrong fails alone.
    for (const t of fanout.live()) {
      const back = await checksumImage(t, { length: total, signal: this.#o.signal });
      if (back.checksum !== checksum) fanout.drop(t, mismatch(back.checksum, t.location));
    }
    if (fanout.live().length === 0)
      throw new BlockError('EIO', `verify failed on every target; the first: ${fanout.outcomes()[0]!.error}`, {
        op: 'verify',
      });
    return true;
  }

  #result(checksum: string | undefined, verified: boolean | undefined): ConvertResult {
    const plan = this.#plan;
    const governor = this.#governor;
    const fanout = this.#fanout;
    return {
      ...this.#snapshot(),
      workers: governor ? governor.chosen : plan.workers,
      ...(governor ? { workersTried: [...governor.history] } : {}),
      bufferSize: plan.bufferSize,
      outOfOrder: plan.outOfOrder,
      ...(this.#preZeroed ? { preZeroed: true } : {}),
      ...(plan.copyOffload ? { bytesOffloaded: this.#stats.bytesOffloaded } : {}),
      ...(checksum !== undefined ? { checksum } : {}),
      ...(verified ? { verified } : {}),
      ...(this.#o.resume ? { resumedFrom: plan.start } : {}),
      ...(this.#checkpointer ? { checkpoints: this.#checkpointer.count } : {}),
      ...(fanout ? { targets: fanout.outcomes() } : {}),
    };
  }
}
