/**
 * An in-memory, sparse block device: the reference backend for the conformance kit
 * and for testing the scheduler, with injectable latency and failures, and a log of
 * operations so tests can check ordering and concurrency. Storage is a map of 64 KiB
 * pages, so a 1 TiB image costs only what is written to it.
 */
import { BlockError } from './errors.js';
import { redactLocation } from './redact.js';
import {
  BLOCK_API_VERSION,
  type BlockBackend,
  type BlockLimits,
  type CopyRequest,
  type Extent,
  type ProtocolDriver,
  type WriteZeroesFlags,
} from './types.js';
import { type SegmentList, piecesAroundHoles } from './segments.js';
import { ZeroScanner } from './zeroscan.js';

const PAGE = 64 * 1024;

export type MemoryOp =
  | 'read'
  | 'readSegments'
  | 'write'
  | 'writeSegments'
  | 'writeZeroes'
  | 'discard'
  | 'blockStatus'
  | 'flush'
  | 'copy'
  | 'pipe';

export interface MemoryOpRecord {
  readonly op: MemoryOp;
  readonly offset: number;
  readonly length: number;
  /** Order in which the operation was started / completed. */
  readonly started: number;
  completed?: number;
}

export interface MemoryBackendOptions {
  readonly size: number;
  readonly location?: string;
  readonly limits?: Partial<BlockLimits>;
  readonly readOnly?: boolean;
  readonly zeroInitialized?: boolean;
  readonly canBlockStatus?: boolean;
  readonly canZero?: boolean;
  readonly canDiscard?: boolean;
  readonly canWriteOutOfOrder?: boolean;
  /**
   * Copy offload (copyTo/copyFrom with request.offload) with other memory backends that
   * can, as a server-side copy would: logged as 'copy' on the target. Default false.
   */
  readonly canCopy?: boolean;
  /**
   * Fused copies (copyTo/copyFrom without offload) with other memory backends that can, scanned with
   * the core's ZeroScanner: the reference for what a driver's pipe must do. Logged as
   * 'pipe' on the target. Default false.
   */
  readonly canPipe?: boolean;
  /** Milliseconds an operation takes, or a function of it (for latency injection). */
  readonly latency?: number | ((op: MemoryOp, offset: number, length: number) => number);
  /** Returns an error to fail an operation with (failure injection). */
  readonly fail?: (op: MemoryOp, offset: number, length: number) => Error | undefined;
  /** Record every operation in `log`. */
  readonly record?: boolean;
}

export class MemoryBackend implements BlockBackend {
  readonly driverName = 'mem';
  readonly location: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly canZero: boolean;
  readonly canDiscard: boolean;
  readonly zeroInitialized: boolean;
  readonly canCompress = false;
  readonly canBlockStatus: boolean;
  readonly canReadHolesCheaply = true;
  readonly canWriteOutOfOrder: boolean;
  readonly log: MemoryOpRecord[] = [];
  /** With canCopy or canPipe. */
  readonly copyTo?: (
    offset: number,
    length: number,
    target: BlockBackend,
    targetOffset: number,
    request: CopyRequest,
  ) => Promise<boolean>;
  readonly copyFrom?: (offset: number, length: number, source: BlockBackend, request: CopyRequest) => Promise<boolean>;
  /** Highest number of operations in flight at once. */
  maxInFlight = 0;
  inFlight = 0;
  flushes = 0;
  closed = false;

  readonly #pages = new Map<number, Uint8Array>();
  readonly #opts: MemoryBackendOptions;
  #seq = 0;

  constructor(opts: MemoryBackendOptions) {
    this.#opts = opts;
    this.location = redactLocation(opts.location ?? `mem://${opts.size}`);
    this.size = opts.size;
    this.readOnly = opts.readOnly ?? false;
    const align = opts.limits?.requestAlignment ?? 1;
    this.limits = {
      requestAlignment: align,
      maxTransfer: opts.limits?.maxTransfer ?? 32 * 1024 * 1024,
      optimalTransfer: opts.limits?.optimalTransfer ?? Math.max(align, PAGE),
      maxWriteZeroes: opts.limits?.maxWriteZeroes,
      minMemAlignment: opts.limits?.minMemAlignment,
      preferredAlignment: opts.limits?.preferredAlignment,
      compressionUnit: opts.limits?.compressionUnit,
    };
    this.canZero = opts.canZero ?? true;
    this.canDiscard = opts.canDiscard ?? true;
    this.zeroInitialized = opts.zeroInitialized ?? true;
    this.canBlockStatus = opts.canBlockStatus ?? true;
    this.canWriteOutOfOrder = opts.canWriteOutOfOrder ?? true;
    if (opts.canCopy || opts.canPipe) {
      this.copyTo = (offset, length, target, targetOffset, request) => {
        if (!target.copyFrom || !this.#takes(request)) return Promise.resolve(false);
        piecesAroundHoles(offset, length, request.holes, request.pieces);
        return target.copyFrom(targetOffset, length, this, request);
      };
      this.copyFrom = (offset, length, source, request) => this.#copyFrom(offset, length, source, request);
    }
  }

  /** Offloads with canCopy, fused copies with canPipe. */
  #takes(request: CopyRequest): boolean {
    return request.offload ? this.#opts.canCopy === true : this.#opts.canPipe === true;
  }

