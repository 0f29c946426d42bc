/**
 * What the fleet commands (worker, submit, jobs, dashboard under commands/) share:
 * @blockconv/fleet (BullMQ on Redis), the --redis option, and a job's line. That package
 * is optional: it is loaded only by these commands, and a clear error says how to
 * install it when it is missing.
 */
import { Option } from 'commander';
import { BlockError, formatSize, redactLocation } from '@blockconv/core';

export type Fleet = typeof import('@blockconv/fleet');
export type JobSummary = import('@blockconv/fleet').ConvertJobSummary;

export async function loadFleet(): Promise<Fleet> {
  try {
    return await import('@blockconv/fleet');
  } catch (err) {
    throw new BlockError(
      'ENODRIVER',
      `the fleet commands need @blockconv/fleet (npm install @blockconv/fleet): ${(err as Error).message.split('\n')[0]}`,
    );
  }
}

export const redisOption = (): Option =>
  new Option('--redis <url>', 'the Redis that holds the jobs').env('BLOCKCONV_REDIS').default('redis://127.0.0.1:6379');

/** A job's targets, redacted, comma-separated. */
export function targetsOf(j: JobSummary): string {
  return [j.target, ...(j.tee ?? [])].map(redactLocation).join(', ');
}

/** A job in one line: id, state, sources -> targets, then progress, checksum or failure. */
export function jobLine(j: JobSummary): string {
  const p = j.progress;
  const pct =
    p && p.total > 0
      ? ` ${((p.done / p.total) * 100).toFixed(1)}% ${formatSize(p.rate)}/s${p.etaSeconds !== undefined ? ` ETA ${p.etaSeconds}s` : ''}`
      : '';
  const failedTargets = j.result?.targets?.filter((t) => !t.ok) ?? [];
  const end =
    j.state === 'completed'
      ? ` ${j.result?.checksum ?? ''}${failedTargets.map((t) => `; target ${t.location} failed: ${t.error}`).join('')}`
      : j.state === 'failed'
        ? ` ${j.failedReason ?? ''}`
        : pct;
  return `${j.id.padEnd(6)} ${j.state.padEnd(10)} ${j.sources.map(redactLocation).join(' + ')} -> ${targetsOf(j)}${end}`;
}
