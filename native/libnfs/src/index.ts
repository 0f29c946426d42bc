/**
 * Promise-based binding over libnfs's asynchronous API (Debian's libnfs 4.0).
 *
 * One NfsContext is one TCP connection to one export. Its socket is driven from
 * Node's event loop (uv_poll on libnfs's fd, re-armed from nfs_which_events after
 * every submit and service call, plus a 100 ms timer for libnfs's RPC timeouts), so
 * any number of requests can be in flight on it without threads, and no synchronous
 * libnfs call ever runs. Buffers passed to pread/pwrite must stay untouched until the
 * promise settles (the binding keeps them referenced until then).
 *
 * Failures reject with an NfsError: libnfs's own text (nfs_get_error or the
 * callback's message, e.g. "NFS: Lookup of /x failed with NFS3ERR_NOENT(-2)") and
 * `code` ('ENOENT', 'EACCES', 'ETIMEDOUT', 'ECONNREFUSED', 'ECANCELED' for requests
 * in flight when the context was destroyed, 'EBADF' after it).
 */
import { createRequire } from 'node:module';
import { lookup } from 'node:dns/promises';
import { isIP } from 'node:net';

export interface NfsError extends Error {
  readonly code: string;
  readonly errno: number;
}

export interface NfsStat {
  readonly size: number;
  readonly mode: number;
  readonly blocks: number;
  readonly blksize: number;
  readonly dev: number;
  readonly ino: number;
  readonly mtimeSec: number;
  readonly mtimeNsec: number;
}

export interface MountInfo {
  /** Server as connected to (an address: host names are resolved before mounting). */
  readonly server: string;
  /** The export path mounted, e.g. "/export". */
  readonly export: string;
  /** The URL's file, relative to the export, e.g. "/disk.raw" ("" for a directory URL). */
  readonly file: string;
}

export interface NfsContextOptions {
  /** RPC timeout in milliseconds (whole seconds in libnfs 4.0), counted from when a request is queued; unset: libnfs's default (none). */
  readonly timeoutMs?: number;
  /**
   * Stall timeout in milliseconds: requests in flight fail (ETIMEDOUT) when the
   * connection has moved no byte either way for this long. Unlike timeoutMs, a slow
   * link with many requests queued never trips it.
   */
  readonly stallMs?: number;
  /** Reconnect attempts after a lost connection (libnfs: -1 forever, 0 never). */
  readonly autoReconnect?: number;
  /**
   * NFSv4 client name (nfs4_set_client_name). Contexts open on the same file at once
   * should each have their own: the server keys open state by client.
   */
  readonly clientName?: string;
}

interface NativeContext {
  mount(url: string): Promise<MountInfo>;
  umount(): Promise<void>;
  open(path: string, flags: number, mode: number): Promise<number>;
  pread(handle: number, buffer: Uint8Array, offset: number): Promise<number>;
  pwrite(handle: number, buffer: Uint8Array, offset: number): Promise<number>;
  fstat(handle: number): Promise<NfsStat>;
  ftruncate(handle: number, size: number): Promise<void>;
  fsync(handle: number): Promise<void>;
  close(handle: number): Promise<void>;
  destroy(): void;
  readonly readMax: number;
  readonly writeMax: number;
  readonly outstanding: number;
  readonly peakOutstanding: number;
  readonly submitted: number;
  readonly fd: number;
  readonly destroyed: boolean;
}

interface Native {
  NfsContext: new (options?: NfsContextOptions) => NativeContext;
  constants: {
    O_RDONLY: number;
    O_WRONLY: number;
    O_RDWR: number;
    O_CREAT: number;
    O_TRUNC: number;
    O_EXCL: number;
    O_SYNC: number;
  };
}

// An ESM module cannot import a .node file; createRequire can. src/ (tsx) and dist/
// (built) both sit beside build/. A missing addon (no libnfs at install time) does not
// fail the import: `available` says so, and using the binding throws loadError's text.
let native: Native | undefined;
/** Why the addon could not be loaded, when it could not. */
export let loadError: Error | undefined;
try {
  native = createRequire(import.meta.url)('../build/Release/nfs_binding.node') as Native;
} catch (err) {
  loadError = new Error(
    `the @blockconv/libnfs addon is not built (it needs libnfs, Debian: libnfs-dev; then \`npm rebuild @blockconv/libnfs\`): ${(err as Error).message}`,
    { cause: err },
  );
}
/** Whether the native addon loaded. */
export const available: boolean = native !== undefined;

