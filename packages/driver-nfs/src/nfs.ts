/**
 * The "nfs" protocol: a file on an NFS export, reached with libnfs from user space
 * (no kernel mount), with many requests in flight on each TCP connection: one per opened
 * image by default, N with `connections=N` (each its own libnfs context, socket and
 * uv_poll; requests go to the least busy), for when one TCP stream is the bottleneck.
 *
 * URLs are libnfs's: nfs://server/export/path/file?version=3|4&uid=&gid=&nfsport=&mountport=...
 * (libnfs 4.0 splits export and file at the last "/"; `server:port` becomes nfsport=),
 * plus this driver's own `connections=N` (1..32), which libnfs never sees.
 * Driver options (-o/-l): timeout=<seconds> without any byte moving on a connection
 * while requests wait, after which they fail (default 30; 0 = wait forever),
 * connections=N (as the URL option).
 * No URL option of libnfs 4.0 holds a secret (AUTH_SYS trusts uid=/gid=), so the driver
 * declares no secretParameters; a user part (user:password@) is refused, as libnfs would
 * otherwise take it for the host name and quote it back in its error.
 *
 * What libnfs 4.0 cannot do, and what this driver reports instead:
 * - No SEEK_DATA over NFSv3 (and none exposed for v4): canBlockStatus is false and the
 *   whole image reads as data; convert's zero detection keeps targets sparse anyway.
 * - No server-side zeroing or hole punching: canZero/canDiscard are false
 *   (writeZeroes writes zero buffers; discard is a no-op).
 * - NFSv4: rsize/wsize are not learnt, and a WRITE of more than ~3.9 KiB fails to
 *   encode, so v4 writes go out as many 2 KiB WRITEs in flight at once (slow: prefer v3).
 *   O_CREAT is exclusive there, so create opens an existing file first.
 */
import {
  BLOCK_API_VERSION,
  BlockError,
  redactLocation,
  settleAll,
  timeoutOption,
  type BackendIdentity,
  type BlockBackend,
  type SegmentList,
  type BlockLimits,
  type CreateOptions,
  type CreateResult,
  type Extent,
  type OpenOptions,
  type ProtocolDriver,
  type WriteFlags,
} from '@blockconv/core';
import { NfsContext, constants } from '@blockconv/libnfs';

const { O_RDONLY, O_RDWR, O_CREAT } = constants;

const MiB = 1024 * 1024;
/** Fallback transfer size when the mount does not tell (NFSv4 in libnfs 4.0). */
const DEFAULT_MAX = 1 * MiB;
/** Cap on one request even if the server allows more: bounds per-request memory. */
const MAX_TRANSFER_CAP = 4 * MiB;
/** Largest NFSv4 WRITE libnfs 4.0 encodes safely (measured limit ~3944 bytes). */
const V4_WRITE_CHUNK = 2048;
const ZERO_CHUNK = 1 * MiB;
const DEFAULT_TIMEOUT_S = 30;
/** Most connections one image may open (each is a TCP stream, a mount and an open). */
const MAX_CONNECTIONS = 32;

/** libnfs error codes kept as they are; anything else becomes EIO (message kept). */
const CODES: Readonly<Record<string, string>> = {
  ENOENT: 'ENOENT',
  EACCES: 'EACCES',
  EPERM: 'EACCES',
  EROFS: 'EROFS',
  ENOSPC: 'ENOSPC',
  EDQUOT: 'ENOSPC',
  EFBIG: 'ENOSPC',
  ETIMEDOUT: 'ETIMEDOUT',
  ECONNREFUSED: 'ECONNREFUSED',
  ECONNRESET: 'ECONNRESET',
  ENOTFOUND: 'ENOTFOUND',
  EINVAL: 'EINVAL',
  ECANCELED: 'ECANCELED',
  EISDIR: 'EISDIR',
  ENOTDIR: 'ENOTDIR',
  EEXIST: 'EEXIST',
  EBADF: 'EBADF',
  ESTALE: 'ESTALE',
};

interface Where {
  op: string;
  location: string;
  offset?: number;
  length?: number;
}

