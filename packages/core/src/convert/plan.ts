/**
 * The plan of a convert: the options checked, and every size and mode the scheduler
 * derives from them and from the backends' limits, computed once before any I/O. Pure:
 * nothing here reads or writes an image.
 */
import { BlockError } from '../errors.js';
import { gateBackend } from '../gate.js';
import { roundDown } from '../registry.js';
import type { BlockBackend, GatedBackend, WriteFlags } from '../types.js';
import { BLKHASH_BLOCK_SIZE } from '../checksum/blkhash.js';
import { DEFAULT_CHECKPOINT_BYTES } from './checkpoints.js';
import { checkStateShape } from './resume.js';
import {
  AUTO_MAX_WORKERS,
  DEFAULT_BUFFER_SIZE,
  DEFAULT_MIN_SPARSE,
  DEFAULT_WORKERS,
  MAX_WORKERS,
  SECTOR,
  type ConvertOptions,
} from './options.js';

export interface ConvertPlan {
  /** The backends behind the request gate (registry backends are gated already). */
  readonly target: GatedBackend;
  readonly sources: readonly GatedBackend[];
  /** Bytes of all sources together. */
  readonly total: number;
  /** -B: the target's backing image, compared with instead of writing what it holds. */
  readonly backing?: GatedBackend;
  /** Workers to start; with -m auto the most the governor may use. */
  readonly workers: number;
  readonly autoWorkers: boolean;
  /** Each worker's buffer: the largest chunk. */
  readonly bufferSize: number;
  /** Chunk boundaries: the largest request alignment, or the target's preferred one. */
  readonly chunkAlign: number;
  /** Where chunks may start: chunkAlign, or 64 KiB blocks with a checksum (no block spans two chunks). */
  readonly cursorAlign: number;
  /** Compute the blkhash digest of what passes. */
  readonly checksum: boolean;
  /** Largest data chunk (whole chunkAlign units) and largest zero chunk. */
  readonly maxDataChunk: number;
  readonly maxZeroChunk: number;
  /** Granularity of the zero scan, and of -B comparisons. */
  readonly unit: number;
  /** -S: zero runs of at least this are not written as data; 0 scans nothing. */
  readonly minSparse: number;
  /** -S 0: every byte is written as data, zeroes included. */
  readonly allData: boolean;
  /** Data is scanned for zero runs (-S > 0, no copy offload). */
  readonly scan: boolean;
  /** -C: data chunks are copied by the storage where source and target allow. */
  readonly copyOffload: boolean;
  /**
   * Data chunks may go through the pair's fused copy (copyTo/copyFrom) where the source
   * offers one: nothing needs the bytes in the core (no checksum, -B, compression or
   * copy offload), and the target takes several writes at once.
   */
  readonly pipe: boolean;
  /** Smallest hole the cursor may read along with the data around it; 0: never. */
  readonly minMergedHole: number;
  /** The target reads back zeroes: zero ranges are skipped. */
  readonly targetZero: boolean;
  /** -W, when the target takes it. */
  readonly outOfOrder: boolean;
  /** The target takes one write at a time. */
  readonly serialized: boolean;
  /** Largest writeZeroes request. */
  readonly maxZeroes: number;
  readonly writeFlags?: WriteFlags;
  /** Writes go out one by one per worker (one-at-a-time targets, compressed writes). */
  readonly pieceByPiece: boolean;
  readonly rateLimit?: number;
  /** Resuming: the target offset this run starts at (0 otherwise). */
  readonly start: number;
  /**
   * Resuming: [start, rewriteEnd) may hold stray writes of the interrupted run and is
   * written in full, zeroes included, whatever targetZero says.
   */
  readonly rewriteEnd: number;
  /** Buffers in memory every backend of the copy can do I/O from (O_DIRECT). */
  readonly allocate: (n: number) => Uint8Array;
}

/**
 * Refuses copy offload with what needs the bytes in memory, which an offloaded copy
 * never brings there. Exported so that a caller can check before it creates a target.
 */
export function checkCopyOffload(
  o: Pick<ConvertOptions, 'copyOffload' | 'compress' | 'diffAgainstBacking' | 'minSparse' | 'checksum' | 'verify'>,
): void {
  if (!o.copyOffload) return;
  const clash = o.compress
    ? 'compress (-c)'
    : o.diffAgainstBacking
      ? 'write only what differs from a backing image (-B)'
      : o.minSparse !== undefined
        ? 'look for zero runs in data (-S)'
        : o.checksum || o.verify
          ? 'checksum or verify what it copies'
          : undefined;
  if (clash)
    throw new BlockError('EINVAL', `copy offload (-C) cannot ${clash}: the data does not pass through blockconv`, {
      field: 'copyOffload',
    });
}

