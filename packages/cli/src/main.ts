/**
 * The `blockconv` command: convert, create, check, info, compare, map, checksum, drivers, serve (serve-command.ts), and the
 * fleet's worker, submit and jobs (fleet-commands.ts). Flags follow
 * qemu-img so that operators can switch without relearning. Errors are one line on
 * stderr (a stack trace only with --debug) and a non-zero exit. No credential is printed:
 * every location shown is redacted (core's redactLocation), and main() filters
 * stdout and stderr as well (redact-output.ts).
 */
import { Command, CommanderError, InvalidArgumentError, Option } from 'commander';
import {
  checkCopyOffload,
  BlockError,
  checksumImage,
  compareImages,
  DEFAULT_BUFFER_SIZE,
  DEFAULT_WORKERS,
  AUTO_MAX_WORKERS,
  formatSize,
  isSecretParameter,
  mapImage,
  REDACTED,
  redactCredentials,
  redactLocation,
  resolveRelative,
  MAX_WORKERS,
  parseSize,
  startConvert, openTargets,
  type BlockBackend,
  type CacheMode,
  type CheckResult,
  type ResumeState,
} from '@blockconv/core';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { registry, registryWithAllDrivers, type CommandContext } from './context.js';
import { printCreateOptions, printOpenOptions } from './driver-options.js';
import { describe, ExitError } from './errors.js';
import { closeAll } from './images.js';
import { addFleetCommands } from './fleet-commands.js';
import { CACHE_MODES, cacheOption, intOption, keyValues, openOptions, sizeOption } from './options.js';
import { addServeCommand } from './serve-command.js';
import { signalAbort } from './signals.js';
import { defaultStatePath, readState, removeState, writeState } from './state-file.js';
import { progressSink, type ProgressMode } from './progress.js';
import { redactStreams } from './redact-output.js';

interface CheckpointSpec { everyBytes?: number; everySeconds?: number }

/** --checkpoint: "off", a size ("1G"), seconds ("30s"), or both ("1G,30s"). */
function checkpointOption(v: string): CheckpointSpec | 'off' {
  if (v === 'off' || v === 'no' || v === '0') return 'off';
  const out: CheckpointSpec = {};
  for (const part of v.split(',')) {
    const secs = /^(\d+(?:\.\d+)?)s$/.exec(part);
    if (secs) { out.everySeconds = Number(secs[1]); continue; }
    try {
      out.everyBytes = parseSize(part, 'checkpoint interval');
    } catch (e) {
      throw new InvalidArgumentError(`expected off, a size (1G), seconds (30s) or both (1G,30s), got "${part}".`);
    }
    if (out.everyBytes < 1024 * 1024) throw new InvalidArgumentError('a checkpoint interval is at least 1M.');
  }
  return out;
}

/** qemu-img's -l: "X" (ID or name) or "snapshot.id=..,snapshot.name=..". */
function snapshotOption(v: string): Record<string, string> {
  if (!v.includes('=')) return { snapshot: v };
  const kv = keyValues(v);
  for (const k of Object.keys(kv)) {
    if (k !== 'snapshot.id' && k !== 'snapshot.name') throw new InvalidArgumentError(`unknown key "${k}" (valid: snapshot.id, snapshot.name).`);
  }
  return kv;
}

