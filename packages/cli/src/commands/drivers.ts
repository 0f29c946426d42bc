/** `blockconv drivers`: the installed drivers, their open options, and the packages they come from (or failed to load from). */
import type { Command } from 'commander';
import type { DriverRegistry } from '@blockconv/core';
import { registryWithAllDrivers, type CommandContext } from '../context.js';
import type { Discovery } from '../discover.js';
import { outputOption } from '../options.js';

export function addDriversCommand(program: Command, ctx: CommandContext): void {
  program
    .command('drivers')
    .description('List the installed drivers and the packages they come from.')
    .addOption(outputOption())
    .action(async (opts: { output: string }) => {
      const reg = await registryWithAllDrivers(ctx);
      const d = ctx.discovery!;
      if (opts.output === 'json') process.stdout.write(`${JSON.stringify(jsonDrivers(reg, d), null, 2)}\n`);
      else printDrivers(reg, d);
    });
}

function jsonDrivers(reg: DriverRegistry, d: Discovery): Record<string, unknown> {
  return {
    protocols: reg.protocols.map((p) => ({
      name: p.name,
      schemes: p.schemes,
      description: p.description,
      readOnly: p.readOnly === true,
      openOptions: p.openOptions ?? [],
    })),
    formats: reg.formats.map((f) => ({
      name: f.name,
      description: f.description,
      openOptions: f.openOptions ?? [],
      createOptions: f.createOptions ?? [],
    })),
    packages: d.loaded,
    failed: d.failed,
  };
}

/** A line per protocol, format, package loaded and package failed. */
function printDrivers(reg: DriverRegistry, d: Discovery): void {
  const takes = (driver: { openOptions?: readonly { name: string }[] }): string =>
    driver.openOptions?.length ? `\n         open options: ${driver.openOptions.map((x) => x.name).join(', ')}` : '';
  for (const p of reg.protocols)
    process.stdout.write(
      `protocol ${p.name.padEnd(8)} schemes: ${p.schemes.join(', ')}${p.readOnly ? ' (read-only)' : ''}${p.description ? `  ${p.description}` : ''}${takes(p)}\n`,
    );
  for (const f of reg.formats)
    process.stdout.write(`format   ${f.name.padEnd(8)}${f.description ? ` ${f.description}` : ''}${takes(f)}\n`);
  for (const p of d.loaded) process.stdout.write(`package  ${p.name} (${p.drivers.join(', ')})\n`);
  for (const p of d.failed) process.stdout.write(`failed   ${p.name}: ${p.error}\n`);
}
