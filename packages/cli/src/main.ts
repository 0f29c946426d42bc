/**
 * The `blockconv` command: the program (global options, each command registered from
 * its module under commands/), and how a run ends (exit codes, error lines). Flags
 * follow qemu-img so that operators can switch without relearning. Errors are one line
 * on stderr (a stack trace only with --debug) and a non-zero exit. No credential is
 * printed: every location shown is redacted (core's redactLocation), and main() filters
 * stdout and stderr as well (redact-output.ts).
 */
import { Command, CommanderError } from 'commander';
import { BlockError, redactCredentials } from '@blockconv/core';
import { createRequire } from 'node:module';
import { addCheckCommand } from './commands/check.js';
import { addChecksumCommand } from './commands/checksum.js';
import { addCompareCommand } from './commands/compare.js';
import { addConvertCommand } from './commands/convert.js';
import { addCreateCommand } from './commands/create.js';
import { addDashboardCommand } from './commands/dashboard.js';
import { addDriversCommand } from './commands/drivers.js';
import { addInfoCommand } from './commands/info.js';
import { addJobsCommand } from './commands/jobs.js';
import { addMapCommand } from './commands/map.js';
import { addServeCommand } from './commands/serve.js';
import { addSubmitCommand } from './commands/submit.js';
import { addWorkerCommand } from './commands/worker.js';
import type { CommandContext } from './context.js';
import { describe, ExitError } from './errors.js';
import { redactStreams } from './redact-output.js';

/** The commands, in the order `blockconv --help` lists them. */
const COMMANDS: ReadonlyArray<(program: Command, ctx: CommandContext) => void> = [
  addConvertCommand,
  addCreateCommand,
  addCheckCommand,
  addInfoCommand,
  addCompareCommand,
  addMapCommand,
  addChecksumCommand,
  addDriversCommand,
  addServeCommand,
  addWorkerCommand,
  addSubmitCommand,
  addJobsCommand,
  addDashboardCommand,
];

export function buildProgram(ctx: CommandContext): Command {
  const program = new Command('blockconv')
    .description('Copy and convert disk images between storage back ends (local files, qcow2, NFS, iSCSI).')
    .option('--debug', 'print stack traces of errors')
    .version(createRequire(import.meta.url)('../package.json').version as string, '-V, --version')
    .showSuggestionAfterError()
    // Usage errors may quote an argument; subcommands inherit this.
    .configureOutput({
      writeOut: (s) => process.stdout.write(redactCredentials(s)),
      writeErr: (s) => process.stderr.write(redactCredentials(s)),
    })
    .configureHelp({ sortOptions: false })
    .exitOverride();
  for (const addCommand of COMMANDS) addCommand(program, ctx);
  return program;
}

export interface MainOptions {
  /**
   * Filter stdout and stderr through the redactor while the command runs (default).
   * Tests turn it off to check that the commands redact by themselves.
   */
  readonly redactOutput?: boolean;
}

export async function main(argv: readonly string[], options: MainOptions = {}): Promise<number> {
  const ctx: CommandContext = { debug: argv.includes('--debug') };
  const unredact = options.redactOutput === false ? () => {} : redactStreams();
  // Drivers warn through process.emitWarning (e.g. a qcow2 image with the corrupt bit):
  // one line in our own voice instead of Node's "(node:PID) Warning:". It stays after
  // main returns: warnings are delivered a tick late.
  if (!process.listeners('warning').includes(printWarning)) {
    process.removeAllListeners('warning');
    process.on('warning', printWarning);
  }
  try {
    return await run(ctx, argv);
  } finally {
    unredact();
  }
}

function printWarning(w: Error): void {
  process.stderr.write(`blockconv: warning: ${redactCredentials(w.message)}\n`);
}

async function run(ctx: CommandContext, argv: readonly string[]): Promise<number> {
  const program = buildProgram(ctx);
  for (const c of program.commands) c.exitOverride();
  try {
    await program.parseAsync(argv as string[]);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      // Commander already printed usage errors and help; only map the code.
      return err.exitCode === 0 || err.code === 'commander.helpDisplayed' || err.code === 'commander.version' ? 0 : 1;
    }
    if (err instanceof ExitError) {
      if (err.message) process.stderr.write(`blockconv: ${redactCredentials(err.message)}\n`);
      return err.exitCode;
    }
    let msg = describe(err, ctx.debug);
    if (err instanceof BlockError && err.code === 'ENODRIVER') {
      // Installed but broken (e.g. an addon built without its system library) is not "missing".
      const failed = ctx.discovery?.failed ?? [];
      const named = failed.find((f) => msg.includes(`install ${f.name}`));
      if (named)
        msg = `${msg.slice(0, msg.indexOf(': install '))}: ${named.name} is installed but failed to load: ${named.error}`;
      else if (failed.length)
        msg += ` (packages that failed to load: ${failed.map((f) => `${f.name}: ${f.error}`).join('; ')})`;
    }
    process.stderr.write(`blockconv: ${msg}\n`);
    return 1;
  }
}
