/**
 * The "http" protocol: an image at an http:// or https:// URL, read-only.
 *
 * At open, a HEAD (redirects followed, up to 10) tells the size and whether the server
 * takes Range requests; a GET of one byte settles it when HEAD is silent or refused.
 * Then:
 * - with Range: every read is one `GET Range: bytes=a-b`, several in flight over
 *   keep-alive connections (connections=N, default 4); a transient failure (connection
 *   reset, timeout, 5xx, 429, a body cut short) is retried with backoff from the byte
 *   the failed response reached (retries=N, default 5);
 * - without Range: the image is one stream (HttpStreamBackend). Reads must come in
 *   ascending order, as a convert of a raw image makes them; the last LOOKBEHIND bytes
 *   are kept so that reads a little behind (a format probe, workers finishing out of
 *   order) still work. A read further behind fails with ENOTSUP naming why: formats
 *   that need random access (qcow2) cannot be read from such a server. A failed stream
 *   is restarted and skipped forward to where it was.
 * Credentials come from the URL (user:password@) or the options user= and
 * password-file=, go out as Basic authentication (not to another host after a
 * redirect), and are never printed. TLS verifies against the system's CA store
 * (/etc/ssl/certs/ca-certificates.crt) plus ca=FILE.
 */
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import {
  BLOCK_API_VERSION,
  BlockError,
  redactLocation,
  registerSecret,
  type BlockBackend,
  type BlockLimits,
  type Extent,
  type OpenOptions,
  type ProtocolDriver,
} from '@blockconv/core';

const MiB = 1024 * 1024;
const DEFAULT_CONNECTIONS = 4;
const MAX_CONNECTIONS = 32;
const DEFAULT_TIMEOUT_S = 30;
const DEFAULT_RETRIES = 5;
const MAX_REDIRECTS = 10;
/** Bytes of a Range-less stream kept behind its position, for reads that come late. */
const LOOKBEHIND = 32 * MiB;
const SYSTEM_CA = '/etc/ssl/certs/ca-certificates.crt';

const LIMITS: BlockLimits = { requestAlignment: 1, maxTransfer: 32 * MiB, optimalTransfer: 2 * MiB };

export interface HttpOptions {
  readonly connections: number;
  readonly timeoutMs: number;
  readonly retries: number;
  /** Extra CA certificates (PEM) besides the system's. */
  readonly ca?: string;
  readonly user?: string;
  readonly password?: string;
}

interface Where {
  op: string;
  location: string;
  offset?: number;
  length?: number;
}

/** An error worth retrying: the server or the network may do better on the next try. */
class TransientError extends Error {
  constructor(
    message: string,
    readonly code: string,
  ) {
    super(message);
  }
}

function invalid(location: string, what: string, field?: string): BlockError {
  return new BlockError('EINVAL', what, { op: 'open', location, field });
}

function wholeOption(
  options: Readonly<Record<string, string>> | undefined,
  name: string,
  dflt: number,
  min: number,
  max: number,
  location: string,
): number {
  const v = options?.[name];
  if (v === undefined) return dflt;
  if (!/^\d+$/.test(v) || Number(v) < min || Number(v) > max)
    throw invalid(location, `${name}=${v}: expected a whole number from ${min} to ${max}`, name);
  return Number(v);
}

function readSecretFile(file: string, what: string, location: string): string {
  try {
    return fs.readFileSync(file, 'utf8').split('\n')[0]!.replace(/\r$/, '');
  } catch (err) {
    throw new BlockError(
      'EACCES',
      `cannot read the ${what} file ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
      { op: 'open', location },
    );
  }
}

/** The driver's options and the URL's credentials, checked. */
export function httpOptions(
  url: URL,
  options: Readonly<Record<string, string>> | undefined,
  location: string,
): HttpOptions {
  let ca: string | undefined;
  if (options?.ca !== undefined) {
    try {
      ca = fs.readFileSync(options.ca, 'utf8');
    } catch (err) {
      throw new BlockError(
        'EACCES',
        `cannot read the CA file ${options.ca}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
        { op: 'open', location, field: 'ca' },
      );
    }
    if (!ca.includes('-----BEGIN CERTIFICATE-----'))
      throw invalid(location, `ca=${options.ca}: no PEM certificate in it`, 'ca');
  }
  let user = url.username ? decodeURIComponent(url.username) : options?.user;
  let password = url.password ? decodeURIComponent(url.password) : undefined;
  if (password === undefined && options?.['password-file'])
    password = readSecretFile(options['password-file'], 'password', location);
  if (password !== undefined && user === undefined) user = '';
  if (password !== undefined) registerSecret(password);
  return {
    connections: wholeOption(options, 'connections', DEFAULT_CONNECTIONS, 1, MAX_CONNECTIONS, location),
    timeoutMs: wholeOption(options, 'timeout', DEFAULT_TIMEOUT_S, 0, 86400, location) * 1000,
    retries: wholeOption(options, 'retries', DEFAULT_RETRIES, 0, 100, location),
    ca,
    user,
    password,
  };
}

