/** `blockconv compare`: whether two images of any formats hold the same content; qemu-img compare's messages and exit codes. */
import type { Command } from 'commander';
import { compareImages, MAX_WORKERS, type BlockBackend } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { describe, ExitError } from '../errors.js';
import { closeAll } from '../images.js';
import { intOption, openOptions, outputOption } from '../options.js';

export function addCompareCommand(program: Command, ctx: CommandContext): void {
  program
    .command('compare')
    .description('Compare the contents of two images of any formats. Exit 0: identical, 1: different, 2: error.')
    .argument('<image1>')
    .argument('<image2>')
    .option('-f, --format1 <fmt>', 'format of image1 (default: probed)')
    .option('-F, --format2 <fmt>', 'format of image2 (default: probed)')
    .option('-s, --strict', 'images of different sizes are different')
    .option('-m, --workers <n>', 'parallel readers', intOption('workers', 1, MAX_WORKERS), 8)
    .addOption(outputOption())
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .addOption(openOptions('--opts <k=v,...>', 'first image'))
    .addOption(openOptions('--opts2 <k=v,...>', 'second image'))
    .action(
      async (
        a: string,
        b: string,
        opts: {
          format1?: string;
          format2?: string;
          strict?: boolean;
          workers: number;
          output: string;
          quiet?: boolean;
          opts?: Record<string, string>;
          opts2?: Record<string, string>;
        },
      ) => {
        const reg = await registry(ctx);
        if (opts.opts?.help || opts.opts2?.help) return printOpenOptions(ctx, reg);
        let ia: BlockBackend | undefined;
        let ib: BlockBackend | undefined;
        try {
          ia = await reg.open(a, { format: opts.format1, readOnly: true, options: opts.opts });
          ib = await reg.open(b, { format: opts.format2, readOnly: true, options: opts.opts2 });
          const r = await compareImages(ia, ib, { strict: opts.strict, workers: opts.workers });
          if (opts.output === 'json') process.stdout.write(`${JSON.stringify(r)}\n`);
          else if (!opts.quiet) {
            if (r.identical) process.stdout.write('Images are identical.\n');
            else if (r.reason === 'size' && opts.strict) process.stdout.write(`Strict mode: Image size mismatch!\n`);
            else process.stdout.write(`Content mismatch at offset ${r.offset}!\n`);
          }
          if (!r.identical) throw new ExitError(1, '');
        } catch (err) {
          if (err instanceof ExitError) throw err;
          throw new ExitError(2, describe(err, ctx.debug));
        } finally {
          await closeAll([ia, ib]);
        }
      },
    );
}
