/** `--opts help`, `-o help` and friends: the installed drivers' open and create options, listed on stdout. */
import type { DriverRegistry } from '@blockconv/core';
import type { CommandContext } from './context.js';

/** Every installed driver's open options. */
export async function printOpenOptions(ctx: CommandContext, reg: DriverRegistry): Promise<void> {
  await ctx.discovery!.loadAll();
  const out: string[] = [];
  for (const d of [...reg.protocols, ...reg.formats]) {
    out.push(`${d.kind} ${d.name}:`);
    const opts = d.openOptions ?? [];
    if (!opts.length) out.push('  (none)');
    for (const o of opts)
      out.push(`  ${o.name.padEnd(20)} ${o.description}${o.default !== undefined ? ` (default: ${o.default})` : ''}`);
  }
  process.stdout.write(`${out.join('\n')}\n`);
}

/** The creation options of one format, as qemu-img's "-o help". */
export async function printCreateOptions(ctx: CommandContext, reg: DriverRegistry, format: string): Promise<void> {
  await ctx.discovery!.loadAll();
  const fmt = reg.format(format);
  const lines = (fmt.createOptions ?? []).map(
    (c) => `  ${c.name.padEnd(20)} ${c.description}${c.default !== undefined ? ` (default: ${c.default})` : ''}`,
  );
  process.stdout.write(`Supported options for ${fmt.name}:\n${lines.length ? lines.join('\n') : '  (none)'}\n`);
}
