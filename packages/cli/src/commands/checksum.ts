/** `blockconv checksum`: the blkhash digest of an image's content, as blksum prints it. */
import { Option, type Command } from 'commander';
import { checksumImage, redactLocation } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { openOptions } from '../options.js';
import { progressSink, type ProgressMode } from '../progress.js';
import { signalAbort } from '../signals.js';

export function addChecksumCommand(program: Command, ctx: CommandContext): void {
  program
    .command('checksum')
    .description('The blkhash (SHA-256, 64 KiB blocks) digest of an image\'s guest-visible content, as blksum computes it; zero ranges are hashed unread, data on every core.')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .option('-p', 'show progress (a bar on a terminal)')
    .addOption(new Option('--progress <mode>', 'progress output: bar, json (JSON lines on stdout), none').choices(['bar', 'json', 'none']))
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (image: string, opts: { format?: string; opts?: Record<string, string>; p?: boolean; progress?: ProgressMode; output: 'human' | 'json' }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const abort = signalAbort();
      const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts, signal: abort.signal });
      const sink = progressSink(opts.progress ?? (opts.p ? 'bar' : 'none'), img.size);
      let stopped = false;
      const stop = (): void => { if (!stopped) { stopped = true; sink.stop(); } };
      const started = performance.now();
      try {
        const r = await checksumImage(img, {
          signal: abort.signal,
          onProgress: (done, total) => {
            const elapsedMs = performance.now() - started;
            sink.update({ done, total, elapsedMs, rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0, bytesRead: 0, bytesWritten: 0, bytesZeroed: 0, bytesSkipped: 0 });
          },
        });
        stop();
        const name = redactLocation(image);
        if (opts.output === 'json') {
          process.stdout.write(JSON.stringify({
            checksum: r.checksum, algorithm: r.algorithm, 'block-size': r.blockSize, filename: name,
            'virtual-size': r.size, 'bytes-read': r.bytesRead, 'elapsed-ms': Math.round(r.elapsedMs),
          }, null, 4) + '\n');
        } else {
          process.stdout.write(`${r.checksum}  ${name}\n`);
        }
      } finally {
        stop();
        abort.dispose();
        await img.close();
      }
    });
}
