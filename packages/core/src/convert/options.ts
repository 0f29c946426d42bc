/**
 * What a convert takes and reports: the public options and results of the scheduler
 * (index.ts), and its defaults.
 */
import type { BlockBackend } from '../types.js';
import type { BlockHashState } from '../checksum/blkhash.js';
import type { ResumeState } from './resume.js';
import type { TargetOutcome } from './fanout.js';

export const DEFAULT_WORKERS = 8;
export const DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024;
export const DEFAULT_MIN_SPARSE = 4096;
export const MAX_WORKERS = 256;
/** Most workers -m auto uses: memory stays AUTO_MAX_WORKERS x buffer at worst. */
export const AUTO_MAX_WORKERS = 32;
/** Zero-detection granularity when the target allows finer: one sector, as qemu-img. */
export const SECTOR = 512;
/**
 * Holes up to this size between data extents of a source with cheap hole reads are
 * read along with the data (and found again by the zero scan): one request instead of
 * two for images fragmented at cluster granularity.
 */
export const MAX_MERGED_HOLE = 128 * 1024;
/**
 * Most holes merged into one data chunk. They are not read: the chunk's data pieces
 * come in one vectored read (readSegments) and the zero scan skips the holes.
 */
export const MAX_MERGED_HOLES = 256;

export interface ConvertOptions {
  /** Opened sources; their contents are concatenated into the target. */
  readonly sources: readonly BlockBackend[];
  /** Opened target, at least as large as the sources together. */
  readonly target?: BlockBackend;
  /**
   * Instead of `target`: several targets, each written the whole copy while the sources
   * are read once (see fanout.ts). A target that fails is dropped and the others go on;
   * ConvertResult.targets says which completed. The convert fails only when all fail.
   */
  readonly targets?: readonly BlockBackend[];
  /**
   * Parallel workers (-m), each with one buffer. Default 8. 'auto': adapted during the
   * copy (see autotune.ts), up to AUTO_MAX_WORKERS.
   */
  readonly workers?: number | 'auto';
  /** Bytes per worker buffer, the largest chunk; capped by both sides' max transfer. Default 2 MiB. */
  readonly bufferSize?: number;
  /** Allow writes to complete out of order (-W). Ignored if the target cannot. */
  readonly outOfOrder?: boolean;
  /**
   * Zero runs of at least this many bytes in data are not written as data (-S).
   * 0: no scanning and no skipping: every byte is written, the target fully allocated.
   * Default 4096. A multiple of 512.
   */
  readonly minSparse?: number;
  /** The target is known to read back zeroes (--target-is-zero); otherwise its capability decides. */
  readonly targetIsZero?: boolean;
  /** Bytes per second (-r); unlimited when absent or 0. */
  readonly rateLimit?: number;
  /**
   * Write only what differs from the target's backing image (qemu-img convert -B): the
   * target reads through to it, so equal clusters are left unallocated.
   */
  readonly diffAgainstBacking?: boolean;
  /** Store data compressed (-c): the target must be able to (canCompress). */
  readonly compress?: boolean;
  /**
   * Copy offload (-C, qemu-img's): data is copied by the storage itself (copy_file_range
   * between local files) where source and target allow, else read and written. Zero
   * extents are still found by block status; zero runs inside data are not looked for,
   * so it cannot be combined with minSparse, compress, diffAgainstBacking, checksum or
   * verify (all need the bytes to pass through the copy).
   */
  readonly copyOffload?: boolean;
  /** Flush the target at the end (default true). The job does not resolve until it succeeds. */
  readonly flush?: boolean;
  readonly signal?: AbortSignal;
  /** Minimum milliseconds between progress events. Default 100. */
  readonly progressInterval?: number;
  /**
   * Compute the blkhash digest (checksumImage's) of what is copied, from the data as it
   * passes: ConvertResult.checksum. Chunks then start on 64 KiB blocks; concatenated
   * sources must each be a multiple of 64 KiB long, the last aside.
   */
  readonly checksum?: boolean;
  /** After the copy (and flush), read the target back and check it against the digest (implies checksum). */
  readonly verify?: boolean;
  /**
   * Checkpoint the copy, so that an interrupted run can be resumed: on this schedule
   * the target is flushed and the durable progress handed to `save` (and emitted as the
   * job's 'checkpoint' event). See checkpoints.ts.
   */
  readonly checkpoint?: CheckpointSchedule;
  /**
   * Go on from the last checkpoint of an interrupted run of the same convert. Refused
   * (EINVAL, naming what differs) when a source, the target or an option that changes
   * the output is not what it was.
   */
  readonly resume?: ResumeState;
  /**
   * The caller's options that change the output but that the scheduler does not see
   * (the CLI's target format and create options): recorded in checkpoints, and a
   * resume with different ones is refused.
   */
  readonly resumeTag?: Readonly<Record<string, string>>;
}

export interface CheckpointSchedule {
  /**
   * At most this many bytes (plus workers x buffer) are copied again after an
   * interruption; checkpoints come every three quarters of it. Default 1 GiB.
   */
  readonly everyBytes?: number;
  /** Also checkpoint after this many seconds without one; 0: by bytes only. Default 30. */
  readonly everySeconds?: number;
  /**
   * Keeps the state where a later run can find it (a file, a job's data). Awaited: the
   * copy writes no further than the previous state allows until it resolves.
   */
  readonly save?: (state: ResumeState) => Promise<void> | void;
}

/** The progress part of a checkpoint: what the target durably holds. */
export interface CheckpointProgress {
  /** Target bytes [0, done) were written and then flushed. */
  readonly done: number;
  /**
   * This run writes nothing at or past dirtyEnd before its next checkpoint, so a resumed
   * run must write [done, dirtyEnd) in full, zeroes included; beyond it the target is
   * still as it was at the start.
   */
  readonly dirtyEnd: number;
  readonly total: number;
  /** The first run's target read back as zeroes: zeroes past dirtyEnd need no writing. */
  readonly targetZero: boolean;
  /** With a checksum: the hash at `done`. */
  readonly checksum?: BlockHashState;
}

export interface ConvertProgress {
  /** Bytes of the target image covered so far (read, written, zeroed or skipped). */
  readonly done: number;
  readonly total: number;
  readonly bytesRead: number;
  readonly bytesWritten: number;
  /** Bytes handed to writeZeroes. */
  readonly bytesZeroed: number;
  /** Zero bytes left alone because the target reads them back as zeroes. */
  readonly bytesSkipped: number;
  readonly elapsedMs: number;
  /** Bytes per second over the job so far. */
  readonly rate: number;
}

export interface ConvertResult extends ConvertProgress {
  /** Workers used (with 'auto': the count it settled on). */
  readonly workers: number;
  /** With 'auto': the worker counts tried, in order. */
  readonly workersTried?: readonly number[];
  readonly bufferSize: number;
  readonly outOfOrder: boolean;
  /** The target was zeroed whole first (fast zero, as qemu-img does), so its zero extents were skipped. */
  readonly preZeroed?: boolean;
  /** With copyOffload: bytes the storage copied itself (part of bytesWritten and bytesRead). */
  readonly bytesOffloaded?: number;
  /** With checksum or verify: the blkhash digest of the sources' content, hex. */
  readonly checksum?: string;
  /** With verify: the target read back to the same digest (else the job fails). */
  readonly verified?: boolean;
  /** With resume: the target offset this run started from. */
  readonly resumedFrom?: number;
  /** Checkpoints taken by this run. */
  readonly checkpoints?: number;
  /** With `targets`: each one's outcome, in order; only those `ok` hold the copy. */
  readonly targets?: readonly TargetOutcome[];
}
