/**
 * `blockconv worker`: runs convert jobs from the queue until SIGTERM/SIGINT; the jobs it
 * runs then are checkpointed and go back to the queue, to resume on any worker.
 */
import type { Command } from 'commander';
import { BlockError, redactLocation } from '@blockconv/core';
import { registryWithAllDrivers, type CommandContext } from '../context.js';
import { loadFleet, redisOption } from '../fleet.js';
import { stopSignal } from '../signals.js';

export function addWorkerCommand(program: Command, ctx: CommandContext): void {
  program
    .command('worker')
    .description(
      'Run convert jobs from the Redis queue (BullMQ) until SIGTERM/SIGINT; a job stopped so is checkpointed and retried, resuming, by any worker.',
    )
    .addOption(redisOption())
    .option('--concurrency <n>', 'jobs at once', (v: string) => Number(v), 1)
    .option('--name <name>', "this worker's name in results (default: host:pid)")
    .option(
      '--lock-seconds <s>',
      "a job's lock: if this worker dies, others take its jobs over (resuming) this long after",
      (v: string) => Number(v),
      30,
    )
    .option('-q, --quiet', 'no line per job start and end')
    .action(async (o: { redis: string; concurrency: number; name?: string; lockSeconds: number; quiet?: boolean }) => {
      if (!(o.lockSeconds >= 1))
        throw new BlockError('EINVAL', '--lock-seconds must be at least 1', { field: 'lock-seconds' });
      if (!Number.isInteger(o.concurrency) || o.concurrency < 1)
        throw new BlockError('EINVAL', '--concurrency must be a whole number of at least 1', { field: 'concurrency' });
      const fleet = await loadFleet();
      const os = await import('node:os');
      const name = o.name ?? `${os.hostname()}:${process.pid}`;
      const worker = await fleet.FleetWorker.start({
        redis: o.redis,
        concurrency: o.concurrency,
        registry: await registryWithAllDrivers(ctx),
        name,
        lockMs: o.lockSeconds * 1000,
        onEvent: o.quiet
          ? undefined
          : (e) => {
              if (e.event !== 'wait-cap')
                process.stderr.write(
                  `worker ${name}: ${new Date().toISOString()} job ${e.job} ${e.event} ${e.target}${e.detail ? ` ${e.detail}` : ''}\n`,
                );
            },
      });
      process.stderr.write(`worker ${name}: taking convert jobs from ${redactLocation(o.redis)}\n`);
      await stopSignal();
      process.stderr.write(`worker ${name}: stopping (running jobs are checkpointed)\n`);
      await worker.close();
    });
}
