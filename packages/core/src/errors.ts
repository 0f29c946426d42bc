/**
 * One error type for everything that goes wrong with an image, so that callers can
 * branch on `code` and users get one line naming the cause, the operation and offset.
 */
import { redactCredentials, redactLocation } from './redact.js';

export type BlockErrorCode =
  /** Input that cannot be right: a malformed URL or option, an unaligned request. */
  | 'EINVAL'
  | 'ENOENT'
  | 'EACCES'
  | 'EIO'
  | 'ENOSPC'
  | 'EROFS'
  /** The operation is not supported by this driver or image. */
  | 'ENOTSUP'
  /** The image is damaged: a field or table entry that cannot be valid. */
  | 'ECORRUPT'
  /** No installed driver serves a scheme or format. */
  | 'ENODRIVER'
  /** Cancelled through an AbortSignal. */
  | 'ECANCELED'
  | 'ETIMEDOUT'
  | 'ECONNREFUSED'
  | 'ECONNRESET'
  /** A host name that does not resolve. */
  | 'ENOTFOUND'
  | 'ERANGE'
  | (string & {});

export interface BlockErrorDetails {
  /** The operation, e.g. "read", "write", "open". */
  readonly op?: string;
  /** Image location the error concerns (the error keeps it redacted). */
  readonly location?: string;
  readonly offset?: number;
  readonly length?: number;
  /** The header field or table the error is about (corrupt images). */
  readonly field?: string;
  /** The error wrapped; its message and stack (and its causes') are redacted in place. */
  readonly cause?: unknown;
}

/** Marks BlockErrors whatever copy of this module made them (see Symbol.hasInstance). */
const BRAND = Symbol.for('@blockconv/core.BlockError');

export class BlockError extends Error {
  /**
   * `instanceof BlockError` holds for errors from any copy of @blockconv/core in the
   * process (a bundled CLI, an embedder's own copy, the testkit beside the bundle).
   */
  static override [Symbol.hasInstance](value: unknown): boolean {
    return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[BRAND] === true;
  }

  override readonly name = 'BlockError';
  readonly [BRAND] = true;
  readonly code: BlockErrorCode;
  readonly op?: string;
  readonly location?: string;
  readonly offset?: number;
  readonly length?: number;
  readonly field?: string;

  /**
   * Message, location and causes come out redacted (redact.ts): the location first, so
   * that its secrets are known when the message and causes are scanned.
   */
  constructor(code: BlockErrorCode, message: string, details: BlockErrorDetails = {}) {
    const location = details.location === undefined ? undefined : redactLocation(details.location);
    redactCauses(details.cause);
    super(
      redactCredentials(formatMessage(message, { ...details, location })),
      details.cause === undefined ? undefined : { cause: details.cause },
    );
    this.code = code;
    this.op = details.op;
    this.location = location;
    this.offset = details.offset;
    this.length = details.length;
    this.field = details.field;
  }
}

function formatMessage(message: string, d: BlockErrorDetails): string {
  const where: string[] = [];
  if (d.location !== undefined) where.push(d.location);
  if (d.op !== undefined) where.push(d.op);
  if (d.offset !== undefined) where.push(`at offset ${d.offset}${d.length !== undefined ? ` (+${d.length})` : ''}`);
  if (d.field !== undefined) where.push(`field ${d.field}`);
  return oneLine(where.length ? `${where.join(' ')}: ${message}` : message);
}

/**
 * Control characters written as escapes: an error is one line, whatever the names in
 * it hold (found by the fuzz campaign: a backing file name with a newline in it).
 */
function oneLine(s: string): string {
  // eslint-disable-next-line no-control-regex
  return /[\x00-\x1f\x7f]/.test(s)
    ? s.replace(/[\x00-\x1f\x7f]/g, (c) =>
        c === '\n' ? '\\n' : c === '\t' ? '\\t' : `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`,
      )
    : s;
}

/** Node system error codes that map onto ours one to one. */
const SYSTEM_CODES = new Set([
  'EINVAL',
  'ENOENT',
  'EACCES',
  'EPERM',
  'EIO',
  'ENOSPC',
  'EROFS',
  'EISDIR',
  'ENOTDIR',
  'EBADF',
  'EEXIST',
  'ETIMEDOUT',
  'ECONNREFUSED',
  'ECONNRESET',
  'EHOSTUNREACH',
  'EFBIG',
  'EDQUOT',
  'ENXIO',
  'ENOTSUP',
  'EOPNOTSUPP',
  'ENOTTY',
  'ENOTFOUND',
  'ECANCELED',
  'EPIPE',
]);

/** System codes folded into one of ours. */
const ALIASES: Readonly<Record<string, BlockErrorCode>> = {
  EPERM: 'EACCES',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  EOPNOTSUPP: 'ENOTSUP',
  ENOTTY: 'ENOTSUP',
  EPIPE: 'ECONNRESET',
};

/** Turns any thrown value into a BlockError with context; BlockErrors pass through. */
export function toBlockError(err: unknown, details: BlockErrorDetails = {}): BlockError {
  if (err instanceof BlockError) return err;
  const e = err as NodeJS.ErrnoException | undefined;
  if (e && typeof e === 'object' && e.name === 'AbortError') {
    return new BlockError('ECANCELED', 'cancelled', { ...details, cause: err });
  }
  const sys = typeof e?.code === 'string' && SYSTEM_CODES.has(e.code) ? e.code : 'EIO';
  const code = ALIASES[sys] ?? sys;
  const raw = e instanceof Error ? e.message : String(err);
  return new BlockError(code, describeSystemError(code, raw), { ...details, cause: err });
}

/** Short human text for common system errors, keeping the original when it says more. */
function describeSystemError(code: string, raw: string): string {
  switch (code) {
    case 'ENOSPC':
      return 'no space left on device';
    case 'ENOENT':
      return 'no such file or directory';
    case 'EACCES':
      return 'permission denied';
    case 'EROFS':
      return 'read-only file system';
    case 'EISDIR':
      return 'is a directory';
    default:
      return raw.replace(/^[A-Z]+: /, '').replace(/, \w+ '.*'$/, '');
  }
}

export function cancelled(reason?: unknown): BlockError {
  const why = reason instanceof Error ? reason.message : reason === undefined ? '' : String(reason);
  return new BlockError('ECANCELED', why && why !== 'This operation was aborted' ? `cancelled: ${why}` : 'cancelled');
}

/**
 * Redacts the messages and stacks of a chain of wrapped errors in place: a native
 * library's text may quote the URL (libnfs: "Invalid address:user:pw@host"), and
 * --debug prints causes. An error handed over as a cause is the wrapper's to change.
 */
function redactCauses(cause: unknown): void {
  const seen = new Set<unknown>();
  for (
    let c = cause;
    c instanceof Error && !(c instanceof BlockError) && !seen.has(c);
    c = (c as { cause?: unknown }).cause
  ) {
    seen.add(c);
    try {
      const message = redactCredentials(c.message);
      if (message !== c.message) c.message = message;
      if (c.stack !== undefined) c.stack = redactCredentials(c.stack);
    } catch {
      // A frozen error keeps its text; the CLI still redacts what it prints.
    }
  }
}