export function buildProgram(ctx: CommandContext): Command {
  const program = new Command('blockconv')
    .description('Copy and convert disk images between storage back ends (local files, qcow2, NFS, iSCSI).')
    .option('--debug', 'print stack traces of errors')
    .version(createRequire(import.meta.url)('../package.json').version as string, '-V, --version')
    .showSuggestionAfterError()
    // Usage errors may quote an argument; subcommands inherit this.
    .configureOutput({ writeOut: (s) => process.stdout.write(redactCredentials(s)), writeErr: (s) => process.stderr.write(redactCredentials(s)) })
    .configureHelp({ sortOptions: false })
    .exitOverride();

  program
    .command('convert')
    .description('Copy SOURCE (several are concatenated) to TARGET, converting formats; workers read ahead in parallel.')
    .usage('[options] <source...> <target>')
    .argument('<images...>', 'one or more source images, then the target: paths or URLs (nfs://, iscsi://, ...)')
    .option('-f, --source-format <fmt>', 'source format (default: probed)')
    .option('-l, --snapshot <snapshot>', 'read an internal snapshot of the source: ID_OR_NAME, or snapshot.id=ID,snapshot.name=NAME', snapshotOption)
    .option('-O, --target-format <fmt>', 'target format', 'raw')
    .option('-o, --target-options <k=v,...>', 'target creation options ("-o help" lists them)', keyValues)
    .addOption(openOptions('--source-opts <k=v,...>', 'sources (all of them)'))
    .addOption(openOptions('--target-opts <k=v,...>', 'target (with -n, or once created)'))
    .option('-m, --workers <n>', `parallel workers, each with one buffer (1-${MAX_WORKERS}), or "auto": adapted during the copy (up to ${AUTO_MAX_WORKERS})`,
      (v: string) => (v === 'auto' ? 'auto' : intOption('workers', 1, MAX_WORKERS)(v)), DEFAULT_WORKERS)
    .option('-B, --backing <file>', 'the target gets this backing file and only what differs from it (relative names: from the target\'s directory)')
    .option('-F, --backing-format <fmt>', 'format of the -B backing file (default: probed)')
    .option('-c, --compress', 'store the target compressed (qcow2: clusters that shrink, in the image\'s compression_type)')
    .option('-W, --out-of-order', 'write each chunk as soon as it is read, not in target order (by default writes are issued in order, several in flight; out of order suits preallocated targets such as LUNs and devices)')
    .option('-C, --copy-offload', 'let the storage copy the data itself where source and target allow (copy_file_range between local files: the bytes stay in the kernel, and file systems with reflinks share them); elsewhere data is read and written as usual. Zero extents are still zeroed or skipped, but zero runs inside data are written as they are; not with -c, -B, -S, --checksum or --verify')
    .option('-S, --sparse-size <size>', 'zero runs of at least this size are not written; 0 writes everything (fully allocated target)', sizeOption('sparse size'), 4096)
    .option('-n, --no-create', 'do not create the target: write into an existing image of at least the source size')
    .option('--tee <target>', 'also write the copy to this target (repeatable; same format and options): the sources are read once for all targets; a target that fails is dropped and the others complete', (v: string, prev: string[] = []) => [...prev, v])
    .option('--target-is-zero', 'the existing target (-n) already reads as zeroes: skip writing zeroes')
    .addOption(cacheOption('-t, --cache <mode>', 'target', 'writeback'))
    .addOption(cacheOption('-T, --source-cache <mode>', 'source', 'writeback'))
    .option('-r, --rate-limit <bytes/s>', 'limit the copy rate (suffixes k, M, G)', sizeOption('rate limit'))
    .option('--buffer-size <size>', 'buffer per worker, the largest request', sizeOption('buffer size'), DEFAULT_BUFFER_SIZE)
    .option('-p', 'show progress (a bar on a terminal)')
    .addOption(new Option('--progress <mode>', 'progress output: bar, json (JSON lines on stdout), none').choices(['bar', 'json', 'none']))
    .option('--checksum', 'print the blkhash digest (as "blockconv checksum" and blksum compute it) of the data copied, computed as it passes: "HEX  TARGET" on stdout')
    .option('--verify', 'after the copy, read the target back and fail unless it has that digest (implies --checksum)')
    .option('--resume', 'continue an interrupted convert of the same sources to the same target from its last checkpoint (copies from the start if there is none); refused if a source, the target or an output option changed')
    .option('--state <file>', 'the resume state file (default: one per target in $XDG_STATE_HOME/blockconv, ~/.local/state/blockconv)')
    .option('--checkpoint <every>', 'checkpoint schedule: flush the target and save the state every SIZE copied and/or every N seconds ("1G", "30s", "1G,30s"), or "off"; at most SIZE plus workers x buffer is copied again after an interruption (default: 1G,30s; off with -t unsafe)', checkpointOption)
    .option('-q, --quiet', 'print nothing but errors (and the --checksum line)')
    .addOption(new Option('--output <fmt>', 'result summary format').choices(['human', 'json']).default('human'))
    .addHelpText('after', `
Cache modes: "none"/"directsync" bypass the host page cache (O_DIRECT); "unsafe" skips
the final flush. Any other mode flushes the target before reporting success.
Resume: a convert checkpoints as it goes; if it is interrupted (killed, a server
lost, Ctrl-C), the same command with --resume continues from the last checkpoint.
A qcow2 target's clusters leaked by the interruption are reclaimed first. The state
is removed once the convert succeeds.
Examples:
  blockconv convert -p disk.raw copy.raw
  blockconv convert -m 16 -W -O raw src.img /dev/sdb -n
  blockconv convert --resume -O qcow2 nfs://server/export/t.img t.qcow2`)
    .action(async (images: string[], opts: ConvertFlags, cmd: Command) => {
      if (images.length < 2) cmd.error('error: convert needs a source and a target');
      // -S has a default; only one given on the command line clashes with -C.
      opts.sparseSizeGiven = cmd.getOptionValueSource('sparseSize') === 'cli';
      await runConvert(ctx, images.slice(0, -1), images.at(-1)!, opts);
    });

  program
    .command('create')
    .description('Create a new, empty image (as qemu-img create).')
    .usage('[options] <filename> [size]')
    .argument('<filename>')
    .argument('[size]', 'virtual size (suffixes k, M, G, T); default: the backing file\'s', (v: string) => parseSize(v, 'size'))
    .option('-f, --format <fmt>', 'image format', 'raw')
    .option('-o, --options <k=v,...>', 'format options ("-o help" lists them)', keyValues)
    .option('-b, --backing <file>', 'backing file (relative names are taken from the new image\'s directory)')
    .option('-F, --backing-format <fmt>', 'format of the backing file (default: probed)')
    .option('-q, --quiet', 'print nothing but errors')
    .action(async (filename: string, size: number | undefined, opts: { format: string; options?: Record<string, string>; backing?: string; backingFormat?: string; quiet?: boolean }) => {
      const reg = await registry(ctx);
      if (opts.options?.help) return printCreateOptions(ctx, reg, opts.format);
      const options: Record<string, string> = { ...opts.options };
      if (opts.backing !== undefined) options.backing_file = opts.backing;
      if (opts.backingFormat !== undefined) options.backing_fmt = opts.backingFormat;
      if (size === undefined) {
        if (options.backing_file === undefined) throw new BlockError('EINVAL', 'give the image size (or a backing file to take it from)');
        const backing = await reg.open(resolveRelative(filename, options.backing_file), { readOnly: true, format: options.backing_fmt });
        size = backing.size;
        await backing.close();
      }
      if (!opts.quiet) {
        const shown = Object.entries(options).map(([k, v]) => ` ${k}=${isSecretParameter(k) ? REDACTED : redactLocation(v)}`).join('');
        process.stdout.write(`Formatting '${redactLocation(filename)}', fmt=${opts.format}${shown} size=${size}\n`);
      }
      const img = await reg.create(filename, size, { format: opts.format, options });
      await img.close();
    });

  program
    .command('check')
    .description('Check an image\'s metadata for consistency (as qemu-img check). Exit 0: clean, 1: check failed, 2: corruptions, 3: leaks only, 63: the format has no checks.')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(new Option('-r, --repair <what>', 'repair leaks, or all inconsistencies that can be repaired').choices(['leaks', 'all']))
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(async (image: string, opts: { format?: string; repair?: 'leaks' | 'all'; output: 'human' | 'json'; quiet?: boolean; opts?: Record<string, string> }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      let r: CheckResult;
      let fixed: CheckResult | undefined;
      try {
        r = await reg.check(image, { format: opts.format, repair: opts.repair, options: opts.opts });
        // As qemu-img does: after a repair, check again and report on the repaired image.
        if (opts.repair && (r.leaksFixed || r.corruptionsFixed)) { fixed = r; r = await reg.check(image, { format: opts.format, options: opts.opts }); }
      } catch (err) {
        // qemu-img check's own code for a format without checks.
        const noChecks = err instanceof BlockError && err.code === 'ENOTSUP' && err.op === 'check' && err.field === 'format';
        throw new ExitError(noChecks ? 63 : 1, describe(err, ctx.debug));
      }
      const format = opts.format ?? 'qcow2';
      if (opts.output === 'json') {
        process.stdout.write(JSON.stringify({
          'image-end-offset': r.imageEndOffset, 'total-clusters': r.totalClusters, 'check-errors': r.checkErrors,
          'allocated-clusters': r.allocatedClusters, filename: redactLocation(image), format,
          'fragmented-clusters': r.fragmentedClusters, 'compressed-clusters': r.compressedClusters,
          leaks: r.leaks, corruptions: r.corruptions,
          'leaks-fixed': fixed?.leaksFixed ?? r.leaksFixed, 'corruptions-fixed': fixed?.corruptionsFixed ?? r.corruptionsFixed,
        }, null, 4) + '\n');
      } else if (!opts.quiet) {
        process.stdout.write(humanCheck(r, fixed));
      }
      const code = r.checkErrors ? 1 : r.corruptions ? 2 : r.leaks ? 3 : 0;
      if (code) throw new ExitError(code, '');
    });

  program
    .command('info')
    .description('Show an image\'s format, virtual size, allocation and format details.')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .option('--backing-chain', 'also show every image of the backing chain')
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .action(async (image: string, opts: { format?: string; backingChain?: boolean; output: 'human' | 'json'; opts?: Record<string, string> }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts });
      try {
        const chain: Array<Record<string, unknown>> = [];
        for (let layer: BlockBackend | undefined = img; layer; layer = opts.backingChain ? layer.backing : undefined) {
          chain.push(await describeImage(layer, layer === img ? redactLocation(image) : layer.location));
        }
        if (opts.output === 'json') {
          process.stdout.write(JSON.stringify(opts.backingChain ? chain : chain[0], null, 4) + '\n');
        } else {
          process.stdout.write(chain.map(humanInfo).join('\n'));
        }
      } finally {
        await img.close();
      }
    });

  program
    .command('compare')
    .description('Compare the contents of two images of any formats. Exit 0: identical, 1: different, 2: error.')
    .argument('<image1>')
    .argument('<image2>')
    .option('-f, --format1 <fmt>', 'format of image1 (default: probed)')
    .option('-F, --format2 <fmt>', 'format of image2 (default: probed)')
    .option('-s, --strict', 'images of different sizes are different')
    .option('-m, --workers <n>', 'parallel readers', intOption('workers', 1, MAX_WORKERS), 8)
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .option('-q, --quiet', 'print nothing; the exit code tells')
    .addOption(openOptions('--opts <k=v,...>', 'first image'))
    .addOption(openOptions('--opts2 <k=v,...>', 'second image'))
    .action(async (a: string, b: string, opts: { format1?: string; format2?: string; strict?: boolean; workers: number; output: string; quiet?: boolean; opts?: Record<string, string>; opts2?: Record<string, string> }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help || opts.opts2?.help) return printOpenOptions(ctx, reg);
      let ia: BlockBackend | undefined;
      let ib: BlockBackend | undefined;
      try {
        ia = await reg.open(a, { format: opts.format1, readOnly: true, options: opts.opts });
        ib = await reg.open(b, { format: opts.format2, readOnly: true, options: opts.opts2 });
        const r = await compareImages(ia, ib, { strict: opts.strict, workers: opts.workers });
        if (opts.output === 'json') process.stdout.write(JSON.stringify(r) + '\n');
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
    });

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

  program
    .command('checksum')
    .description('The blkhash (SHA-256, 64 KiB blocks) digest of an image\'s guest-visible content, as blksum computes it; zero ranges are hashed unread, data on every core.')
    .argument('<image>')
    .option('-f, --format <fmt>', 'image format (default: probed)')
    .addOption(openOptions('--opts <k=v,...>', 'image'))
    .option('-p', 'show progress (a bar on a terminal)')
    .addOption(new Option('--progress <mode>', 'progress output: bar, json (JSON lines on stdout), none').choices(['bar', 'json', 'none']))
    .addOption(new Option('--output <fmt>', 'output format').choices(['human', 'json']).default('human'))
    .action(async (image: string, opts: { format?: string; opts?: Record<string, string>; p?: boolean; progress?: ProgressMode; output: 'human' | 'json' }) => {
      const reg = await registry(ctx);
      if (opts.opts?.help) return printOpenOptions(ctx, reg);
      const abort = signalAbort();
      const img = await reg.open(image, { format: opts.format, readOnly: true, options: opts.opts, signal: abort.signal });
      const sink = progressSink(opts.progress ?? (opts.p ? 'bar' : 'none'), img.size);
      let stopped = false;
      const stop = (): void => { if (!stopped) { stopped = true; sink.stop(); } };
      const started = performance.now();
      try {
        const r = await checksumImage(img, {
          signal: abort.signal,
          onProgress: (done, total) => {
            const elapsedMs = performance.now() - started;
            sink.update({ done, total, elapsedMs, rate: elapsedMs > 0 ? (done * 1000) / elapsedMs : 0, bytesRead: 0, bytesWritten: 0, bytesZeroed: 0, bytesSkipped: 0 });
          },
        });
        stop();
        const name = redactLocation(image);
        if (opts.output === 'json') {
          process.stdout.write(JSON.stringify({
            checksum: r.checksum, algorithm: r.algorithm, 'block-size': r.blockSize, filename: name,
            'virtual-size': r.size, 'bytes-read': r.bytesRead, 'elapsed-ms': Math.round(r.elapsedMs),
          }, null, 4) + '\n');
        } else {
          process.stdout.write(`${r.checksum}  ${name}\n`);
        }
      } finally {
        stop();
        abort.dispose();
        await img.close();
      }
    });

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

  addServeCommand(program, () => registry(ctx), CACHE_MODES);

  addFleetCommands(program, () => registryWithAllDrivers(ctx));
  return program;
}

