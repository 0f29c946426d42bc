/**
 * Convert jobs in the queue: what a job carries, how it is submitted (one, or a batch),
 * and how it is listed and followed. Locations in jobs never hold credentials: a job
 * names them by reference (a driver option such as `password-env` or `password-file`,
 * resolved on the worker), so Redis, logs and the dashboard never see a secret.
 */
import { Queue, type Job, type JobsOptions } from 'bullmq';
import { Redis } from 'ioredis';
import { BlockError, isSecretParameter, redactLocation, type ResumeState, type TargetOutcome } from '@blockconv/core';
import { setServerCaps } from './caps.js';
import type { ConvertBatch } from './batch.js';

/** The BullMQ queue convert jobs go through. */
export const CONVERT_QUEUE = 'blockconv-convert';

export interface ConvertJobData {
  /** Source locations (paths or URLs), concatenated. No credentials. */
  readonly sources: readonly string[];
  readonly target: string;
  /** More targets written from the same read (convert --tee): a failing one fails alone. */
  readonly tee?: readonly string[];
  readonly sourceFormat?: string;
  /** Default raw. */
  readonly targetFormat?: string;
  /** Write into an existing target (-n); default: create it. */
  readonly noCreate?: boolean;
  /** Driver open options of the sources and targets, creation options (-o): references to secrets only. */
  readonly sourceOptions?: Readonly<Record<string, string>>;
  readonly targetOptions?: Readonly<Record<string, string>>;
  readonly createOptions?: Readonly<Record<string, string>>;
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
  /** Percent done, 0-100 (what dashboards draw). */
  readonly progress: number;
  /** Bytes per second so far (this attempt). */
  readonly rate: number;
  /** Seconds left at that rate, when known. */
  readonly etaSeconds?: number;
  readonly resumedFrom?: number;
  readonly worker?: string;
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
  /** With tee targets: each one's outcome; only those `ok` hold the copy. */
  readonly targets?: readonly TargetOutcome[];
}

/** A Redis connection for BullMQ from a URL (workers block on Redis: no retry limit per request). */
export function connection(url: string): { url: string; maxRetriesPerRequest: null } {
  return { url, maxRetriesPerRequest: null };
}

/**
 * Fails fast, in one line, when Redis cannot be reached (BullMQ would retry forever):
 * one connection attempt, bounded by `timeoutMs`.
 */
export async function checkRedis(url: string, timeoutMs = 5000): Promise<void> {
  let client: Redis;
  try {
    client = new Redis(url, {
      lazyConnect: true,
      connectTimeout: timeoutMs,
      maxRetriesPerRequest: 0,
      retryStrategy: () => null,
      enableOfflineQueue: false,
    });
  } catch (err) {
    throw new BlockError('EINVAL', `malformed Redis URL ${redactLocation(url)}: ${(err as Error).message}`, {
      field: 'redis',
    });
  }
  // The socket's own error says more than the client's "Connection is closed".
  let cause: Error | undefined;
  client.on('error', (err: Error) => {
    cause ??= err;
  });
  try {
    await client.connect();
    await client.ping();
  } catch (err) {
    const why = cause ?? (err as Error);
    throw new BlockError(
      (why as NodeJS.ErrnoException).code === 'ENOTFOUND' ? 'ENOTFOUND' : 'ECONNREFUSED',
      `cannot reach Redis at ${redactLocation(url)}: ${why.message}`,
      { field: 'redis' },
    );
  } finally {
    client.disconnect();
  }
}

/** Refuses what must not reach Redis: credentials in a location, secret values in options. */
export function checkJobData(data: ConvertJobData): void {
  if (!data.sources?.length || !data.target)
    throw new BlockError('EINVAL', 'a convert job needs sources and a target', { field: 'job' });
  for (const l of [...data.sources, data.target, ...(data.tee ?? [])]) {
    if (redactLocation(l) !== l) {
      throw new BlockError(
        'EINVAL',
        `${redactLocation(l)}: a job must not carry credentials; name them by reference (e.g. -o password-env=VAR or password-file=PATH, resolved on the worker)`,
        { field: 'location' },
      );
    }
  }
  for (const [field, o] of [
    ['sourceOptions', data.sourceOptions],
    ['targetOptions', data.targetOptions],
    ['createOptions', data.createOptions],
  ] as const) {
    for (const k of Object.keys(o ?? {})) {
      if (isSecretParameter(k) && !/-(file|env)$/.test(k))
        throw new BlockError(
          'EINVAL',
          `${field}.${k}: a job must not carry a secret; name it by reference (${k}-env or ${k}-file, resolved on the worker)`,
          { field: `${field}.${k}` },
        );
    }
  }
}

function queueOf(redisUrl: string): Queue<ConvertJobData, ConvertJobResult> {
  const queue = new Queue<ConvertJobData, ConvertJobResult>(CONVERT_QUEUE, { connection: connection(redisUrl) });
  queue.on('error', () => {});
  return queue;
}

const JOB_DEFAULTS: JobsOptions = { attempts: 3, backoff: { type: 'exponential', delay: 1000 } };

