/**
 * The "nbd" protocol: an export of an NBD server (qemu-nbd, nbdkit, nbd-server,
 * `blockconv serve`), spoken in TypeScript over node:net (connection.ts).
 *
 * URLs follow the NBD URI standard (NetworkBlockDevice/nbd doc/uri.md):
 *   nbd://host[:port][/export]           TCP, port 10809 by default
 *   nbd+unix:///[export]?socket=PATH     a Unix socket
 * plus this driver's own `connections=N`. The export name is the path without its
 * leading "/", percent-decoded. nbds:// and the tls-* parameters (TLS) are refused.
 * Driver options (-o/-l): connections=N (1..16; default 4 when the server advertises
 * multi-conn, else 1), timeout=<seconds> the server may owe a reply without sending a
 * byte (default 30; 0 = wait forever).
 *
 * What the export tells and the driver does with it:
 * - block size constraints (NBD_INFO_BLOCK_SIZE): requestAlignment = minimum,
 *   maxTransfer = maximum payload (at most 32 MiB), preferred size as the alignment
 *   writes should keep;
 * - base:allocation: block status (zero where the server says NBD_STATE_ZERO, else data),
 *   answered from the last reply's extents until this backend changes the export;
 *   zeroInitialized when, at open, the whole export reads as zeroes;
 * - WRITE_ZEROES (NO_HOLE unless the caller allows unmapping; FAST_ZERO when asked),
 *   TRIM, FLUSH, FUA as the transmission flags allow; FUA without SEND_FUA is a flush;
 * - multi-conn: requests go to the least busy of several connections; without it, one
 *   connection (the spec's advice: caches may not be shared).
 * An export is never created: convert to nbd:// with -n.
 */
import {
  BLOCK_API_VERSION,
  BlockError,
  redactLocation,
  settleAll,
  timeoutOption,
  type BlockBackend,
  type BlockLimits,
  type Extent,
  type OpenOptions,
  type ProtocolDriver,
  type WriteFlags,
  type WriteZeroesFlags,
} from '@blockconv/core';
import { NbdConnection, type Endpoint, type ExportInfo } from './connection.js';
import { BASE_ALLOCATION, Flag, State } from './protocol.js';

const MiB = 1024 * 1024;
const DEFAULT_PORT = 10809;
const DEFAULT_TIMEOUT_S = 30;
/** Largest read or write sent, even if the server takes more: bounds memory per request. */
const MAX_TRANSFER_CAP = 32 * MiB;
/** One WRITE_ZEROES or TRIM covers at most this (the length field has 32 bits). */
const MAX_ZEROES = 1024 * MiB;
/** Block status asks about this much at once; the server answers up to 2^20 extents. */
const STATUS_HINT = 2 * 1024 * MiB;
const MAX_CONNECTIONS = 16;
/** Connections opened when the server allows multi-conn and the user did not say (nbdcopy's default). */
const DEFAULT_MULTI_CONN = 4;

/** An nbd:// or nbd+unix:// URL, parsed. */
export interface NbdUrl {
  readonly endpoint: Endpoint;
  readonly exportName: string;
  /** connections= of the URL, when given. */
  readonly connections?: number;
}

function invalid(location: string, what: string): BlockError {
  return new BlockError('EINVAL', what, { op: 'open', location });
}

function parseConnections(v: string, location: string): number {
  if (!/^\d+$/.test(v) || Number(v) < 1 || Number(v) > MAX_CONNECTIONS) {
    throw invalid(location, `connections=${v}: expected a whole number from 1 to ${MAX_CONNECTIONS}`);
  }
  return Number(v);
}