function nfsError(err: unknown, where: Where): BlockError {
  if (err instanceof BlockError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const raw = typeof e?.code === 'string' ? e.code : 'EIO';
  const text = typeof e?.message === 'string' ? e.message.replace(/\s+/g, ' ').trim() : String(err);
  return new BlockError(CODES[raw] ?? 'EIO', text, { ...where, cause: err });
}

function isV4(location: string): boolean {
  return /[?&]version=4(&|$)/.test(location);
}

/**
 * Takes this driver's own URL option, connections=N, out of the URL (libnfs would
 * refuse it) and checks it and the -o option of the same name. Returns the URL for
 * libnfs and the number of connections.
 */
function splitConnections(
  location: string,
  options: Readonly<Record<string, string>> | undefined,
  op: string,
): { url: string; connections: number } {
  const q = location.indexOf('?');
  let url = location;
  const given: string[] = [];
  if (q >= 0) {
    const params = new URLSearchParams(location.slice(q + 1));
    given.push(...params.getAll('connections'));
    if (given.length > 0) {
      params.delete('connections');
      const rest = params.toString();
      url = location.slice(0, q) + (rest ? `?${rest}` : '');
    }
  }
  if (options?.connections !== undefined) given.push(options.connections);
  for (const v of given) {
    if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > MAX_CONNECTIONS) {
      throw new BlockError('EINVAL', `connections=${v}: expected a whole number from 1 to ${MAX_CONNECTIONS}`, {
        op,
        location,
      });
    }
  }
  if (new Set(given.map(Number)).size > 1) {
    throw new BlockError('EINVAL', `connections given twice with different values (${given.join(', ')})`, {
      op,
      location,
    });
  }
  const connections = given.length ? Number(given[0]) : 1;
  // libnfs's readahead and page cache live in each context: with several, one
  // connection's cache would not see what another wrote.
  if (connections > 1 && /[?&](readahead|pagecache)=[1-9]/.test(url)) {
    throw new BlockError(
      'EINVAL',
      'connections > 1 cannot be combined with readahead= or pagecache= (each connection would cache apart)',
      { op, location },
    );
  }
  return { url, connections };
}

interface Connection {
  ctx: NfsContext;
  fh: number;
  file: string;
}

let clientSerial = 0;

