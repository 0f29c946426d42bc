/** `blockconv submit`: queues convert jobs, from the command line or a batch file; --wait follows them to their end. */
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import type { Command } from 'commander';
import type * as CliProgress from 'cli-progress';
import type { ConvertBatch } from '@blockconv/fleet';
import { BlockError, formatSize } from '@blockconv/core';
import { jobLine, loadFleet, redisOption, targetsOf, type Fleet, type JobSummary } from '../fleet.js';
import { keyValues, outputOption } from '../options.js';

/** --cap SERVER=K, repeatable. */
function capOption(v: string, prev: Record<string, number> = {}): Record<string, number> {
  const eq = v.lastIndexOf('=');
  const k = Number(v.slice(eq + 1));
  if (eq <= 0 || !Number.isSafeInteger(k) || k < 1)
    throw new BlockError('EINVAL', `--cap: expected SERVER=K (e.g. nfs://filer=2, "*=4"), got "${v}"`, {
      field: 'cap',
    });
  return { ...prev, [v.slice(0, eq)]: k };
}

/**
 * Follows jobs to their end: a bar of the bytes of all jobs on a terminal, else a line
 * per change of a job's state. Returns the summaries at the end.
 */
async function follow(fleet: Fleet, redis: string, ids: readonly string[], json: boolean): Promise<JobSummary[]> {
  const tty = process.stderr.isTTY && !json;
  let bars: CliProgress.MultiBar | undefined;
  let bar: CliProgress.SingleBar | undefined;
  if (tty) {
    const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
    // A MultiBar for its log(): finished jobs print above the bar.
    bars = new cliProgress.MultiBar({
      stream: process.stderr,
      hideCursor: true,
      barCompleteChar: '\u2588',
      barIncompleteChar: '\u2591',
      etaBuffer: 20,
      format:
        '{bar} {percentage}% | {doneText} / {totalText} | jobs {finished}/{jobs} done, {running} running, {failedJobs} failed | ETA {eta_formatted}',
    });
    bar = bars.create(1, 0, {
      doneText: '0 B',
      totalText: '?',
      finished: 0,
      jobs: ids.length,
      running: 0,
      failedJobs: 0,
    });
  }
  const seen = new Map<string, string>();
  try {
    return await fleet.followJobs(redis, ids, (jobs) => {
      if (json) return;
      for (const j of jobs) {
        const l = j.state === 'active' ? `${j.id} active` : jobLine(j);
        if (seen.get(j.id) !== l && (!tty || j.state === 'completed' || j.state === 'failed')) {
          seen.set(j.id, l);
          if (bars) bars.log(`${jobLine(j)}\n`);
          else process.stderr.write(`${jobLine(j)}\n`);
        }
      }
      if (bar) {
        // Jobs not started yet count with their sizes once known; until then the total grows.
        const total = jobs.reduce((n, j) => n + (j.progress?.total ?? j.result?.total ?? 0), 0);
        const done = jobs.reduce(
          (n, j) => n + (j.state === 'completed' ? (j.result?.total ?? 0) : (j.progress?.done ?? 0)),
          0,
        );
        bar.setTotal(Math.max(total, 1));
        bar.update(done, {
          doneText: formatSize(done),
          totalText: formatSize(total),
          jobs: ids.length,
          finished: jobs.filter((j) => j.state === 'completed' || j.state === 'failed').length,
          running: jobs.filter((j) => j.state === 'active').length,
          failedJobs: jobs.filter((j) => !fleet.jobSucceeded(j) && (j.state === 'completed' || j.state === 'failed'))
            .length,
        });
      }
    });
  } finally {
    bars?.stop();
  }
}

interface SubmitFlags {
  redis: string;
  batch?: string;
  sourceFormat?: string;
  targetFormat: string;
  targetOptions?: Record<string, string>;
  sourceOpts?: Record<string, string>;
  targetOpts?: Record<string, string>;
  tee?: string[];
  create: boolean;
  workers?: number;
  outOfOrder?: boolean;
  compress?: boolean;
  rateLimit?: number;
  cap?: Record<string, number>;
  attempts: number;
  wait?: boolean;
  output: string;
}