/** Parses an NBD URI (doc/uri.md); throws EINVAL naming the part that is wrong. */
export function parseNbdUrl(location: string): NbdUrl {
  const display = redactLocation(location);
  const m = /^([a-z+]+):\/\/([^/?#]*)([^?#]*)(\?[^#]*)?(#.*)?$/i.exec(location);
  if (!m) throw invalid(display, 'expected nbd://host[:port][/export] or nbd+unix:///export?socket=PATH');
  const scheme = m[1]!.toLowerCase();
  const authority = m[2]!;
  const path = m[3]!;
  if (m[5]) throw invalid(display, 'an NBD URL has no fragment (#...)');
  if (scheme === 'nbds' || scheme === 'nbds+unix')
    throw new BlockError('ENOTSUP', `${scheme}:// needs TLS, which this NBD client does not speak (yet)`, {
      op: 'open',
      location: display,
    });
  if (scheme !== 'nbd' && scheme !== 'nbd+unix')
    throw invalid(display, `unknown scheme ${scheme}:// (expected nbd:// or nbd+unix://)`);
  let exportName: string;
  try {
    exportName = decodeURIComponent(path.replace(/^\//, ''));
  } catch {
    throw invalid(display, `bad percent-encoding in the export name "${path}"`);
  }
  if (exportName.includes('\0')) throw invalid(display, 'the export name contains a NUL character');
  let socket: string | undefined;
  let connections: number | undefined;
  for (const [key, value] of queryPairs(m[4]?.slice(1) ?? '', display)) {
    if (key === 'socket' && scheme === 'nbd+unix') {
      if (socket !== undefined) throw invalid(display, 'socket= given twice');
      socket = value;
    } else if (key === 'connections') {
      if (connections !== undefined) throw invalid(display, 'connections= given twice');
      connections = parseConnections(value, display);
    } else if (key.startsWith('tls')) {
      throw new BlockError('ENOTSUP', `${key}=: TLS is not supported by this NBD client (yet)`, {
        op: 'open',
        location: display,
      });
    } else {
      throw invalid(
        display,
        `unknown URL parameter "${key}" (nbd URLs take ${scheme === 'nbd+unix' ? 'socket= and ' : ''}connections=)`,
      );
    }
  }
  if (scheme === 'nbd+unix') {
    if (authority !== '') throw invalid(display, 'nbd+unix:// takes no host: write nbd+unix:///export?socket=PATH');
    if (!socket) throw invalid(display, 'nbd+unix:// needs ?socket=PATH');
    return { endpoint: { path: socket }, exportName, connections };
  }
  if (authority.includes('@'))
    throw invalid(display, 'a user name is only used with TLS, which this NBD client does not speak');
  const hp = /^(?:\[([0-9a-fA-F:.]+)\]|([^:[\]]+))(?::(\d*))?$/.exec(authority);
  if (!hp)
    throw invalid(
      display,
      authority === '' ? 'nbd:// needs a host: nbd://host[:port][/export]' : `bad host or port "${authority}"`,
    );
  const host = hp[1] ?? hp[2]!;
  const port = hp[3] === undefined || hp[3] === '' ? DEFAULT_PORT : Number(hp[3]);
  if (!Number.isInteger(port) || port < 1 || port > 65535)
    throw invalid(display, `port ${hp[3]} is not between 1 and 65535`);
  return { endpoint: { host, port }, exportName, connections };
}

/** key=value pairs of a query, percent-decoded as RFC 3986 says ("+" stays "+", unlike forms). */
function queryPairs(query: string, display: string): [string, string][] {
  if (query === '') return [];
  return query.split('&').map((part) => {
    const eq = part.indexOf('=');
    try {
      return [
        decodeURIComponent(eq < 0 ? part : part.slice(0, eq)),
        eq < 0 ? '' : decodeURIComponent(part.slice(eq + 1)),
      ];
    } catch {
      throw invalid(display, `bad percent-encoding in the URL parameter "${part}"`);
    }
  });
}

function floorTo(n: number, align: number): number {
  return Math.floor(n / align) * align;
}

export class NbdBackend implements BlockBackend {
  readonly driverName = 'nbd';
  readonly location: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly readOnlyReason?: string;
  readonly limits: BlockLimits;
  readonly canZero: boolean;
  readonly canDiscard: boolean;
  readonly canFastZero: boolean;
  zeroInitialized = false;
  readonly canCompress = false;
  readonly canBlockStatus: boolean;
  readonly canReadHolesCheaply = false;
  readonly canWriteOutOfOrder = true;

  readonly #connections: NbdConnection[];
  readonly #info: ExportInfo;
  readonly #exportName: string;
  readonly #unsafe: boolean;
  /** The last block status answer: where each extent ends, and its flags. */
  #status?: StatusList;
  #generation = 0;
  #statusRequests = 0;
  #writeZeroesWorks = true;
  #zeroBuf?: Uint8Array;
  #closed = false;

  constructor(
    connections: NbdConnection[],
    o: { location: string; exportName: string; readOnly: boolean; unsafe: boolean },
  ) {
    const info = connections[0]!.info;
    this.#connections = connections;
    this.#info = info;
    this.#exportName = o.exportName;
    this.#unsafe = o.unsafe;
    this.location = o.location;
    this.size = info.size;
    const serverReadOnly = (info.flags & Flag.READ_ONLY) !== 0;
    this.readOnly = o.readOnly || serverReadOnly;
    if (serverReadOnly && !o.readOnly) this.readOnlyReason = 'the NBD server exports it read-only';
    const align = info.minBlock;
    const maxTransfer = Math.max(align, floorTo(Math.min(info.maxPayload, MAX_TRANSFER_CAP), align));
    this.limits = {
      requestAlignment: align,
      maxTransfer,
      optimalTransfer: Math.min(maxTransfer, Math.max(info.preferredBlock, 2 * MiB)),
      maxWriteZeroes: floorTo(MAX_ZEROES, align),
      preferredAlignment: Math.max(align, Math.min(info.preferredBlock, 64 * 1024)),
    };
    this.canZero = (info.flags & Flag.SEND_WRITE_ZEROES) !== 0;
    this.canDiscard = (info.flags & Flag.SEND_TRIM) !== 0;
    this.canFastZero = this.canZero && (info.flags & Flag.SEND_FAST_ZERO) !== 0;
    this.canBlockStatus = info.metaContexts.has(BASE_ALLOCATION);
  }

  /** Connections open, requests in flight on each, block status requests sent: for tests and diagnostics. */
  get stats(): { connections: number; inFlight: number[]; statusRequests: number } {
    return {
      connections: this.#connections.length,
      inFlight: this.#connections.map((c) => c.inFlight),
      statusRequests: this.#statusRequests,
    };
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    if (length === 0) return out;
    await this.#pick().read(offset, length, out);
    return out;
  }

  async write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.#changed();
    const fua = flags?.fua === true && !this.#unsafe;
    try {
      await this.#pick().write(offset, data, fua && (this.#info.flags & Flag.SEND_FUA) !== 0);
      if (fua && !(this.#info.flags & Flag.SEND_FUA)) await this.#flushNow();
    } finally {
      this.#changed();
    }
  }

  async writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#changed();
    try {
      // FAST_ZERO: the server zeroes at metadata speed or says ENOTSUP; no fallback here.
      if (flags?.fast)
        return await this.#pick().writeZeroes(offset, length, { noHole: flags.mayUnmap !== true, fast: true });
      if (this.canZero && this.#writeZeroesWorks) {
        try {
          await this.#pick().writeZeroes(offset, length, { noHole: flags?.mayUnmap !== true });
          return;
        } catch (err) {
          // A server that advertises WRITE_ZEROES yet refuses it: write zero buffers from now on.
          if ((err as { code?: string }).code !== 'ENOTSUP') throw err;
          this.#writeZeroesWorks = false;
        }
      }
      const zeroes = (this.#zeroBuf ??= new Uint8Array(Math.min(this.limits.maxTransfer, 1 * MiB)));
      const parts: Promise<void>[] = [];
      for (let done = 0; done < length; done += zeroes.length) {
        const n = Math.min(zeroes.length, length - done);
        parts.push(this.#pick().write(offset + done, zeroes.subarray(0, n), false));
      }
      await settleAll(parts);
    } finally {
      this.#changed();
    }
  }

  /** TRIM when the server takes it; advisory, so a no-op elsewhere. */
  async discard(offset: number, length: number): Promise<void> {
    if (!this.canDiscard) return;
    this.#changed();
    try {
      await this.#pick().trim(offset, length);
    } finally {
      this.#changed();
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const rest = this.size - offset;
    if (!this.canBlockStatus) return { kind: 'data', length: rest };
    let found = this.#covering(offset);
    if (!found) {
      const generation = this.#generation;
      const hint = Math.min(rest, Math.max(length, STATUS_HINT));
      this.#statusRequests++;
      const status = await this.#pick().blockStatus(
        offset,
        floorTo(Math.min(hint, 0xffffffff), this.limits.requestAlignment) || hint,
      );
      // Not kept when a change started meanwhile: the answer may predate it.
      const list = statusList(status, offset);
      if (generation === this.#generation) this.#status = list;
      found = covering(list, offset, rest);
    }
    if (!found) return { kind: 'data', length: Math.min(rest, Math.max(length, this.limits.requestAlignment)) };
    return { kind: found.flags & State.ZERO ? 'zero' : 'data', length: found.end - offset };
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.#unsafe) return;
    await this.#flushNow();
  }

  /** Soft disconnect of every connection (bounded). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await Promise.all(this.#connections.map((c) => c.close()));
  }

  async info(): Promise<Record<string, unknown>> {
    const i = this.#info;
    const f = i.flags;
    return {
      export: this.#exportName,
      connections: this.#connections.length,
      multiConn: (f & Flag.CAN_MULTI_CONN) !== 0,
      structuredReplies: i.structuredReplies,
      blockStatus: this.canBlockStatus,
      minimumBlockSize: i.minBlock,
      preferredBlockSize: i.preferredBlock,
      maximumPayload: i.maxPayload,
      flush: (f & Flag.SEND_FLUSH) !== 0,
      fua: (f & Flag.SEND_FUA) !== 0,
      trim: (f & Flag.SEND_TRIM) !== 0,
      writeZeroes: (f & Flag.SEND_WRITE_ZEROES) !== 0,
      fastZero: (f & Flag.SEND_FAST_ZERO) !== 0,
      readOnlyExport: (f & Flag.READ_ONLY) !== 0,
    };
  }

  /** Sees, once at open, whether the whole export reads as zeroes (a new nbdkit memory disk). */
  async probeAllZero(): Promise<void> {
    if (this.readOnly || !this.canBlockStatus || this.size === 0) return;
    const e = await this.blockStatus(0, this.size);
    this.zeroInitialized = e.kind === 'zero' && e.length >= this.size;
  }

  async #flushNow(): Promise<void> {
    if (!(this.#info.flags & Flag.SEND_FLUSH)) return;
    // With multi-conn one flush covers the writes every connection completed (proto.md).
    await this.#pick().flush();
  }

  /** The least busy usable connection; the first one's failure when none is left. */
  #pick(): NbdConnection {
    const cs = this.#connections;
    if (cs.length === 1) return cs[0]!;
    let best: NbdConnection | undefined;
    for (const c of cs) if (c.usable && (!best || c.inFlight < best.inFlight)) best = c;
    return best ?? cs[0]!;
  }

  #covering(offset: number): { flags: number; end: number } | undefined {
    return this.#status ? covering(this.#status, offset, this.size - offset) : undefined;
  }

  /** Called as a change starts and as it ends, so no block status overlapping it is kept. */
  #changed(): void {
    this.#status = undefined;
    this.#generation++;
  }
}

/** A block status answer, ready for lookups: extent i covers [ends[i-1] (or start), ends[i]). */
interface StatusList {
  readonly start: number;
  readonly ends: Float64Array;
  readonly flags: Uint32Array;
}

function statusList(pairs: Uint32Array, start: number): StatusList {
  const n = pairs.length >> 1;
  const ends = new Float64Array(n);
  const flags = new Uint32Array(n);
  let at = start;
  for (let i = 0; i < n; i++) {
    at += pairs[2 * i]!;
    ends[i] = at;
    flags[i] = pairs[2 * i + 1]!;
  }
  return { start, ends, flags };
}

/** The extent that covers `offset` (binary search: a converter walks thousands of them). */
function covering(list: StatusList, offset: number, rest: number): { flags: number; end: number } | undefined {
  const { ends } = list;
  if (offset < list.start || ends.length === 0 || offset >= ends[ends.length - 1]!) return undefined;
  let lo = 0;
  let hi = ends.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (ends[mid]! > offset) hi = mid;
    else lo = mid + 1;
  }
  return { flags: list.flags[lo]!, end: Math.min(ends[lo]!, offset + rest) };
}

/** Opens the export an nbd:// or nbd+unix:// URL names. */
export async function openNbd(location: string, options: OpenOptions = {}): Promise<NbdBackend> {
  const display = redactLocation(location);
  const url = parseNbdUrl(location);
  const timeoutMs = timeoutOption(display, options.options, DEFAULT_TIMEOUT_S) * 1000;
  const asked =
    options.options?.connections !== undefined ? parseConnections(options.options.connections, display) : undefined;
  if (asked !== undefined && url.connections !== undefined && asked !== url.connections) {
    throw invalid(display, `connections given twice with different values (${url.connections}, ${asked})`);
  }
  const wanted = asked ?? url.connections;
  const connect = (): Promise<NbdConnection> =>
    NbdConnection.open(url.endpoint, {
      exportName: url.exportName,
      location: display,
      timeoutMs,
      signal: options.signal,
      metaContexts: [BASE_ALLOCATION],
    });
  const first = await connect();
  const connections = [first];
  try {
    const multiConn = (first.info.flags & Flag.CAN_MULTI_CONN) !== 0;
    if (wanted !== undefined && wanted > 1 && !multiConn) {
      throw invalid(
        display,
        `connections=${wanted}: the server does not allow multi-conn for this export (its caches may not be shared); use 1`,
      );
    }
    const n = wanted ?? (multiConn ? DEFAULT_MULTI_CONN : 1);
    const more = await Promise.allSettled(Array.from({ length: n - 1 }, connect));
    for (const r of more) if (r.status === 'fulfilled') connections.push(r.value);
    const failed = more.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) throw failed.reason;
    const backend = new NbdBackend(connections, {
      location: display,
      exportName: url.exportName,
      readOnly: options.readOnly === true,
      unsafe: options.cache === 'unsafe',
    });
    await backend.probeAllZero();
    return backend;
  } catch (err) {
    for (const c of connections) c.destroy();
    throw err;
  }
}

export const nbdDriver: ProtocolDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'protocol',
  name: 'nbd',
  description:
    'exports of NBD servers (qemu-nbd, nbdkit, blockconv serve) over TCP or Unix sockets; convert to one with -n',
  schemes: ['nbd', 'nbd+unix', 'nbds', 'nbds+unix'],
  openOptions: [
    {
      name: 'connections',
      description: `connections to open (1..${MAX_CONNECTIONS}; more than 1 only when the server allows multi-conn)`,
      default: `${DEFAULT_MULTI_CONN} with multi-conn, else 1`,
    },
    {
      name: 'timeout',
      description: 'seconds the server may owe a reply without sending a byte, before requests fail (0: wait forever)',
      default: String(DEFAULT_TIMEOUT_S),
    },
  ],
  open: openNbd,
};
