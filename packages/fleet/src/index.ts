/**
 * @blockconv/fleet: convert jobs across many hosts on BullMQ + Redis. BullMQ brings the
 * jobs, retries with backoff, progress and concurrency; this package adds what is
 * specific to block copies:
 * - a job's last checkpoint (the core's ResumeState) is stored in the job's data, so a
 *   retried job resumes where it stopped, on whichever worker picks it up;
 * - progress (bytes, rate, ETA) goes into the job; the result carries the checksum;
 * - closing a worker stops its running jobs at a checkpoint, so that they are retried
 *   from there rather than from zero.
 * The core never depends on this package; it uses only the core's public API.
 */
import { Queue, Worker, type Job, type JobsOptions } from 'bullmq';
import { Redis } from 'ioredis';
import { BlockError, redactLocation, startConvert, type BlockBackend, type ConvertResult, type DriverRegistry, type ResumeState } from '@blockconv/core';

/** The BullMQ queue convert jobs go through. */
export const CONVERT_QUEUE = 'blockconv-convert';

export interface ConvertJobData {
  /** Source locations (paths or URLs), concatenated. No credentials: see the README. */
  readonly sources: readonly string[];
  readonly target: string;
  readonly sourceFormat?: string;
  /** Default raw. */
  readonly targetFormat?: string;
  /** Write into an existing target (-n); default: create it. */
  readonly noCreate?: boolean;
  readonly workers?: number;
  readonly bufferSize?: number;
  readonly outOfOrder?: boolean;
  readonly compress?: boolean;
  readonly minSparse?: number;
  /** Default true: the result carries the blkhash digest. */
  readonly checksum?: boolean;
  readonly checkpointBytes?: number;
  readonly checkpointSeconds?: number;
  /** Bytes per second (-r). */
  readonly rateLimit?: number;
  /** Written by workers: the last checkpoint, which a retry resumes from. */
  readonly resume?: ResumeState;
}

export interface ConvertJobProgress {
  readonly done: number;
  readonly total: number;
  /** Bytes per second so far (this attempt). */
  readonly rate: number;
  /** Seconds left at that rate, when known. */
  readonly etaSeconds?: number;
  readonly resumedFrom?: number;
}

export interface ConvertJobResult {
  readonly total: number;
  readonly checksum?: string;
  readonly elapsedMs: number;
  readonly bytesRead: number;
  readonly bytesWritten: number;
  readonly resumedFrom?: number;
  readonly checkpoints?: number;
  readonly worker: string;
}

/** A Redis connection for BullMQ from a URL (workers block on Redis: no retry limit per request). */
function connection(url: string): { url: string; maxRetriesPerRequest: null } {
  return { url, maxRetriesPerRequest: null };
}

/**
 * Fails fast, in one line, when Redis cannot be reached (BullMQ would retry forever):
 * one connection attempt, bounded by `timeoutMs`.
 */
export async function checkRedis(url: string, timeoutMs = 5000): Promise<void> {
  let client: Redis;
  try {
    client = new Redis(url, { lazyConnect: true, connectTimeout: timeoutMs, maxRetriesPerRequest: 0, retryStrategy: () => null, enableOfflineQueue: false });
  } catch (err) {
    throw new BlockError('EINVAL', `malformed Redis URL ${redactLocation(url)}: ${(err as Error).message}`, { field: 'redis' });
  }
  // The socket's own error says more than the client's "Connection is closed".
  let cause: Error | undefined;
  client.on('error', (err: Error) => { cause ??= err; });
  try {
    await client.connect();
    await client.ping();
  } catch (err) {
    const why = cause ?? (err as Error);
    throw new BlockError((why as NodeJS.ErrnoException).code === 'ENOTFOUND' ? 'ENOTFOUND' : 'ECONNREFUSED', `cannot reach Redis at ${redactLocation(url)}: ${why.message}`, { field: 'redis' });
  } finally {
    client.disconnect();
  }
}

