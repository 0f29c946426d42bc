/**
 * A fleet worker: runs convert jobs from the queue with the core's library API.
 * - Before a job starts, it takes a slot on every storage server the job touches
 *   (caps.ts); when one is full the job goes back as delayed and the worker takes others.
 * - The job's checkpoints are saved into its data, so a retry resumes on any worker.
 * - Progress (bytes, rate, ETA) goes into the job; the result carries the checksum and,
 *   with several targets, each one's outcome.
 * - close() stops running jobs at a checkpoint, so they are retried from there.
 */
import { DelayedError, Worker, type Job } from 'bullmq';
import { Redis } from 'ioredis';
import { openTargets, startConvert, type BlockBackend, type ConvertResult, type DriverRegistry } from '@blockconv/core';
import { acquireCaps, serverOf } from './caps.js';
import {
  CONVERT_QUEUE,
  checkRedis,
  connection,
  type ConvertJobData,
  type ConvertJobProgress,
  type ConvertJobResult,
} from './jobs.js';

export interface FleetWorkerOptions {
  readonly redis: string;
  /** Jobs run at once by this worker. Default 1. */
  readonly concurrency?: number;
  /** Opens and creates images: the drivers this host has. */
  readonly registry: DriverRegistry;
  /** Names this worker in results and logs. */
  readonly name?: string;
  /**
   * How long a job's lock (and its server slots) last without renewal (renewed at a
   * fraction of it): a worker that died (kill -9, a lost host) gives its jobs back to
   * the others this long after, and they resume from the job's checkpoint. Default 30 s.
   */
  readonly lockMs?: number;
  /** Called as jobs start and end (for logs): never with a secret, locations are the job's. */
  readonly onEvent?: (e: {
    event: 'start' | 'end' | 'fail' | 'wait-cap';
    job: string;
    target: string;
    detail?: string;
  }) => void;
}

/** A job whose worker vanished this many times is failed instead of retried again. */
const MAX_STALLED = 3;
/** A job waiting for a server slot is tried again after this (plus jitter, so workers do not take turns in step). */
const CAP_RETRY_MS = 500;

/** Runs convert jobs from the queue until closed. */
export class FleetWorker {
  readonly #worker: Worker<ConvertJobData, ConvertJobResult>;
  readonly #registry: DriverRegistry;
  readonly #name: string;
  readonly #lockMs: number;
  /** Commands of its own for the server caps (BullMQ's connection blocks). */
  readonly #redis: Redis;
  readonly #onEvent: NonNullable<FleetWorkerOptions['onEvent']>;
  /** Running jobs: stopped at a checkpoint when the worker closes. */
  readonly #running = new Set<{ stop: (reason: Error) => void }>();

