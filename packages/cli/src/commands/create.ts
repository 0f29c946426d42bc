/** `blockconv create`: a new, empty image (as qemu-img create), sized or sized as its backing file. */
import type { Command } from 'commander';
import {
  BlockError,
  isSecretParameter,
  parseSize,
  REDACTED,
  redactLocation,
  resolveRelative,
  type DriverRegistry,
} from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printCreateOptions } from '../driver-options.js';
import { keyValues } from '../options.js';

export function addCreateCommand(program: Command, ctx: CommandContext): void {
  program
    .command('create')
    .description('Create a new, empty image (as qemu-img create).')
    .usage('[options] <filename> [size]')
    .argument('<filename>')
    .argument('[size]', "virtual size (suffixes k, M, G, T); default: the backing file's", (v: string) =>
      parseSize(v, 'size'),
    )
    .option('-f, --format <fmt>', 'image format', 'raw')
    .option('-o, --options <k=v,...>', 'format options ("-o help" lists them)', keyValues)
    .option('-b, --backing <file>', "backing file (relative names are taken from the new image's directory)")
    .option('-F, --backing-format <fmt>', 'format of the backing file (default: probed)')
    .option('-q, --quiet', 'print nothing but errors')
    .action(
      async (
        filename: string,
        size: number | undefined,
        opts: {
          format: string;
          options?: Record<string, string>;
          backing?: string;
          backingFormat?: string;
          quiet?: boolean;
        },
      ) => {
        const reg = await registry(ctx);
        if (opts.options?.help) return printCreateOptions(ctx, reg, opts.format);
        const options: Record<string, string> = { ...opts.options };
        if (opts.backing !== undefined) options.backing_file = opts.backing;
        if (opts.backingFormat !== undefined) options.backing_fmt = opts.backingFormat;
        size ??= await backingSize(reg, filename, options);
        if (!opts.quiet) {
          const shown = Object.entries(options)
            .map(([k, v]) => ` ${k}=${isSecretParameter(k) ? REDACTED : redactLocation(v)}`)
            .join('');
          process.stdout.write(`Formatting '${redactLocation(filename)}', fmt=${opts.format}${shown} size=${size}\n`);
        }
        const img = await reg.create(filename, size, { format: opts.format, options });
        await img.close();
      },
    );
}

/** The size of the backing file that -b (or -o backing_file) names, for a create without a size. */
async function backingSize(reg: DriverRegistry, filename: string, options: Record<string, string>): Promise<number> {
  if (options.backing_file === undefined)
    throw new BlockError('EINVAL', 'give the image size (or a backing file to take it from)');
  const backing = await reg.open(resolveRelative(filename, options.backing_file), {
    readOnly: true,
    format: options.backing_fmt,
  });
  const size = backing.size;
  await backing.close();
  return size;
}