function addon(): Native {
  if (!native) throw loadError!;
  return native;
}

/** open() flags (Linux values, which libnfs expects). */
export const constants: Native['constants'] = native?.constants ?? {
  O_RDONLY: 0,
  O_WRONLY: 1,
  O_RDWR: 2,
  O_CREAT: 0o100,
  O_TRUNC: 0o1000,
  O_EXCL: 0o200,
  O_SYNC: 0o4010000,
};

/** URL options libnfs 4.0 understands (nfs_set_context_args); it silently ignores others. */
export const URL_OPTIONS: readonly string[] = [
  'uid',
  'gid',
  'tcp-syncnt',
  'readahead',
  'pagecache',
  'debug',
  'auto-traverse-mounts',
  'dircache',
  'autoreconnect',
  'if',
  'version',
  'nfsport',
  'mountport',
];

/** libnfs reports some failures with a generic errno; its text says what happened. */
function refine(err: unknown, timeoutMs: number | undefined): unknown {
  const e = err as { code?: string; message?: string } | null;
  if (!e || typeof e.message !== 'string') return err;
  const m = e.message;
  let code: string | undefined;
  // An RPC timeout reaches the callback as -EINTR "Command was cancelled" in libnfs 4.0.
  if (e.code === 'EINTR' && /cancelled/i.test(m)) {
    code = 'ETIMEDOUT';
    e.message = `NFS request timed out${timeoutMs ? ` after ${timeoutMs / 1000} s` : ''} (server unreachable or not answering)`;
  } else if (/ERR_NOSPC/.test(m)) {
    code = 'ENOSPC';
    e.message = `no space left on the NFS server's file system (${m})`;
  } else if (/ERR_DQUOT/.test(m)) {
    // libnfs 4.0 reports NFS3ERR_DQUOT as ERANGE.
    code = 'EDQUOT';
    e.message = `over the user's quota on the NFS server (${m})`;
  } else if (/ERR_FBIG/.test(m)) code = 'EFBIG';
  else if (/ERR_ROFS/.test(m)) code = 'EROFS';
  else if (/connection refused/i.test(m)) code = 'ECONNREFUSED';
  else if (/timed? ?out/i.test(m)) code = 'ETIMEDOUT';
  else if (/Can not resolv/i.test(m)) code = 'ENOTFOUND';
  else if (/reconnect/i.test(m)) {
    code = 'ECONNRESET';
    e.message = `connection to the NFS server lost (${m})`;
  } else if (/connection reset|socket error|disconnect/i.test(m) && e.code === 'EFAULT') code = 'ECONNRESET';
  if (code && code !== e.code) Object.defineProperty(e, 'code', { value: code, enumerable: true, writable: true });
  return e;
}

function urlError(message: string): NfsError {
  return Object.assign(new Error(message), { code: 'EINVAL', errno: 22 }) as NfsError;
}

/**
 * Prepares a URL for libnfs 4.0: checks its options (libnfs ignores unknown ones and
 * bad values), turns `host:port` into `?nfsport=` (4.0 has no port in the authority)
 * and resolves a host name to an address here, asynchronously (libnfs would call
 * getaddrinfo on the event loop).
 */