function checkOptions(o: ConvertOptions & { readonly target: BlockBackend }): void {
  const int = (name: string, v: number | undefined, min: number, max = Number.MAX_SAFE_INTEGER): void => {
    if (v !== undefined && (!Number.isSafeInteger(v) || v < min || v > max)) {
      throw new BlockError('EINVAL', `${name} must be an integer from ${min} to ${max}, got ${v}`);
    }
  };
  if (o.sources.length === 0) throw new BlockError('EINVAL', 'no source image');
  if (o.workers !== 'auto') int('workers', o.workers, 1, MAX_WORKERS);
  int('bufferSize', o.bufferSize, SECTOR, 1 << 30);
  int('minSparse', o.minSparse, 0);
  int('rateLimit', o.rateLimit, 0);
  if (o.minSparse !== undefined && o.minSparse % SECTOR !== 0) {
    throw new BlockError('EINVAL', `minSparse must be a multiple of ${SECTOR} bytes, got ${o.minSparse}`);
  }
  if (o.target.readOnly) {
    throw new BlockError(
      'EROFS',
      `the target is read-only${o.target.readOnlyReason ? `: ${o.target.readOnlyReason}` : ''}`,
      { location: o.target.location },
    );
  }
  checkCopyOffload(o);
  if (o.compress && !o.target.canCompress) {
    throw new BlockError('EINVAL', `the target (${o.target.driverName}) cannot store compressed data`, {
      location: o.target.location,
    });
  }
}

/** `o.target` is the one target, or the fanout of several (fanout.ts). */
/** Where each source but the last ends in the target; each must end on the alignment. */
function sourceJoins(sources: readonly GatedBackend[], align: number): Array<{ source: BlockBackend; end: number }> {
  const joins: Array<{ source: BlockBackend; end: number }> = [];
  let base = 0;
  for (const s of sources.slice(0, -1)) {
    base += s.size;
    joins.push({ source: s, end: base });
    if (base % align !== 0) {
      throw new BlockError(
        'EINVAL',
        `source ${s.location} ends at ${base}, not a multiple of the ${align}-byte alignment; sources cannot be concatenated`,
      );
    }
  }
  return joins;
}

/** A checksum hashes 64 KiB blocks: no block may span two chunks, two sources or a resume point. */
function checkChecksumPlacement(p: {
  bufferSize: number;
  cursorAlign: number;
  joins: ReadonlyArray<{ source: BlockBackend; end: number }>;
  start: number;
  total: number;
  resumedWithout: boolean;
}): void {
  if (p.bufferSize < p.cursorAlign) {
    throw new BlockError('EINVAL', `a checksum needs a buffer of at least ${p.cursorAlign} bytes, got ${p.bufferSize}`);
  }
  const join = p.joins.find((j) => j.end % BLKHASH_BLOCK_SIZE !== 0);
  if (join) {
    throw new BlockError(
      'EINVAL',
      `source ${join.source.location} ends at ${join.end}, not on a 64 KiB block: concatenated sources cannot be checksummed while copied`,
    );
  }
  if (p.start % BLKHASH_BLOCK_SIZE !== 0 && p.start !== p.total) {
    throw new BlockError('EINVAL', `cannot resume a checksum from offset ${p.start}: not on a 64 KiB block`, {
      op: 'resume',
      field: 'resume',
    });
  }
  if (p.resumedWithout) {
    throw new BlockError('EINVAL', 'cannot resume with a checksum: the interrupted run computed none', {
      op: 'resume',
      field: 'checksum',
    });
  }
}

/** The backend whose allocBuffer satisfies every side's memory alignment (O_DIRECT), if any needs one. */
function alignedBufferOwner(backends: readonly GatedBackend[]): GatedBackend | undefined {
  const memAlign = Math.max(...backends.map((b) => b.limits.minMemAlignment ?? 1));
  return memAlign > 1 ? backends.find((b) => b.allocBuffer && (b.limits.minMemAlignment ?? 1) >= memAlign) : undefined;
}

