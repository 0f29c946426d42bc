/**
 * Checkpoints of a convert: durable progress, so that an interrupted copy resumes
 * instead of starting over.
 *
 * - The watermark (ProgressLedger) is the target offset below which every chunk's
 *   writes have completed: with in-order writes the end of the last chunk written,
 *   with -W the start of the oldest chunk still in flight. Chunks in flight are at
 *   most the workers, so the ledger holds at most that many entries.
 * - A checkpoint reads the watermark, flushes the target (what completed before the
 *   flush is durable after it), and saves {done: watermark, dirtyEnd}. Writes beyond
 *   dirtyEnd wait until a later checkpoint has been saved, so after a crash only
 *   [done, dirtyEnd) may hold stray writes: a resumed run writes that range in full
 *   (zeroes too) and may still skip zeroes beyond it on a target that read back zeroes.
 *   dirtyEnd - done is the schedule's bytes plus workers x buffer: the bound on what is
 *   copied twice.
 * - With a checksum, the hash state at the watermark goes into the checkpoint (the
 *   tap feeds its hash only with chunks already written, see checksum-tap.ts).
 */
import { BlockError, toBlockError } from '../errors.js';
import type { BlockHashState } from '../checksum/blkhash.js';
import type { CheckpointProgress, CheckpointSchedule } from './options.js';
import type { FailedTarget } from './fanout.js';
import { RESUME_STATE_KIND, RESUME_STATE_VERSION, type ConvertIdentity, type ResumeState } from './resume.js';

export const DEFAULT_CHECKPOINT_BYTES = 1024 * 1024 * 1024;
export const DEFAULT_CHECKPOINT_SECONDS = 30;

/** Completion of chunks in cursor order: the watermark, with O(chunks in flight) memory. */
export class ProgressLedger {
  #open = 0;
  #watermark: number;
  /** Chunks completed ahead of the oldest open one: seq -> end. */
  readonly #ahead = new Map<number, number>();

  constructor(start: number) {
    this.#watermark = start;
  }

  /** The target offset below which every chunk has completed. */
  get watermark(): number {
    return this.#watermark;
  }
  /** The oldest chunk not completed (chunks before it all have). */
  get openSeq(): number {
    return this.#open;
  }

  /** Chunk `seq` (ending at target offset `end`) completed; true if the watermark moved. */
  complete(seq: number, end: number): boolean {
    if (seq !== this.#open) {
      this.#ahead.set(seq, end);
      return false;
    }
    this.#watermark = end;
    this.#open++;
    for (let e = this.#ahead.get(this.#open); e !== undefined; e = this.#ahead.get(this.#open)) {
      this.#ahead.delete(this.#open);
      this.#watermark = e;
      this.#open++;
    }
    return true;
  }
}

export interface CheckpointerParams {
  readonly schedule: CheckpointSchedule;
  readonly identity: ConvertIdentity;
  readonly total: number;
  /** Where this run starts, and the range a previous run may have left stray writes in. */
  readonly start: number;
  readonly dirtyEnd: number;
  readonly targetZero: boolean;
  /** Workers x buffer: what is in flight beyond the watermark at most. */
  readonly inFlight: number;
  readonly flush: () => Promise<void>;
  /** The hash state once the hash has taken every chunk before `seq`. */
  readonly hashAt?: (seq: number) => Promise<BlockHashState>;
  readonly onCheckpoint: (state: ResumeState) => void;
  /** Several targets: those dropped so far, recorded in each checkpoint. */
  readonly failedTargets?: () => readonly FailedTarget[];
  /** A checkpoint failed (flush or save): the copy stops with this error. */
  readonly onError: (err: BlockError) => void;
}

export class Checkpointer {
  readonly ledger: ProgressLedger;
  readonly #p: CheckpointerParams;
  readonly #everyMs: number;
  /** Bytes of watermark progress that start a checkpoint. */
  readonly #trigger: number;
  /** dirtyEnd - done of a checkpoint. */
  readonly #span: number;
  #lastDone: number;
  #lastAt = performance.now();
  /** Writes may reach this offset: the dirtyEnd last saved. */
  #limit: number;
  #running: Promise<void> | null = null;
  #stopped = false;
  #waiters: Array<() => void> = [];
  #count = 0;