/** Adds a convert job; retried (resuming) `attempts` times with exponential backoff by default. */
export async function submitConvert(
  redisUrl: string,
  data: ConvertJobData,
  options: JobsOptions = {},
): Promise<string> {
  checkJobData(data);
  await checkRedis(redisUrl);
  const queue = queueOf(redisUrl);
  try {
    const job = await queue.add('convert', data, { ...JOB_DEFAULTS, ...options });
    return job.id!;
  } finally {
    await queue.close();
  }
}

/** Queues a batch (parseBatch) in one round trip, after setting its caps; returns the job ids in order. */
export async function submitBatch(redisUrl: string, batch: ConvertBatch, options: JobsOptions = {}): Promise<string[]> {
  for (const d of batch.jobs) checkJobData(d);
  await checkRedis(redisUrl);
  if (Object.keys(batch.caps).length) {
    const r = new Redis(redisUrl, { maxRetriesPerRequest: 3 });
    r.on('error', () => {});
    try {
      await setServerCaps(r, batch.caps);
    } finally {
      r.disconnect();
    }
  }
  const queue = queueOf(redisUrl);
  try {
    const jobs = await queue.addBulk(
      batch.jobs.map((data) => ({
        name: 'convert',
        data,
        opts: { ...JOB_DEFAULTS, ...(batch.attempts ? { attempts: batch.attempts } : {}), ...options },
      })),
    );
    return jobs.map((j) => j.id!);
  } finally {
    await queue.close();
  }
}

/** A job as `blockconv jobs` shows it: locations as submitted (never credentials, see checkJobData). */
export interface ConvertJobSummary {
  readonly id: string;
  readonly state: string;
  readonly sources: readonly string[];
  readonly target: string;
  readonly tee?: readonly string[];
  readonly attemptsMade: number;
  readonly progress?: ConvertJobProgress;
  readonly result?: ConvertJobResult;
  readonly failedReason?: string;
  /** Durable bytes of the last checkpoint, when the job has one. */
  readonly checkpoint?: number;
}

/** Completed with every target, or not: a completed job without a result (none recorded) has not succeeded. */
export function jobSucceeded(j: ConvertJobSummary): boolean {
  return j.state === 'completed' && j.result !== undefined && (j.result.targets ?? []).every((t) => t.ok);
}

async function summarize(queue: Queue, found: Job<ConvertJobData, ConvertJobResult>): Promise<ConvertJobSummary> {
  let job = found;
  const state = await job.getState();
  // The job was read before its state: one that finished in between was read without its
  // result (or failure), which its move to completed (failed) wrote with the state. Read again.
  if ((state === 'completed' && job.returnvalue == null) || (state === 'failed' && !job.failedReason)) {
    job = (await queue.getJob(job.id!)) ?? job;
  }
  const p = job.progress as Partial<ConvertJobProgress> | number;
  return {
    id: job.id!,
    state,
    sources: job.data.sources,
    target: job.data.target,
    ...(job.data.tee ? { tee: job.data.tee } : {}),
    attemptsMade: job.attemptsMade,
    ...(typeof p === 'object' && p && p.total !== undefined ? { progress: p as ConvertJobProgress } : {}),
    ...(job.returnvalue ? { result: job.returnvalue } : {}),
    ...(job.failedReason ? { failedReason: job.failedReason } : {}),
    ...(job.data.resume ? { checkpoint: job.data.resume.progress.done } : {}),
  };
}

/** The queue's convert jobs (or those named), newest first. */
export async function listConvertJobs(redisUrl: string, ids?: readonly string[]): Promise<ConvertJobSummary[]> {
  await checkRedis(redisUrl);
  const queue = queueOf(redisUrl);
  try {
    const jobs = ids
      ? (await Promise.all(ids.map((id) => queue.getJob(id)))).filter(
          (j): j is Job<ConvertJobData, ConvertJobResult> => j !== undefined,
        )
      : await queue.getJobs(['active', 'waiting', 'delayed', 'prioritized', 'completed', 'failed'], 0, 999);
    return Promise.all(jobs.map((j) => summarize(queue, j)));
  } finally {
    await queue.close();
  }
}

/**
 * Follows jobs until each has completed or failed for good (attempts used up), calling
 * `onUpdate` with their summaries about twice a second. Rides through Redis being
 * restarted: a poll that fails is tried again (up to `outageMs`).
 */
export async function followJobs(
  redisUrl: string,
  ids: readonly string[],
  onUpdate: (jobs: readonly ConvertJobSummary[]) => void,
  signal?: AbortSignal,
  outageMs = 60_000,
): Promise<ConvertJobSummary[]> {
  let failingSince: number | undefined;
  for (;;) {
    signal?.throwIfAborted();
    let jobs: ConvertJobSummary[];
    try {
      jobs = await listConvertJobs(redisUrl, ids);
      failingSince = undefined;
    } catch (err) {
      failingSince ??= Date.now();
      if (Date.now() - failingSince > outageMs) throw err;
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    onUpdate(jobs);
    if (jobs.length === ids.length && jobs.every((j) => j.state === 'completed' || j.state === 'failed')) return jobs;
    await new Promise((r) => setTimeout(r, 500));
  }
}