export function planConvert(o: ConvertOptions & { readonly target: BlockBackend }): ConvertPlan {
  checkOptions(o);
  const target = gateBackend(o.target);
  const sources = o.sources.map((s) => gateBackend(s));
  const total = sources.reduce((n, s) => n + s.size, 0);
  if (target.size < total) {
    throw new BlockError('ERANGE', `target is smaller than the source (${target.size} < ${total} bytes)`, {
      location: target.location,
    });
  }
  const align = Math.max(target.limits.requestAlignment, ...sources.map((s) => s.limits.requestAlignment));
  const joins = sourceJoins(sources, align);

  const minSparse = o.minSparse ?? DEFAULT_MIN_SPARSE;
  const allData = minSparse === 0;
  const backing = o.diffAgainstBacking && target.backing ? gateBackend(target.backing) : undefined;
  if (o.diffAgainstBacking && !backing)
    throw new BlockError('EINVAL', 'the target has no backing image to compare with', { location: target.location });
  // A resumed target was not just created: whether it read back zeroes is the first run's to say.
  const resume = o.resume?.progress;
  if (o.resume) {
    checkStateShape(o.resume);
    if (resume!.total !== total)
      throw new BlockError(
        'EINVAL',
        `cannot resume: the state is of a ${resume!.total}-byte copy, this one is ${total} bytes`,
        { op: 'resume', field: 'resume' },
      );
  }
  const targetZero = !backing && (resume ? resume.targetZero : o.targetIsZero === true || target.zeroInitialized);
  const outOfOrder = (o.outOfOrder ?? false) && target.canWriteOutOfOrder;
  // In order, writes of consecutive chunks overlap unless the target cannot take that.
  const serialized = !outOfOrder && !target.canWriteOutOfOrder;
  const maxTransfer = Math.min(target.limits.maxTransfer, ...sources.map((s) => s.limits.maxTransfer));
  const bufferSize = Math.max(align, roundDown(Math.min(o.bufferSize ?? DEFAULT_BUFFER_SIZE, maxTransfer), align));
  // Chunks and zero runs on the target's preferred granularity (qcow2 clusters) spare it
  // copy-on-write, as long as a buffer holds one such unit; sources only need `align`.
  // Compressed writes go by whole compression units (qcow2 clusters).
  const preferred = (o.compress ? target.limits.compressionUnit : undefined) ?? target.limits.preferredAlignment ?? 1;
  const chunkAlign = preferred > align && preferred <= bufferSize && preferred % align === 0 ? preferred : align;
  const chunksAtMost = Math.ceil(total / bufferSize) || 1;
  const autoWorkers = o.workers === 'auto';
  const workers = autoWorkers
    ? Math.min(AUTO_MAX_WORKERS, chunksAtMost)
    : Math.max(1, Math.min((o.workers as number | undefined) ?? DEFAULT_WORKERS, chunksAtMost));
  const maxZeroes = target.limits.maxWriteZeroes ?? target.limits.maxTransfer;
  // A zero chunk skipped on a zero target costs nothing, so it may be huge; written zeroes are split later.
  // Zero chunks compared with a backing image are read like data: one buffer at most.
  // With checkpoints, a written chunk must fit in one checkpoint's span (checkpoints.ts).
  const zeroCap = o.checkpoint
    ? Math.max(bufferSize, roundDown(o.checkpoint.everyBytes ?? DEFAULT_CHECKPOINT_BYTES, chunkAlign))
    : 1 << 30;
  const maxZeroChunk = backing
    ? bufferSize
    : targetZero
      ? Number.MAX_SAFE_INTEGER
      : Math.max(bufferSize, roundDown(Math.min(maxZeroes, 1 << 30, zeroCap), chunkAlign));
  const unit = Math.max(SECTOR, target.limits.requestAlignment, chunkAlign);
  const checksum = o.checksum === true || o.verify === true;
  const cursorAlign = checksum ? Math.max(chunkAlign, BLKHASH_BLOCK_SIZE) : chunkAlign;
  // A merged hole must come back from the zero scan as a run the target need not write.
  // Not with copy offload: merged holes are found by the scan, which it does not run.
  const copyOffload = o.copyOffload === true;
  const minMergedHole = allData || copyOffload ? 0 : Math.max(minSparse, unit);
  const alignedOwner = alignedBufferOwner([target, ...sources]);
  const writeFlags = o.compress ? { compress: true } : undefined;
  const start = resume?.done ?? 0;
  const rewriteEnd = resume ? Math.min(total, Math.ceil(resume.dirtyEnd / cursorAlign) * cursorAlign) : 0;
  if (checksum)
    checkChecksumPlacement({
      bufferSize,
      cursorAlign,
      joins,
      start,
      total,
      resumedWithout: resume !== undefined && !resume.checksum,
    });
  return {
    target,
    sources,
    total,
    backing,
    start,
    rewriteEnd,
    workers,
    autoWorkers,
    bufferSize,
    chunkAlign,
    cursorAlign,
    checksum,
    maxDataChunk: roundDown(bufferSize, cursorAlign),
    maxZeroChunk: checksum ? roundDown(maxZeroChunk, cursorAlign) || cursorAlign : maxZeroChunk,
    unit,
    minSparse,
    allData,
    minMergedHole,
    scan: !allData && !copyOffload,
    copyOffload,
    pipe:
      target.copyFrom !== undefined && !checksum && !backing && !copyOffload && writeFlags === undefined && !serialized,
    targetZero,
    outOfOrder,
    serialized,
    maxZeroes,
    writeFlags,
    pieceByPiece: serialized || writeFlags !== undefined,
    rateLimit: o.rateLimit || undefined,
    allocate: (n) => (alignedOwner ? alignedOwner.allocBuffer!(n) : Buffer.allocUnsafeSlow(n)),
  };
}