/** qemu-img check's human report. */
function humanCheck(r: CheckResult, fixed: CheckResult | undefined): string {
  const out: string[] = [];
  if (fixed) {
    out.push(...fixed.messages, '', 'The following inconsistencies were found and repaired:', '',
      `    ${fixed.leaksFixed} leaked clusters`, `    ${fixed.corruptionsFixed} corruptions`, '', 'Double checking the fixed image now...');
  }
  out.push(...r.messages);
  if (r.messages.length) out.push('');
  if (r.corruptions) out.push(`${r.corruptions} errors were found on the image.`, 'Data may be corrupted, or further writes to the image may corrupt it.');
  if (r.leaks) out.push(`${r.leaks} leaked clusters were found on the image.`, 'This means waste of disk space, but no harm to data.');
  if (r.checkErrors) out.push(`${r.checkErrors} internal errors have occurred during the check.`);
  if (!r.corruptions && !r.leaks && !r.checkErrors) out.push('No errors were found on the image.');
  if (r.totalClusters && r.allocatedClusters) {
    const pct = (a: number, b: number): string => (b ? (100 * a) / b : 0).toFixed(2);
    out.push(`${r.allocatedClusters}/${r.totalClusters} = ${pct(r.allocatedClusters, r.totalClusters)}% allocated, ` +
      `${pct(r.fragmentedClusters ?? 0, r.allocatedClusters)}% fragmented, ${pct(r.compressedClusters ?? 0, r.allocatedClusters)}% compressed clusters`);
  }
  if (r.imageEndOffset !== undefined) out.push(`Image end offset: ${r.imageEndOffset}`);
  return out.join('\n') + '\n';
}

