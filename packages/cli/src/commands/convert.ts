/**
 * `blockconv convert`: copies one or more sources (concatenated) to a target, or to
 * several with --tee, converting formats, as qemu-img convert with its flags. It
 * checkpoints as it goes (state-file.ts), so that --resume continues an interrupted copy.
 */
import { InvalidArgumentError, type Command } from 'commander';
import {
  AUTO_MAX_WORKERS,
  BlockError,
  checkCopyOffload,
  DEFAULT_BUFFER_SIZE,
  DEFAULT_WORKERS,
  formatSize,
  MAX_WORKERS,
  openTargets,
  parseSize,
  redactLocation,
  startConvert,
  type BlockBackend,
  type CacheMode,
  type ConvertJob,
  type ConvertResult,
  type DriverRegistry,
  type ResumeState,
} from '@blockconv/core';
import { existsSync } from 'node:fs';
import { registry, type CommandContext } from '../context.js';
import { printCreateOptions, printOpenOptions } from '../driver-options.js';
import { ExitError } from '../errors.js';
import { closeAll } from '../images.js';
import {
  cacheOption,
  intOption,
  keyValues,
  openOptions,
  outputOption,
  progressOption,
  sizeOption,
} from '../options.js';
import { progressSink, type ProgressMode } from '../progress.js';
import { signalAbort, type SignalAbort } from '../signals.js';
import { defaultStatePath, readState, removeState, writeState } from '../state-file.js';

export function addConvertCommand(program: Command, ctx: CommandContext): void {
  program
    .command('convert')
    .description(
      'Copy SOURCE (several are concatenated) to TARGET, converting formats; workers read ahead in parallel.',
    )
    .usage('[options] <source...> <target>')
    .argument('<images...>', 'one or more source images, then the target: paths or URLs (nfs://, iscsi://, ...)')
    .option('-f, --source-format <fmt>', 'source format (default: probed)')
    .option(
      '-l, --snapshot <snapshot>',
      'read an internal snapshot of the source: ID_OR_NAME, or snapshot.id=ID,snapshot.name=NAME',
      snapshotOption,
    )
    .option('-O, --target-format <fmt>', 'target format', 'raw')
    .option('-o, --target-options <k=v,...>', 'target creation options ("-o help" lists them)', keyValues)
    .addOption(openOptions('--source-opts <k=v,...>', 'sources (all of them)'))
    .addOption(openOptions('--target-opts <k=v,...>', 'target (with -n, or once created)'))
    .option(
      '-m, --workers <n>',
      `parallel workers, each with one buffer (1-${MAX_WORKERS}), or "auto": adapted during the copy (up to ${AUTO_MAX_WORKERS})`,
      (v: string) => (v === 'auto' ? 'auto' : intOption('workers', 1, MAX_WORKERS)(v)),
      DEFAULT_WORKERS,
    )
    .option(
      '-B, --backing <file>',
      "the target gets this backing file and only what differs from it (relative names: from the target's directory)",
    )
    .option('-F, --backing-format <fmt>', 'format of the -B backing file (default: probed)')
    .option(
      '-c, --compress',
      "store the target compressed (qcow2: clusters that shrink, in the image's compression_type)",
    )
    .option(
      '-W, --out-of-order',
      'write each chunk as soon as it is read, not in target order (by default writes are issued in order, several in flight; out of order suits preallocated targets such as LUNs and devices)',
    )
    .option(
      '-C, --copy-offload',
      'let the storage copy the data itself where source and target allow (copy_file_range between local files: the bytes stay in the kernel, and file systems with reflinks share them); elsewhere data is read and written as usual. Zero extents are still zeroed or skipped, but zero runs inside data are written as they are; not with -c, -B, -S, --checksum or --verify',
    )
    .option(
      '-S, --sparse-size <size>',
      'zero runs of at least this size are not written; 0 writes everything (fully allocated target)',
      sizeOption('sparse size'),
      4096,
    )
    .option('-n, --no-create', 'do not create the target: write into an existing image of at least the source size')
    .option(
      '--tee <target>',
      'also write the copy to this target (repeatable; same format and options): the sources are read once for all targets; a target that fails is dropped and the others complete',
      (v: string, prev: string[] = []) => [...prev, v],
    )
    .option('--target-is-zero', 'the existing target (-n) already reads as zeroes: skip writing zeroes')
    .addOption(cacheOption('-t, --cache <mode>', 'target', 'writeback'))
    .addOption(cacheOption('-T, --source-cache <mode>', 'source', 'writeback'))
    .option('-r, --rate-limit <bytes/s>', 'limit the copy rate (suffixes k, M, G)', sizeOption('rate limit'))
    .option(
      '--buffer-size <size>',
      'buffer per worker, the largest request',
      sizeOption('buffer size'),
      DEFAULT_BUFFER_SIZE,
    )
    .option('-p', 'show progress (a bar on a terminal)')
    .addOption(progressOption())
    .option(
      '--checksum',
      'print the blkhash digest (as "blockconv checksum" and blksum compute it) of the data copied, computed as it passes: "HEX  TARGET" on stdout',
    )
    .option('--verify', 'after the copy, read the target back and fail unless it has that digest (implies --checksum)')
    .option(
      '--resume',
      'continue an interrupted convert of the same sources to the same target from its last checkpoint (copies from the start if there is none); refused if a source, the target or an output option changed',
    )
    .option(
      '--state <file>',
      'the resume state file (default: one per target in $XDG_STATE_HOME/blockconv, ~/.local/state/blockconv)',
    )
    .option(
      '--checkpoint <every>',
      'checkpoint schedule: flush the target and save the state every SIZE copied and/or every N seconds ("1G", "30s", "1G,30s"), or "off"; at most SIZE plus workers x buffer is copied again after an interruption (default: 1G,30s; off with -t unsafe)',
      checkpointOption,
    )
    .option('-q, --quiet', 'print nothing but errors (and the --checksum line)')
    .addOption(outputOption('result summary format'))
    .addHelpText(
      'after',
      `
Cache modes: "none"/"directsync" bypass the host page cache (O_DIRECT); "unsafe" skips
the final flush. Any other mode flushes the target before reporting success.
Resume: a convert checkpoints as it goes; if it is interrupted (killed, a server
lost, Ctrl-C), the same command with --resume continues from the last checkpoint.
A qcow2 target's clusters leaked by the interruption are reclaimed first. The state
is removed once the convert succeeds.
Examples:
  blockconv convert -p disk.raw copy.raw
  blockconv convert -m 16 -W -O raw src.img /dev/sdb -n
  blockconv convert --resume -O qcow2 nfs://server/export/t.img t.qcow2`,
    )
    .action(async (images: string[], opts: ConvertFlags, cmd: Command) => {
      if (images.length < 2) cmd.error('error: convert needs a source and a target');
      // -S has a default; only one given on the command line clashes with -C.
      opts.sparseSizeGiven = cmd.getOptionValueSource('sparseSize') === 'cli';
      await runConvert(ctx, images.slice(0, -1), images.at(-1)!, opts);
    });
}

