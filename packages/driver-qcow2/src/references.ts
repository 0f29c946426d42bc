/**
 * What a qcow2 image refers to: its external data file and its backing file, opened
 * through the resolver relative to the image's own location, as QEMU does. Backing
 * loops are caught by comparing the canonical locations of the images being opened
 * along the chain (carried through nested opens in an AsyncLocalStorage, with the
 * reference policy the outermost open chose).
 *
 * The policy (open option "references") decides which names an image may make us
 * open: a hostile image naming /etc/shadow or another server as its backing file
 * would otherwise copy what it names into the output. "same-server" (the default)
 * keeps every reference on the image's own storage: a local image names local files,
 * an NFS image files of the same server. "confined" keeps them inside the image's own
 * directory (symlinks resolved): for images from untrusted sources. "none" refuses any
 * reference; "any" follows every name, as qemu-img does. A data file the user names
 * (the "data-file" option) is the user's choice, not the image's, and is not checked.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { realpath } from 'node:fs/promises';
import { dirname, posix, resolve as resolvePath } from 'node:path';
import {
  BlockError,
  gateBackend,
  parseLocation,
  resolveRelative,
  type GatedBackend,
  type ImageResolver,
  type OpenOptions,
} from '@blockconv/core';
import { corrupt } from './errors.js';
import { INCOMPAT_DATA_FILE, type Qcow2Header } from './header.js';

export const REFERENCE_POLICIES = ['same-server', 'confined', 'none', 'any'] as const;
export type ReferencePolicy = (typeof REFERENCE_POLICIES)[number];
export const DEFAULT_REFERENCE_POLICY: ReferencePolicy = 'same-server';

/** The images whose opening is in progress (canonical locations, outermost first), and the chain's policy. */
export const chain = new AsyncLocalStorage<{ readonly images: readonly string[]; readonly policy: ReferencePolicy }>();

/** The policy of an open: its own option, else that of the image whose chain this is, else the default. */
export function referencePolicy(option: string | undefined, where: { location: string; op?: string }): ReferencePolicy {
  if (option === undefined) return chain.getStore()?.policy ?? DEFAULT_REFERENCE_POLICY;
  if (!(REFERENCE_POLICIES as readonly string[]).includes(option)) {
    throw new BlockError('EINVAL', `references must be one of ${REFERENCE_POLICIES.join(', ')}, got "${option}"`, {
      ...where,
      field: 'references',
    });
  }
  return option as ReferencePolicy;
}