  constructor(o: FleetWorkerOptions) {
    this.#registry = o.registry;
    this.#name = o.name ?? `${process.pid}`;
    this.#lockMs = o.lockMs ?? 30_000;
    this.#onEvent = o.onEvent ?? (() => {});
    this.#redis = new Redis(o.redis, { maxRetriesPerRequest: null });
    this.#redis.on('error', () => {});
    this.#worker = new Worker<ConvertJobData, ConvertJobResult>(CONVERT_QUEUE, (job, token) => this.#run(job, token), {
      connection: connection(o.redis),
      concurrency: o.concurrency ?? 1,
      autorun: true,
      name: this.#name,
      lockDuration: this.#lockMs,
      stalledInterval: this.#lockMs,
      maxStalledCount: MAX_STALLED,
    });
    // A failed job is BullMQ's to retry; the worker itself goes on.
    this.#worker.on('error', () => {});
  }

  /** Resolves once the worker is connected and taking jobs. */
  async ready(): Promise<void> {
    await this.#worker.waitUntilReady();
  }

  /** A worker, once Redis has answered (a clear error if it cannot be reached). */
  static async start(o: FleetWorkerOptions): Promise<FleetWorker> {
    await checkRedis(o.redis);
    const w = new FleetWorker(o);
    await w.ready();
    return w;
  }

  /**
   * Stops: running jobs finish their chunks in flight, save a last checkpoint into the
   * job and fail this attempt, so that a retry (on any worker) resumes from there.
   */
  async close(): Promise<void> {
    for (const r of this.#running) r.stop(new Error(`worker ${this.#name} is shutting down`));
    await this.#worker.close();
    this.#redis.disconnect();
  }

  async #run(job: Job<ConvertJobData, ConvertJobResult>, token?: string): Promise<ConvertJobResult> {
    const d = job.data;
    const targetNames = [d.target, ...(d.tee ?? [])];
    const servers = [...d.sources, ...targetNames].map(serverOf).filter((s): s is string => s !== undefined);
    const lease = await acquireCaps(this.#redis, servers, job.id!, this.#lockMs);
    if (!lease) {
      // At its cap: back to the queue for a moment; this worker takes other jobs meanwhile.
      this.#onEvent({ event: 'wait-cap', job: job.id!, target: d.target });
      await job.moveToDelayed(Date.now() + CAP_RETRY_MS + Math.floor(Math.random() * CAP_RETRY_MS), token);
      throw new DelayedError();
    }
    this.#onEvent({
      event: 'start',
      job: job.id!,
      target: targetNames.join(', '),
      ...(d.resume ? { detail: `resuming at ${d.resume.progress.done}` } : {}),
    });
    try {
      const r = await this.#convert(job);
      this.#onEvent({ event: 'end', job: job.id!, target: targetNames.join(', '), detail: r.checksum });
      return r;
    } catch (err) {
      this.#onEvent({ event: 'fail', job: job.id!, target: targetNames.join(', '), detail: (err as Error).message });
      throw err;
    } finally {
      await lease.release();
    }
  }

  async #convert(job: Job<ConvertJobData, ConvertJobResult>): Promise<ConvertJobResult> {
    const d = job.data;
    const reg = this.#registry;
    const resume = d.resume;
    const targetNames = [d.target, ...(d.tee ?? [])];
    const sources: BlockBackend[] = [];
    let targets: BlockBackend[] = [];
    try {
      for (const s of d.sources)
        sources.push(await reg.open(s, { format: d.sourceFormat, readOnly: true, options: d.sourceOptions }));
      const total = sources.reduce((n, s) => n + s.size, 0);
      const format = d.targetFormat ?? 'raw';
      targets = await openTargets(reg, targetNames, {
        format,
        create: !d.noCreate,
        size: total,
        resume,
        openOptions: d.targetOptions,
        createOptions: d.createOptions,
      });
      const several = targets.length > 1;
      const convertJob = startConvert({
        sources,
        ...(several ? { targets } : { target: targets[0] }),
        workers: d.workers,
        bufferSize: d.bufferSize,
        outOfOrder: d.outOfOrder,
        compress: d.compress,
        minSparse: d.minSparse,
        rateLimit: d.rateLimit,
        checksum: d.checksum !== false,
        checkpoint: {
          everyBytes: d.checkpointBytes,
          everySeconds: d.checkpointSeconds,
          save: async (state) => {
            await job.updateData({ ...job.data, resume: state });
          },
        },
        resume,
        resumeTag: {
          targetFormat: format,
          create: String(!d.noCreate),
          createOptions: JSON.stringify(d.createOptions ?? {}),
        },
        progressInterval: 1000,
      });
      const handle = { stop: (reason: Error) => convertJob.stop(reason) };
      this.#running.add(handle);
      convertJob.on('progress', (p) => {
        const eta = p.rate > 0 ? Math.round((p.total - p.done) / p.rate) : undefined;
        const progress: ConvertJobProgress = {
          done: p.done,
          total: p.total,
          progress: p.total ? Math.floor((p.done / p.total) * 1000) / 10 : 100,
          rate: Math.round(p.rate),
          ...(eta !== undefined ? { etaSeconds: eta } : {}),
          ...(resume ? { resumedFrom: resume.progress.done } : {}),
          worker: this.#name,
        };
        job.updateProgress(progress as unknown as object).catch(() => {});
      });
      let r: ConvertResult;
      try {
        r = await convertJob.done;
      } finally {
        this.#running.delete(handle);
      }
      const closing = targets;
      targets = [];
      await Promise.all(closing.map((t) => t.close()));
      return {
        total: r.total,
        elapsedMs: Math.round(r.elapsedMs),
        bytesRead: r.bytesRead,
        bytesWritten: r.bytesWritten,
        worker: this.#name,
        ...(r.checksum ? { checksum: r.checksum } : {}),
        ...(r.resumedFrom !== undefined ? { resumedFrom: r.resumedFrom } : {}),
        ...(r.checkpoints !== undefined ? { checkpoints: r.checkpoints } : {}),
        ...(r.targets ? { targets: r.targets } : {}),
      };
    } finally {
      await Promise.all([...sources, ...targets].map((b) => b.close().catch(() => {})));
    }
  }
}