interface CheckpointSpec {
  everyBytes?: number;
  everySeconds?: number;
}

/** --checkpoint: "off", a size ("1G"), seconds ("30s"), or both ("1G,30s"). */
function checkpointOption(v: string): CheckpointSpec | 'off' {
  if (v === 'off' || v === 'no' || v === '0') return 'off';
  const out: CheckpointSpec = {};
  for (const part of v.split(',')) {
    const secs = /^(\d+(?:\.\d+)?)s$/.exec(part);
    if (secs) {
      out.everySeconds = Number(secs[1]);
      continue;
    }
    try {
      out.everyBytes = parseSize(part, 'checkpoint interval');
    } catch (_e) {
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
    if (k !== 'snapshot.id' && k !== 'snapshot.name')
      throw new InvalidArgumentError(`unknown key "${k}" (valid: snapshot.id, snapshot.name).`);
  }
  return kv;
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

/** The target's creation options: -o, with -B and -F as backing_file and backing_fmt. */
function creationOptions(o: ConvertFlags): Record<string, string> {
  return {
    ...o.targetOptions,
    ...(o.backing !== undefined ? { backing_file: o.backing } : {}),
    ...(o.backingFormat !== undefined ? { backing_fmt: o.backingFormat } : {}),
  };
}

/** The convert's options that change the output beyond what the core sees: a resume must repeat them. */
function resumeTag(o: ConvertFlags): Record<string, string> {
  const create = creationOptions(o);
  return {
    targetFormat: o.targetFormat,
    create: String(o.create),
    createOptions: Object.keys(create)
      .sort()
      .map((k) => `${k}=${create[k]}`)
      .join(','),
    ...(o.snapshot
      ? {
          snapshot: Object.entries(o.snapshot)
            .map(([k, v]) => `${k}=${v}`)
            .join(','),
        }
      : {}),
  };
}

/** Notices, in the voice of errors and warnings ("blockconv: ..."), so that scripts can tell them from other output. */
function notice(o: ConvertFlags, line: string): void {
  if (!o.quiet && o.output !== 'json') process.stderr.write(`blockconv: ${line}\n`);
}

/** What a convert settles before it opens anything. */
interface ConvertPlan {
  readonly sourceNames: readonly string[];
  /** The target, then those of --tee. */
  readonly targetNames: readonly string[];
  /** The targets as messages name them (redacted). */
  readonly targetLabel: string;
  readonly mode: ProgressMode;
  readonly checkpointing: boolean;
  /** Where checkpoints are saved (when checkpointing). */
  readonly statePath?: string;
  /** The checkpoint --resume continues from, if one was found. */
  readonly resumeState?: ResumeState;
}

/** The images a convert has open, for the end to close whatever happened. */
interface OpenImages {
  sources: BlockBackend[];
  targets: BlockBackend[];
}

async function runConvert(
  ctx: CommandContext,
  sourceNames: string[],
  firstTarget: string,
  o: ConvertFlags,
): Promise<void> {
  const reg = await registry(ctx);
  if (o.targetOptions?.help) return printCreateOptions(ctx, reg, o.targetFormat);
  if (o.sourceOpts?.help || o.targetOpts?.help) return printOpenOptions(ctx, reg);
  const targetNames = checkFlags(o, firstTarget);
  const targetLabel = targetNames.map(redactLocation).join(', ');
  const abort = signalAbort();
  const mode: ProgressMode = o.quiet ? 'none' : (o.progress ?? (o.p ? 'bar' : 'none'));
  const checkpoints = await planCheckpoints(o, targetNames);
  if (o.backing !== undefined && !o.create)
    throw new BlockError('EINVAL', '-B cannot be used with -n (the backing file is set when the target is created)');
  if (o.backingFormat !== undefined && o.backing === undefined) throw new BlockError('EINVAL', '-F needs -B');
  const plan: ConvertPlan = { sourceNames, targetNames, targetLabel, mode, ...checkpoints };
  const images: OpenImages = { sources: [], targets: [] };
  try {
    const total = await openImages(reg, o, plan, abort.signal, images);
    if (o.backing !== undefined && !plan.resumeState && !images.targets[0]!.backing)
      throw new BlockError('EINVAL', `format ${o.targetFormat} cannot have a backing file (-B)`);
    const job = startJob(o, plan, images, abort);
    const r = await awaitJob(job, o, plan, total, abort);
    // Closed before the resume state goes and the result is told; after a failure, the finally closes them.
    const closing = images.targets;
    images.targets = [];
    await closeAll(closing);
    if (plan.statePath) await removeState(plan.statePath);
    reportResult(o, plan, r);
  } finally {
    abort.dispose();
    await closeAll([...images.sources, ...images.targets]);
  }
}

/** Refuses flags that contradict each other, before anything is opened; returns the targets. */
function checkFlags(o: ConvertFlags, firstTarget: string): string[] {
  if (!o.create && o.targetOptions)
    throw new BlockError(
      'EINVAL',
      '-o sets creation options, and -n creates nothing: give open options of an existing target with --target-opts',
    );
  if (o.targetIsZero && o.create) throw new BlockError('EINVAL', '--target-is-zero requires -n (an existing target)');
  if (o.sparseSize % 512 !== 0)
    throw new BlockError('EINVAL', `-S must be a multiple of 512 bytes, got ${o.sparseSize}`);
  // Before anything is opened or created: a refused -C leaves no new target behind.
  checkCopyOffload({
    copyOffload: o.copyOffload,
    compress: o.compress,
    diffAgainstBacking: o.backing !== undefined,
    minSparse: o.sparseSizeGiven ? o.sparseSize : undefined,
    checksum: o.checksum,
    verify: o.verify,
  });
  // --tee: more targets, each written the whole copy while the sources are read once.
  const targetNames = [firstTarget, ...(o.tee ?? [])];
  if (targetNames.length > 1 && o.backing !== undefined)
    throw new BlockError('EINVAL', '-B takes one target: it cannot be used with --tee');
  if (new Set(targetNames).size !== targetNames.length)
    throw new BlockError('EINVAL', 'a target is named twice (--tee)');
  return targetNames;
}

/** Whether the convert checkpoints, where, and the state --resume continues from. */
async function planCheckpoints(
  o: ConvertFlags,
  targetNames: readonly string[],
): Promise<Pick<ConvertPlan, 'checkpointing' | 'statePath' | 'resumeState'>> {
  // Checkpoints by default, so that an interrupted convert can be resumed without having
  // asked for it beforehand; not with -t unsafe (no flushes), unless asked for.
  if (o.checkpoint === 'off' && (o.resume || o.state))
    throw new BlockError('EINVAL', '--checkpoint off leaves nothing to resume from: drop it, or --resume and --state');
  const checkpointing =
    o.checkpoint !== 'off' && (o.resume || o.state !== undefined || o.checkpoint !== undefined || o.cache !== 'unsafe');
  const statePath = checkpointing ? (o.state ?? defaultStatePath(targetNames.join('\n'))) : undefined;
  const resumeState: ResumeState | undefined = o.resume ? await readState(statePath!) : undefined;
  if (o.resume && !resumeState) notice(o, `note: no resume state (${statePath}): copying from the start`);
  if (!o.resume && statePath && existsSync(statePath))
    notice(
      o,
      `note: an interrupted convert to this target left a resume state; starting over replaces it (--resume continues it)`,
    );
  return { checkpointing, statePath, resumeState };
}

/** Opens the sources and the targets (creating them unless -n) into `images`; returns the sources' total size. */
async function openImages(
  reg: DriverRegistry,
  o: ConvertFlags,
  plan: ConvertPlan,
  signal: AbortSignal,
  images: OpenImages,
): Promise<number> {
  const sourceOptions = o.snapshot || o.sourceOpts ? { ...o.snapshot, ...o.sourceOpts } : undefined;
  // Sources and existing targets open at once, each a connection set up (mount, login):
  // one after another they would add their round trips to the copy's start. A target
  // to create waits for the sources' size. All settle before any error is thrown, so
  // that what did open is closed.
  const sourcesOpened = Promise.allSettled(
    plan.sourceNames.map((s) =>
      reg.open(s, { format: o.sourceFormat, readOnly: true, cache: o.sourceCache, options: sourceOptions, signal }),
    ),
  ).then((opened) => {
    for (const r of opened) if (r.status === 'fulfilled') images.sources.push(r.value);
    const failed = opened.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    return images.sources.reduce((n, s) => n + s.size, 0);
  });
  const [sized, targetsOpened] = await Promise.allSettled([
    sourcesOpened,
    openTargets(reg, [...plan.targetNames], {
      format: o.targetFormat,
      create: o.create,
      size: sourcesOpened,
      resume: plan.resumeState,
      cache: o.cache,
      openOptions: o.targetOpts,
      createOptions: creationOptions(o),
      signal,
    }),
  ]);
  if (targetsOpened.status === 'fulfilled') images.targets = targetsOpened.value;
  if (sized.status === 'rejected') throw sized.reason;
  if (targetsOpened.status === 'rejected') throw targetsOpened.reason;
  return sized.value;
}

function startJob(o: ConvertFlags, plan: ConvertPlan, images: OpenImages, abort: SignalAbort): ConvertJob {
  const { statePath, resumeState } = plan;
  const job = startConvert({
    sources: images.sources,
    ...(plan.targetNames.length > 1 ? { targets: images.targets } : { target: images.targets[0] }),
    workers: o.workers,
    bufferSize: o.bufferSize,
    outOfOrder: o.outOfOrder,
    compress: o.compress,
    diffAgainstBacking: o.backing !== undefined,
    // -C does not scan data (an -S given with it was refused before).
    minSparse: o.copyOffload ? undefined : o.sparseSize,
    copyOffload: o.copyOffload,
    targetIsZero: o.targetIsZero,
    rateLimit: o.rateLimit,
    flush: o.cache !== 'unsafe',
    signal: abort.signal,
    progressInterval: plan.mode === 'json' ? 500 : 100,
    checksum: o.checksum,
    verify: o.verify,
    ...(plan.checkpointing
      ? {
          checkpoint: {
            ...(o.checkpoint as CheckpointSpec | undefined),
            save: (state: ResumeState) => writeState(statePath!, state),
          },
          resume: resumeState,
          resumeTag: resumeTag(o),
        }
      : {}),
  });
  if (plan.checkpointing) abort.graceful((reason) => job.stop(reason));
  return job;
}

/** Shows the job's progress and checkpoints until it ends; a failure says what is durable and how to go on. */
async function awaitJob(
  job: ConvertJob,
  o: ConvertFlags,
  plan: ConvertPlan,
  total: number,
  abort: SignalAbort,
): Promise<ConvertResult> {
  const { mode, statePath, resumeState } = plan;
  const sink = progressSink(mode, total);
  job.on('progress', (p) => sink.update(p));
  let durable = resumeState?.progress.done ?? 0;
  job.on('checkpoint', (state) => {
    durable = state.progress.done;
    if (mode === 'json')
      process.stdout.write(
        `${JSON.stringify({
          event: 'checkpoint',
          done: state.progress.done,
          dirtyEnd: state.progress.dirtyEnd,
          total: state.progress.total,
        })}\n`,
      );
  });
  if (resumeState && resumeState.progress.done > 0)
    notice(
      o,
      `note: resuming at ${formatSize(resumeState.progress.done)} of ${formatSize(total)} (${resumeState.progress.done} bytes)`,
    );
  try {
    return await job.done;
  } catch (err) {
    // Say how to go on: what is durable, and where the state is.
    const next =
      statePath && durable > 0 && !(err instanceof BlockError && err.op === 'resume')
        ? `; ${durable} bytes are durable: the same command with --resume continues (state: ${statePath})`
        : '';
    if (err instanceof BlockError && err.code === 'ECANCELED') {
      throw new ExitError(
        abort.exitCode(),
        `convert cancelled (${err.message.replace(/^cancelled: /, '')}): target ${plan.targetLabel} is incomplete${next}`,
      );
    }
    if (err instanceof Error && next) err.message = err.message.replace(/\.$/, '') + next;
    throw err;
  } finally {
    sink.stop();
  }
}

/** The result: a JSON line or the --checksum lines on stdout, the rest on stderr; a target that failed fails the command. */
function reportResult(o: ConvertFlags, plan: ConvertPlan, r: ConvertResult): void {
  const several = plan.targetNames.length > 1;
  const firstTarget = plan.targetNames[0]!;
  const outcomes = r.targets ?? [{ location: redactLocation(firstTarget), ok: true }];
  const failures = outcomes.filter((t) => !t.ok);
  if (o.output === 'json') {
    process.stdout.write(
      `${JSON.stringify({
        event: 'done',
        source: plan.sourceNames.map(redactLocation),
        target: several ? plan.targetNames.map(redactLocation) : redactLocation(firstTarget),
        ...r,
        elapsedMs: Math.round(r.elapsedMs),
        rate: Math.round(r.rate),
      })}\n`,
    );
  } else if (r.checksum !== undefined) {
    for (const t of outcomes) if (t.ok) process.stdout.write(`${r.checksum}  ${t.location}\n`);
  }
  if (o.output !== 'json') {
    if (r.verified && !o.quiet)
      process.stderr.write(
        `verified: ${several ? 'each completed target reads' : 'the target reads'} back with the same digest\n`,
      );
    for (const t of failures)
      process.stderr.write(`blockconv: target ${t.location} failed, the others went on: ${t.error}\n`);
  }
  if (o.output !== 'json' && !o.quiet && plan.mode !== 'none')
    process.stderr.write(summaryLine(r, several ? outcomes.length - failures.length : undefined));
  // Not every target holds the copy: the command did not do what it was asked.
  if (failures.length)
    throw new ExitError(
      1,
      `${failures.length} of ${outcomes.length} targets failed (${failures.map((t) => t.location).join(', ')}); the others are complete`,
    );
}

/** "converted ... in ... s (...)", shown with progress; `completedTargets` with --tee. */
function summaryLine(r: ConvertResult, completedTargets: number | undefined): string {
  return (
    `converted ${formatSize(r.total)} in ${(r.elapsedMs / 1000).toFixed(2)} s (${formatSize(Math.round(r.rate))}/s; ` +
    `read ${formatSize(r.bytesRead)}, wrote ${formatSize(r.bytesWritten)}${completedTargets !== undefined ? ` to each of ${completedTargets} targets` : ''}, zeroed ${formatSize(r.bytesZeroed)}, skipped ${formatSize(r.bytesSkipped)}` +
    `${r.bytesOffloaded !== undefined ? `; the storage copied ${formatSize(r.bytesOffloaded)} itself (-C)` : ''}` +
    `${r.workersTried ? `; -m auto settled on ${r.workers} workers, tried ${r.workersTried.join(' ')}` : ''})\n`
  );
}
