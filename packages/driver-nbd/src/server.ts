/**
 * An NBD server exporting one BlockBackend (`blockconv serve`): fixed newstyle
 * negotiation with structured replies, base:allocation, NBD_OPT_GO/INFO with block
 * sizes, and requests served concurrently, answered in whatever order they finish.
 *
 * All clients share the one backend, whose cache (if any) is the process's: so flush
 * and FUA on any connection cover the writes every connection completed, and the export
 * advertises multi-conn. A connection stops reading while more than MAX_PENDING bytes
 * of its requests wait.
 * No TLS: the CLI binds to loopback unless told otherwise.
 */
import * as net from 'node:net';
import { gateBackend, mapImage, type BlockBackend, type GatedBackend } from '@blockconv/core';
import {
  BASE_ALLOCATION,
  Command,
  CommandFlag,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  Flag,
  IHAVEOPT,
  Info,
  MAX_STRING,
  NBDMAGIC,
  NbdErrno,
  Option,
  OptionError,
  OptionReply,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REQUEST_MAGIC,
  REQUEST_SIZE,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  State,
} from './protocol.js';
import { SinkReader } from './reader.js';

const MiB = 1024 * 1024;
/** The largest read or write payload a client may ask (also what we advertise). */
const MAX_PAYLOAD = 32 * MiB;
/** Option payloads above this are refused and the connection dropped (bounded memory). */
const MAX_OPTION = 64 * 1024;
/** Bytes of requests in flight on one connection before it stops reading more. */
const MAX_PENDING = 64 * MiB;
/** How long a shutdown waits for a connection's requests before dropping it. */
const SHUTDOWN_GRACE_MS = 10_000;
/** Extents in one block status reply at most. */
const MAX_EXTENTS = 64 * 1024;
/** The context id of base:allocation on every connection. */
const ALLOCATION_ID = 1;

export interface NbdServerOptions {
  /** The export's name (default ""): what clients ask for. */
  readonly exportName?: string;
  /** Refuse writes even if the backend takes them. */
  readonly readOnly?: boolean;
  /** Called with what went wrong on a connection (protocol violations, socket errors). */
  readonly onConnectionError?: (err: Error, client: string) => void;
}

/** NBD error values for the core's error codes. */
function errnoOf(err: unknown): number {
  switch ((err as { code?: string } | null)?.code) {
    case 'EROFS':
    case 'EACCES':
    case 'EPERM':
      return NbdErrno.EPERM;
    case 'ENOSPC':
      return NbdErrno.ENOSPC;
    case 'EINVAL':
    case 'ERANGE':
      return NbdErrno.EINVAL;
    case 'ENOTSUP':
      return NbdErrno.ENOTSUP;
    case 'ENOMEM':
      return NbdErrno.ENOMEM;
    case 'ESHUTDOWN':
      return NbdErrno.ESHUTDOWN;
    default:
      return NbdErrno.EIO;
  }
}

