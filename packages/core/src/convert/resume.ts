/**
 * What a checkpoint records beside the progress, so that a resume that would give a
 * wrong image is refused instead of producing a silent mix of two copies: each
 * source's identity (size, the storage's id and version, a digest of the first MiB),
 * the target's identity, and the options that change the output. JSON-safe: the CLI
 * keeps it in a file, fleet workers in a job; locations are redacted, no secret is kept.
 */
import { createHash } from 'node:crypto';
import { BlockError, toBlockError } from '../errors.js';
import { redactLocation } from '../redact.js';
import type { BackendIdentity, BlockBackend } from '../types.js';
import type { CheckpointProgress } from './options.js';
import type { FailedTarget } from './fanout.js';

export const RESUME_STATE_KIND = 'blockconv-convert-state';
export const RESUME_STATE_VERSION = 1;
/** Bytes at the start of the sources whose digest is recorded (and found again in the target). */
export const HEAD_BYTES = 1024 * 1024;

export interface ImageIdentity {
  /** Redacted location. */
  readonly location: string;
  readonly driver: string;
  readonly size: number;
  /** BlockBackend.identity(), when the storage tells. */
  readonly id?: string;
  readonly version?: string;
}

export interface ConvertIdentity {
  readonly sources: readonly ImageIdentity[];
  /** The target's version is left out: the copy itself changes it. */
  readonly target: ImageIdentity;
  /** SHA-256 of the first headLength bytes of the sources, in order: the target holds them once done passes headLength. */
  readonly head: string;
  readonly headLength: number;
  /** Options that change the output, as strings. */
  readonly options: Readonly<Record<string, string>>;
}

/** A checkpoint: where an interrupted convert can go on from, and what it was copying. */
export interface ResumeState extends ConvertIdentity {
  readonly kind: typeof RESUME_STATE_KIND;
  readonly version: typeof RESUME_STATE_VERSION;
  readonly progress: CheckpointProgress;
  /** When it was taken (ISO 8601). */
  readonly savedAt: string;
  /** A convert to several targets: those dropped from the copy, which a resume leaves out. */
  readonly failedTargets?: readonly FailedTarget[];
}

async function identify(b: BlockBackend, withVersion: boolean): Promise<ImageIdentity> {
  let id: BackendIdentity | undefined;
  try {
    id = await b.identity?.();
  } catch (err) {
    throw toBlockError(err, { op: 'identity', location: b.location });
  }
  return {
    location: redactLocation(b.location),
    driver: b.driverName,
    size: b.size,
    ...(id ? { id: id.id, ...(withVersion && id.version !== undefined ? { version: id.version } : {}) } : {}),
  };
}

/** SHA-256 of the first `length` bytes of the backends' concatenated content. */
async function headDigest(parts: readonly BlockBackend[], length: number): Promise<string> {
  const hash = createHash('sha256');
  let left = length;
  for (const b of parts) {
    if (left <= 0) break;
    const n = Math.min(left, b.size);
    try {
      hash.update(await b.read(0, n));
    } catch (err) {
      throw toBlockError(err, { op: 'read', location: b.location, offset: 0, length: n });
    }
    left -= n;
  }
  return hash.digest('hex');
}

/** The identity of a convert, taken at its start. */
export async function identifyConvert(
  sources: readonly BlockBackend[],
  target: BlockBackend,
  options: Readonly<Record<string, string>>,
): Promise<ConvertIdentity> {
  const total = sources.reduce((n, s) => n + s.size, 0);
  const headLength = Math.min(total, HEAD_BYTES);
  const [ids, targetId, head] = await Promise.all([
    Promise.all(sources.map((s) => identify(s, true))),
    identify(target, false),
    headDigest(sources, headLength),
  ]);
  return { sources: ids, target: targetId, head, headLength, options };
}

function describe(i: ImageIdentity): string {
  return `${i.location} (${i.driver}, ${i.size} bytes${i.id ? `, id ${i.id}` : ''}${i.version ? `, version ${i.version}` : ''})`;
}

function mismatch(what: string, was: string, now: string): BlockError {
  return new BlockError('EINVAL', `cannot resume: ${what} was ${was}, is now ${now}; start again without resuming`, {
    op: 'resume',
    field: 'resume',
  });
}

/** Checks that a state is one this code can resume, and its progress sane. */
export function checkStateShape(state: unknown): asserts state is ResumeState {
  const s = state as Partial<ResumeState> | null;
  const bad = (why: string): never => {
    throw new BlockError('EINVAL', `not a resume state of this version: ${why}`, { op: 'resume', field: 'resume' });
  };
  if (!s || typeof s !== 'object') bad('not an object');
  if (s!.kind !== RESUME_STATE_KIND) bad(`kind is ${JSON.stringify(s!.kind)}`);
  if (s!.version !== RESUME_STATE_VERSION)
    bad(`version is ${JSON.stringify(s!.version)}, this blockconv reads ${RESUME_STATE_VERSION}`);
  const p = s!.progress;
  const int = (v: unknown): boolean => Number.isSafeInteger(v) && (v as number) >= 0;
  if (
    !p ||
    !int(p.done) ||
    !int(p.dirtyEnd) ||
    !int(p.total) ||
    p.done > p.total ||
    p.dirtyEnd < p.done ||
    typeof p.targetZero !== 'boolean'
  )
    bad('progress is malformed');
  if (
    !Array.isArray(s!.sources) ||
    !s!.target ||
    typeof s!.head !== 'string' ||
    !int(s!.headLength) ||
    typeof s!.options !== 'object'
  )
    bad('identity is malformed');
}

/**
 * Refuses a resume whose sources, target or output options are not those of the state
 * (EINVAL naming the first difference); then, once the target holds the head of the
 * sources, checks that it does.
 */
export async function checkResume(state: ResumeState, now: ConvertIdentity, target: BlockBackend): Promise<void> {
  checkStateShape(state);
  if (state.sources.length !== now.sources.length)
    throw mismatch('the number of sources', `${state.sources.length}`, `${now.sources.length}`);
  state.sources.forEach((was, i) => {
    const is = now.sources[i]!;
    if (
      was.location !== is.location ||
      was.size !== is.size ||
      was.driver !== is.driver ||
      was.id !== is.id ||
      was.version !== is.version
    ) {
      throw mismatch(`source ${i + 1}`, describe(was), describe(is));
    }
  });
  if (state.head !== now.head || state.headLength !== now.headLength)
    throw mismatch(`the first ${now.headLength} bytes of the sources`, `SHA-256 ${state.head}`, `SHA-256 ${now.head}`);
  const t = state.target;
  if (
    t.location !== now.target.location ||
    t.size !== now.target.size ||
    t.driver !== now.target.driver ||
    t.id !== now.target.id
  ) {
    throw mismatch('the target', describe(t), describe(now.target));
  }
  const keys = new Set([...Object.keys(state.options), ...Object.keys(now.options)]);
  for (const k of keys) {
    if (state.options[k] !== now.options[k])
      throw mismatch(`option ${k}`, state.options[k] ?? '(unset)', now.options[k] ?? '(unset)');
  }
  if (state.progress.done >= state.headLength && state.headLength > 0) {
    const there = await headDigest([target], state.headLength);
    if (there !== state.head) {
      throw new BlockError(
        'EINVAL',
        `cannot resume: the target's first ${state.headLength} bytes are not the sources' (SHA-256 ${there}, expected ${state.head}): it was changed or replaced since the checkpoint`,
        { op: 'resume', field: 'resume', location: target.location },
      );
    }
  }
}
