/** `blockconv drivers`: the installed drivers, their open options, and the packages they come from (or failed to load from). */
import { Option, type Command } from 'commander';
import { registry, type CommandContext } from '../context.js';

export function addDriversCommand(program: Command, ctx: CommandContext): void {
  program
    .command('drivers')
    .description('List the installed drivers and the packages they come from.')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (opts: { output: string }) => {
      const reg = await registry(ctx);
      const d = ctx.discovery!;
      await d.loadAll();
      if (opts.output === 'json') {
        process.stdout.write(JSON.stringify({
          protocols: reg.protocols.map((p) => ({ name: p.name, schemes: p.schemes, description: p.description, readOnly: p.readOnly === true, openOptions: p.openOptions ?? [] })),
          formats: reg.formats.map((f) => ({ name: f.name, description: f.description, openOptions: f.openOptions ?? [], createOptions: f.createOptions ?? [] })),
          packages: d.loaded, failed: d.failed,
        }, null, 2) + '\n');
        return;
      }
      const takes = (d: { openOptions?: readonly { name: string }[] }): string => (d.openOptions?.length ? `\n         open options: ${d.openOptions.map((x) => x.name).join(', ')}` : '');
      for (const p of reg.protocols) process.stdout.write(`protocol ${p.name.padEnd(8)} schemes: ${p.schemes.join(', ')}${p.readOnly ? ' (read-only)' : ''}${p.description ? `  ${p.description}` : ''}${takes(p)}\n`);
      for (const f of reg.formats) process.stdout.write(`format   ${f.name.padEnd(8)}${f.description ? ` ${f.description}` : ''}${takes(f)}\n`);
      for (const p of d.loaded) process.stdout.write(`package  ${p.name} (${p.drivers.join(', ')})\n`);
      for (const p of d.failed) process.stdout.write(`failed   ${p.name}: ${p.error}\n`);
    });
}
