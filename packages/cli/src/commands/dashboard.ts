/** `blockconv dashboard`: bull-board's web page of the convert queue, served until SIGINT/SIGTERM. */
import type { Command } from 'commander';
import { BlockError, redactLocation } from '@blockconv/core';
import { loadFleet, redisOption } from '../fleet.js';
import { stopSignal } from '../signals.js';

export function addDashboardCommand(program: Command): void {
  program
    .command('dashboard')
    .description(
      'Serve a web page of the convert queue (bull-board): jobs, progress, results, failures. Until SIGINT/SIGTERM.',
    )
    .addOption(redisOption())
    .option('--port <n>', 'TCP port', (v: string) => Number(v), 3000)
    .option('--bind <addr>', 'address to listen on (the page has no login: loopback unless you mean it)', '127.0.0.1')
    .option('--read-only', 'no retry or clean buttons')
    .action(async (o: { redis: string; port: number; bind: string; readOnly?: boolean }) => {
      if (!Number.isInteger(o.port) || o.port < 0 || o.port > 65535)
        throw new BlockError('EINVAL', `--port must be 0-65535, got ${o.port}`, { field: 'port' });
      const fleet = await loadFleet();
      const d = await fleet.startDashboard({ redis: o.redis, port: o.port, host: o.bind, readOnly: o.readOnly });
      process.stderr.write(`dashboard: ${d.url} (queue of ${redactLocation(o.redis)})\n`);
      await stopSignal();
      await d.close();
    });
}
