/**
 * Read once, write many: several targets presented to the scheduler as one. Every
 * write, zero, flush and discard goes to each target still in the copy, in parallel; a
 * target whose request fails is dropped from the copy (its error kept for the result)
 * and the others go on. Only when every target has failed does a request fail, and
 * with it the convert. The source is read once whatever the number of targets; the
 * slowest target sets the pace (a chunk's buffer is reused only when every target has
 * its write).
 *
 * Limits and capabilities are those every target accepts: the largest alignment, the
 * smallest transfer, zeroes skipped only when every target reads back zeroes. The
 * request gate in front of this enforces them, so each target receives requests within
 * its own limits.
 */
import { BlockError, toBlockError } from '../errors.js';
import { redactLocation } from '../redact.js';
import { gateBackend } from '../gate.js';
import type { SegmentList } from '../segments.js';
import type {
  BackendIdentity,
  BlockBackend,
  BlockLimits,
  Extent,
  GatedBackend,
  WriteFlags,
  WriteZeroesFlags,
} from '../types.js';

/** What became of one target of a convert to several. */
export interface TargetOutcome {
  /** Redacted location. */
  readonly location: string;
  /** Every byte was written and flushed. */
  readonly ok: boolean;
  /** Why it was dropped from the copy (a one-line message, with its operation and offset). */
  readonly error?: string;
  readonly code?: string;
}

/** A target dropped from the copy, as a checkpoint records it (a resume leaves it out again). */
export interface FailedTarget {
  readonly index: number;
  readonly reason: string;
}

/**
 * Stands for a target that could not be opened or created, so that a convert to several
 * keeps every target in its place (checkpoints name them by index) and reports this one
 * as failed from the start. Every request fails with the error.
 */
export class UnopenedTarget implements BlockBackend {
  readonly driverName = 'unopened';
  readonly size = 0;
  readonly readOnly = true;
  readonly limits: BlockLimits = { requestAlignment: 1, maxTransfer: 1 };

  constructor(
    readonly location: string,
    readonly error: BlockError,
  ) {}

  read(): Promise<Uint8Array> {
    return Promise.reject(this.error);
  }
  write(): Promise<void> {
    return Promise.reject(this.error);
  }
  writeZeroes(): Promise<void> {
    return Promise.reject(this.error);
  }
  discard(): Promise<void> {
    return Promise.reject(this.error);
  }
  blockStatus(): Promise<Extent> {
    return Promise.reject(this.error);
  }
  flush(): Promise<void> {
    return Promise.reject(this.error);
  }
  async close(): Promise<void> {}
  async identity(): Promise<BackendIdentity> {
    return { id: `unopened ${redactLocation(this.location)}` };
  }
}

interface Member {
  readonly backend: GatedBackend;
  failure?: BlockError;
}

export interface FanoutChecks {
  /** Bytes every target must hold. */
  readonly total: number;
  readonly compress?: boolean;
  /** Targets already dropped (a resumed copy's). */
  readonly failed?: readonly FailedTarget[];
}

export class FanoutTarget implements BlockBackend {
  readonly driverName = 'fanout';
  readonly location: string;
  readonly size: number;
  readonly readOnly = false;
  readonly limits: BlockLimits;
  readonly canZero: boolean;
  readonly canDiscard: boolean;
  readonly zeroInitialized: boolean;
  readonly canCompress: boolean;
  readonly canBlockStatus = false;
  readonly canWriteOutOfOrder: boolean;
  readonly #members: Member[];
  /** Members still in the copy; rebuilt when one fails (rare), not per request. */
  #live: Member[];