/** One image's info, with qemu-img info's field names. */
async function describeImage(img: BlockBackend, name: string): Promise<Record<string, unknown>> {
  const actual = await img.allocatedSize?.();
  const extra = (await img.info?.()) ?? {};
  return {
    'virtual-size': img.size, filename: name, format: img.driverName,
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
      v.forEach((item, i) => put(`[${i}]`, item, indent + '    '));
    } else if (v && typeof v === 'object') {
      lines.push(`${indent}${key}:`);
      for (const [a, b] of Object.entries(v)) put(a, b, indent + '    ');
    } else {
      lines.push(`${indent}${key}: ${String(v)}`);
    }
  };
  for (const [k, v] of Object.entries(rest)) put(k, v, '');
  return lines.join('\n') + '\n';
}

interface ConvertFlags {
  sourceFormat?: string;
  snapshot?: Record<string, string>;
  targetFormat: string;
  targetOptions?: Record<string, string>;
  sourceOpts?: Record<string, string>;
  targetOpts?: Record<string, string>;
  workers: number | 'auto';
  outOfOrder?: boolean;
  compress?: boolean;
  backing?: string;
  backingFormat?: string;
  sparseSize: number;
  /** -S was on the command line (not its default). */
  sparseSizeGiven?: boolean;
  copyOffload?: boolean;
  create: boolean;
  targetIsZero?: boolean;
  cache: CacheMode;
  sourceCache: CacheMode;
  rateLimit?: number;
  bufferSize: number;
  p?: boolean;
  progress?: ProgressMode;
  quiet?: boolean;
  checksum?: boolean;
  verify?: boolean;
  resume?: boolean;
  state?: string;
  checkpoint?: CheckpointSpec | 'off';
  output: 'human' | 'json';
  tee?: string[];
}

