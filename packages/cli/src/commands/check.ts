/** `blockconv check`: an image's metadata checked (and repaired with -r), with qemu-img check's report and exit codes. */
import { Option, type Command } from 'commander';
import { BlockError, redactLocation, type CheckResult, type DriverRegistry } from '@blockconv/core';
import { registry, type CommandContext } from '../context.js';
import { printOpenOptions } from '../driver-options.js';
import { describe, ExitError } from '../errors.js';
import { openOptions, outputOption } from '../options.js';

interface CheckFlags {
  format?: string;
  repair?: 'leaks' | 'all';
  output: 'human' | 'json';
  quiet?: boolean;
  opts?: Record<string, string>;
}

export function addCheckCommand(program: Command, ctx: CommandContext): void {
  program
    .command('check')
    .description(
      "Check an image's metadata for consistency (as qemu-img check). Exit 0: clean, 1: check failed, 2: corruptions, 3: leaks only, 63: the format has no checks.",
    )
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(
      new Option('-r, --repair <what>', 'repair leaks, or all inconsistencies that can be repaired').choices([
        'leaks',
        'all',
      ]),
    )
    .addOption(outputOption())
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(async (image: string, opts: CheckFlags) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const { r, fixed } = await checkAndRepair(ctx, reg, image, opts);
      if (opts.output === 'json')
        process.stdout.write(`${JSON.stringify(jsonCheck(r, fixed, image, opts.format ?? 'qcow2'), null, 4)}\n`);
      else if (!opts.quiet) process.stdout.write(humanCheck(r, fixed));
      const code = r.checkErrors ? 1 : r.corruptions ? 2 : r.leaks ? 3 : 0;
      if (code) throw new ExitError(code, '');
    });
}

/** The check, and with -r the repair: `r` reports on the image as it is now, `fixed` on what the repair did. */
async function checkAndRepair(
  ctx: CommandContext,
  reg: DriverRegistry,
  image: string,
  opts: CheckFlags,
): Promise<{ r: CheckResult; fixed?: CheckResult }> {
  try {
    const r = await reg.check(image, { format: opts.format, repair: opts.repair, options: opts.opts });
    // As qemu-img does: after a repair, check again and report on the repaired image.
    if (opts.repair && (r.leaksFixed || r.corruptionsFixed))
      return { r: await reg.check(image, { format: opts.format, options: opts.opts }), fixed: r };
    return { r };
  } catch (err) {
    // qemu-img check's own code for a format without checks.
    const noChecks =
      err instanceof BlockError && err.code === 'ENOTSUP' && err.op === 'check' && err.field === 'format';
    throw new ExitError(noChecks ? 63 : 1, describe(err, ctx.debug));
  }
}

/** qemu-img check's JSON report. */
function jsonCheck(
  r: CheckResult,
  fixed: CheckResult | undefined,
  image: string,
  format: string,
): Record<string, unknown> {
  return {
    'image-end-offset': r.imageEndOffset,
    'total-clusters': r.totalClusters,
    'check-errors': r.checkErrors,
    'allocated-clusters': r.allocatedClusters,
    filename: redactLocation(image),
    format,
    'fragmented-clusters': r.fragmentedClusters,
    'compressed-clusters': r.compressedClusters,
    leaks: r.leaks,
    corruptions: r.corruptions,
    'leaks-fixed': fixed?.leaksFixed ?? r.leaksFixed,
    'corruptions-fixed': fixed?.corruptionsFixed ?? r.corruptionsFixed,
  };
}

/** qemu-img check's human report. */
function humanCheck(r: CheckResult, fixed: CheckResult | undefined): string {
  const out: string[] = [];
  if (fixed) {
    out.push(
      ...fixed.messages,
      '',
      'The following inconsistencies were found and repaired:',
      '',
      `    ${fixed.leaksFixed} leaked clusters`,
      `    ${fixed.corruptionsFixed} corruptions`,
      '',
      'Double checking the fixed image now...',
    );
  }
  out.push(...r.messages);
  if (r.messages.length) out.push('');
  if (r.corruptions)
    out.push(
      `${r.corruptions} errors were found on the image.`,
      'Data may be corrupted, or further writes to the image may corrupt it.',
    );
  if (r.leaks)
    out.push(
      `${r.leaks} leaked clusters were found on the image.`,
      'This means waste of disk space, but no harm to data.',
    );
  if (r.checkErrors) out.push(`${r.checkErrors} internal errors have occurred during the check.`);
  if (!r.corruptions && !r.leaks && !r.checkErrors) out.push('No errors were found on the image.');
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (a: number, b: number): string => (b ? (100 * a) / b : 0).toFixed(2);
    out.push(
      `${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
        `${pct(r.fragmentedClusters ?? 0, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters ?? 0, r.allocatedClusters)}% compressed clusters`,
    );
  }
  if (r.imageEndOffset !== undefined) out.push(`Image end offset: ${r.imageEndOffset}`);
  return `${out.join('\n')}\n`;
}