/** Adds a convert job; retried (resuming) `attempts` times with exponential backoff by default. */
export async function submitConvert(redisUrl: string, data: ConvertJobData, options: JobsOptions = {}): Promise<string> {
  if (!data.sources?.length || !data.target) throw new BlockError('EINVAL', 'a convert job needs sources and a target', { field: 'job' });
  // Secrets never go into Redis: workers find credentials themselves (environment, files).
  for (const l of [...data.sources, data.target]) {
    if (redactLocation(l) !== l) {
      throw new BlockError('EINVAL', `${redactLocation(l)}: a job must not carry credentials; give them to the workers (e.g. LIBISCSI_CHAP_PASSWORD, a password file)`, { field: 'location' });
    }
  }
  await checkRedis(redisUrl);
  const queue = new Queue<ConvertJobData>(CONVERT_QUEUE, { connection: connection(redisUrl) });
  queue.on('error', () => {});
  try {
    const job = await queue.add('convert', data, { attempts: 3, backoff: { type: 'exponential', delay: 1000 }, ...options });
    return job.id!;
  } finally {
    await queue.close();
  }
}

export interface FleetWorkerOptions {
  readonly redis: string;
  /** Jobs run at once by this worker. Default 1. */
  readonly concurrency?: number;
  /** Opens and creates images: the drivers this host has. */
  readonly registry: DriverRegistry;
  /** Names this worker in results and logs. */
  readonly name?: string;
  /**
   * How long a job's lock lasts without renewal (renewed at half of it): a worker that
   * died (kill -9, a lost host) gives its jobs back to the others this long after,
   * and they resume from the job's checkpoint. Default 30 s.
   */
  readonly lockMs?: number;
}

/** A job whose worker vanished this many times is failed instead of retried again. */
const MAX_STALLED = 3;

/** Runs convert jobs from the queue until closed. */
export class FleetWorker {
  readonly #worker: Worker<ConvertJobData, ConvertJobResult>;
  readonly #registry: DriverRegistry;
  readonly #name: string;
  /** Running jobs: stopped at a checkpoint when the worker closes. */
  readonly #running = new Set<{ stop: (reason: Error) => void }>();

  constructor(o: FleetWorkerOptions) {
    this.#registry = o.registry;
    this.#name = o.name ?? `${process.pid}`;
    this.#worker = new Worker<ConvertJobData, ConvertJobResult>(CONVERT_QUEUE, (job) => this.#run(job), {
      connection: connection(o.redis), concurrency: o.concurrency ?? 1, autorun: true, name: this.#name,
      lockDuration: o.lockMs ?? 30_000, stalledInterval: o.lockMs ?? 30_000, maxStalledCount: MAX_STALLED,
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
  }

  async #run(job: Job<ConvertJobData, ConvertJobResult>): Promise<ConvertJobResult> {
    const d = job.data;
    const reg = this.#registry;
    const resume = d.resume;
    const sources: BlockBackend[] = [];
    let target: BlockBackend | undefined;
    try {
      for (const s of d.sources) sources.push(await reg.open(s, { format: d.sourceFormat, readOnly: true }));
      const total = sources.reduce((n, s) => n + s.size, 0);
      const format = d.targetFormat ?? 'raw';
      if (resume) {
        await reg.reclaimForResume(d.target, { format });
        target = await reg.open(d.target, { format });
      } else if (d.noCreate) {
        target = await reg.open(d.target, { format });
      } else {
        target = await reg.create(d.target, total, { format });
      }
      const convertJob = startConvert({
        sources, target,
        workers: d.workers, bufferSize: d.bufferSize, outOfOrder: d.outOfOrder, compress: d.compress, minSparse: d.minSparse, rateLimit: d.rateLimit,
        checksum: d.checksum !== false,
        checkpoint: {
          everyBytes: d.checkpointBytes, everySeconds: d.checkpointSeconds,
          save: async (state) => { await job.updateData({ ...job.data, resume: state }); },
        },
        resume,
        resumeTag: { targetFormat: format, create: String(!d.noCreate) },
        progressInterval: 1000,
      });
      const handle = { stop: (reason: Error) => convertJob.stop(reason) };
      this.#running.add(handle);
      convertJob.on('progress', (p) => {
        const eta = p.rate > 0 ? Math.round((p.total - p.done) / p.rate) : undefined;
        const progress: ConvertJobProgress = { done: p.done, total: p.total, rate: Math.round(p.rate), ...(eta !== undefined ? { etaSeconds: eta } : {}), ...(resume ? { resumedFrom: resume.progress.done } : {}) };
        job.updateProgress(progress as unknown as object).catch(() => {});
      });
      let r: ConvertResult;
      try {
        r = await convertJob.done;
      } finally {
        this.#running.delete(handle);
      }
      await target.close();
      target = undefined;
      return {
        total: r.total, elapsedMs: Math.round(r.elapsedMs), bytesRead: r.bytesRead, bytesWritten: r.bytesWritten, worker: this.#name,
        ...(r.checksum ? { checksum: r.checksum } : {}), ...(r.resumedFrom !== undefined ? { resumedFrom: r.resumedFrom } : {}),
        ...(r.checkpoints !== undefined ? { checkpoints: r.checkpoints } : {}),
      };
    } finally {
      await Promise.all([...sources, target].map((b) => b?.close().catch(() => {})));
    }
  }
}