/** Mounts the URL's export and opens its file; destroys the context on failure. */
async function connect(
  location: string,
  flags: number,
  timeoutMs: number,
  op: string,
  url = location,
): Promise<Connection> {
  if (/^[^?]*\/$/.test(url)) {
    throw new BlockError('EINVAL', 'the URL names no file (expected nfs://server/export/file)', { op, location });
  }
  if (/^nfs:\/\/[^/?#]*@/i.test(url)) {
    throw new BlockError(
      'EINVAL',
      'nfs:// URLs take no user or password (the server trusts the uid= and gid= options)',
      { op, location },
    );
  }
  // A client name of its own per context: NFSv4 open state is the client's, and
  // contexts side by side on one file must not take each other's over.
  // A stall timeout, not libnfs's per-request one: that counts from when a request is
  // queued, and a slow link with many requests queued trips it while data still flows.
  const ctx = new NfsContext({
    stallMs: timeoutMs || undefined,
    timeoutMs: -1,
    clientName: `blockconv-${process.pid}-${++clientSerial}-${Date.now().toString(36)}`,
  });
  try {
    const m = await ctx.mount(url);
    if (!m.file || m.file === '/')
      throw new BlockError('EINVAL', 'the URL names no file (expected nfs://server/export/file)', { op, location });
    let fh: number;
    try {
      try {
        fh = await ctx.open(m.file, flags & ~O_CREAT, 0o644);
      } catch (err) {
        // Open first, create only when missing: libnfs 4.0's NFSv4 O_CREAT is exclusive.
        if (!(flags & O_CREAT) || (err as { code?: string }).code !== 'ENOENT') throw err;
        fh = await ctx.open(m.file, flags, 0o644);
      }
    } catch (err) {
      throw permissionDenied(err, url, flags);
    }
    return { ctx, fh, file: m.file };
  } catch (err) {
    ctx.destroy();
    throw nfsError(err, { op, location });
  }
}

/**
 * libnfs's text for a refused open names the NFS status, not who was refused: say
 * which access as which user, since the server judges the URL's uid=/gid= (or this
 * process's ids) against the file's owner and mode.
 */
function permissionDenied(err: unknown, url: string, flags: number): unknown {
  const e = err as { code?: string; message?: string } | null;
  if (e?.code !== 'EACCES' && e?.code !== 'EPERM') return err;
  const uid = /[?&]uid=(\d+)/.exec(url)?.[1] ?? String(process.getuid?.() ?? '?');
  const gid = /[?&]gid=(\d+)/.exec(url)?.[1] ?? String(process.getgid?.() ?? '?');
  const access = `${flags & O_CREAT ? 'create or open' : 'open'} the file ${(flags & O_RDWR) === O_RDWR ? 'read-write' : 'read-only'}`;
  const text = typeof e.message === 'string' ? e.message.replace(/\s+/g, ' ').trim() : '';
  return Object.assign(
    new Error(`permission denied: uid ${uid}, gid ${gid} may not ${access} (${text})`, { cause: err }),
    { code: 'EACCES' },
  );
}

/** Opens `n` connections side by side; if one fails, the others are closed. */
async function connectAll(
  location: string,
  url: string,
  n: number,
  flags: number,
  timeoutMs: number,
  op: string,
): Promise<Connection[]> {
  const results = await Promise.allSettled(
    Array.from({ length: n }, () => connect(location, flags, timeoutMs, op, url)),
  );
  const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
  if (!failed) return results.map((r) => (r as PromiseFulfilledResult<Connection>).value);
  for (const r of results) if (r.status === 'fulfilled') r.value.ctx.destroy();
  throw failed.reason;
}

/** Per-connection counters, for tests and diagnostics. */
export interface ConnectionStats {
  /** Requests in flight now. */
  readonly outstanding: number;
  /** Most requests in flight at once. */
  readonly peakOutstanding: number;
  /** Requests sent since the connection was made (mount and open included). */
  readonly submitted: number;
}

export class NfsBackend implements BlockBackend {
  readonly driverName = 'nfs';
  readonly location: string;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly canZero = false;
  readonly canDiscard = false;
  /** Unknown for an existing file; the registry sets it on one create() just made. */
  readonly zeroInitialized = false;
  readonly canCompress = false;
  /** libnfs 4.0 has no SEEK_DATA: everything is reported as data. */
  readonly canBlockStatus = false;
  readonly canReadHolesCheaply = false;
  readonly canWriteOutOfOrder = true;

  readonly #conns: readonly Connection[];
  readonly #writeChunk: number;
  readonly #unsafe: boolean;
  #closed = false;
  #zeroBuf?: Uint8Array;
  #size: number;
  /** Where the search for the least busy connection starts: ties rotate. */
  #next = 0;

  constructor(
    conns: readonly Connection[],
    p: { location: string; size: number; readOnly: boolean; v4: boolean; unsafe: boolean },
  ) {
    this.#conns = conns;
    const c = conns[0]!;
    this.location = redactLocation(p.location);
    this.#size = p.size;
    this.readOnly = p.readOnly;
    this.#unsafe = p.unsafe;
    const rmax = c.ctx.readMax || DEFAULT_MAX;
    const wmax = c.ctx.writeMax || DEFAULT_MAX;
    // v4 writes are split below the limit libnfs can encode; reads take the full size.
    const maxTransfer = Math.min(p.v4 ? rmax : Math.min(rmax, wmax), MAX_TRANSFER_CAP);
    this.#writeChunk = p.v4 ? V4_WRITE_CHUNK : maxTransfer;
    this.limits = {
      requestAlignment: 1,
      maxTransfer,
      optimalTransfer: Math.min(maxTransfer, 1 * MiB),
      maxWriteZeroes: 64 * MiB,
      minMemAlignment: 1,
    };
  }

  get size(): number {
    return this.#size;
  }

  /** Counters summed over the connections, and each connection's own. */
  get stats(): ConnectionStats & { connections: readonly ConnectionStats[] } {
    const connections = this.#conns.map(({ ctx }) => ({
      outstanding: ctx.outstanding,
      peakOutstanding: ctx.peakOutstanding,
      submitted: ctx.submitted,
    }));
    const sum = (k: keyof ConnectionStats) => connections.reduce((a, c) => a + c[k], 0);
    return {
      outstanding: sum('outstanding'),
      peakOutstanding: Math.max(...connections.map((c) => c.peakOutstanding)),
      submitted: sum('submitted'),
      connections,
    };
  }

  /** The connection with the fewest requests in flight (the first connection when there is one). */
  #pick(): Connection {
    const conns = this.#conns;
    if (conns.length === 1) return conns[0]!;
    const start = this.#next;
    this.#next = (start + 1) % conns.length;
    let best = conns[start]!;
    for (let i = 1; i < conns.length && best.ctx.outstanding > 0; i++) {
      const c = conns[(start + i) % conns.length]!;
      if (c.ctx.outstanding < best.ctx.outstanding) best = c;
    }
    return best;
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    // At most maxTransfer (the core's gate splits larger reads): NFSv4 READs past the
    // server's rsize break the connection, and libnfs 4.0 splits only v3 READs.
    const c = this.#pick();
    try {
      for (let done = 0; done < length; ) {
        const n = await c.ctx.pread(c.fh, out.subarray(done, length), offset + done);
        if (n === 0) {
          out.fill(0, done, length);
          break;
        } // past EOF (file shrank): zeroes
        done += n;
      }
    } catch (err) {
      throw nfsError(err, this.#where('read', offset, length));
    }
    return out;
  }

  /**
   * Vectored read (qcow2 reads one guest range from many host runs with it): every
   * segment a request of its own, all in flight together, spread over the connections.
   */
  async readSegments(into: Uint8Array, segments: SegmentList): Promise<void> {
    const parts: Promise<unknown>[] = [];
    for (let i = 0; i < segments.count; i++) {
      const at = segments.positionAt(i);
      parts.push(this.read(segments.offsetAt(i), segments.lengthAt(i), into.subarray(at, at + segments.lengthAt(i))));
    }
    await settleAll(parts);
  }

  /**
   * Vectored write (convert's data split by zero runs; qcow2's newly allocated clusters
   * of a chunk, one allocation for the whole chunk): every piece in flight at once,
   * rather than one after another as the core would write them without this.
   */
  async writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    const parts: Promise<void>[] = [];
    for (let i = 0; i < segments.count; i++) {
      const at = segments.positionAt(i);
      parts.push(this.write(segments.offsetAt(i), from.subarray(at, at + segments.lengthAt(i))));
    }
    await settleAll(parts);
  }

  async write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    try {
      await this.#writeAll(offset, data);
      // COMMIT is per file on the server: any connection commits every connection's writes.
      if (flags?.fua) await this.#conns[0]!.ctx.fsync(this.#conns[0]!.fh);
    } catch (err) {
      throw nfsError(err, this.#where('write', offset, data.length));
    }
  }

  /** One request per chunk, all in flight together; short writes are resumed. */
  async #writeAll(offset: number, data: Uint8Array): Promise<void> {
    const one = async (start: number, end: number): Promise<void> => {
      const c = this.#pick();
      for (let done = start; done < end; ) {
        const n = await c.ctx.pwrite(c.fh, data.subarray(done, end), offset + done);
        if (n <= 0) throw Object.assign(new Error('write made no progress'), { code: 'EIO' });
        done += n;
      }
    };
    const chunk = this.#writeChunk;
    if (data.length <= chunk) return one(0, data.length);
    const parts: Promise<void>[] = [];
    for (let s = 0; s < data.length; s += chunk) parts.push(one(s, Math.min(s + chunk, data.length)));
    await settleAll(parts);
  }

  /** No zeroing operation in NFS: writes zero buffers (the core avoids calling this). */
  async writeZeroes(offset: number, length: number): Promise<void> {
    const zeroes = (this.#zeroBuf ??= new Uint8Array(Math.min(ZERO_CHUNK, this.limits.maxTransfer)));
    try {
      const parts: Promise<void>[] = [];
      for (let done = 0; done < length; done += zeroes.length) {
        parts.push(this.#writeAll(offset + done, zeroes.subarray(0, Math.min(zeroes.length, length - done))));
      }
      await Promise.all(parts);
    } catch (err) {
      throw nfsError(err, this.#where('writeZeroes', offset, length));
    }
  }

  /** Advisory, and NFS (before v4.2) cannot deallocate: a no-op. */
  async discard(): Promise<void> {}

  async blockStatus(offset: number, _length: number): Promise<Extent> {
    return { kind: 'data', length: this.size - offset, offset };
  }

  /**
   * Grows or shrinks the file (SETATTR size): qcow2 grows its file through this. Callers
   * do not resize with their own requests to the range in flight (the qcow2 driver
   * serialises allocation), so one connection's SETATTR is all it takes.
   */
  async resize(size: number): Promise<void> {
    const c = this.#pick();
    try {
      await c.ctx.ftruncate(c.fh, size);
    } catch (err) {
      throw nfsError(err, this.#where('resize', size, 0));
    }
    this.#size = size;
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.#unsafe) return;
    try {
      // One COMMIT covers the file; with several connections each commits anyway, so
      // that no server may keep one connection's writes unstable (NFSv4 clients apart).
      await Promise.all(this.#conns.map((c) => c.ctx.fsync(c.fh)));
    } catch (err) {
      throw nfsError(err, { op: 'flush', location: this.location });
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    const results = await Promise.allSettled(this.#conns.map((c) => c.ctx.close(c.fh)));
    // Like QEMU: no UMNT, just drop the connections (requests in flight reject).
    for (const c of this.#conns) c.ctx.destroy();
    const failed = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw nfsError(failed.reason, { op: 'close', location: this.location });
  }

  async info(): Promise<Record<string, unknown>> {
    const c = this.#conns[0]!;
    return { readMax: c.ctx.readMax, writeMax: c.ctx.writeMax, connections: this.#conns.length };
  }

  async allocatedSize(): Promise<number | undefined> {
    if (this.#closed) return undefined;
    const c = this.#conns[0]!;
    const st = await c.ctx.fstat(c.fh).catch(() => undefined);
    return st ? st.blocks * 512 : undefined;
  }

  async identity(): Promise<BackendIdentity> {
    const c = this.#conns[0]!;
    const st = await c.ctx.fstat(c.fh).catch((err: unknown) => {
      throw nfsError(err, { op: 'fstat', location: this.location });
    });
    return { id: `${st.dev}:${st.ino}`, version: `${st.mtimeSec}.${String(st.mtimeNsec).padStart(9, '0')}` };
  }

  #where(op: string, offset: number, length: number): Where {
    return { op, location: this.location, offset, length };
  }
}

/** Opens the file a nfs:// URL names. */
export async function openNfs(location: string, options: OpenOptions = {}): Promise<NfsBackend> {
  options.signal?.throwIfAborted();
  const readOnly = options.readOnly === true;
  const timeoutMs = timeoutOption(location, options.options, DEFAULT_TIMEOUT_S) * 1000;
  const { url, connections } = splitConnections(location, options.options, 'open');
  const conns = await connectAll(location, url, connections, readOnly ? O_RDONLY : O_RDWR, timeoutMs, 'open');
  try {
    const st = await conns[0]!.ctx.fstat(conns[0]!.fh);
    if ((st.mode & 0o170000) === 0o040000) throw new BlockError('EISDIR', 'is a directory', { op: 'open', location });
    return new NfsBackend(conns, {
      location,
      size: st.size,
      readOnly,
      v4: isV4(url),
      unsafe: options.cache === 'unsafe',
    });
  } catch (err) {
    for (const c of conns) c.ctx.destroy();
    throw nfsError(err, { op: 'open', location });
  }
}

/** Creates (or truncates) the file to `size` bytes: all hole on the server, reading as zeroes. */
export async function createNfs(location: string, size: number, options: CreateOptions = {}): Promise<CreateResult> {
  options.signal?.throwIfAborted();
  if (!Number.isSafeInteger(size) || size < 0) {
    throw new BlockError('EINVAL', `invalid image size ${size}`, { op: 'create', location });
  }
  const timeoutMs = timeoutOption(location, options.options, DEFAULT_TIMEOUT_S) * 1000;
  const { url } = splitConnections(location, options.options, 'create');
  const c = await connect(location, O_RDWR | O_CREAT, timeoutMs, 'create', url);
  try {
    // Truncating to 0 first drops every old block, so the result is all hole.
    await c.ctx.ftruncate(c.fh, 0);
    await c.ctx.ftruncate(c.fh, size);
    await c.ctx.close(c.fh);
    return { zeroInitialized: true };
  } catch (err) {
    throw nfsError(err, { op: 'create', location });
  } finally {
    c.ctx.destroy();
  }
}

export const nfsDriver: ProtocolDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'protocol',
  name: 'nfs',
  description: 'files on NFS servers (NFSv3, NFSv4) through libnfs, without a kernel mount',
  schemes: ['nfs'],
  openOptions: [
    {
      name: 'timeout',
      description:
        'seconds the server may send and take nothing while requests wait, before they fail (0: wait forever; also for create)',
      default: String(DEFAULT_TIMEOUT_S),
    },
    {
      name: 'connections',
      description: `TCP connections to spread requests over (1-${MAX_CONNECTIONS}); also ?connections=N in the URL`,
      default: '1',
    },
  ],
  open: openNfs,
  create: createNfs,
};