export async function prepareUrl(url: string): Promise<string> {
  const m = /^nfs:\/\/(\[[^\]]*\]|[^/:?]*)(?::(\d*))?(\/[^?]*)?(?:\?(.*))?$/i.exec(url);
  if (!m) throw urlError(`invalid NFS URL ${JSON.stringify(url)}: expected nfs://server/export/path`);
  let host = m[1]!;
  const port = m[2];
  const path = m[3] ?? '';
  const params = new URLSearchParams(m[4] ?? '');
  if (!host) throw urlError(`invalid NFS URL ${JSON.stringify(url)}: no server`);
  for (const [key, value] of params) {
    if (!URL_OPTIONS.includes(key))
      throw urlError(`unknown NFS URL option "${key}" (libnfs 4.0 knows ${URL_OPTIONS.join(', ')})`);
    if (key === 'version' && value !== '3' && value !== '4')
      throw urlError(`NFS version ${value} is not supported (3 or 4)`);
    if (key !== 'if' && !/^-?\d+$/.test(value)) throw urlError(`NFS URL option ${key}=${value}: expected a number`);
  }
  if (port !== undefined) {
    if (!/^\d+$/.test(port) || Number(port) > 65535) throw urlError(`invalid port "${port}" in ${url}`);
    if (params.has('nfsport')) throw urlError('both a port and nfsport= given');
    params.set('nfsport', port);
  }
  const bare = host.startsWith('[') ? host.slice(1, -1) : host;
  if (!isIP(bare)) {
    try {
      host = (await lookup(bare, { family: 4 })).address;
    } catch (err) {
      throw Object.assign(new Error(`unknown NFS server host "${bare}"`), { code: 'ENOTFOUND', errno: 0, cause: err });
    }
  }
  const query = params.toString();
  return `nfs://${host}${path}${query ? `?${query}` : ''}`;
}

/** One connection to one NFS export. Call destroy() when done; it is synchronous. */
export class NfsContext {
  readonly #n: NativeContext;
  readonly #timeoutMs: number | undefined;

  constructor(options: NfsContextOptions = {}) {
    this.#n = new (addon().NfsContext)(options);
    this.#timeoutMs = options.timeoutMs;
  }

  /** Parses `url` (applying its options), resolves its host and mounts its export. */
  async mount(url: string): Promise<MountInfo> {
    return this.#wrap(this.#n.mount(await prepareUrl(url)));
  }

  /** NFSv3: tells mountd the export is no longer used (a no-op for v4). */
  umount(): Promise<void> {
    return this.#wrap(this.#n.umount());
  }

  /** Opens (O_CREAT: creates) a file relative to the export; resolves to a handle id. */
  open(path: string, flags: number, mode = 0o644): Promise<number> {
    return this.#wrap(this.#n.open(path, flags, mode));
  }

  /** Reads into all of `buffer` from `offset`; resolves to the bytes read (fewer only at EOF). */
  pread(handle: number, buffer: Uint8Array, offset: number): Promise<number> {
    return this.#wrap(this.#n.pread(handle, buffer, offset));
  }

  /** Writes all of `buffer` at `offset` in one request; resolves to the bytes written. */
  pwrite(handle: number, buffer: Uint8Array, offset: number): Promise<number> {
    return this.#wrap(this.#n.pwrite(handle, buffer, offset));
  }

  fstat(handle: number): Promise<NfsStat> {
    return this.#wrap(this.#n.fstat(handle));
  }

  ftruncate(handle: number, size: number): Promise<void> {
    return this.#wrap(this.#n.ftruncate(handle, size));
  }

  /** COMMIT: data written so far is on stable storage. */
  fsync(handle: number): Promise<void> {
    return this.#wrap(this.#n.fsync(handle));
  }

  /** The handle is invalid from the call on, whatever the outcome. */
  close(handle: number): Promise<void> {
    return this.#wrap(this.#n.close(handle));
  }

  /**
   * Closes the connection and frees the context at once. Requests in flight reject
   * with ECANCELED; later calls with EBADF. Idempotent.
   */
  destroy(): void {
    this.#n.destroy();
  }

  #wrap<T>(p: Promise<T>): Promise<T> {
    return p.catch((err: unknown) => {
      throw refine(err, this.#timeoutMs);
    });
  }

  /** Largest READ the server accepts (its rsize); 0 before mount. */
  get readMax(): number {
    return this.#n.readMax;
  }
  /** Largest WRITE the server accepts (its wsize); 0 before mount. */
  get writeMax(): number {
    return this.#n.writeMax;
  }
  /** Requests submitted and not yet completed. */
  get outstanding(): number {
    return this.#n.outstanding;
  }
  /** Most requests that were in flight at once, counted when one completes. */
  get peakOutstanding(): number {
    return this.#n.peakOutstanding;
  }
  /** Requests libnfs accepted on this context since it was made (mount and open included). */
  get submitted(): number {
    return this.#n.submitted;
  }
  /** libnfs's socket (-1 when not connected), for tests. */
  get fd(): number {
    return this.#n.fd;
  }
  get destroyed(): boolean {
    return this.#n.destroyed;
  }
}
