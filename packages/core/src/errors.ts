/**
 * One error type for everything that goes wrong with an image, so that callers can
 * branch on `code` and users get one line naming the cause, the operation and offset.
 */

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
  /** Image location the error concerns. */
  readonly location?: string;
  readonly offset?: number;
  readonly length?: number;
  /** The header field or table the error is about (corrupt images). */
  readonly field?: string;
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

  constructor(code: BlockErrorCode, message: string, details: BlockErrorDetails = {}) {
    super(formatMessage(message, details), details.cause === undefined ? undefined : { cause: details.cause });
    this.code = code;
    this.op = details.op;
    this.location = details.location === undefined ? undefined : redactLocation(details.location);
    this.offset = details.offset;
    this.length = details.length;
    this.field = details.field;
  }
}

function formatMessage(message: string, d: BlockErrorDetails): string {
  const where: string[] = [];
  if (d.location !== undefined) where.push(redactLocation(d.location));
  if (d.op !== undefined) where.push(d.op);
  if (d.offset !== undefined) where.push(`at offset ${d.offset}` + (d.length !== undefined ? ` (+${d.length})` : ''));
  if (d.field !== undefined) where.push(`field ${d.field}`);
  return where.length ? `${where.join(' ')}: ${message}` : message;
}

/** Node system error codes that map onto ours one to one. */
const SYSTEM_CODES = new Set([
  'EINVAL', 'ENOENT', 'EACCES', 'EPERM', 'EIO', 'ENOSPC', 'EROFS', 'EISDIR', 'ENOTDIR', 'EBADF',
  'EEXIST', 'ETIMEDOUT', 'ECONNREFUSED', 'ECONNRESET', 'EHOSTUNREACH', 'EFBIG', 'EDQUOT', 'ENXIO',
  'ENOTSUP', 'EOPNOTSUPP', 'ENOTTY', 'ENOTFOUND', 'ECANCELED', 'EPIPE',
]);

/** System codes folded into one of ours. */
const ALIASES: Readonly<Record<string, BlockErrorCode>> = {
  EPERM: 'EACCES', EDQUOT: 'ENOSPC', EFBIG: 'ENOSPC', EOPNOTSUPP: 'ENOTSUP', ENOTTY: 'ENOTSUP', EPIPE: 'ECONNRESET',
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
    case 'ENOSPC': return 'no space left on device';
    case 'ENOENT': return 'no such file or directory';
    case 'EACCES': return 'permission denied';
    case 'EROFS': return 'read-only file system';
    case 'EISDIR': return 'is a directory';
    default: return raw.replace(/^[A-Z]+: /, '').replace(/, \w+ '.*'$/, '');
  }
}

export function cancelled(reason?: unknown): BlockError {
  const why = reason instanceof Error ? reason.message : reason === undefined ? '' : String(reason);
  return new BlockError('ECANCELED', why && why !== 'This operation was aborted' ? `cancelled: ${why}` : 'cancelled');
}

/**
 * A location fit to print: the password of a URL's user part (`user%password@` as
 * libiscsi and qemu write it, or `user:password@`) is dropped. Messages and error
 * details pass every location through this, so that no credential reaches a log.
 */
export function redactLocation(location: string): string {
  return redactCredentials(location);
}

/** Text with the password of every URL in it dropped (see redactLocation). */
export function redactCredentials(text: string): string {
  return text.replace(/([a-z][a-z0-9+.-]*:\/\/)([^@\s/?#]*)@/gi, (_m, scheme: string, user: string) => `${scheme}${user.split(/[%:]/)[0]}@`);
}