  /**
   * Targets that cannot take the copy at all (too small, read-only, no compression
   * when asked) are dropped at once; if none is left, the first one's reason is thrown.
   */
  constructor(targets: readonly BlockBackend[], checks: FanoutChecks) {
    if (targets.length === 0) throw new BlockError('EINVAL', 'no target image');
    // An unopened target fails as it is; the others behind their gates (registry ones are already).
    this.#members = targets.map((t) => ({
      backend: gateBackend(t),
      ...(t instanceof UnopenedTarget ? { failure: t.error } : {}),
    }));
    for (const f of checks.failed ?? []) {
      const m = this.#members[f.index];
      if (m)
        m.failure = new BlockError('EIO', `left out: it failed in the interrupted run (${f.reason})`, {
          location: m.backend.location,
        });
    }
    for (const m of this.#members) {
      if (m.failure) continue;
      const t = m.backend;
      if (t.readOnly)
        m.failure = new BlockError(
          'EROFS',
          `the target is read-only${t.readOnlyReason ? `: ${t.readOnlyReason}` : ''}`,
          { location: t.location },
        );
      else if (t.size < checks.total)
        m.failure = new BlockError('ERANGE', `target is smaller than the source (${t.size} < ${checks.total} bytes)`, {
          location: t.location,
        });
      else if (checks.compress && !t.canCompress)
        m.failure = new BlockError('EINVAL', `the target (${t.driverName}) cannot store compressed data`, {
          location: t.location,
        });
    }
    this.#live = this.#members.filter((m) => !m.failure);
    if (this.#live.length === 0)
      throw (
        this.#members.find((m) => !m.failure?.message.startsWith('left out'))?.failure ?? this.#members[0]!.failure!
      );
    const live = this.#live.map((m) => m.backend);
    this.location = targets.map((t) => redactLocation(t.location)).join(', ');
    this.size = Math.min(...live.map((t) => t.size));
    const l = live.map((t) => t.limits);
    const maxTransfer = Math.min(...l.map((x) => x.maxTransfer));
    const alignments = l.map((x) => x.preferredAlignment ?? x.requestAlignment);
    const preferred = Math.max(...alignments);
    const units = l.map((x) => x.compressionUnit).filter((u): u is number => u !== undefined);
    this.limits = {
      requestAlignment: Math.max(...l.map((x) => x.requestAlignment)),
      maxTransfer,
      maxWriteZeroes: Math.min(...l.map((x) => x.maxWriteZeroes ?? x.maxTransfer)),
      minMemAlignment: Math.max(...l.map((x) => x.minMemAlignment ?? 1)),
      // Alignments are powers of two: the largest is a multiple of the others.
      ...(alignments.every((a) => preferred % a === 0) && preferred > 1 ? { preferredAlignment: preferred } : {}),
      ...(units.length ? { compressionUnit: Math.max(...units) } : {}),
    };
    this.canZero = live.every((t) => t.canZero);
    this.canDiscard = live.every((t) => t.canDiscard);
    this.zeroInitialized = live.every((t) => t.zeroInitialized);
    this.canCompress = live.every((t) => t.canCompress);
    this.canWriteOutOfOrder = live.every((t) => t.canWriteOutOfOrder);
  }

  /** Each target's outcome so far: `ok` means no request to it has failed. */
  outcomes(): TargetOutcome[] {
    return this.#members.map((m) => ({
      location: redactLocation(m.backend.location),
      ok: !m.failure,
      ...(m.failure ? { error: m.failure.message, code: m.failure.code } : {}),
    }));
  }

  /** The targets dropped so far, for checkpoints. */
  failed(): FailedTarget[] {
    const out: FailedTarget[] = [];
    this.#members.forEach((m, index) => {
      if (m.failure) out.push({ index, reason: m.failure.message });
    });
    return out;
  }

  /** The targets still in the copy. */
  live(): GatedBackend[] {
    return this.#live.map((m) => m.backend);
  }

  /** Drops a target from the copy with this error (e.g. its verify failed). */
  drop(target: GatedBackend, err: unknown): void {
    const m = this.#members.find((x) => x.backend === target);
    if (m && !m.failure) this.#fail(m, toBlockError(err, { location: target.location }));
  }

  #fail(m: Member, err: BlockError): void {
    m.failure = err;
    this.#live = this.#live.filter((x) => x !== m);
  }

  /**
   * Runs a request on every live target; a target whose request fails is dropped. Throws
   * only when none is left, with the first failure.
   */
  async #each(
    op: string,
    offset: number | undefined,
    length: number | undefined,
    run: (t: GatedBackend) => Promise<unknown>,
  ): Promise<void> {
    const live = this.#live;
    if (live.length === 0) throw this.#firstFailure();
    const settle = (m: Member) =>
      run(m.backend).then(undefined, (err: unknown) => {
        if (!m.failure) this.#fail(m, toBlockError(err, { op, location: m.backend.location, offset, length }));
      });
    if (live.length === 1) await settle(live[0]!);
    else await Promise.all(live.map(settle));
    if (this.#live.length === 0) throw this.#firstFailure();
  }

  #firstFailure(): BlockError {
    const failures = this.#members.map((m) => m.failure!).filter(Boolean);
    const first = failures[0]!;
    if (failures.length === 1) return first;
    return new BlockError(first.code, `every target failed; the first: ${first.message}`, { cause: first });
  }

  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    if (this.#live.length === 0) return Promise.reject(this.#firstFailure());
    return this.#live[0]!.backend.read(offset, length, into);
  }

  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    return this.#each('write', offset, data.length, (t) => t.write(offset, data, flags));
  }

  writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    return this.#each('write', segments.count ? segments.offsetAt(0) : undefined, undefined, async (t) => {
      if (t.writeSegments) return t.writeSegments(from, segments);
      for (let i = 0; i < segments.count; i++) {
        const pos = segments.positionAt(i);
        await t.write(segments.offsetAt(i), from.subarray(pos, pos + segments.lengthAt(i)));
      }
    });
  }

  writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    return this.#each('zero', offset, length, (t) => t.writeZeroes(offset, length, flags));
  }

  discard(offset: number, length: number): Promise<void> {
    return this.#each('discard', offset, length, (t) => t.discard(offset, length));
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    return { kind: 'data', length: Math.min(length, this.size - offset) };
  }

  flush(): Promise<void> {
    return this.#each('flush', undefined, undefined, (t) => t.flush());
  }

  /** The targets stay open: whoever opened them closes them. */
  async close(): Promise<void> {}

  allocBuffer(size: number): Uint8Array {
    const align = this.limits.minMemAlignment ?? 1;
    const owner = this.#live
      .map((m) => m.backend)
      .find((t) => t.allocBuffer && (t.limits.minMemAlignment ?? 1) >= align);
    return owner ? owner.allocBuffer!(size) : Buffer.allocUnsafeSlow(size);
  }

  /** Every target's id, in order: a resume must name the same targets. */
  async identity(): Promise<BackendIdentity> {
    const ids = await Promise.all(
      this.#members.map(async (m) => (await m.backend.identity?.())?.id ?? redactLocation(m.backend.location)),
    );
    return { id: ids.join(' | ') };
  }
}