/** Loads the system's CA bundle once (Node's own list is Mozilla's, not the system's). */
let systemCa: string | null | undefined;
function caList(extra?: string): string[] | undefined {
  if (systemCa === undefined) {
    try {
      systemCa = fs.readFileSync(SYSTEM_CA, 'utf8');
    } catch {
      systemCa = null;
    }
  }
  const out = [systemCa, extra].filter((x): x is string => typeof x === 'string');
  return out.length ? out : undefined;
}

const STATUS_TEXT = (status: number): string => `HTTP ${status} ${http.STATUS_CODES[status] ?? ''}`.trim();

/** The error for a status that will not change by retrying. */
function statusError(status: number, where: Where): BlockError {
  if (status === 404 || status === 410)
    return new BlockError('ENOENT', `${STATUS_TEXT(status)}: no image at this URL`, where);
  if (status === 401)
    return new BlockError(
      'EACCES',
      `${STATUS_TEXT(status)}: the server wants credentials (user:password@ in the URL, or the options user= and password-file=)`,
      where,
    );
  if (status === 403) return new BlockError('EACCES', `${STATUS_TEXT(status)}: the server refuses access`, where);
  if (status === 412)
    return new BlockError(
      'EIO',
      `${STATUS_TEXT(status)}: the image changed on the server since it was opened (another ETag or date): its parts would not fit together`,
      where,
    );
  if (status === 416)
    return new BlockError(
      'EINVAL',
      `${STATUS_TEXT(status)}: the server refused the range (did the image shrink?)`,
      where,
    );
  return new BlockError('EIO', `${STATUS_TEXT(status)}`, where);
}

function transientStatus(status: number): boolean {
  return status === 429 || status === 408 || (status >= 500 && status <= 599 && status !== 501 && status !== 505);
}

/** A network error as a BlockError, or a TransientError when a retry may help. */
function networkError(err: NodeJS.ErrnoException, host: string): Error {
  const code = err.code ?? '';
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return new BlockError('ENOTFOUND', `unknown host ${host}`);
  if (/CERT|SSL|TLS|SELF_SIGNED|UNABLE_TO_VERIFY|ERR_TLS/.test(code)) {
    return new BlockError('EIO', `TLS: ${err.message} (give the server's CA with ca=FILE)`);
  }
  if (code === 'ECONNREFUSED') return new TransientError(`connection refused by ${host}`, 'ECONNREFUSED');
  if (code === 'ETIMEDOUT') return new TransientError(err.message, 'ETIMEDOUT');
  return new TransientError(
    err.message || code || 'connection failed',
    code === 'EPIPE' ? 'ECONNRESET' : code || 'ECONNRESET',
  );
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(resolve, ms);
    signal?.addEventListener(
      'abort',
      () => {
        clearTimeout(t);
        reject(signal.reason);
      },
      { once: true },
    );
  });
}

/** 250 ms, doubling, at most 8 s, with ±25 % jitter so that connections do not retry in step. */
function backoff(attempt: number): number {
  return Math.min(8000, 250 * 2 ** attempt) * (0.75 + Math.random() * 0.5);
}

/** One server endpoint after redirects, with its agent and credentials. */
export class HttpClient {
  #url: URL;
  readonly #options: HttpOptions;
  readonly #agent: http.Agent;
  #auth?: string;
  #authHost: string;
  /** Sent with every GET once open: the image must still be the version it opened (ETag, else Last-Modified). */
  #precondition: Record<string, string> = {};
  retries = 0;

  /** The image's size once open (Content-Range totals must agree). */
  #size = -1;

  set size(n: number) {
    this.#size = n;
  }

