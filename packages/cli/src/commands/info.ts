/** `blockconv info`: an image's format, sizes and format details (and its backing chain's), with qemu-img info's fields. */
import type { Command } from 'commander';
import { formatSize, redactLocation, type BlockBackend } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { openOptions, outputOption } from '../options.js';

export function addInfoCommand(program: Command, ctx: CommandContext): void {
  program
    .command('info')
    .description("Show an image's format, virtual size, allocation and format details.")
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('--backing-chain', 'also show every image of the backing chain')
    .addOption(outputOption())
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(
      async (
        image: string,
        opts: { format?: string; backingChain?: boolean; output: 'human' | 'json'; opts?: Record<string, string> },
      ) => {
        const reg = await registry(ctx);
        if (opts.opts?.help) return printOpenOptions(ctx, reg);
        const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts });
        try {
          const chain: Array<Record<string, unknown>> = [];
          for (
            let layer: BlockBackend | undefined = img;
            layer;
            layer = opts.backingChain ? layer.backing : undefined
          ) {
            chain.push(await describeImage(layer, layer === img ? redactLocation(image) : layer.location));
          }
          if (opts.output === 'json') {
            process.stdout.write(`${JSON.stringify(opts.backingChain ? chain : chain[0], null, 4)}\n`);
          } else {
            process.stdout.write(chain.map(humanInfo).join('\n'));
          }
        } finally {
          await img.close();
        }
      },
    );
}

/** One image's info, with qemu-img info's field names. */
async function describeImage(img: BlockBackend, name: string): Promise<Record<string, unknown>> {
  const actual = await img.allocatedSize?.();
  const extra = (await img.info?.()) ?? {};
  return {
    'virtual-size': img.size,
    filename: name,
    format: img.driverName,
    ...(actual !== undefined ? { 'actual-size': actual } : {}),
    ...extra,
  };
}

function humanInfo(info: Record<string, unknown>): string {
  const { 'virtual-size': size, filename, format, 'actual-size': actual, ...rest } = info;
  const lines = [
    `image: ${String(filename)}`,
    `file format: ${String(format)}`,
    `virtual size: ${formatSize(size as number)} (${String(size)} bytes)`,
    `disk size: ${actual === undefined ? 'unavailable' : formatSize(actual as number)}`,
  ];
  const put = (key: string, v: unknown, indent: string): void => {
    if (Array.isArray(v)) {
      lines.push(`${indent}${key}:`);
      v.forEach((item, i) => {
        put(`[${i}]`, item, `${indent}    `);
      });
    } else if (v && typeof v === 'object') {
      lines.push(`${indent}${key}:`);
      for (const [a, b] of Object.entries(v)) put(a, b, `${indent}    `);
    } else {
      lines.push(`${indent}${key}: ${String(v)}`);
    }
  };
  for (const [k, v] of Object.entries(rest)) put(k, v, '');
  return `${lines.join('\n')}\n`;
}
