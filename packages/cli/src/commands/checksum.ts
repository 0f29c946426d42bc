/** `blockconv checksum`: the blkhash digest of an image's content, as blksum prints it. */
import type { Command } from 'commander';
import { checksumImage, redactLocation, type BlockBackend, type ChecksumResult } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { openOptions, outputOption, progressOption } from '../options.js';
import { progressSink, type ProgressMode } from '../progress.js';
import { signalAbort } from '../signals.js';

interface ChecksumFlags {
  format?: string;
  opts?: Record<string, string>;
  p?: boolean;
  progress?: ProgressMode;
  output: 'human' | 'json';
}

export function addChecksumCommand(program: Command, ctx: CommandContext): void {
  program
    .command('checksum')
    .description(
      "The blkhash (SHA-256, 64 KiB blocks) digest of an image's guest-visible content, as blksum computes it; zero ranges are hashed unread, data on every core.",
    )
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .option('-p', 'show progress (a bar on a terminal)')
    .addOption(progressOption())
    .addOption(outputOption())
    .action(async (image: string, opts: ChecksumFlags) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const abort = signalAbort();
      const img = await reg.open(image, {
        format: opts.format,
        readOnly: true,
        options: opts.opts,
        signal: abort.signal,
      });
      try {
        const r = await checksumWithProgress(img, opts.progress ?? (opts.p ? 'bar' : 'none'), abort.signal);
        const name = redactLocation(image);
        if (opts.output === 'json') {
          process.stdout.write(
            `${JSON.stringify(
              {
                checksum: r.checksum,
                algorithm: r.algorithm,
                'block-size': r.blockSize,
                filename: name,
                'virtual-size': r.size,
                'bytes-read': r.bytesRead,
                'elapsed-ms': Math.round(r.elapsedMs),
              },
              null,
              4,
            )}\n`,
          );
        } else {
          process.stdout.write(`${r.checksum}  ${name}\n`);
        }
      } finally {
        abort.dispose();
        await img.close();
      }
    });
}

/** The digest, with progress shown as a convert's; the bar is gone before the digest is printed. */
async function checksumWithProgress(
  img: BlockBackend,
  mode: ProgressMode,
  signal: AbortSignal,
): Promise<ChecksumResult> {
  const sink = progressSink(mode, img.size);
  const started = performance.now();
  try {
    return await checksumImage(img, {
      signal,
      onProgress: (done, total) => {
        const elapsedMs = performance.now() - started;
        sink.update({
          done,
          total,
          elapsedMs,
          rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0,
          bytesRead: 0,
          bytesWritten: 0,
          bytesZeroed: 0,
          bytesSkipped: 0,
        });
      },
    });
  } finally {
    sink.stop();
  }
}