export function addSubmitCommand(program: Command): void {
  program
    .command('submit')
    .description(
      'Queue convert jobs: SOURCE... TARGET as for convert (--tee for more targets of the same read), or a batch file. Prints the job ids; --wait follows them to the end.',
    )
    .usage('[options] <source...> <target>  |  --batch FILE')
    .argument('[images...]')
    .addOption(redisOption())
    .option('--batch <file>', 'a JSON batch: a template and many targets, each with options (see the README)')
    .option('-f, --source-format <fmt>', 'source format (default: probed)')
    .option('-O, --target-format <fmt>', 'target format', 'raw')
    .option('-o, --target-options <k=v,...>', 'target creation options', keyValues)
    .option(
      '--source-opts <k=v,...>',
      'source driver options (secrets by reference only: password-env=VAR, password-file=PATH on the worker)',
      keyValues,
    )
    .option('--target-opts <k=v,...>', 'target driver options (secrets by reference only, as --source-opts)', keyValues)
    .option(
      '--tee <target>',
      'also write the same read to this target (repeatable); a failing target fails alone',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('-n, --no-create', 'write into an existing target')
    .option('-m, --workers <n>', 'convert workers', (v: string) => Number(v))
    .option('-W, --out-of-order', 'out-of-order writes')
    .option('-c, --compress', 'compressed target')
    .option('-r, --rate-limit <bytes>', 'bytes per second', (v: string) => Number(v))
    .option(
      '--cap <server=k>',
      'at most K jobs at once on this storage server, across all workers (nfs://HOST, iscsi://HOST:PORT, "*" for any; repeatable; kept in Redis)',
      capOption,
    )
    .option('--attempts <n>', 'tries before a job fails for good (each resumes the last)', (v: string) => Number(v), 3)
    .option('--wait', 'follow the jobs to their end (a progress bar on a terminal); exit non-zero if any failed')
    .addOption(outputOption())
    .action(async (images: string[], o: SubmitFlags) => {
      const fleet = await loadFleet();
      let batch: ConvertBatch;
      if (o.batch !== undefined) {
        if (images.length) throw new BlockError('EINVAL', 'give a batch file or SOURCE... TARGET, not both');
        const b = fleet.parseBatch(await readBatchFile(o.batch));
        batch = { ...b, caps: { ...b.caps, ...o.cap } };
      } else {
        batch = batchOfOne(images, o);
      }
      const ids = await fleet.submitBatch(
        o.redis,
        batch,
        o.batch !== undefined && batch.attempts ? {} : { attempts: o.attempts },
      );
      if (!o.wait) {
        process.stdout.write(o.output === 'json' ? `${JSON.stringify({ ids })}\n` : `${ids.join('\n')}\n`);
        return;
      }
      const jobs = await follow(fleet, o.redis, ids, o.output === 'json');
      if (o.output === 'json') process.stdout.write(`${JSON.stringify(jobs)}\n`);
      const bad = jobs.filter((j) => !fleet.jobSucceeded(j));
      if (bad.length)
        throw new BlockError(
          'EIO',
          `${bad.length} of ${jobs.length} jobs failed: ${bad
            .map(
              (j) =>
                `job ${j.id} (${targetsOf(j)}): ${
                  j.failedReason ??
                  j.result?.targets
                    ?.filter((t) => !t.ok)
                    .map((t) => `${t.location}: ${t.error}`)
                    .join('; ') ??
                  j.state
                }`,
            )
            .join('; ')}`,
        );
      if (o.output !== 'json') process.stderr.write(`${jobs.length} of ${jobs.length} jobs completed\n`);
    });
}

/** A --batch file's JSON, not yet checked (parseBatch does that). */
async function readBatchFile(file: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(file, 'utf8');
  } catch (err) {
    throw new BlockError(
      'ENOENT',
      `cannot read the batch file ${file}: ${(err as NodeJS.ErrnoException).code ?? (err as Error).message}`,
      { field: 'batch' },
    );
  }
  try {
    return JSON.parse(text);
  } catch (err) {
    throw new BlockError('EINVAL', `batch file ${file} is not JSON: ${(err as Error).message}`, { field: 'batch' });
  }
}

/** The one job of SOURCE... TARGET and the flags. */
function batchOfOne(images: string[], o: SubmitFlags): ConvertBatch {
  if (images.length < 2) throw new BlockError('EINVAL', 'submit needs a source and a target (or --batch FILE)');
  return {
    jobs: [
      {
        sources: images.slice(0, -1),
        target: images.at(-1)!,
        ...(o.tee ? { tee: o.tee } : {}),
        sourceFormat: o.sourceFormat,
        targetFormat: o.targetFormat,
        noCreate: !o.create,
        workers: o.workers,
        outOfOrder: o.outOfOrder,
        compress: o.compress,
        rateLimit: o.rateLimit,
        sourceOptions: o.sourceOpts,
        targetOptions: o.targetOpts,
        createOptions: o.targetOptions,
      },
    ],
    caps: o.cap ?? {},
  };
}
