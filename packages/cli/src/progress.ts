/**
 * Progress display for long jobs: a bar on a terminal (-p), plain lines when stderr is
 * not a terminal, or JSON lines on stdout for machines (--progress=json).
 */
import { createRequire } from 'node:module';
import type * as CliProgress from 'cli-progress';
import { formatSize, type ConvertProgress } from '@blockconv/core';

export type ProgressMode = 'bar' | 'json' | 'none';

export interface ProgressSink {
  update(p: ConvertProgress): void;
  stop(): void;
}

export function progressSink(mode: ProgressMode, total: number): ProgressSink {
  if (mode === 'json') {
    return {
      update: (p) =>
        process.stdout.write(
          `${JSON.stringify({
            event: 'progress',
            done: p.done,
            total: p.total,
            percent: pct(p),
            bytesPerSecond: Math.round(p.rate),
            elapsedMs: Math.round(p.elapsedMs),
          })}\n`,
        ),
      stop: () => {},
    };
  }
  if (mode === 'none') return { update: () => {}, stop: () => {} };
  if (!process.stderr.isTTY) {
    // qemu-img -p also reports without a terminal; keep it to a line per 10%.
    let next = 0;
    return {
      update: (p) => {
        const percent = pct(p);
        if (percent >= next) {
          process.stderr.write(`    (${percent.toFixed(2)}/100%)\n`);
          next = Math.floor(percent / 10) * 10 + 10;
        }
      },
      stop: () => {},
    };
  }
  // Loaded only when a bar is drawn: it costs start-up time every other run would pay.
  const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof CliProgress;
  const bar = new cliProgress.SingleBar({
    stream: process.stderr,
    format: '{bar} {percentage}% | {doneText} / {totalText} | {rateText}/s | ETA {eta_formatted}',
    barCompleteChar: '\u2588',
    barIncompleteChar: '\u2591',
    hideCursor: true,
    etaBuffer: 50,
    fps: 10,
  });
  bar.start(total, 0, { doneText: formatSize(0), totalText: formatSize(total), rateText: formatSize(0) });
  return {
    update: (p) =>
      bar.update(p.done, {
        doneText: formatSize(p.done),
        totalText: formatSize(p.total),
        rateText: formatSize(Math.round(p.rate)),
      }),
    stop: () => bar.stop(),
  };
}

function pct(p: ConvertProgress): number {
  return p.total === 0 ? 100 : Math.round((p.done / p.total) * 10000) / 100;
}