/** Power of two at or above n. */
function pow2(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/** What a connection needs to know about the export; fixed at construction. */
interface ExportFacts {
  readonly name: string;
  readonly size: number;
  /** Transmission flags (structured replies aside: SEND_DF goes only with them). */
  readonly flags: number;
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly readOnly: boolean;
}

export class NbdServer {
  readonly #backend: GatedBackend;
  /** @internal */
  readonly export: ExportFacts;
  readonly #onError?: (err: Error, client: string) => void;
  readonly #servers: net.Server[] = [];
  readonly #connections = new Set<ServerConnection>();
  #closing = false;
  #served = 0;

  constructor(image: BlockBackend, options: NbdServerOptions = {}) {
    // Behind the request gate (registry images are already): every request fits the image's limits.
    const backend = gateBackend(image);
    this.#backend = backend;
    this.#onError = options.onConnectionError;
    const readOnly = options.readOnly === true || backend.readOnly;
    const minBlock = Math.min(65536, backend.limits.requestAlignment);
    // SEND_FAST_ZERO always: a fast zero the image cannot do gets ENOTSUP (allowed by proto.md).
    let flags =
      Flag.HAS_FLAGS |
      Flag.SEND_FLUSH |
      Flag.SEND_FUA |
      Flag.CAN_MULTI_CONN |
      Flag.SEND_WRITE_ZEROES |
      Flag.SEND_DF |
      Flag.SEND_FAST_ZERO;
    if (backend.canDiscard) flags |= Flag.SEND_TRIM;
    if (readOnly) flags |= Flag.READ_ONLY;
    this.export = {
      name: options.exportName ?? '',
      size: backend.size,
      flags,
      minBlock,
      readOnly,
      preferredBlock: Math.max(minBlock, 4096, pow2(backend.limits.preferredAlignment ?? 1)),
    };
  }

  get exportName(): string {
    return this.export.name;
  }

  /** Clients connected now, and served since the start. */
  get stats(): { connected: number; served: number } {
    return { connected: this.#connections.size, served: this.#served };
  }

  /** Listens on a Unix socket path or a TCP host and port; resolves once listening. */
  async listen(where: { path: string } | { host: string; port: number }): Promise<net.AddressInfo | string> {
    // allowHalfOpen: a client may shut its side after DISC and still be owed replies.
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.#accept(socket));
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if ('path' in where) server.listen(where.path, resolve);
      else server.listen(where.port, where.host, resolve);
    });
    server.on('error', (err) => this.#onError?.(err, 'listener'));
    this.#servers.push(server);
    return server.address()!;
  }

  /**
   * Stops listening, lets every connection finish the requests it has (new ones get
   * ESHUTDOWN), then closes them. Does not close the backend.
   */
  async close(): Promise<void> {
    this.#closing = true;
    await Promise.all([
      ...this.#servers.map((s) => new Promise<void>((r) => s.close(() => r()))),
      ...[...this.#connections].map((c) => c.shutdown()),
    ]);
  }

  #accept(socket: net.Socket): void {
    if (this.#closing) {
      socket.destroy();
      return;
    }
    this.#served++;
    const conn = new ServerConnection(socket, this, this.#backend, `client ${this.#served}`);
    this.#connections.add(conn);
    socket.once('close', () => this.#connections.delete(conn));
  }

  /** @internal */
  get closing(): boolean {
    return this.#closing;
  }

  /** @internal */
  reportError(err: Error, client: string): void {
    this.#onError?.(err, client);
  }
}

/** What the reader is filling its sink for. */
enum Want {
  ClientFlags,
  OptionHeader,
  OptionData,
  RequestHeader,
  WriteData,
}

class ServerConnection {
  readonly #socket: net.Socket;
  readonly #server: NbdServer;
  readonly #backend: GatedBackend;
  readonly #name: string;
  readonly #reader = new SinkReader(
    () => this.#advance(),
    () => this.#violation('bytes the protocol did not ask for'),
  );
  #want: Want = Want.ClientFlags;
  readonly #small = Buffer.alloc(REQUEST_SIZE);
  #option = 0;
  #noZeroes = false;
  #structured = false;
  #allocation = false;
  /** The write request whose payload is being read; `refuse`: the error to answer once it is. */
  #write: { flags: number; cookie: Buffer; offset: number; data: Buffer; refuse?: [number, string] } | null = null;
  /** Requests taken and not yet answered (a write counts from its header on). */
  #inFlight = 0;
  #pendingBytes = 0;
  #paused = false;
  #disconnecting = false;
  /** Waiting for this connection to have no request in flight (shutdown). */
  readonly #idle: (() => void)[] = [];

  constructor(socket: net.Socket, server: NbdServer, backend: GatedBackend, name: string) {
    this.#socket = socket;
    this.#server = server;
    this.#backend = backend;
    this.#name = name;
    socket.setNoDelay(true);
    socket.on('error', (err) => this.#server.reportError(err, this.#name));
    socket.on('data', (chunk: Buffer) => this.#reader.feed(chunk));
    socket.once('close', () => {
      this.#reader.stop();
      this.#wake();
    });
    // The client half-closed: once its requests are answered, close ours too.
    socket.on('end', () => {
      this.#disconnecting = true;
      this.#reader.stop();
      if (this.#inFlight === 0) this.#end();
    });
    const greeting = Buffer.alloc(18);
    greeting.writeBigUInt64BE(NBDMAGIC, 0);
    greeting.writeBigUInt64BE(IHAVEOPT, 8);
    greeting.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    socket.write(greeting);
    this.#expect(Want.ClientFlags, this.#small, 0, 4);
  }

  /**
   * Server shutdown: waits for the requests in flight (SHUTDOWN_GRACE_MS at most), then
   * closes; resolves once the socket is closed, dropping it if the client does not close.
   */
  async shutdown(): Promise<void> {
    if (this.#socket.destroyed) return;
    const closed = new Promise<void>((r) => this.#socket.once('close', () => r()));
    const grace = setTimeout(() => this.#socket.destroy(), SHUTDOWN_GRACE_MS);
    if (this.#inFlight > 0) await new Promise<void>((r) => this.#idle.push(r));
    this.#end();
    // A client that neither reads nor closes: its socket goes after a little more.
    clearTimeout(grace);
    const drop = setTimeout(() => this.#socket.destroy(), 2000);
    await closed;
    clearTimeout(drop);
  }

  #wake(): void {
    for (const r of this.#idle.splice(0)) r();
  }

  #end(): void {
    if (!this.#socket.writableEnded) this.#socket.end();
  }

  /** Replies may still be written: the socket is neither destroyed nor ended by us. */
  get #writable(): boolean {
    return !this.#socket.destroyed && !this.#socket.writableEnded;
  }

  #expect(want: Want, sink: Uint8Array, start: number, end: number): void {
    this.#want = want;
    this.#reader.expect(sink, start, end, want === Want.WriteData);
  }

  #violation(what: string): void {
    this.#server.reportError(new Error(`protocol error: ${what}`), this.#name);
    this.#reader.stop();
    this.#socket.destroy();
  }

  #advance(): void {
    switch (this.#want) {
      case Want.ClientFlags: {
        const flags = this.#small.readUInt32BE(0);
        if (!(flags & FLAG_FIXED_NEWSTYLE))
          return this.#violation('the client does not speak fixed newstyle negotiation');
        this.#noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
        return this.#expect(Want.OptionHeader, this.#small, 0, 16);
      }
      case Want.OptionHeader: {
        if (this.#small.readBigUInt64BE(0) !== IHAVEOPT) return this.#violation('bad option magic');
        this.#option = this.#small.readUInt32BE(8);
        const length = this.#small.readUInt32BE(12);
        if (length > MAX_OPTION) return this.#violation(`option ${this.#option} of ${length} bytes`);
        return this.#expect(Want.OptionData, Buffer.alloc(length), 0, length);
      }
      case Want.OptionData:
        return this.#onOption(this.#option, this.#reader.sink as Buffer);
      case Want.RequestHeader:
        return this.#onRequest();
      case Want.WriteData: {
        const w = this.#write!;
        this.#write = null;
        this.#expectRequest();
        if (w.refuse) {
          this.#release(w.data.length);
          this.#error(w.cookie, w.refuse[0], w.refuse[1]);
          return this.#done();
        }
        void this.#serve(
          w.cookie,
          () => this.#backend.write(w.offset, w.data, { fua: (w.flags & CommandFlag.FUA) !== 0 }),
          w.data.length,
          true,
        );
        return;
      }
    }
  }

  // ---- negotiation ----

  #optionReply(type: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(20);
    h.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
    h.writeUInt32BE(this.#option, 8);
    h.writeUInt32BE(type >>> 0, 12);
    h.writeUInt32BE(data.length, 16);
    this.#socket.write(data.length ? Buffer.concat([h, data]) : h);
  }

  #optionError(type: number, message: string): void {
    this.#optionReply(type, Buffer.from(message.slice(0, MAX_STRING), 'utf8'));
  }

  /** The export name at the start of an option's data, or undefined if malformed. */
  #nameIn(data: Buffer): { name: string; end: number } | undefined {
    if (data.length < 4) return undefined;
    const n = data.readUInt32BE(0);
    if (n > MAX_STRING || 4 + n > data.length) return undefined;
    return { name: data.toString('utf8', 4, 4 + n), end: 4 + n };
  }

  #onOption(option: number, data: Buffer): void {
    const exp = this.#server.export;
    const next = (): void => this.#expect(Want.OptionHeader, this.#small, 0, 16);
    switch (option) {
      case Option.EXPORT_NAME: {
        if (data.toString('utf8') !== exp.name)
          return this.#violation(`no export named "${data.toString('utf8')}" (EXPORT_NAME)`);
        const out = Buffer.alloc(10 + (this.#noZeroes ? 0 : 124));
        out.writeBigUInt64BE(BigInt(exp.size), 0);
        out.writeUInt16BE(this.#transmissionFlags(), 8);
        this.#socket.write(out);
        return this.#startTransmission();
      }
      case Option.ABORT:
        this.#optionReply(OptionReply.ACK);
        this.#socket.end();
        return;
      case Option.LIST: {
        const name = Buffer.from(exp.name, 'utf8');
        const d = Buffer.alloc(4 + name.length);
        d.writeUInt32BE(name.length, 0);
        name.copy(d, 4);
        this.#optionReply(OptionReply.SERVER, d);
        this.#optionReply(OptionReply.ACK);
        return next();
      }
      case Option.STRUCTURED_REPLY:
        if (data.length !== 0) this.#optionError(OptionError.INVALID, 'STRUCTURED_REPLY takes no data');
        else {
          this.#structured = true;
          this.#optionReply(OptionReply.ACK);
        }
        return next();
      case Option.LIST_META_CONTEXT:
      case Option.SET_META_CONTEXT: {
        const set = option === Option.SET_META_CONTEXT;
        const parsed = this.#nameIn(data);
        if (!parsed || parsed.end + 4 > data.length) {
          this.#optionError(OptionError.INVALID, 'malformed meta context option');
          return next();
        }
        if (set && !this.#structured) {
          this.#optionError(OptionError.INVALID, 'SET_META_CONTEXT needs structured replies first');
          return next();
        }
        if (parsed.name !== exp.name) {
          this.#optionError(OptionError.UNKNOWN, `no export named "${parsed.name}"`);
          return next();
        }
        const count = data.readUInt32BE(parsed.end);
        let p = parsed.end + 4;
        let selected = false;
        const queries: string[] = [];
        for (let i = 0; i < count; i++) {
          if (p + 4 > data.length) break;
          const n = data.readUInt32BE(p);
          if (n > MAX_STRING || p + 4 + n > data.length) break;
          queries.push(data.toString('utf8', p + 4, p + 4 + n));
          p += 4 + n;
        }
        const wants = (q: string): boolean => q === BASE_ALLOCATION || (!set && (q === 'base:' || q === ''));
        if ((count === 0 && !set) || queries.some(wants)) {
          const name = Buffer.from(BASE_ALLOCATION, 'utf8');
          const d = Buffer.alloc(4 + name.length);
          d.writeUInt32BE(ALLOCATION_ID, 0);
          name.copy(d, 4);
          this.#optionReply(OptionReply.META_CONTEXT, d);
          selected = true;
        }
        if (set) this.#allocation = selected;
        this.#optionReply(OptionReply.ACK);
        return next();
      }
      case Option.INFO:
      case Option.GO: {
        const parsed = this.#nameIn(data);
        if (!parsed || parsed.end + 2 > data.length) {
          this.#optionError(OptionError.INVALID, 'malformed INFO/GO option');
          return next();
        }
        if (parsed.name !== exp.name) {
          this.#optionError(OptionError.UNKNOWN, `no export named "${parsed.name}"`);
          return next();
        }
        const info = Buffer.alloc(12);
        info.writeUInt16BE(Info.EXPORT, 0);
        info.writeBigUInt64BE(BigInt(exp.size), 2);
        info.writeUInt16BE(this.#transmissionFlags(), 10);
        this.#optionReply(OptionReply.INFO, info);
        const sizes = Buffer.alloc(14);
        sizes.writeUInt16BE(Info.BLOCK_SIZE, 0);
        sizes.writeUInt32BE(exp.minBlock, 2);
        sizes.writeUInt32BE(exp.preferredBlock, 6);
        sizes.writeUInt32BE(MAX_PAYLOAD, 10);
        this.#optionReply(OptionReply.INFO, sizes);
        this.#optionReply(OptionReply.ACK);
        if (option === Option.GO) return this.#startTransmission();
        return next();
      }
      case Option.STARTTLS:
        this.#optionError(OptionError.UNSUP, 'this server does not speak TLS');
        return next();
      default:
        this.#optionError(OptionError.UNSUP, `option ${option} is not supported`);
        return next();
    }
  }

  #transmissionFlags(): number {
    const f = this.#server.export.flags;
    return this.#structured ? f : f & ~Flag.SEND_DF;
  }

  #startTransmission(): void {
    this.#expectRequest();
  }

  // ---- transmission ----

  #expectRequest(): void {
    this.#expect(Want.RequestHeader, this.#small, 0, REQUEST_SIZE);
  }

  #onRequest(): void {
    const h = this.#small;
    if (h.readUInt32BE(0) !== REQUEST_MAGIC)
      return this.#violation(`bad request magic 0x${h.readUInt32BE(0).toString(16)}`);
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const cookie = Buffer.from(h.subarray(8, 16));
    const high = h.readUInt32BE(16);
    const offset = high >= 0x200000 ? Infinity : high * 0x100000000 + h.readUInt32BE(20);
    const length = h.readUInt32BE(24);
    const exp = this.#server.export;
    if (type === Command.DISC) {
      this.#disconnecting = true;
      this.#reader.stop();
      if (this.#inFlight === 0) this.#end();
      return;
    }
    const inside = offset + length <= exp.size;
    if (type === Command.WRITE) {
      // The payload is read whatever the answer, so that the next request is found.
      if (length > MAX_PAYLOAD) return this.#violation(`write of ${length} bytes (at most ${MAX_PAYLOAD})`);
      const refuse: [number, string] | undefined = this.#server.closing
        ? [NbdErrno.ESHUTDOWN, 'the server is shutting down']
        : exp.readOnly
          ? [NbdErrno.EPERM, 'the export is read-only']
          : !inside
            ? [NbdErrno.EINVAL, `write at ${offset} (+${length}) past the end (${exp.size})`]
            : undefined;
      const data = Buffer.allocUnsafe(length);
      this.#write = { flags, cookie, offset, data, refuse };
      this.#inFlight++;
      this.#hold(length);
      return this.#expect(Want.WriteData, data, 0, length);
    }
    this.#expectRequest();
    if (this.#server.closing) return this.#error(cookie, NbdErrno.ESHUTDOWN, 'the server is shutting down');
    switch (type) {
      case Command.READ: {
        // A read above the maximum payload is refused, not a reason to disconnect (proto.md).
        if (length > MAX_PAYLOAD)
          return this.#error(
            cookie,
            this.#structured ? NbdErrno.EOVERFLOW : NbdErrno.EINVAL,
            `read of ${length} bytes (at most ${MAX_PAYLOAD})`,
          );
        if (!inside)
          return this.#error(cookie, NbdErrno.EINVAL, `read at ${offset} (+${length}) past the end (${exp.size})`);
        this.#hold(length);
        void this.#serveRead(cookie, offset, length);
        return;
      }
      case Command.FLUSH:
        void this.#serve(cookie, () => this.#backend.flush(), 0);
        return;
      case Command.TRIM:
        if (!inside) return this.#error(cookie, NbdErrno.EINVAL, 'trim past the end');
        void this.#serve(cookie, () => (exp.readOnly ? refusedReadOnly() : this.#backend.discard(offset, length)), 0);
        return;
      case Command.WRITE_ZEROES:
        if (!inside) return this.#error(cookie, NbdErrno.EINVAL, 'write zeroes past the end');
        {
          // FAST_ZERO: only an image that can zero fast gets it; else ENOTSUP, nothing changed.
          const fast = (flags & CommandFlag.FAST_ZERO) !== 0;
          if (fast && this.#backend.canFastZero !== true)
            return this.#error(cookie, NbdErrno.ENOTSUP, 'zeroing is not faster than writing here');
          void this.#serve(
            cookie,
            () =>
              exp.readOnly
                ? refusedReadOnly()
                : this.#backend.writeZeroes(offset, length, { mayUnmap: !(flags & CommandFlag.NO_HOLE), fast }),
            0,
          );
        }
        return;
      case Command.BLOCK_STATUS:
        if (!this.#allocation) return this.#error(cookie, NbdErrno.EINVAL, 'no metadata context was selected');
        if (!inside || length === 0) return this.#error(cookie, NbdErrno.EINVAL, 'block status outside the export');
        void this.#serveStatus(cookie, offset, length, (flags & CommandFlag.REQ_ONE) !== 0);
        return;
      case Command.CACHE:
        return this.#simple(cookie, 0);
      default:
        return this.#error(cookie, NbdErrno.EINVAL, `unknown command ${type}`);
    }
  }

  /** Counts a request's bytes against MAX_PENDING; stops reading the socket beyond it. */
  #hold(bytes: number): void {
    this.#pendingBytes += bytes;
    if (!this.#paused && this.#pendingBytes > MAX_PENDING) {
      this.#paused = true;
      this.#socket.pause();
    }
  }

  #release(bytes: number): void {
    this.#pendingBytes -= bytes;
    if (this.#paused && this.#pendingBytes <= MAX_PENDING / 2) {
      this.#paused = false;
      this.#socket.resume();
    }
  }

  /** Runs `op` and answers; `counted`: the request is already in #inFlight (a write). */
  async #serve(cookie: Buffer, op: () => Promise<void>, held: number, counted = false): Promise<void> {
    if (!counted) this.#inFlight++;
    try {
      await op();
      this.#simple(cookie, 0);
    } catch (err) {
      this.#error(cookie, errnoOf(err), (err as Error).message);
    } finally {
      this.#release(held);
      this.#done();
    }
  }

  async #serveRead(cookie: Buffer, offset: number, length: number): Promise<void> {
    this.#inFlight++;
    // The read's bytes count against MAX_PENDING until the kernel took them, so that a
    // client that asks much and reads slowly cannot make replies pile up here.
    let held = length;
    try {
      const data = Buffer.allocUnsafe(length);
      await this.#backend.read(offset, length, data);
      if (!this.#writable) return;
      const sent = (): void => this.#release(length);
      if (this.#structured) {
        const h = Buffer.alloc(28);
        h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
        h.writeUInt16BE(REPLY_FLAG_DONE, 4);
        h.writeUInt16BE(ReplyType.OFFSET_DATA, 6);
        cookie.copy(h, 8);
        h.writeUInt32BE(length + 8, 16);
        h.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
        h.writeUInt32BE(offset >>> 0, 24);
        this.#socket.cork();
        this.#socket.write(h);
        this.#socket.write(data, sent);
        this.#socket.uncork();
      } else {
        this.#socket.cork();
        this.#simple(cookie, 0);
        this.#socket.write(data, sent);
        this.#socket.uncork();
      }
      held = 0;
    } catch (err) {
      // Without structured replies a failed read has no payload: the simple reply says so.
      this.#error(cookie, errnoOf(err), (err as Error).message);
    } finally {
      this.#release(held);
      this.#done();
    }
  }

  async #serveStatus(cookie: Buffer, offset: number, length: number, one: boolean): Promise<void> {
    this.#inFlight++;
    try {
      const pairs: number[] = [];
      const end = offset + length;
      for await (const e of mapImage(this.#backend, offset, length)) {
        const n = Math.min(
          e.length,
          0xffffffff - (0xffffffff % this.#server.export.minBlock),
          one ? end - e.start : Infinity,
        );
        pairs.push(n, e.data ? 0 : State.HOLE | State.ZERO);
        if (one || pairs.length / 2 >= MAX_EXTENTS || e.start + n >= end) break;
      }
      const d = Buffer.alloc(20 + 4 + pairs.length * 4);
      d.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
      d.writeUInt16BE(REPLY_FLAG_DONE, 4);
      d.writeUInt16BE(ReplyType.BLOCK_STATUS, 6);
      cookie.copy(d, 8);
      d.writeUInt32BE(4 + pairs.length * 4, 16);
      d.writeUInt32BE(ALLOCATION_ID, 20);
      for (let i = 0; i < pairs.length; i++) d.writeUInt32BE(pairs[i]!, 24 + 4 * i);
      if (this.#writable) this.#socket.write(d);
    } catch (err) {
      this.#error(cookie, errnoOf(err), (err as Error).message);
    } finally {
      this.#done();
    }
  }

  #done(): void {
    this.#inFlight--;
    if (this.#inFlight === 0) {
      if (this.#disconnecting) this.#end();
      this.#wake();
    }
  }

  #simple(cookie: Buffer, error: number): void {
    if (!this.#writable) return;
    const r = Buffer.alloc(16);
    r.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    r.writeUInt32BE(error, 4);
    cookie.copy(r, 8);
    this.#socket.write(r);
  }

  /** An error reply: a structured error chunk with the message when negotiated, else simple. */
  #error(cookie: Buffer, errno: number, message: string): void {
    if (!this.#writable) return;
    if (!this.#structured) return this.#simple(cookie, errno);
    const msg = Buffer.from(message, 'utf8').subarray(0, MAX_STRING);
    const d = Buffer.alloc(20 + 6 + msg.length);
    d.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    d.writeUInt16BE(REPLY_FLAG_DONE, 4);
    d.writeUInt16BE(ReplyType.ERROR, 6);
    cookie.copy(d, 8);
    d.writeUInt32BE(6 + msg.length, 16);
    d.writeUInt32BE(errno, 20);
    d.writeUInt16BE(msg.length, 24);
    msg.copy(d, 26);
    this.#socket.write(d);
  }
}

function refusedReadOnly(): Promise<void> {
  return Promise.reject(Object.assign(new Error('the export is read-only'), { code: 'EROFS' }));
}