  #copyFrom(offset: number, length: number, source: BlockBackend, request: CopyRequest): Promise<boolean> {
    if (!(source instanceof MemoryBackend) || !source.#takes(request) || !this.#takes(request))
      return Promise.resolve(false);
    const { buffer, pieces, holes, zeroRuns, unit, minRun } = request;
    if (request.offload) {
      request.issued();
      return this.#op(
        'copy',
        offset,
        length,
        () => {
          const data = new Uint8Array(length);
          for (let i = 0; i < pieces.count; i++) {
            const pos = pieces.positionAt(i);
            source.#load(pieces.offsetAt(i), pieces.lengthAt(i), data.subarray(pos, pos + pieces.lengthAt(i)));
          }
          this.#store(offset, data);
        },
        true,
      ).then(() => true);
    }
    // What fileio.pipe refuses, refused here too.
    if (
      (minRun === 0 && holes.count > 0) ||
      (minRun > 0 && zeroRuns.capacity < Math.ceil(length / unit) + holes.count + 1) ||
      buffer.length < length
    ) {
      return Promise.reject(
        new RangeError('pipe: holes without a scan, a run list too short for the chunk, or a buffer too small'),
      );
    }
    request.issued();
    return this.#op(
      'pipe',
      offset,
      length,
      () => {
        for (let i = 0; i < pieces.count; i++) {
          const off = pieces.offsetAt(i);
          const len = pieces.lengthAt(i);
          const at = pieces.positionAt(i);
          // The source's failure injection applies to its half, as a read.
          const err = source.#opts.fail?.('read', off, len);
          if (err) throw err;
          source.#load(off, len, buffer.subarray(at, at + len));
        }
        if (minRun === 0) {
          this.#store(offset, buffer.subarray(0, length));
          return;
        }
        const scanner = new ZeroScanner(buffer, unit, minRun);
        scanner.scan(length, offset, holes);
        for (let i = 0; i < scanner.data.count; i++) {
          const pos = scanner.data.positionAt(i);
          this.#store(scanner.data.offsetAt(i), buffer.subarray(pos, pos + scanner.data.lengthAt(i)));
        }
        for (let i = 0; i < scanner.zeroes.count; i++)
          zeroRuns.push(scanner.zeroes.offsetAt(i), scanner.zeroes.lengthAt(i), scanner.zeroes.positionAt(i));
      },
      true,
    ).then(() => true);
  }

  /** Bytes held in memory (allocated pages). */
  get allocatedBytes(): number {
    return this.#pages.size * PAGE;
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : new Uint8Array(length);
    await this.#op('read', offset, length, () => this.#load(offset, length, out));
    return out;
  }

  #load(offset: number, length: number, out: Uint8Array): void {
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const page = this.#pages.get(Math.floor(pos / PAGE));
      const inPage = pos % PAGE;
      const n = Math.min(PAGE - inPage, length - done);
      if (page) out.set(page.subarray(inPage, inPage + n), done);
      else out.fill(0, done, done + n);
      done += n;
    }
  }

  /**
   * Vectored read, logged as one operation over the span of its pieces; `length` of
   * the record is the bytes the pieces ask for (what a driver would move).
   */
  async readSegments(into: Uint8Array, segments: SegmentList): Promise<void> {
    if (segments.count === 0) return;
    const pieces = segments.toArray();
    for (const { offset: off, length: len, position: at } of pieces) {
      if (!(at + len <= into.length))
        throw new BlockError('EINVAL', 'segment runs past the buffer', {
          op: 'readSegments',
          location: this.location,
          offset: off,
          length: len,
        });
      const a = this.limits.requestAlignment;
      if (off % a !== 0 || (len % a !== 0 && off + len !== this.size) || off + len > this.size) {
        throw new BlockError('EINVAL', `segment not aligned to ${a} bytes or past the end`, {
          op: 'readSegments',
          location: this.location,
          offset: off,
          length: len,
        });
      }
    }
    await this.#op('readSegments', pieces[0]!.offset, segments.totalLength(), () => {
      for (const { offset: off, length: len, position: at } of pieces)
        this.#load(off, len, into.subarray(at, at + len));
    });
  }

  async write(offset: number, data: Uint8Array): Promise<void> {
    await this.#op('write', offset, data.length, () => this.#store(offset, data), true);
  }

  #store(offset: number, data: Uint8Array): void {
    for (let done = 0; done < data.length; ) {
      const pos = offset + done;
      const idx = Math.floor(pos / PAGE);
      let page = this.#pages.get(idx);
      if (!page) this.#pages.set(idx, (page = new Uint8Array(PAGE)));
      const inPage = pos % PAGE;
      const n = Math.min(PAGE - inPage, data.length - done);
      page.set(data.subarray(done, done + n), inPage);
      done += n;
    }
  }

  /** Vectored write, logged as one operation over the span of its pieces (as a driver would send one request). */
  async writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    if (segments.count === 0) return;
    const pieces = segments.toArray();
    const first = Math.min(...pieces.map((p) => p.offset));
    const end = Math.max(...pieces.map((p) => p.offset + p.length));
    await this.#op(
      'writeSegments',
      first,
      end - first,
      () => {
        for (const { offset, length, position } of pieces)
          this.#store(offset, from.subarray(position, position + length));
      },
      true,
    );
  }

  async writeZeroes(offset: number, length: number, _flags?: WriteZeroesFlags): Promise<void> {
    await this.#op('writeZeroes', offset, length, () => this.#zero(offset, length), true);
  }

  async discard(offset: number, length: number): Promise<void> {
    await this.#op('discard', offset, length, () => this.#zero(offset, length), true);
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    let result: Extent = { kind: 'data', length: this.size - offset };
    await this.#op('blockStatus', offset, Math.max(1, Math.min(length, this.size - offset)), () => {
      if (!this.canBlockStatus) return;
      const allocated = this.#pages.has(Math.floor(offset / PAGE));
      let end = (Math.floor(offset / PAGE) + 1) * PAGE;
      while (end < this.size && end < offset + length && this.#pages.has(end / PAGE) === allocated) end += PAGE;
      result = { kind: allocated ? 'data' : 'zero', length: Math.min(end, this.size) - offset };
    });
    return result;
  }

  async flush(): Promise<void> {
    await this.#op('flush', 0, 0, () => {
      this.flushes++;
    });
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  #zero(offset: number, length: number): void {
    for (let done = 0; done < length; ) {
      const pos = offset + done;
      const idx = Math.floor(pos / PAGE);
      const inPage = pos % PAGE;
      const n = Math.min(PAGE - inPage, length - done);
      const page = this.#pages.get(idx);
      if (page) {
        if (n === PAGE) this.#pages.delete(idx);
        else page.fill(0, inPage, inPage + n);
      }
      done += n;
    }
  }

  async #op(op: MemoryOp, offset: number, length: number, body: () => void, writes = false): Promise<void> {
    if (this.closed) throw new BlockError('EINVAL', 'backend is closed', { op, location: this.location });
    if (writes && this.readOnly)
      throw new BlockError('EROFS', 'image is read-only', { op, location: this.location, offset });
    if (op !== 'flush') {
      if (
        !Number.isSafeInteger(offset) ||
        !Number.isSafeInteger(length) ||
        offset < 0 ||
        length < 0 ||
        offset + length > this.size
      ) {
        throw new BlockError('ERANGE', `request beyond the end of the image (size ${this.size})`, {
          op,
          location: this.location,
          offset,
          length,
        });
      }
      const a = this.limits.requestAlignment;
      // A block-status length is only a hint, so only its offset must be aligned.
      // readSegments' pieces are checked one by one (its length is their sum).
      if (
        offset % a !== 0 ||
        (op !== 'blockStatus' && op !== 'readSegments' && length % a !== 0 && offset + length !== this.size)
      ) {
        throw new BlockError('EINVAL', `request not aligned to ${a} bytes`, {
          op,
          location: this.location,
          offset,
          length,
        });
      }
    }
    const rec: MemoryOpRecord | undefined = this.#opts.record
      ? { op, offset, length, started: this.#seq++ }
      : undefined;
    if (rec) this.log.push(rec);
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      const lat =
        typeof this.#opts.latency === 'function' ? this.#opts.latency(op, offset, length) : (this.#opts.latency ?? 0);
      if (lat > 0) await new Promise((r) => setTimeout(r, lat));
      else await Promise.resolve();
      const err = this.#opts.fail?.(op, offset, length);
      if (err) throw err;
      body();
    } finally {
      this.inFlight--;
      if (rec) rec.completed = this.#seq++;
    }
  }
}

/**
 * `mem://NAME` images that live as long as the process: handy for embedding and tests.
 * create() makes (or replaces) one; open() finds it.
 */
export function createMemoryDriver(): ProtocolDriver & { readonly images: Map<string, MemoryBackend> } {
  const images = new Map<string, MemoryBackend>();
  return {
    apiVersion: BLOCK_API_VERSION,
    kind: 'protocol',
    name: 'mem',
    description: 'in-memory images (mem://NAME), kept for the life of the process',
    schemes: ['mem'],
    images,
    async open(location, options) {
      const img = images.get(location);
      if (!img) throw new BlockError('ENOENT', 'no such memory image', { op: 'open', location });
      void options;
      return img;
    },
    async create(location, size) {
      images.set(location, new MemoryBackend({ size, location }));
    },
  };
}
