/** Error helpers: every complaint about an image names the field or table entry and where it is. */
import { BlockError } from '@blockconv/core';

export interface Where {
  readonly location: string;
  readonly op?: string;
}

/** A field or table entry that cannot be valid: ECORRUPT naming it and its offset in the file. */
export function corrupt(where: Where, field: string, message: string, offset?: number): BlockError {
  return new BlockError('ECORRUPT', message, { location: where.location, op: where.op ?? 'open', field, offset });
}

/** A valid image using something this driver does not implement (encryption, a new feature bit). */
export function unsupported(where: Where, field: string, message: string): BlockError {
  return new BlockError('ENOTSUP', message, { location: where.location, op: where.op ?? 'open', field });
}

export function hex(n: number | bigint): string {
  return `0x${n.toString(16)}`;
}
