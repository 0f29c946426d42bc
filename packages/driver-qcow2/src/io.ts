/** Reading metadata through the protocol backend below, honouring its limits. */
import type { GatedBackend } from '@blockconv/core';
import type { Where } from './errors.js';
import { headerReadLength, parseHeader, type ParseOptions, type Qcow2Header } from './header.js';

export type ReadMeta = (offset: number, length: number) => Promise<Uint8Array>;

/** Reads [offset, offset+length) of `file` into a new buffer (aligned when the file needs it). */
export function metaReader(file: GatedBackend): ReadMeta {
  const aligned = file.allocBuffer && (file.limits.minMemAlignment ?? 1) > 1;
  return (offset, length) => file.read(offset, length, aligned ? file.allocBuffer!(length) : new Uint8Array(length));
}

/** Reads and validates the header (from the first cluster). */
export async function readHeader(
  file: GatedBackend,
  readMeta: ReadMeta,
  where: Where,
  options: ParseOptions = {},
): Promise<Qcow2Header> {
  const prefix = await readMeta(0, Math.min(file.size, 512));
  const firstLength = headerReadLength(prefix, file.size, where);
  const first = firstLength <= prefix.length ? prefix : await readMeta(0, firstLength);
  return parseHeader(first, file.size, where, options);
}