  constructor(url: URL, options: HttpOptions) {
    this.#url = new URL(url.href);
    this.#url.username = '';
    this.#url.password = '';
    this.#options = options;
    const tls = url.protocol === 'https:';
    this.#agent = tls
      ? new https.Agent({ keepAlive: true, maxSockets: options.connections, ca: caList(options.ca) })
      : new http.Agent({ keepAlive: true, maxSockets: options.connections });
    if (options.user !== undefined || options.password !== undefined) {
      this.#auth = `Basic ${Buffer.from(`${options.user ?? ''}:${options.password ?? ''}`).toString('base64')}`;
    }
    this.#authHost = url.host;
  }

  get url(): URL {
    return this.#url;
  }

  get retryLimit(): number {
    return this.#options.retries;
  }

  get timeoutMs(): number {
    return this.#options.timeoutMs;
  }

  /** From now on a GET asks for this version only; a server with another answers 412. */
  pin(identity: { etag?: string; lastModified?: string }): void {
    if (identity.etag && !identity.etag.startsWith('W/')) this.#precondition = { 'if-match': identity.etag };
    else if (identity.lastModified) this.#precondition = { 'if-unmodified-since': identity.lastModified };
  }

  /** Sends one request; resolves with the response (body unread). No retries here. */
  send(method: 'GET' | 'HEAD', headers: Record<string, string>, url: URL = this.#url): Promise<http.IncomingMessage> {
    return new Promise((resolve, reject) => {
      const h: Record<string, string> = {
        'accept-encoding': 'identity',
        'user-agent': 'blockconv',
        ...(method === 'GET' ? this.#precondition : {}),
        ...headers,
      };
      // Credentials go to the host they were given for, never to another after a redirect.
      if (this.#auth && url.host === this.#authHost) h.authorization = this.#auth;
      const mod = url.protocol === 'https:' ? https : http;
      if (url.protocol !== this.#url.protocol) {
        reject(
          new BlockError('ENOTSUP', `a redirect to ${url.protocol}// from ${this.#url.protocol}// is not followed`),
        );
        return;
      }
      const req = mod.request(url, { method, headers: h, agent: this.#agent }, resolve);
      if (this.#options.timeoutMs > 0) {
        req.setTimeout(this.#options.timeoutMs, () =>
          req.destroy(
            Object.assign(new Error(`no answer from ${url.host} for ${this.#options.timeoutMs / 1000} s`), {
              code: 'ETIMEDOUT',
            }),
          ),
        );
      }
      req.on('error', (err) => reject(networkError(err, url.host)));
      req.end();
    });
  }

  /** Follows redirects from the URL given at open; later requests go to where it ended. */
  async resolve(): Promise<{ response: http.IncomingMessage; method: 'HEAD' | 'GET' }> {
    let url = this.#url;
    let method: 'HEAD' | 'GET' = 'HEAD';
    for (let hop = 0; ; hop++) {
      const res = await this.send(method, method === 'GET' ? { range: 'bytes=0-0' } : {}, url);
      const status = res.statusCode ?? 0;
      if ([301, 302, 303, 307, 308].includes(status) && res.headers.location) {
        res.resume();
        if (hop >= MAX_REDIRECTS) throw new BlockError('EIO', `more than ${MAX_REDIRECTS} redirects`);
        url = new URL(res.headers.location, url);
        continue;
      }
      // Servers that do not answer HEAD (405, 501): ask for one byte instead.
      if (method === 'HEAD' && (status === 405 || status === 501 || status === 403)) {
        res.resume();
        method = 'GET';
        continue;
      }
      this.#url = url;
      return { response: res, method };
    }
  }

  destroy(): void {
    this.#agent.destroy();
  }

  /**
   * One GET of [offset, offset + length) into `into`: the bytes that arrived, and why the
   * body stopped short (`cut`) if it did. Throws TransientError for what a retry may fix.
   */
  async getRange(
    offset: number,
    length: number,
    into: Uint8Array,
    where: Where,
  ): Promise<{ got: number; cut?: Error }> {
    const res = await this.send('GET', { range: `bytes=${offset}-${offset + length - 1}` });
    const status = res.statusCode ?? 0;
    if (status !== 206) {
      // A 200 carries the whole image: drop the connection rather than drain it.
      if (status === 200) res.destroy();
      else res.resume();
      if (status === 200)
        throw new BlockError('EIO', 'the server ignored the Range header (answered 200 with the whole image)', where);
      if (transientStatus(status)) throw new TransientError(STATUS_TEXT(status), 'EIO');
      throw statusError(status, where);
    }
    const range = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(String(res.headers['content-range'] ?? ''));
    if (
      !range ||
      Number(range[1]) !== offset ||
      Number(range[2]) < offset ||
      Number(range[2]) > offset + length - 1 ||
      (range[3] !== '*' && Number(range[3]) !== this.#size)
    ) {
      res.resume();
      throw new BlockError(
        'EIO',
        `the server answered another range (${res.headers['content-range'] ?? 'none'}) than asked (bytes ${offset}-${offset + length - 1})`,
        where,
      );
    }
    const want = Number(range[2]) - offset + 1;
    let got = 0;
    let cut: Error | undefined;
    await new Promise<void>((resolve) => {
      res.on('data', (chunk: Buffer) => {
        const n = Math.min(chunk.length, want - got);
        chunk.copy(into, got, 0, n);
        got += n;
      });
      res.once('end', () => resolve());
      // A body cut short (reset, timeout): what arrived counts; the caller retries the rest.
      res.once('error', (err) => {
        cut = err;
        resolve();
      });
      res.once('close', () => resolve());
    });
    if (!cut && got < want) cut = new Error(`the response ended after ${got} of ${want} bytes`);
    return { got, cut };
  }
}

/** Runs `attempt` until it succeeds, retrying transient failures with backoff (the attempt itself resumes where the last stopped). */
async function withRetries<T>(
  client: HttpClient,
  where: Where,
  attempt: (n: number) => Promise<T>,
  signal?: AbortSignal,
): Promise<T> {
  for (let n = 0; ; n++) {
    try {
      return await attempt(n);
    } catch (err) {
      if (!(err instanceof TransientError) || n >= client.retryLimit) {
        if (err instanceof BlockError)
          throw err.location ? err : new BlockError(err.code, err.message, { ...where, cause: err });
        const code = (err as { code?: string }).code;
        const suffix = n > 0 ? ` (after ${n} ${n === 1 ? 'retry' : 'retries'})` : '';
        throw new BlockError(
          code === 'ETIMEDOUT' || code === 'ECONNREFUSED' ? code : code === 'EIO' ? 'EIO' : 'ECONNRESET',
          `${(err as Error).message}${suffix}`,
          { ...where, cause: err },
        );
      }
      client.retries++;
      await sleep(backoff(n), signal);
    }
  }
}

abstract class HttpBase {
  readonly driverName = 'http';
  readonly location: string;
  readonly size: number;
  readonly readOnly = true;
  readonly readOnlyReason = 'http:// and https:// images are read-only';
  readonly limits = LIMITS;
  readonly canZero = false;
  readonly canDiscard = false;
  readonly zeroInitialized = false;
  readonly canCompress = false;
  readonly canBlockStatus = false;
  readonly canReadHolesCheaply = false;
  protected readonly client: HttpClient;
  readonly #identity: { etag?: string; lastModified?: string };

  constructor(client: HttpClient, location: string, size: number, identity: { etag?: string; lastModified?: string }) {
    this.client = client;
    this.location = location;
    this.size = size;
    this.#identity = identity;
  }

  abstract read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array>;

  write(offset: number): Promise<void> {
    return Promise.reject(
      new BlockError('EROFS', this.readOnlyReason, { op: 'write', location: this.location, offset }),
    );
  }

  writeZeroes(offset: number): Promise<void> {
    return Promise.reject(
      new BlockError('EROFS', this.readOnlyReason, { op: 'writeZeroes', location: this.location, offset }),
    );
  }

  async discard(): Promise<void> {}

  async blockStatus(offset: number): Promise<Extent> {
    return { kind: 'data', length: this.size - offset };
  }

  async flush(): Promise<void> {}

  async close(): Promise<void> {
    this.client.destroy();
  }

  /** The ETag (or Last-Modified) names this version: a resumed convert refuses a changed image. */
  async identity(): Promise<{ id: string; version?: string }> {
    return { id: this.client.url.href, version: this.#identity.etag ?? this.#identity.lastModified };
  }

  async info(): Promise<Record<string, unknown>> {
    return {
      url: redactLocation(this.client.url.href),
      rangeRequests: this instanceof HttpRangeBackend,
      etag: this.#identity.etag,
      lastModified: this.#identity.lastModified,
      retries: this.client.retries,
    };
  }
}

/** A server that takes Range requests: random access, many reads in flight. */
export class HttpRangeBackend extends HttpBase implements BlockBackend {
  readonly canWriteOutOfOrder = true;

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    if (length === 0) return out;
    const where: Where = { op: 'read', location: this.location, offset, length };
    let done = 0;
    await withRetries<void>(this.client, where, async () => {
      // A retry resumes from the first byte the failed response did not deliver.
      while (done < length) {
        const { got, cut } = await this.client.getRange(offset + done, length - done, out.subarray(done), where);
        done += got;
        if (cut) {
          const code = (cut as { code?: string }).code === 'ETIMEDOUT' ? 'ETIMEDOUT' : 'ECONNRESET';
          throw new TransientError(`${cut.message} (at byte ${offset + done})`, code);
        }
      }
    });
    return out;
  }
}

interface PendingRead {
  offset: number;
  end: number;
  into: Uint8Array;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/**
 * A server without Range: one GET streams the image from its start. Reads are served as
 * the stream passes them; the stream pauses while no read waits for what comes next.
 */
export class HttpStreamBackend extends HttpBase implements BlockBackend {
  readonly canWriteOutOfOrder = true;
  readonly #ring = Buffer.allocUnsafe(LOOKBEHIND);
  /** Bytes of the stream consumed so far. */
  #pos = 0;
  #pending: PendingRead[] = [];
  #res?: http.IncomingMessage;
  #starting = false;
  #restarts = 0;
  #failure?: BlockError;
  #closed = false;
  #restartTimer?: NodeJS.Timeout;

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    if (length === 0) return out;
    if (this.#failure) throw this.#failure;
    if (this.#closed)
      throw new BlockError('EIO', 'the image is closed', { op: 'read', location: this.location, offset, length });
    const end = offset + length;
    if (offset < this.#pos - LOOKBEHIND || (offset < this.#pos && this.#pos > this.size)) {
      throw new BlockError(
        'ENOTSUP',
        `the server does not take Range requests, so the image can only be read in one pass, as a raw image is converted (a read at ${offset} came after the stream passed ${this.#pos}); formats such as qcow2 need random access`,
        { op: 'read', location: this.location, offset, length },
      );
    }
    // The part already passed comes from the ring.
    const behind = Math.min(end, this.#pos) - offset;
    if (behind > 0) this.#fromRing(offset, out.subarray(0, behind));
    if (end <= this.#pos) return out;
    await new Promise<void>((resolve, reject) => {
      this.#pending.push({
        offset: Math.max(offset, this.#pos),
        end,
        into: out.subarray(Math.max(0, this.#pos - offset)),
        resolve,
        reject,
      });
      this.#pending.sort((a, b) => a.offset - b.offset);
      this.#pump();
    });
    return out;
  }

  override async close(): Promise<void> {
    this.#closed = true;
    clearTimeout(this.#restartTimer);
    this.#fail(
      new BlockError('EIO', 'the image was closed while reads waited', { op: 'read', location: this.location }),
    );
    this.#res?.destroy();
    await super.close();
  }

  #fromRing(offset: number, dst: Uint8Array): void {
    let at = offset;
    let p = 0;
    while (p < dst.length) {
      const r = at % LOOKBEHIND;
      const n = Math.min(dst.length - p, LOOKBEHIND - r);
      this.#ring.copy(dst, p, r, r + n);
      p += n;
      at += n;
    }
  }

  #toRing(chunk: Buffer): void {
    let p = 0;
    let at = this.#pos;
    while (p < chunk.length) {
      const r = at % LOOKBEHIND;
      const n = Math.min(chunk.length - p, LOOKBEHIND - r);
      chunk.copy(this.#ring, r, p, p + n);
      p += n;
      at += n;
    }
  }

  /** Starts or resumes the stream while reads wait; pauses it when none does. */
  #pump(): void {
    if (this.#closed || this.#failure) return;
    if (this.#pending.length === 0) {
      this.#pause();
      return;
    }
    if (this.#res) {
      // Idle while paused by us is not a stall: the timeout counts again from here.
      this.#res.socket?.setTimeout(this.client.timeoutMs);
      this.#res.resume();
      return;
    }
    if (!this.#starting) void this.#start();
  }

  /** Pauses the stream while nothing waits, without its socket timing out meanwhile. */
  #pause(): void {
    this.#res?.socket?.setTimeout(0);
    this.#res?.pause();
  }

  /** (Re)starts the GET; after a failure, the bytes already consumed are skipped. */
  async #start(): Promise<void> {
    this.#starting = true;
    const skip = this.#pos;
    const where: Where = { op: 'read', location: this.location, offset: skip };
    try {
      const res = await withRetries(this.client, where, async () => {
        const r = await this.client.send('GET', {});
        const status = r.statusCode ?? 0;
        if (
          status === 200 &&
          r.headers['content-length'] !== undefined &&
          Number(r.headers['content-length']) !== this.size
        ) {
          r.destroy();
          throw new BlockError(
            'EIO',
            `the image changed on the server: ${r.headers['content-length']} bytes now, ${this.size} at open`,
            where,
          );
        }
        if (status === 200) return r;
        r.resume();
        if (transientStatus(status)) throw new TransientError(STATUS_TEXT(status), 'EIO');
        throw statusError(status, where);
      });
      let toSkip = skip;
      this.#res = res;
      res.on('data', (chunk: Buffer) => {
        if (toSkip > 0) {
          if (chunk.length <= toSkip) {
            toSkip -= chunk.length;
            return;
          }
          chunk = chunk.subarray(toSkip);
          toSkip = 0;
        }
        this.#onData(chunk);
      });
      res.once('end', () => this.#onEnd(res));
      res.once('error', () => this.#onEnd(res));
      res.once('close', () => this.#onEnd(res));
    } catch (err) {
      this.#fail(
        err instanceof BlockError ? err : new BlockError('EIO', (err as Error).message, { ...where, cause: err }),
      );
    } finally {
      this.#starting = false;
    }
    this.#pump();
  }

  #onData(chunk: Buffer): void {
    const start = this.#pos;
    if (start + chunk.length > this.size) chunk = chunk.subarray(0, Math.max(0, this.size - start));
    this.#toRing(chunk);
    const end = start + chunk.length;
    this.#pos = end;
    // Copy into every waiting read the chunk overlaps; resolve the complete ones, keep the others.
    let kept = 0;
    for (const r of this.#pending) {
      const a = Math.max(r.offset, start);
      const b = Math.min(r.end, end);
      if (a < b) {
        // r.into starts at r.offset, which is never before the chunk's start (reads wait ahead of #pos).
        chunk.copy(r.into, a - r.offset, a - start, b - start);
        r.into = r.into.subarray(b - r.offset);
        r.offset = b;
      }
      if (r.offset >= r.end) r.resolve();
      else this.#pending[kept++] = r;
    }
    this.#pending.length = kept;
    if (this.#pending.length === 0) this.#pause();
  }

  #onEnd(res: http.IncomingMessage): void {
    if (this.#res !== res) return;
    this.#res = undefined;
    if (this.#closed) return;
    if (this.#pos >= this.size || this.#pending.length === 0) return;
    // Cut short: restart and skip to where we were (as many times as retries allow).
    if (this.#restarts++ >= this.client.retryLimit) {
      this.#fail(
        new BlockError(
          'ECONNRESET',
          `the stream ended at ${this.#pos} of ${this.size} bytes (after ${this.#restarts - 1} restarts)`,
          { op: 'read', location: this.location, offset: this.#pos },
        ),
      );
      return;
    }
    this.client.retries++;
    this.#restartTimer = setTimeout(() => this.#pump(), backoff(this.#restarts - 1));
  }

  #fail(err: BlockError): void {
    this.#failure ??= err;
    const pending = this.#pending;
    this.#pending = [];
    for (const r of pending)
      r.reject(
        new BlockError(err.code, err.message.replace(/^.*?: /, ''), {
          op: 'read',
          location: this.location,
          offset: r.offset,
          cause: err,
        }),
      );
  }
}

/** Opens the image at an http:// or https:// URL. */
export async function openHttp(
  location: string,
  options: OpenOptions = {},
): Promise<HttpRangeBackend | HttpStreamBackend> {
  const display = redactLocation(location);
  let url: URL;
  try {
    url = new URL(location);
  } catch {
    throw invalid(display, 'not a valid URL');
  }
  if (url.protocol !== 'http:' && url.protocol !== 'https:')
    throw invalid(display, `unknown scheme ${url.protocol}// (expected http:// or https://)`);
  if (url.hash) throw invalid(display, 'an http URL for an image has no fragment (#...)');
  const opts = httpOptions(url, options.options, display);
  const client = new HttpClient(url, opts);
  const where: Where = { op: 'open', location: display };
  try {
    const { response: res, method } = await withRetries(
      client,
      where,
      async () => {
        const r = await client.resolve();
        const status = r.response.statusCode ?? 0;
        if (transientStatus(status)) {
          r.response.resume();
          throw new TransientError(STATUS_TEXT(status), 'EIO');
        }
        return r;
      },
      options.signal,
    );
    const status = res.statusCode ?? 0;
    if (method === 'GET' && status === 200) res.destroy();
    else res.resume();
    const h = res.headers;
    const identity = {
      etag: typeof h.etag === 'string' ? h.etag : undefined,
      lastModified: typeof h['last-modified'] === 'string' ? h['last-modified'] : undefined,
    };
    let size: number | undefined;
    let ranges: boolean;
    if (method === 'HEAD') {
      if (status !== 200) throw statusError(status, where);
      size = h['content-length'] !== undefined ? Number(h['content-length']) : undefined;
      ranges = /\bbytes\b/i.test(String(h['accept-ranges'] ?? ''));
      if (!ranges && !/\bnone\b/i.test(String(h['accept-ranges'] ?? ''))) {
        // HEAD said nothing about ranges: a one-byte GET tells.
        const probe = await client.send('GET', { range: 'bytes=0-0' });
        // A server without Range sends the whole image: drop it rather than drain it.
        probe.destroy();
        ranges = probe.statusCode === 206;
        const total = /\/(\d+)$/.exec(String(probe.headers['content-range'] ?? ''));
        if (size === undefined && total) size = Number(total[1]);
      }
    } else {
      // The one-byte GET of a server that refuses HEAD.
      if (status === 206) {
        ranges = true;
        const total = /\/(\d+)$/.exec(String(h['content-range'] ?? ''));
        size = total ? Number(total[1]) : undefined;
      } else if (status === 200) {
        ranges = false;
        size = h['content-length'] !== undefined ? Number(h['content-length']) : undefined;
      } else {
        throw statusError(status, where);
      }
    }
    if (size === undefined || !Number.isSafeInteger(size) || size < 0) {
      throw new BlockError(
        'ENOTSUP',
        'the server tells no size (no Content-Length): an image of unknown size cannot be converted',
        where,
      );
    }
    if (String(h['content-encoding'] ?? 'identity') !== 'identity') {
      throw new BlockError(
        'ENOTSUP',
        `the server sends the image encoded (${h['content-encoding']}), not as its bytes`,
        where,
      );
    }
    client.size = size;
    client.pin(identity);
    return ranges
      ? new HttpRangeBackend(client, display, size, identity)
      : new HttpStreamBackend(client, display, size, identity);
  } catch (err) {
    client.destroy();
    if (err instanceof BlockError)
      throw err.location ? err : new BlockError(err.code, err.message, { ...where, cause: err });
    throw err;
  }
}

export const httpDriver: ProtocolDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'protocol',
  name: 'http',
  description:
    'images at http:// and https:// URLs (read-only): Range requests on several connections, retries that resume; one stream when the server has no Range',
  schemes: ['http', 'https'],
  readOnly: true,
  secretParameters: [
    'x-amz-signature',
    'x-amz-credential',
    'x-amz-security-token',
    'x-goog-signature',
    'x-goog-credential',
    'sig',
    'signature',
  ],
  openOptions: [
    {
      name: 'connections',
      description: `connections (and Range requests) in flight at most (1..${MAX_CONNECTIONS})`,
      default: String(DEFAULT_CONNECTIONS),
    },
    {
      name: 'timeout',
      description: 'seconds a request may wait without a byte from the server before it fails (0: wait forever)',
      default: String(DEFAULT_TIMEOUT_S),
    },
    {
      name: 'retries',
      description:
        'retries of a request that failed on the way (reset, timeout, 5xx, 429, a cut-short body), with backoff from 0.25 to 8 s; each resumes where the last stopped',
      default: String(DEFAULT_RETRIES),
    },
    { name: 'ca', description: "file of PEM CA certificates to trust besides the system's (/etc/ssl/certs)" },
    { name: 'user', description: "user name for Basic authentication (else the URL's)" },
    { name: 'password-file', description: "file whose first line is the password (else the URL's)" },
  ],
  open: openHttp,
};