/** The convert's options that change the output beyond what the core sees: a resume must repeat them. */
function resumeTag(o: ConvertFlags): Record<string, string> {
  const create = { ...o.targetOptions, ...(o.backing !== undefined ? { backing_file: o.backing } : {}), ...(o.backingFormat !== undefined ? { backing_fmt: o.backingFormat } : {}) };
  return {
    targetFormat: o.targetFormat,
    create: String(o.create),
    createOptions: Object.keys(create).sort().map((k) => `${k}=${create[k as keyof typeof create]}`).join(','),
    ...(o.snapshot ? { snapshot: Object.entries(o.snapshot).map(([k, v]) => `${k}=${v}`).join(',') } : {}),
  };
}

async function runConvert(ctx: CommandContext, sourceNames: string[], firstTarget: string, o: ConvertFlags): Promise<void> {
  const reg = await registry(ctx);
  if (o.targetOptions?.help) return printCreateOptions(ctx, reg, o.targetFormat);
  if (o.sourceOpts?.help || o.targetOpts?.help) return printOpenOptions(ctx, reg);
  if (!o.create && o.targetOptions) throw new BlockError('EINVAL', '-o sets creation options, and -n creates nothing: give open options of an existing target with --target-opts');
  const sourceOptions = o.snapshot || o.sourceOpts ? { ...o.snapshot, ...o.sourceOpts } : undefined;
  if (o.targetIsZero && o.create) throw new BlockError('EINVAL', '--target-is-zero requires -n (an existing target)');
  if (o.sparseSize % 512 !== 0) throw new BlockError('EINVAL', `-S must be a multiple of 512 bytes, got ${o.sparseSize}`);
  // Before anything is opened or created: a refused -C leaves no new target behind.
  checkCopyOffload({ copyOffload: o.copyOffload, compress: o.compress, diffAgainstBacking: o.backing !== undefined, minSparse: o.sparseSizeGiven ? o.sparseSize : undefined, checksum: o.checksum, verify: o.verify });
  // --tee: more targets, each written the whole copy while the sources are read once.
  const targetNames = [firstTarget, ...(o.tee ?? [])];
  const several = targetNames.length > 1;
  if (several && o.backing !== undefined) throw new BlockError('EINVAL', '-B takes one target: it cannot be used with --tee');
  if (new Set(targetNames).size !== targetNames.length) throw new BlockError('EINVAL', 'a target is named twice (--tee)');
  const targetLabel = targetNames.map(redactLocation).join(', ');
  const sources: BlockBackend[] = [];
  let targets: BlockBackend[] = [];
  const abort = signalAbort();
  const mode: ProgressMode = o.quiet ? 'none' : o.progress ?? (o.p ? 'bar' : 'none');
  let sink: ReturnType<typeof progressSink> | undefined;
  // Checkpoints by default, so that an interrupted convert can be resumed without having
  // asked for it beforehand; not with -t unsafe (no flushes), unless asked for.
  if (o.checkpoint === 'off' && (o.resume || o.state)) throw new BlockError('EINVAL', '--checkpoint off leaves nothing to resume from: drop it, or --resume and --state');
  const checkpointing = o.checkpoint !== 'off' && (o.resume || o.state !== undefined || o.checkpoint !== undefined || o.cache !== 'unsafe');
  const statePath = checkpointing ? o.state ?? defaultStatePath(targetNames.join('\n')) : undefined;
  const resumeState: ResumeState | undefined = o.resume ? await readState(statePath!) : undefined;
  // Notices, in the voice of errors and warnings ("blockconv: ..."), so that scripts can tell them from other output.
  const say = (line: string): void => { if (!o.quiet && o.output !== 'json') process.stderr.write(`blockconv: ${line}\n`); };
  if (o.resume && !resumeState) say(`note: no resume state (${statePath}): copying from the start`);
  if (!o.resume && statePath && existsSync(statePath)) say(`note: an interrupted convert to this target left a resume state; starting over replaces it (--resume continues it)`);
  const resuming = resumeState !== undefined;
  if (o.backing !== undefined && !o.create) throw new BlockError('EINVAL', '-B cannot be used with -n (the backing file is set when the target is created)');
  if (o.backingFormat !== undefined && o.backing === undefined) throw new BlockError('EINVAL', '-F needs -B');
  try {
    // Sources and existing targets open at once, each a connection set up (mount, login):
    // one after another they would add their round trips to the copy's start. A target
    // to create waits for the sources' size. All settle before any error is thrown, so
    // that what did open is closed below.
    const sourcesOpened = Promise.allSettled(sourceNames.map((s) => reg.open(s, { format: o.sourceFormat, readOnly: true, cache: o.sourceCache, options: sourceOptions, signal: abort.signal })))
      .then((opened) => {
        for (const r of opened) if (r.status === 'fulfilled') sources.push(r.value);
        const failed = opened.find((r): r is PromiseRejectedResult => r.status === 'rejected');
        if (failed) throw failed.reason;
        return sources.reduce((n, s) => n + s.size, 0);
      });
    const createOptions = { ...o.targetOptions, ...(o.backing !== undefined ? { backing_file: o.backing } : {}), ...(o.backingFormat !== undefined ? { backing_fmt: o.backingFormat } : {}) };
    const [sized, targetsOpened] = await Promise.allSettled([sourcesOpened, openTargets(reg, targetNames, {
      format: o.targetFormat, create: o.create, size: sourcesOpened, resume: resumeState, cache: o.cache,
      openOptions: o.targetOpts, createOptions, signal: abort.signal,
    })]);
    if (targetsOpened.status === 'fulfilled') targets = targetsOpened.value;
    if (sized.status === 'rejected') throw sized.reason;
    if (targetsOpened.status === 'rejected') throw targetsOpened.reason;
    const total = sized.value;
    if (o.backing !== undefined && !resuming && !targets[0]!.backing) throw new BlockError('EINVAL', `format ${o.targetFormat} cannot have a backing file (-B)`);
    const job = startConvert({
      sources, ...(several ? { targets } : { target: targets[0] }),
      workers: o.workers,
      bufferSize: o.bufferSize,
      outOfOrder: o.outOfOrder,
      compress: o.compress,
      diffAgainstBacking: o.backing !== undefined,
      // -C does not scan data (an -S given with it was refused above).
      minSparse: o.copyOffload ? undefined : o.sparseSize,
      copyOffload: o.copyOffload,
      targetIsZero: o.targetIsZero,
      rateLimit: o.rateLimit,
      flush: o.cache !== 'unsafe',
      signal: abort.signal,
      progressInterval: mode === 'json' ? 500 : 100,
      checksum: o.checksum,
      verify: o.verify,
      ...(checkpointing ? {
        checkpoint: { ...(o.checkpoint as CheckpointSpec | undefined), save: (state: ResumeState) => writeState(statePath!, state) },
        resume: resumeState,
        resumeTag: resumeTag(o),
      } : {}),
    });
    if (checkpointing) abort.graceful((reason) => job.stop(reason));
    sink = progressSink(mode, total);
    job.on('progress', (p) => sink!.update(p));
    let durable = resumeState?.progress.done ?? 0;
    job.on('checkpoint', (state) => {
      durable = state.progress.done;
      if (mode === 'json') process.stdout.write(JSON.stringify({ event: 'checkpoint', done: state.progress.done, dirtyEnd: state.progress.dirtyEnd, total: state.progress.total }) + '\n');
    });
    if (resuming && resumeState.progress.done > 0) say(`note: resuming at ${formatSize(resumeState.progress.done)} of ${formatSize(total)} (${resumeState.progress.done} bytes)`);
    let r;
    try {
      r = await job.done;
    } catch (err) {
      // Say how to go on: what is durable, and where the state is.
      const next = statePath && durable > 0 && !(err instanceof BlockError && err.op === 'resume') ? `; ${durable} bytes are durable: the same command with --resume continues (state: ${statePath})` : '';
      if (err instanceof BlockError && err.code === 'ECANCELED') {
        throw new ExitError(abort.exitCode(), `convert cancelled (${err.message.replace(/^cancelled: /, '')}): target ${targetLabel} is incomplete${next}`);
      }
      if (err instanceof Error && next) err.message = err.message.replace(/\.$/, '') + next;
      throw err;
    } finally {
      sink.stop();
    }
    const closing = targets;
    targets = [];
    await closeAll(closing);
    if (statePath) await removeState(statePath);
    const outcomes = r.targets ?? [{ location: redactLocation(firstTarget), ok: true }];
    const failures = outcomes.filter((t) => !t.ok);
    if (o.output === 'json') {
      process.stdout.write(JSON.stringify({ event: 'done', source: sourceNames.map(redactLocation), target: several ? targetNames.map(redactLocation) : redactLocation(firstTarget), ...r, elapsedMs: Math.round(r.elapsedMs), rate: Math.round(r.rate) }) + '\n');
    } else if (r.checksum !== undefined) {
      for (const t of outcomes) if (t.ok) process.stdout.write(`${r.checksum}  ${t.location}\n`);
    }
    if (o.output !== 'json') {
      if (r.verified && !o.quiet) process.stderr.write(`verified: ${several ? 'each completed target reads' : 'the target reads'} back with the same digest\n`);
      for (const t of failures) process.stderr.write(`blockconv: target ${t.location} failed, the others went on: ${t.error}\n`);
    }
    if (o.output !== 'json' && !o.quiet && mode !== 'none') {
      process.stderr.write(`converted ${formatSize(r.total)} in ${(r.elapsedMs / 1000).toFixed(2)} s (${formatSize(Math.round(r.rate))}/s; ` +
        `read ${formatSize(r.bytesRead)}, wrote ${formatSize(r.bytesWritten)}${several ? ` to each of ${outcomes.length - failures.length} targets` : ''}, zeroed ${formatSize(r.bytesZeroed)}, skipped ${formatSize(r.bytesSkipped)}` +
        `${r.bytesOffloaded !== undefined ? `; the storage copied ${formatSize(r.bytesOffloaded)} itself (-C)` : ''}` +
        `${r.workersTried ? `; -m auto settled on ${r.workers} workers, tried ${r.workersTried.join(' ')}` : ''})\n`);
    }
    // Not every target holds the copy: the command did not do what it was asked.
    if (failures.length) throw new ExitError(1, `${failures.length} of ${outcomes.length} targets failed (${failures.map((t) => t.location).join(', ')}); the others are complete`);
  } finally {
    abort.dispose();
    await closeAll([...sources, ...targets]);
  }
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
  program.commands.forEach((c) => c.exitOverride());
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
      if (named) msg = `${msg.slice(0, msg.indexOf(': install '))}: ${named.name} is installed but failed to load: ${named.error}`;
      else if (failed.length) msg += ` (packages that failed to load: ${failed.map((f) => `${f.name}: ${f.error}`).join('; ')})`;
    }
    process.stderr.write(`blockconv: ${msg}\n`);
    return 1;
  }
}
