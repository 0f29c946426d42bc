/**
 * `blockconv worker`, `submit` and `jobs`: the fleet commands, over @blockconv/fleet
 * (BullMQ on Redis). That package is optional: it is loaded only by these commands, and
 * a clear error says how to install it when it is missing.
 */
import { Option, type Command } from 'commander';
import { BlockError, formatSize, redactLocation, type DriverRegistry } from '@blockconv/core';

type Fleet = typeof import('@blockconv/fleet');

async function loadFleet(): Promise<Fleet> {
  try {
    return await import('@blockconv/fleet');
  } catch (err) {
    throw new BlockError('ENODRIVER', `the fleet commands need @blockconv/fleet (npm install @blockconv/fleet): ${(err as Error).message.split('\n')[0]}`);
  }
}

const redisOption = (): Option => new Option('--redis <url>', 'the Redis that holds the jobs').env('BLOCKCONV_REDIS').default('redis://127.0.0.1:6379');

function line(j: import('@blockconv/fleet').ConvertJobSummary): string {
  const p = j.progress;
  const pct = p && p.total > 0 ? ` ${((p.done / p.total) * 100).toFixed(1)}% ${formatSize(p.rate)}/s${p.etaSeconds !== undefined ? ` ETA ${p.etaSeconds}s` : ''}` : '';
  const end = j.state === 'completed' ? ` ${j.result?.checksum ?? ''}` : j.state === 'failed' ? ` ${j.failedReason ?? ''}` : pct;
  return `${j.id.padEnd(6)} ${j.state.padEnd(10)} ${j.sources.map(redactLocation).join(' + ')} -> ${redactLocation(j.target)}${end}`;
}

export function addFleetCommands(program: Command, registry: () => Promise<DriverRegistry>): void {
  program
    .command('worker')
    .description('Run convert jobs from the Redis queue (BullMQ) until SIGTERM/SIGINT; a job stopped so is checkpointed and retried, resuming, by any worker.')
    .addOption(redisOption())
    .option('--concurrency <n>', 'jobs at once', (v: string) => Number(v), 1)
    .option('--name <name>', 'this worker\'s name in results (default: host:pid)')
    .option('--lock-seconds <s>', 'a job\'s lock: if this worker dies, others take its jobs over (resuming) this long after', (v: string) => Number(v), 30)
    .action(async (o: { redis: string; concurrency: number; name?: string; lockSeconds: number }) => {
      if (!(o.lockSeconds >= 1)) throw new BlockError('EINVAL', '--lock-seconds must be at least 1', { field: 'lock-seconds' });
      if (!Number.isInteger(o.concurrency) || o.concurrency < 1) throw new BlockError('EINVAL', '--concurrency must be a whole number of at least 1', { field: 'concurrency' });
      const fleet = await loadFleet();
      const os = await import('node:os');
      const name = o.name ?? `${os.hostname()}:${process.pid}`;
      const worker = await fleet.FleetWorker.start({ redis: o.redis, concurrency: o.concurrency, registry: await registry(), name, lockMs: o.lockSeconds * 1000 });
      process.stderr.write(`worker ${name}: taking convert jobs from ${redactLocation(o.redis)}\n`);
      await new Promise<void>((resolve) => {
        const stop = (): void => { process.off('SIGINT', stop); process.off('SIGTERM', stop); resolve(); };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
      });
      process.stderr.write(`worker ${name}: stopping (running jobs are checkpointed)\n`);
      await worker.close();
    });

  program
    .command('submit')
    .description('Queue a convert job: SOURCE... TARGET, as for convert. Prints its id; --wait follows it to the end.')
    .usage('[options] <source...> <target>')
    .argument('<images...>')
    .addOption(redisOption())
    .option('-f, --source-format <fmt>', 'source format (default: probed)')
    .option('-O, --target-format <fmt>', 'target format', 'raw')
    .option('-n, --no-create', 'write into an existing target')
    .option('-m, --workers <n>', 'convert workers', (v: string) => Number(v))
    .option('-W, --out-of-order', 'out-of-order writes')
    .option('-c, --compress', 'compressed target')
    .option('--attempts <n>', 'tries before the job fails for good (each resumes the last)', (v: string) => Number(v), 3)
    .option('--wait', 'follow the job to its end; exit non-zero if it failed')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (images: string[], o: { redis: string; sourceFormat?: string; targetFormat: string; create: boolean; workers?: number; outOfOrder?: boolean; compress?: boolean; attempts: number; wait?: boolean; output: string }) => {
      if (images.length < 2) throw new BlockError('EINVAL', 'submit needs a source and a target');
      const fleet = await loadFleet();
      const id = await fleet.submitConvert(o.redis, {
        sources: images.slice(0, -1), target: images.at(-1)!, sourceFormat: o.sourceFormat, targetFormat: o.targetFormat, noCreate: !o.create,
        workers: o.workers, outOfOrder: o.outOfOrder, compress: o.compress,
      }, { attempts: o.attempts });
      if (!o.wait) {
        process.stdout.write(o.output === 'json' ? JSON.stringify({ id }) + '\n' : `${id}\n`);
        return;
      }
      let last = '';
      const [job] = await fleet.followJobs(o.redis, [id], (jobs) => {
        const l = jobs[0] ? line(jobs[0]) : '';
        if (o.output !== 'json' && l !== last) { process.stderr.write(l + '\n'); last = l; }
      });
      if (o.output === 'json') process.stdout.write(JSON.stringify(job) + '\n');
      if (job!.state !== 'completed') throw new BlockError('EIO', `job ${id} failed: ${job!.failedReason ?? job!.state}`);
    });

  program
    .command('jobs')
    .description('List the convert jobs in the queue: state, progress, checksum or failure.')
    .argument('[ids...]', 'only these jobs')
    .addOption(redisOption())
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (ids: string[], o: { redis: string; output: string }) => {
      const fleet = await loadFleet();
      const jobs = await fleet.listConvertJobs(o.redis, ids.length ? ids : undefined);
      if (o.output === 'json') process.stdout.write(JSON.stringify(jobs, null, 1) + '\n');
      else for (const j of jobs) process.stdout.write(line(j) + '\n');
    });
}
