/** `blockconv map`: an image's allocation map, in qemu-img map's human and JSON forms. */
import type { Command } from 'commander';
import { mapImage, redactLocation, type MapEntry } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { openOptions, outputOption, sizeOption } from '../options.js';

interface MapFlags {
  format?: string;
  output: string;
  startOffset: number;
  maxLength?: number;
  opts?: Record<string, string>;
}

export function addMapCommand(program: Command, ctx: CommandContext): void {
  program
    .command('map')
    .description('Print the allocation map of an image (as qemu-img map).')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(outputOption())
    .option('--start-offset <offset>', 'first byte to map', sizeOption('start offset'), 0)
    .option('--max-length <length>', 'bytes to map', sizeOption('max length'))
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(async (image: string, opts: MapFlags) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts });
      const file = redactLocation(image);
      try {
        const extents = mapImage(img, opts.startOffset, opts.maxLength);
        if (opts.output === 'json') await writeJsonMap(extents);
        else await writeHumanMap(extents, file);
      } finally {
        await img.close();
      }
    });
}

/** Stdout written in batches of lines, not a write per extent. */
class BatchedOutput {
  readonly #parts: string[] = [];

  push(part: string): void {
    this.#parts.push(part);
    if (this.#parts.length > 1024) this.flush();
  }

  flush(): void {
    if (this.#parts.length) {
      process.stdout.write(this.#parts.join(''));
      this.#parts.length = 0;
    }
  }
}

/** qemu-img map --output=json: every extent, one per line. */
async function writeJsonMap(extents: AsyncIterable<MapEntry>): Promise<void> {
  const out = new BatchedOutput();
  let first = true;
  for await (const e of extents) {
    const fields = [
      `"start": ${e.start}`,
      `"length": ${e.length}`,
      `"depth": ${e.depth}`,
      `"present": ${e.present}`,
      `"zero": ${e.zero}`,
      `"data": ${e.data}`,
    ];
    if (e.offset !== undefined) fields.push(`"offset": ${e.offset}`);
    out.push(`${first ? '[' : ',\n'}{ ${fields.join(', ')}}`);
    first = false;
  }
  out.push(first ? '[]\n' : ']\n');
  out.flush();
}

/** qemu-img map's table: the extents that hold data, in hex. */
async function writeHumanMap(extents: AsyncIterable<MapEntry>, file: string): Promise<void> {
  const out = new BatchedOutput();
  const hex = (n: number): string => `0x${n.toString(16)}`;
  out.push(`${'Offset'.padEnd(20)}${'Length'.padEnd(20)}${'Mapped to'.padEnd(20)}File\n`);
  for await (const e of extents) {
    if (!e.data) continue;
    out.push(
      `${hex(e.start).padEnd(20)}${hex(e.length).padEnd(20)}${(e.offset === undefined ? '-' : hex(e.offset)).padEnd(20)}${file}\n`,
    );
  }
  out.flush();
}