/** scheme://authority of a URL location; "file" for local paths. */
function serverOf(location: string): string {
  const { scheme } = parseLocation(location);
  if (scheme === 'file') return 'file';
  const m = /^([a-z][a-z0-9+.-]*:\/\/)(?:[^@/?#]*@)?([^/?#]*)/i.exec(location);
  return m ? `${m[1]!.toLowerCase()}${m[2]!.toLowerCase()}` : scheme;
}

/** The directory part of a location, with "." and ".." segments resolved (local: symlinks too). */
async function directoryOf(location: string): Promise<string> {
  const { scheme } = parseLocation(location);
  if (scheme === 'file') return `${dirname(await canonical(location))}/`;
  const path = location.replace(/[?#].*$/, '');
  return posix.dirname(posix.normalize(path.replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*/i, ''))).replace(/\/?$/, '/');
}

async function canonicalPath(location: string): Promise<string> {
  const { scheme } = parseLocation(location);
  if (scheme === 'file') return canonical(location);
  return posix.normalize(location.replace(/[?#].*$/, '').replace(/^[a-z][a-z0-9+.-]*:\/\/[^/]*/i, ''));
}

/** Refuses a reference the policy does not allow, naming the policy and how to allow it. */
async function checkReference(
  policy: ReferencePolicy,
  image: string,
  target: string,
  what: string,
  name: string,
  where: { location: string; op: string },
): Promise<void> {
  if (policy === 'any') return;
  const field = what === 'backing file' ? 'backing_file' : 'data_file';
  const refuse = (why: string): never => {
    throw new BlockError(
      'EACCES',
      `${what} "${name}" ${why}: refused by references=${policy}${policy === DEFAULT_REFERENCE_POLICY ? ' (the default)' : ''}; the open option references=any follows it`,
      { ...where, field },
    );
  };
  if (policy === 'none') refuse('is named by the image');
  const from = serverOf(image);
  const to = serverOf(target);
  if (from !== to)
    refuse(
      `is on ${to === 'file' ? 'this machine' : to}, not on the image's storage (${from === 'file' ? 'this machine' : from})`,
    );
  if (policy === 'confined') {
    const dir = await directoryOf(image);
    const path = await canonicalPath(target);
    if (!path.startsWith(dir)) refuse(`resolves to ${path}, outside the image's directory ${dir}`);
  }
}

export async function canonical(location: string): Promise<string> {
  const parsed = parseLocation(location);
  if (parsed.scheme !== 'file') return location;
  return realpath(parsed.location).catch(() => resolvePath(parsed.location));
}

/** The external data file, when the image has one (the "data-file" option names another). */
export async function openDataFile(
  file: GatedBackend,
  header: Qcow2Header,
  dataFileOption: string | undefined,
  options: OpenOptions & { readonly resolver?: ImageResolver },
  where: { location: string; op: string },
  writable: boolean,
  policy: ReferencePolicy,
): Promise<GatedBackend | undefined> {
  if ((header.incompatibleFeatures & INCOMPAT_DATA_FILE) === 0n) {
    if (dataFileOption !== undefined)
      throw new BlockError('EINVAL', 'the "data-file" option is only for images with an external data file', where);
    return undefined;
  }
  const name = dataFileOption ?? header.dataFile;
  if (name === undefined || name === '') {
    throw corrupt(
      where,
      'data file extension',
      'the image uses an external data file but does not name it (give the "data-file" option)',
    );
  }
  const location = resolveRelative(file.location, name);
  if (dataFileOption === undefined) await checkReference(policy, file.location, location, 'data file', name, where);
  return openChild(options, location, 'raw', 'data file', name, where, writable);
}

/** The backing file (and, through its own open, the rest of the chain); `chainSoFar` ends with this image. */
export async function openBacking(
  file: GatedBackend,
  header: Qcow2Header,
  options: OpenOptions & { readonly resolver?: ImageResolver },
  where: { location: string; op: string },
  chainSoFar: readonly string[],
  policy: ReferencePolicy,
): Promise<GatedBackend | undefined> {
  if (header.backingFile === undefined) return undefined;
  const name = header.backingFile;
  const location = resolveRelative(file.location, name);
  await checkReference(policy, file.location, location, 'backing file', name, where);
  return chain.run({ images: chainSoFar, policy }, () =>
    openChild(options, location, header.backingFormat, 'backing file', name, where),
  );
}

/**
 * Opens, and closes again, what the image refers to: qemu-img check opens the data
 * file and the whole backing chain before it checks anything, and fails when one of
 * them cannot be opened (missing, a loop, a damaged header).
 */
export async function openReferencesForCheck(
  file: GatedBackend,
  header: Qcow2Header,
  options: OpenOptions & { readonly resolver?: ImageResolver },
  policy: ReferencePolicy,
): Promise<void> {
  const where = { location: file.location, op: 'check' };
  const opened: GatedBackend[] = [];
  try {
    const dataFile = await openDataFile(file, header, undefined, options, where, false, policy);
    if (dataFile) opened.push(dataFile);
    const backing = await openBacking(file, header, options, where, [await canonical(file.location)], policy);
    if (backing) opened.push(backing);
  } finally {
    await Promise.allSettled(opened.map((b) => b.close()));
  }
}

/** Opens the backing or data file; a failure names the image that refers to it (once, not at every level of a chain). */
async function openChild(
  options: OpenOptions & { readonly resolver?: ImageResolver },
  location: string,
  format: string | undefined,
  what: string,
  name: string,
  where: { location: string; op: string },
  writable = false,
): Promise<GatedBackend> {
  const field = what === 'backing file' ? 'backing_file' : 'data_file';
  if (!options.resolver) {
    throw new BlockError('ENOTSUP', `the image has a ${what} ("${name}") but no resolver was given to open it`, {
      ...where,
      field,
    });
  }
  try {
    // Gated here too: a resolver other than the registry may hand out ungated backends.
    return gateBackend(
      await options.resolver.open(location, {
        readOnly: !writable,
        cache: options.cache,
        signal: options.signal,
        ...(format !== undefined ? { format } : {}),
      }),
    );
  } catch (err) {
    if (err instanceof BlockError && (err.field === 'backing_file' || err.field === 'data_file')) throw err;
    const e = err as BlockError;
    throw new BlockError(
      e?.code ?? 'EIO',
      `cannot open ${what} "${name}" (${location}): ${e?.message ?? String(err)}`,
      { ...where, field, cause: err },
    );
  }
}
