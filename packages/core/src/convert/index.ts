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
 * One chunk's way through, all in run.ts's ConvertRun.#copyChunk: plan.ts derives every
 * size once; the cursor (cursor.ts) carves the next chunk; the worker's ChunkCopier
 * (copier.ts) decides its mode once and reads it into its buffer; the write order
 * (order.ts) lets it issue its writes in turn; the copier writes its pieces and counts
 * the bytes. This file is the job's public face (ConvertJob, convert, startConvert).
 */
import { EventEmitter } from 'node:events';
import type { ConvertOptions, ConvertProgress, ConvertResult } from './options.js';
import type { ResumeState } from './resume.js';
import { StopRequest, runConvert } from './run.js';

export * from './options.js';
export { checkCopyOffload } from './plan.js';
export { FanoutTarget, UnopenedTarget, type FailedTarget, type TargetOutcome } from './fanout.js';
export { openTargets, type OpenTargetsOptions } from './targets.js';
export { DEFAULT_CHECKPOINT_BYTES, DEFAULT_CHECKPOINT_SECONDS, ProgressLedger } from './checkpoints.js';
export {
  HEAD_BYTES,
  RESUME_STATE_KIND,
  RESUME_STATE_VERSION,
  checkResume,
  checkStateShape,
  identifyConvert,
  type ConvertIdentity,
  type ImageIdentity,
  type ResumeState,
} from './resume.js';

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
    this.done = runConvert(options, this, this.#controller.signal, this.#stop).finally(() => {
      this.#finished = true;
    });
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
    const onProgress = (p: ConvertProgress): void => {
      queue.push(p);
      wake?.();
    };
    this.on('progress', onProgress);
    const ended = this.done
      .then(
        () => {},
        () => {},
      )
      .finally(() => wake?.());
    try {
      for (;;) {
        while (queue.length) yield queue.shift()!;
        if (this.#finished) break;
        await Promise.race([
          new Promise<void>((r) => {
            wake = r;
          }),
          ended,
        ]);
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
export function convert(
  options: ConvertOptions & { onProgress?: (p: ConvertProgress) => void; onCheckpoint?: (s: ResumeState) => void },
): Promise<ConvertResult> {
  const job = new ConvertJob(options);
  if (options.onProgress) job.on('progress', options.onProgress);
  if (options.onCheckpoint) job.on('checkpoint', options.onCheckpoint);
  return job.done;
}