  constructor(p: CheckpointerParams) {
    this.#p = p;
    this.ledger = new ProgressLedger(p.start);
    const bytes = p.schedule.everyBytes ?? DEFAULT_CHECKPOINT_BYTES;
    if (!Number.isSafeInteger(bytes) || bytes < 1024 * 1024)
      throw new BlockError('EINVAL', `checkpoint interval must be at least 1 MiB, got ${bytes} bytes`, {
        field: 'checkpoint',
      });
    const seconds = p.schedule.everySeconds ?? DEFAULT_CHECKPOINT_SECONDS;
    if (!(seconds >= 0))
      throw new BlockError('EINVAL', `checkpoint seconds must be 0 or more, got ${seconds}`, { field: 'checkpoint' });
    this.#everyMs = seconds * 1000;
    // Started at three quarters of the interval, a checkpoint has a quarter (and the
    // buffers in flight) of headroom before writes must wait for it.
    this.#trigger = Math.ceil((bytes * 3) / 4);
    this.#span = bytes + p.inFlight;
    this.#lastDone = p.start;
    this.#limit = p.dirtyEnd;
  }

  /** Largest written chunk that can never wait forever on the limit. */
  get span(): number {
    return this.#span;
  }
  /** Checkpoints taken (the starting state aside). */
  get count(): number {
    return this.#count;
  }
  /** Writes ending at or before this go ahead without waiting. */
  get limit(): number {
    return this.#limit;
  }

  /** Saves the starting state (nothing written yet, so no flush) before the first write. */
  async begin(): Promise<void> {
    await this.#save(
      this.#p.start,
      Math.max(this.#limit, this.#p.start + this.#span),
      this.#p.hashAt ? await this.#p.hashAt(0) : undefined,
      false,
    );
  }

  /** Chunk `seq` ending at `end` has completed its writes. */
  completed(seq: number, end: number): void {
    if (this.ledger.complete(seq, end)) this.#maybeStart();
  }

  /** Waits until a write ending at `end` stays within what the saved state allows. */
  async allow(end: number): Promise<void> {
    while (end > this.#limit) {
      if (this.#stopped) return;
      const woken = new Promise<void>((r) => this.#waiters.push(r));
      this.#maybeStart();
      await woken;
    }
  }

  /** Takes a checkpoint of everything completed now (the copy stopped between chunks). */
  async final(): Promise<void> {
    while (this.#running) await this.#running;
    if (this.#stopped || this.ledger.watermark <= this.#lastDone || this.ledger.watermark >= this.#p.total) return;
    this.#running = this.#take();
    await this.#running;
    this.#running = null;
  }

  /** No more checkpoints (the copy failed or ended); waits for one being taken. */
  async stop(): Promise<void> {
    this.#stopped = true;
    this.#wake();
    await this.#running;
  }

  #maybeStart(): void {
    // At the end the copy is about to finish: its result, not a checkpoint, records it.
    if (this.#running || this.#stopped || this.ledger.watermark >= this.#p.total) return;
    const progress = this.ledger.watermark - this.#lastDone;
    const due =
      this.#waiters.length > 0
        ? progress > 0 || this.ledger.watermark + this.#span > this.#limit
        : progress >= this.#trigger ||
          (this.#everyMs > 0 && progress > 0 && performance.now() - this.#lastAt >= this.#everyMs);
    if (!due) return;
    this.#running = this.#take().finally(() => {
      this.#running = null;
      this.#maybeStart();
    });
  }

  async #take(): Promise<void> {
    const done = this.ledger.watermark;
    const seq = this.ledger.openSeq;
    try {
      const hash = this.#p.hashAt?.(seq);
      if (done > this.#lastDone) {
        try {
          await this.#p.flush();
        } catch (err) {
          throw toBlockError(err, { op: 'flush' });
        }
      }
      await this.#save(done, Math.max(this.#limit, done + this.#span), await hash, true);
    } catch (err) {
      this.#stopped = true;
      this.#p.onError(toBlockError(err, { op: 'checkpoint' }));
    } finally {
      this.#wake();
    }
  }

  async #save(done: number, dirtyEnd: number, checksum: BlockHashState | undefined, counted: boolean): Promise<void> {
    const progress: CheckpointProgress = {
      done,
      dirtyEnd: Math.min(dirtyEnd, this.#p.total),
      total: this.#p.total,
      targetZero: this.#p.targetZero,
      ...(checksum ? { checksum } : {}),
    };
    const state: ResumeState = {
      kind: RESUME_STATE_KIND,
      version: RESUME_STATE_VERSION,
      ...this.#p.identity,
      progress,
      savedAt: new Date().toISOString(),
      ...(this.#p.failedTargets?.().length ? { failedTargets: this.#p.failedTargets() } : {}),
    };
    if (this.#p.schedule.save) {
      try {
        await this.#p.schedule.save(state);
      } catch (err) {
        throw new BlockError(
          'EIO',
          `checkpoint: the state could not be saved: ${(err as Error)?.message ?? String(err)}`,
          { op: 'checkpoint', cause: err },
        );
      }
    }
    this.#lastDone = done;
    this.#lastAt = performance.now();
    this.#limit = Math.max(this.#limit, dirtyEnd);
    if (counted) this.#count++;
    this.#p.onCheckpoint(state);
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const r of w) r();
  }
}
