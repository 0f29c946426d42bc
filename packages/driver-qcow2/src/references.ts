/**
 * What a qcow2 image refers to: its external data file and its backing file, opened
 * through the resolver relative to the image's own location, as QEMU does. Backing
 * loops are caught by comparing the canonical locations of the images being opened
 * along the chain (carried through nested opens in an AsyncLocalStorage).
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { realpath } from 'node:fs/promises';
import { resolve as resolvePath } from 'node:path';
import { BlockError, gateBackend, parseLocation, resolveRelative, type BlockBackend, type ImageResolver, type OpenOptions } from '@blockconv/core';
import { corrupt } from './errors.js';
import { INCOMPAT_DATA_FILE, type Qcow2Header } from './header.js';

/** Canonical locations of the images whose opening is in progress, outermost first. */
export const chain = new AsyncLocalStorage<readonly string[]>();

export async function canonical(location: string): Promise<string> {
  const parsed = parseLocation(location);
  if (parsed.scheme !== 'file') return location;
  return realpath(parsed.location).catch(() => resolvePath(parsed.location));
}

/** The external data file, when the image has one (the "data-file" option names another). */
export async function openDataFile(file: BlockBackend, header: Qcow2Header, dataFileOption: string | undefined, options: OpenOptions & { readonly resolver?: ImageResolver }, where: { location: string; op: string }, writable: boolean): Promise<BlockBackend | undefined> {
  if ((header.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0n) {
    if (dataFileOption !== undefined) throw new BlockError('EINVAL', 'the "data-file" option is only for images with an external data file', where);
    return undefined;
  }
  const name = dataFileOption ?? header.dataFile;
  if (name === undefined || name === '') {
    throw corrupt(where, 'data file extension', 'the image uses an external data file but does not name it (give the "data-file" option)');
  }
  return openChild(options, resolveRelative(file.location, name), 'raw', 'data file', name, where, writable);
}

/** The backing file (and, through its own open, the rest of the chain); `chainSoFar` ends with this image. */
export async function openBacking(file: BlockBackend, header: Qcow2Header, options: OpenOptions & { readonly resolver?: ImageResolver }, where: { location: string; op: string }, chainSoFar: readonly string[]): Promise<BlockBackend | undefined> {
  if (header.backingFile === undefined) return undefined;
  const name = header.backingFile;
  return chain.run(chainSoFar, () => openChild(options, resolveRelative(file.location, name), header.backingFormat, 'backing file', name, where));
}

/**
 * Opens, and closes again, what the image refers to: qemu-img check opens the data
 * file and the whole backing chain before it checks anything, and fails when one of
 * them cannot be opened (missing, a loop, a damaged header).
 */
export async function openReferencesForCheck(file: BlockBackend, header: Qcow2Header, options: OpenOptions & { readonly resolver?: ImageResolver }): Promise<void> {
  const where = { location: file.location, op: 'check' };
  const opened: BlockBackend[] = [];
  try {
    const dataFile = await openDataFile(file, header, undefined, options, where, false);
    if (dataFile) opened.push(dataFile);
    const backing = await openBacking(file, header, options, where, [await canonical(file.location)]);
    if (backing) opened.push(backing);
  } finally {
    await Promise.allSettled(opened.map((b) => b.close()));
  }
}

/** Opens the backing or data file; a failure names the image that refers to it (once, not at every level of a chain). */
async function openChild(options: OpenOptions & { readonly resolver?: ImageResolver }, location: string, format: string | undefined, what: string, name: string, where: { location: string; op: string }, writable = false): Promise<BlockBackend> {
  const field = what === 'backing file' ? 'backing_file' : 'data_file';
  if (!options.resolver) {
    throw new BlockError('ENOTSUP', `the image has a ${what} ("${name}") but no resolver was given to open it`, { ...where, field });
  }
  try {
    // Gated here too: a resolver other than the registry may hand out ungated backends.
    return gateBackend(await options.resolver.open(location, { readOnly: !writable, cache: options.cache, signal: options.signal, ...(format !== undefined ? { format } : {}) }));
  } catch (err) {
    if (err instanceof BlockError && (err.field === 'backing_file' || err.field === 'data_file')) throw err;
    const e = err as BlockError;
    throw new BlockError(e?.code ?? 'EIO', `cannot open ${what} "${name}" (${location}): ${e?.message ?? String(err)}`, { ...where, field, cause: err });
  }
}
