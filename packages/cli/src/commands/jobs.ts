/** `blockconv jobs`: the convert jobs in the queue, a line each (or JSON). */
import type { Command } from 'commander';
import { jobLine, loadFleet, redisOption } from '../fleet.js';
import { outputOption } from '../options.js';

export function addJobsCommand(program: Command): void {
  program
    .command('jobs')
    .description('List the convert jobs in the queue: state, progress, checksum or failure.')
    .argument('[ids...]', 'only these jobs')
    .addOption(redisOption())
    .addOption(outputOption())
    .action(async (ids: string[], o: { redis: string; output: string }) => {
      const fleet = await loadFleet();
      const jobs = await fleet.listConvertJobs(o.redis, ids.length ? ids : undefined);
      if (o.output === 'json') process.stdout.write(`${JSON.stringify(jobs, null, 1)}\n`);
      else for (const j of jobs) process.stdout.write(`${jobLine(j)}\n`);
    });
}