/** A job as `blockconv jobs` shows it: locations as submitted (never credentials, see submitConvert). */
export interface ConvertJobSummary {
  readonly id: string;
  readonly state: string;
  readonly sources: readonly string[];
  readonly target: string;
  readonly attemptsMade: number;
  readonly progress?: ConvertJobProgress;
  readonly result?: ConvertJobResult;
  readonly failedReason?: string;
  /** Durable bytes of the last checkpoint, when the job has one. */
  readonly checkpoint?: number;
}

async function summarize(job: Job<ConvertJobData, ConvertJobResult>): Promise<ConvertJobSummary> {
  const p = job.progress as Partial<ConvertJobProgress> | number;
  return {
    id: job.id!, state: await job.getState(), sources: job.data.sources, target: job.data.target, attemptsMade: job.attemptsMade,
    ...(typeof p === 'object' && p && p.total !== undefined ? { progress: p as ConvertJobProgress } : {}),
    ...(job.returnvalue ? { result: job.returnvalue } : {}),
    ...(job.failedReason ? { failedReason: job.failedReason } : {}),
    ...(job.data.resume ? { checkpoint: job.data.resume.progress.done } : {}),
  };
}

/** The queue's convert jobs (or those named), newest first. */
export async function listConvertJobs(redisUrl: string, ids?: readonly string[]): Promise<ConvertJobSummary[]> {
  await checkRedis(redisUrl);
  const queue = new Queue<ConvertJobData, ConvertJobResult>(CONVERT_QUEUE, { connection: connection(redisUrl) });
  queue.on('error', () => {});
  try {
    const jobs = ids
      ? (await Promise.all(ids.map((id) => queue.getJob(id)))).filter((j): j is Job<ConvertJobData, ConvertJobResult> => j !== undefined)
      : await queue.getJobs(['active', 'waiting', 'delayed', 'prioritized', 'completed', 'failed'], 0, 999);
    return Promise.all(jobs.map(summarize));
  } finally {
    await queue.close();
  }
}

/**
 * Follows jobs until each has completed or failed for good (attempts used up), calling
 * `onUpdate` with their summaries about twice a second.
 */
export async function followJobs(redisUrl: string, ids: readonly string[], onUpdate: (jobs: readonly ConvertJobSummary[]) => void, signal?: AbortSignal): Promise<ConvertJobSummary[]> {
  for (;;) {
    signal?.throwIfAborted();
    const jobs = await listConvertJobs(redisUrl, ids);
    onUpdate(jobs);
    if (jobs.length === ids.length && jobs.every((j) => j.state === 'completed' || j.state === 'failed')) return jobs;
    await new Promise((r) => setTimeout(r, 500));
  }
}
