/** `blockconv map`: an image's allocation map, in qemu-img map's human and JSON forms. */
import { Option, type Command } from 'commander';
import { mapImage, redactLocation } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { openOptions, sizeOption } from '../options.js';

export function addMapCommand(program: Command, ctx: CommandContext): void {
  program
    .command('map')
    .description('Print the allocation map of an image (as qemu-img map).')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .option('--start-offset <offset>', 'first byte to map', sizeOption('start offset'), 0)
    .option('--max-length <length>', 'bytes to map', sizeOption('max length'))
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(async (image: string, opts: { format?: string; output: string; startOffset: number; maxLength?: number; opts?: Record<string, string> }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts });
      const file = redactLocation(image);
      try {
        const out: string[] = [];
        const flushOut = (): void => { if (out.length) { process.stdout.write(out.join('')); out.length = 0; } };
        if (opts.output === 'json') {
          let first = true;
          for await (const e of mapImage(img, opts.startOffset, opts.maxLength)) {
            const fields = [`"start": ${e.start}`, `"length": ${e.length}`, `"depth": ${e.depth}`, `"present": ${e.present}`, `"zero": ${e.zero}`, `"data": ${e.data}`];
            if (e.offset !== undefined) fields.push(`"offset": ${e.offset}`);
            out.push(`${first ? '[' : ',\n'}{ ${fields.join(', ')}}`);
            first = false;
            if (out.length > 1024) flushOut();
          }
          out.push(first ? '[]\n' : ']\n');
        } else {
          out.push(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Mapped to'.padEnd(20)}File\n`);
          for await (const e of mapImage(img, opts.startOffset, opts.maxLength)) {
            if (!e.data) continue;
            const hex = (n: number): string => `0x${n.toString(16)}`;
            out.push(`${hex(e.start).padEnd(20)}${hex(e.length).padEnd(20)}${(e.offset === undefined ? '-' : hex(e.offset)).padEnd(20)}${file}\n`);
            if (out.length > 1024) flushOut();
          }
        }
        flushOut();
      } finally {
        await img.close();
      }
    });
}
