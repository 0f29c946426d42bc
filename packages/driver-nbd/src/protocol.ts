/**
 * The NBD protocol's numbers, as NetworkBlockDevice/nbd doc/proto.md names them: the
 * fixed newstyle handshake, options and their replies, requests, simple and structured
 * replies. Shared by the client here and by any server built on this package.
 */

/** "NBDMAGIC": the first 8 bytes a newstyle server sends. */
export const NBDMAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle negotiation, and the magic of every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Old-style negotiation's second magic: a server this client does not speak to. */
export const CLISERV_MAGIC = 0x00420281861253n;
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;

export const Option = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
} as const;

export const OptionReply = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
} as const;

/** Option reply types with bit 31 set are errors. */
export const OPTION_REPLY_ERROR = 0x80000000;
const OPTION_ERRORS: Readonly<Record<number, string>> = {
  1: 'not supported by the server',
  2: "refused by the server's policy",
  3: 'invalid',
  4: "not available on the server's platform",
  5: 'the server requires TLS',
  6: 'no such export',
  7: 'the server is shutting down',
  8: 'the server requires block size negotiation',
  9: 'too big for the server',
};
export const OptionError = {
  UNSUP: OPTION_REPLY_ERROR + 1,
  POLICY: OPTION_REPLY_ERROR + 2,
  INVALID: OPTION_REPLY_ERROR + 3,
  TLS_REQD: OPTION_REPLY_ERROR + 5,
  UNKNOWN: OPTION_REPLY_ERROR + 6,
} as const;

export function optionErrorText(type: number): string {
  return OPTION_ERRORS[type - OPTION_REPLY_ERROR] ?? `error ${type - OPTION_REPLY_ERROR}`;
}

export const Info = {
  EXPORT: 0,
  NAME: 1,
  DESCRIPTION: 2,
  BLOCK_SIZE: 3,
} as const;

/** Transmission flags: what the export supports. */
export const Flag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Command = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CommandFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const REPLY_FLAG_DONE = 1 << 0;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;
/** Structured reply types with bit 15 set are errors. */
export const REPLY_TYPE_ERROR_BIT = 1 << 15;

/** base:allocation's status flags. */
export const State = {
  HOLE: 1 << 0,
  ZERO: 1 << 1,
} as const;

export const BASE_ALLOCATION = 'base:allocation';

/** Sizes of the fixed parts of messages. */
export const REQUEST_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_REPLY_SIZE = 20;

/** The size constraints a server assumes when it advertises none (proto.md, "Size constraints"). */
export const DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024;
/** Longest string the protocol allows (export names, error messages). */
export const MAX_STRING = 4096;

/** NBD error values and the errno names the core uses for them. */
const ERRNO: Readonly<Record<number, string>> = {
  1: 'EACCES', // NBD_EPERM
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EINVAL', // NBD_EOVERFLOW: a request too large for the server
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};
const ERRNO_TEXT: Readonly<Record<number, string>> = {
  1: 'operation not permitted',
  5: 'input/output error',
  12: 'out of memory',
  22: 'invalid argument',
  28: 'no space left on device',
  75: 'value too large',
  95: 'operation not supported',
  108: 'server is shutting down',
};

export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** The core's error code for an NBD error value (unknown values are EIO, as the spec says). */
export function errnoCode(value: number): string {
  return ERRNO[value] ?? 'EIO';
}

export function errnoText(value: number): string {
  return ERRNO_TEXT[value] ?? `error ${value}`;
}
