/**
 * The request gate: every backend the registry opens (protocols, formats, backing files,
 * external data files) is wrapped in one, so that the core, not each driver, enforces
 * the interface's rules for every request, whoever makes it: convert, compare, a format
 * driver reading its protocol, an embedding program. As QEMU's block layer does in
 * bdrv_co_preadv/pwritev for every driver, each request passes the same steps:
 * - admit: a closed backend (EBADF), a change to a read-only one (EROFS), a request
 *   outside the image (ERANGE) are refused, with the same codes whatever the driver; a
 *   write that arrives while a read-modify-write runs waits behind it, then is admitted
 *   again (the image may have been resized or closed meanwhile);
 * - direct: a request that already fits the limits goes straight to the driver (a few
 *   comparisons, no allocation);
 * - split: reads and writes at maxTransfer, writeZeroes and discard at maxWriteZeroes;
 * - pad: unaligned reads go through a bounce buffer; unaligned writes and zeroes are
 *   padded with a read-modify-write of the edge blocks, serialised against every other
 *   write (write-serializer.ts); unaligned discards shrink to whole blocks (discard is
 *   advisory); memory off a minMemAlignment boundary goes through an aligned copy;
 * - copy steps (copyTo/copyFrom) are checked as a read and a write; one that would need
 *   padding or splitting is declined, so the caller reads and writes the chunk instead.
 *
 * It also completes the backend: capabilities default as types.ts says, and what the
 * driver left out is supplied (no write on a read-only image, zeroes written when there
 * is no writeZeroes, all data without blockStatus, no-op discard and flush). Pieces of a
 * split request go out one by one to a target that takes one write at a time. Nothing is
 * sent after close().
 */
import { BlockError } from './errors.js';
import { forwardBackend } from './forward.js';
import { checkLimits } from './limits.js';
import { SegmentList } from './segments.js';
import { settleAll } from './settle.js';
import type { BlockBackend, CopyRequest, Extent, GatedBackend, WriteFlags, WriteZeroesFlags } from './types.js';
import { WriteSerializer } from './write-serializer.js';

export { checkLimits } from './limits.js';

const GATED = Symbol.for('@blockconv/core.gated');

/** The backend a gate wraps, for tests and diagnostics; the backend itself when not gated. */
export function ungated(backend: BlockBackend): BlockBackend {
  return (backend as { [GATED]?: BlockBackend })[GATED] ?? backend;
}

export function isGated(backend: BlockBackend): backend is GatedBackend {
  return (backend as { [GATED]?: BlockBackend })[GATED] !== undefined;
}

/** Facts the opener knows better than the driver: what a create() said, a read-only protocol or format. */
export interface GateFacts {
  readonly zeroInitialized?: boolean;
  /** The backend must be read-only, for this reason (it reports readOnly and readOnlyReason). */
  readonly readOnlyReason?: string;
}

/** Error details for one request. */
function at(b: BlockBackend, op: string, offset: number, length: number) {
  return { op, location: b.location, offset, length };
}

/** Calls a driver method, turning a synchronous throw (a careless driver) into a rejection. */
function call<T>(start: () => Promise<T>): Promise<T> {
  try {
    return start();
  } catch (err) {
    return Promise.reject(err);
  }
}

/** Runs the pieces of one request all in flight; every started one settles before an error is thrown. */
async function allInFlight(pieces: ReadonlyArray<() => Promise<unknown>>): Promise<void> {
  const started: Array<Promise<unknown>> = [];
  try {
    for (const piece of pieces) started.push(piece());
  } finally {
    await settleAll(started);
  }
}

/** Where a request's unaligned edge blocks are: [offset, mid) and [midEnd, end) need padding. */
interface Edges {
  readonly mid: number;
  readonly midEnd: number;
  readonly head: boolean;
  readonly tail: boolean;
}

/**
 * Wraps `inner` in the request gate. Idempotent: a gated backend is returned as it is.
 * Every other member (info, identity, a driver's own extras) is forwarded.
 */
export function gateBackend(inner: BlockBackend, facts?: GateFacts): GatedBackend {
  if (isGated(inner)) {
    if (!facts) return inner;
    inner = ungated(inner); // a new gate with the facts, in place of the old one
  }
  const gated = forwardBackend(inner, new RequestGate(inner, facts).members()) as GatedBackend;
  Object.defineProperty(gated, GATED, { value: inner });
  return gated;
}

/** The steps of the gate for one backend; gateBackend presents them as the backend's members. */
class RequestGate {
  readonly #inner: BlockBackend;
  readonly #readOnly: boolean;
  readonly #readOnlyReason: string;
  readonly #forcedReadOnly: string | undefined;
  readonly #zeroInitialized: boolean;
  readonly #align: number;
  readonly #memAlign: number;
  /** Largest read/write piece: maxTransfer, in whole blocks. */
  readonly #maxIo: number;
  /** Largest writeZeroes/discard piece. */
  readonly #maxZero: number;
  readonly #compressionUnit: number;
  /** Backends without alignment never need a read-modify-write, so their writes are not tracked. */
  readonly #serializer: WriteSerializer | undefined;
  /** The pieces of a split request go out one by one to a target that takes one write at a time. */
  readonly #oneAtATime: boolean;
  #closed = false;
  /** Zeroes written for a driver without writeZeroes (allocated on first use). */
  #zeroes: Uint8Array | undefined;

  constructor(inner: BlockBackend, facts: GateFacts | undefined) {
    checkLimits(inner);
    this.#inner = inner;
    this.#forcedReadOnly = facts?.readOnlyReason;
    this.#readOnly = this.#forcedReadOnly !== undefined || (inner.readOnly ?? typeof inner.write !== 'function');
    this.#readOnlyReason = this.#forcedReadOnly ?? inner.readOnlyReason ?? 'image is read-only';
    this.#zeroInitialized = facts?.zeroInitialized === true;
    const l = inner.limits;
    this.#align = l.requestAlignment;
    this.#memAlign = l.minMemAlignment ?? 1;
    this.#maxIo = l.maxTransfer - (l.maxTransfer % this.#align);
    const maxZeroes = l.maxWriteZeroes ?? l.maxTransfer;
    this.#maxZero = Math.max(this.#align, maxZeroes - (maxZeroes % this.#align));
    this.#compressionUnit = l.compressionUnit ?? this.#align;
    this.#serializer = this.#align > 1 ? new WriteSerializer() : undefined;
    this.#oneAtATime = inner.canWriteOutOfOrder === false;
  }

  /**
   * The members that override the driver's: the operations, bound once, and the
   * capabilities with their defaults (live getters: a driver may change its answer).
   */
  members(): Partial<GatedBackend> {
    const inner = this.#inner;
    const ops: Partial<{ -readonly [K in keyof GatedBackend]: GatedBackend[K] }> = {
      read: this.read.bind(this),
      write: this.write.bind(this),
      writeZeroes: this.writeZeroes.bind(this),
      discard: this.discard.bind(this),
      blockStatus: this.blockStatus.bind(this),
      flush: this.flush.bind(this),
      close: this.close.bind(this),
    };
    if (inner.resize) ops.resize = this.resize.bind(this);
    if (inner.readSegments) ops.readSegments = this.readSegments.bind(this);
    if (inner.writeSegments) ops.writeSegments = this.writeSegments.bind(this);
    if (inner.copyTo) ops.copyTo = this.copyTo.bind(this);
    if (inner.copyFrom) ops.copyFrom = this.copyFrom.bind(this);
    return Object.defineProperties(ops, {
      readOnly: { get: () => this.#readOnly || inner.readOnly === true, enumerable: true },
      readOnlyReason: { get: () => this.#forcedReadOnly ?? inner.readOnlyReason, enumerable: true },
      canZero: { get: () => inner.canZero ?? typeof inner.writeZeroes === 'function', enumerable: true },
      canFastZero: {
        get: () => inner.canFastZero === true && typeof inner.writeZeroes === 'function',
        enumerable: true,
      },
      canDiscard: { get: () => inner.canDiscard ?? typeof inner.discard === 'function', enumerable: true },
      canCompress: { get: () => inner.canCompress === true, enumerable: true },
      canBlockStatus: { get: () => inner.canBlockStatus ?? typeof inner.blockStatus === 'function', enumerable: true },
      canReadHolesCheaply: { get: () => inner.canReadHolesCheaply === true, enumerable: true },
      canWriteOutOfOrder: { get: () => inner.canWriteOutOfOrder !== false, enumerable: true },
      zeroInitialized: { get: () => this.#zeroInitialized || inner.zeroInitialized === true, enumerable: true },
      backing: { get: () => this.#gatedBacking(), enumerable: true },
    }) as Partial<GatedBackend>;
  }

  #backing: { readonly inner: BlockBackend; readonly gated: GatedBackend } | undefined;

  /** The backing image behind a gate of its own (the same one each time; registry backings are gated already). */
  #gatedBacking(): GatedBackend | undefined {
    const backing = this.#inner.backing;
    if (!backing) return undefined;
    if (this.#backing?.inner !== backing) this.#backing = { inner: backing, gated: gateBackend(backing) };
    return this.#backing.gated;
  }

  // ---- admit ------------------------------------------------------------------------

  #closedError(op: string): BlockError {
    return new BlockError('EBADF', 'image is closed', { op, location: this.#inner.location });
  }

  /** Null when the request may proceed; else the error to reject it with. */
  #refuse(op: string, offset: number, length: number, writes: boolean): BlockError | null {
    if (this.#closed) return this.#closedError(op);
    if (writes && this.#readOnly)
      return new BlockError('EROFS', this.#readOnlyReason, at(this.#inner, op, offset, length));
    const size = this.#inner.size;
    if (
      !(
        Number.isSafeInteger(offset) &&
        Number.isSafeInteger(length) &&
        offset >= 0 &&
        length >= 0 &&
        offset + length <= size
      )
    ) {
      return new BlockError('ERANGE', `request outside the image (size ${size})`, at(this.#inner, op, offset, length));
    }
    return null;
  }

  /**
   * A write that arrives while a read-modify-write waits or runs: `retry` (the same call
   * again, admitted anew) once it is over. Null when nothing is in the way.
   */
  #behindBarrier<T>(retry: () => Promise<T>): Promise<T> | null {
    const wait = this.#serializer?.waiting;
    return wait ? wait.then(retry) : null;
  }

  /** Starts one driver write after any read-modify-write queued before it, never after close. */
  #send<T>(op: string, start: () => Promise<T>): Promise<T> {
    const serializer = this.#serializer;
    if (!serializer) return this.#closed ? Promise.reject(this.#closedError(op)) : call(start);
    const wait = serializer.waiting;
    if (wait) return wait.then(() => this.#send(op, start));
    return this.#closed ? Promise.reject(this.#closedError(op)) : serializer.track(start);
  }

  // ---- direct: does the request fit the driver as it is? ----------------------------

  /** Starts on a block and is whole blocks, or runs to the image's end. */
  #aligned(offset: number, length: number): boolean {
    return offset % this.#align === 0 && (length % this.#align === 0 || offset + length === this.#inner.size);
  }

  /** Memory at `position` of `buffer` is on the driver's memory alignment. */
  #memoryFits(buffer: Uint8Array | undefined, position = 0): boolean {
    return this.#memAlign === 1 || buffer === undefined || (buffer.byteOffset + position) % this.#memAlign === 0;
  }

  /** The one test of "can this go straight to the driver": aligned, small enough, memory usable. */
  #fits(offset: number, length: number, buffer: Uint8Array | undefined, position = 0): boolean {
    return length <= this.#maxIo && this.#aligned(offset, length) && this.#memoryFits(buffer, position);
  }

  // ---- pad and split ----------------------------------------------------------------

  #alloc(n: number): Uint8Array {
    return this.#memAlign > 1 ? this.#inner.allocBuffer!(n) : new Uint8Array(n);
  }

  /** Splits [offset, end) into unaligned edge blocks (bounced or read-modify-written) and an aligned middle. */
  #edges(offset: number, end: number): Edges {
    const align = this.#align;
    let mid = offset;
    let midEnd = end;
    let head = false;
    let tail = false;
    if (offset % align !== 0) {
      mid = Math.min(offset - (offset % align) + align, end);
      head = true;
    }
    if (midEnd > mid && midEnd % align !== 0 && midEnd !== this.#inner.size) {
      midEnd = Math.max(mid, midEnd - (midEnd % align));
      tail = end > midEnd;
    }
    return { mid, midEnd, head, tail };
  }

  /** Runs a split write's pieces: all in flight, or one by one to a one-at-a-time target. */
  async #runPieces(pieces: ReadonlyArray<() => Promise<unknown>>): Promise<void> {
    if (this.#oneAtATime || pieces.length === 1) {
      for (const piece of pieces) await piece();
      return;
    }
    await allInFlight(pieces);
  }

  /** Reads the driver's view of [offset, +length) into `out` (it may hand back another buffer). */
  async #readInto(offset: number, length: number, out: Uint8Array): Promise<void> {
    const got = await this.#inner.read(offset, length, out);
    if (got.buffer !== out.buffer || got.byteOffset !== out.byteOffset) out.set(got.subarray(0, length));
  }

  /** Reads [pos, pos+n) into dest through an aligned bounce buffer covering whole blocks. */
  async #bounceRead(pos: number, n: number, dest: Uint8Array): Promise<void> {
    const align = this.#align;
    const start = pos - (pos % align);
    const end = Math.min(Math.ceil((pos + n) / align) * align, this.#inner.size);
    for (let s = start; s < end; s += this.#maxIo) {
      const e = Math.min(s + this.#maxIo, end);
      const lo = Math.max(s, pos);
      const hi = Math.min(e, pos + n);
      if (hi <= lo) continue;
      const got = await this.#inner.read(s, e - s, this.#alloc(e - s));
      dest.set(got.subarray(lo - s, hi - s), lo - pos);
    }
  }

  /**
   * Writes the unaligned [pos, pos+n) — `data`, or zeroes when absent — by reading the
   * whole blocks around it, patching them and writing them back, alone.
   */
  #readModifyWrite(
    op: string,
    pos: number,
    n: number,
    data: Uint8Array | undefined,
    flags?: WriteFlags,
  ): Promise<void> {
    return this.#serializer!.exclusive(async () => {
      const inner = this.#inner;
      // Checked again: the image may have been closed or resized while this waited.
      if (this.#closed) throw this.#closedError(op);
      if (pos + n > inner.size)
        throw new BlockError('ERANGE', `request outside the image (size ${inner.size})`, at(inner, op, pos, n));
      const start = pos - (pos % this.#align);
      const end = Math.min(Math.ceil((pos + n) / this.#align) * this.#align, inner.size);
      const block = this.#alloc(end - start);
      await this.#readInto(start, end - start, block);
      if (data) block.set(data.subarray(0, n), pos - start);
      else block.fill(0, pos - start, pos - start + n);
      if (this.#closed) throw this.#closedError(op);
      await inner.write!(start, block, flags);
    });
  }

  // ---- reads ------------------------------------------------------------------------

  read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const err = this.#refuse('read', offset, length, false);
    if (err) return Promise.reject(err);
    if (into && into.length < length) {
      return Promise.reject(
        new BlockError(
          'EINVAL',
          `buffer of ${into.length} bytes cannot hold ${length}`,
          at(this.#inner, 'read', offset, length),
        ),
      );
    }
    if (length === 0) return Promise.resolve(into ? into.subarray(0, 0) : new Uint8Array(0));
    // Inline, not through call(): no closure per read on the copy's hot path.
    if (this.#fits(offset, length, into)) {
      try {
        return this.#inner.read(offset, length, into);
      } catch (e) {
        return Promise.reject(e);
      }
    }
    return this.#readPadded(offset, length, into);
  }

  /** A read split at maxTransfer, its unaligned edges and misaligned memory through bounces. */
  async #readPadded(offset: number, length: number, into: Uint8Array | undefined): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : this.#alloc(length);
    const end = offset + length;
    const pieces: Array<() => Promise<void>> = [];
    const { mid, midEnd, head, tail } = this.#edges(offset, end);
    if (head) pieces.push(() => this.#bounceRead(offset, mid - offset, out.subarray(0, mid - offset)));
    if (tail) pieces.push(() => this.#bounceRead(midEnd, end - midEnd, out.subarray(midEnd - offset)));
    for (let s = mid; s < midEnd; s += this.#maxIo) {
      const n = Math.min(this.#maxIo, midEnd - s);
      const dest = out.subarray(s - offset, s - offset + n);
      pieces.push(this.#memoryFits(dest) ? () => this.#readInto(s, n, dest) : () => this.#bounceRead(s, n, dest));
    }
    await allInFlight(pieces);
    return out;
  }

  /**
   * Checks segments against the image and `buffer`: the error to reject with, or
   * whether every one can go to the driver as it is.
   */
  #checkSegments(op: 'read' | 'write', buffer: Uint8Array, segments: SegmentList): BlockError | boolean {
    let direct = true;
    for (let i = 0; i < segments.count; i++) {
      const offset = segments.offsetAt(i);
      const length = segments.lengthAt(i);
      const pos = segments.positionAt(i);
      const err = this.#refuse(op, offset, length, op === 'write');
      if (err) return err;
      if (!(Number.isSafeInteger(pos) && pos >= 0 && pos + length <= buffer.length)) {
        return new BlockError(
          'EINVAL',
          `segment ${i} runs past the end of the buffer`,
          at(this.#inner, op, offset, length),
        );
      }
      if (direct && !this.#fits(offset, length, buffer, pos)) direct = false;
    }
    return direct;
  }

  readSegments(into: Uint8Array, segments: SegmentList): Promise<void> {
    const checked = this.#checkSegments('read', into, segments);
    if (checked instanceof BlockError) return Promise.reject(checked);
    if (segments.count === 0) return Promise.resolve();
    if (checked) return call(() => this.#inner.readSegments!(into, segments));
    // Some piece needs splitting or a bounce: each through read(), all in flight.
    const pieces: Array<() => Promise<unknown>> = [];
    for (let i = 0; i < segments.count; i++) {
      const offset = segments.offsetAt(i);
      const length = segments.lengthAt(i);
      const pos = segments.positionAt(i);
      pieces.push(() => this.read(offset, length, into.subarray(pos, pos + length)));
    }
    return allInFlight(pieces);
  }

  blockStatus(offset: number, length: number): Promise<Extent> {
    const inner = this.#inner;
    if (this.#closed) return Promise.reject(this.#closedError('blockStatus'));
    const size = inner.size;
    if (!(Number.isSafeInteger(offset) && offset >= 0 && offset < size)) {
      return Promise.reject(
        new BlockError(
          'ERANGE',
          `block status outside the image (size ${size})`,
          at(inner, 'blockStatus', offset, length),
        ),
      );
    }
    if (!inner.blockStatus) return Promise.resolve({ kind: 'data', length: size - offset });
    const asked = Number.isSafeInteger(length) && length > 0 ? Math.min(length, size - offset) : size - offset;
    return call(() => inner.blockStatus!(offset, asked)).then((ext) => {
      if (!(ext.length > 0))
        throw new BlockError('EIO', 'driver returned an empty extent', at(inner, 'blockStatus', offset, length));
      // The length is a hint that may run on, but never past the end of the image.
      return offset + ext.length <= size ? ext : { ...ext, length: size - offset };
    });
  }

  // ---- writes -----------------------------------------------------------------------

  write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    const later = this.#serializer?.waiting && this.#behindBarrier(() => this.write(offset, data, flags));
    if (later) return later;
    const err = this.#refuse('write', offset, data.length, true);
    if (err) return Promise.reject(err);
    if (data.length === 0) return Promise.resolve();
    if (this.#fits(offset, data.length, data) && (!flags?.compress || offset % this.#compressionUnit === 0)) {
      const inner = this.#inner;
      if (!this.#serializer) {
        try {
          return inner.write!(offset, data, flags);
        } catch (e) {
          return Promise.reject(e);
        }
      }
      return this.#serializer.track(() => inner.write!(offset, data, flags));
    }
    return this.#writePadded(offset, data, flags);
  }

  /** A write split at maxTransfer (compression units kept whole), its unaligned edges read-modify-written. */
  #writePadded(offset: number, data: Uint8Array, flags: WriteFlags | undefined): Promise<void> {
    const end = offset + data.length;
    const unitOfCompression = this.#compressionUnit;
    if (
      flags?.compress &&
      (offset % unitOfCompression !== 0 || (data.length % unitOfCompression !== 0 && end !== this.#inner.size))
    ) {
      return Promise.reject(
        new BlockError(
          'EINVAL',
          `compressed writes cover whole ${unitOfCompression}-byte compression units`,
          at(this.#inner, 'write', offset, data.length),
        ),
      );
    }
    const { mid, midEnd, head, tail } = this.#edges(offset, end);
    const pieces: Array<() => Promise<void>> = [];
    if (head) pieces.push(() => this.#readModifyWrite('write', offset, mid - offset, data, flags));
    const unit = flags?.compress ? unitOfCompression : this.#align;
    const step = Math.max(unit, this.#maxIo - (this.#maxIo % unit));
    for (let s = mid; s < midEnd; s += step) {
      const piece = data.subarray(s - offset, Math.min(s + step, midEnd) - offset);
      pieces.push(() => this.#writeMiddle(s, piece, flags));
    }
    if (tail)
      pieces.push(() => this.#readModifyWrite('write', midEnd, end - midEnd, data.subarray(midEnd - offset), flags));
    return this.#runPieces(pieces);
  }

  /** An aligned piece of a split write, copied first when its memory is not aligned. */
  #writeMiddle(offset: number, piece: Uint8Array, flags: WriteFlags | undefined): Promise<void> {
    let data = piece;
    if (!this.#memoryFits(piece)) {
      data = this.#alloc(piece.length);
      data.set(piece);
    }
    return this.#send('write', () => this.#inner.write!(offset, data, flags));
  }

  writeSegments(from: Uint8Array, segments: SegmentList): Promise<void> {
    // The caller may reuse the list once this returns: a write held back keeps a copy.
    const later = this.#serializer?.waiting && this.#behindBarrier(() => this.writeSegments(from, copyOf(segments)));
    if (later) return later;
    const checked = this.#checkSegments('write', from, segments);
    if (checked instanceof BlockError) return Promise.reject(checked);
    if (segments.count === 0) return Promise.resolve();
    if (checked) return this.#send('write', () => this.#inner.writeSegments!(from, segments));
    const pieces: Array<() => Promise<void>> = [];
    for (let i = 0; i < segments.count; i++) {
      const offset = segments.offsetAt(i);
      const pos = segments.positionAt(i);
      const data = from.subarray(pos, pos + segments.lengthAt(i));
      pieces.push(() => this.write(offset, data));
    }
    return this.#runPieces(pieces);
  }

  writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    const later = this.#serializer?.waiting && this.#behindBarrier(() => this.writeZeroes(offset, length, flags));
    if (later) return later;
    const inner = this.#inner;
    const err = this.#refuse('writeZeroes', offset, length, true);
    if (err) return Promise.reject(err);
    if (length === 0) return Promise.resolve();
    // A fast zero is all or nothing at metadata speed: no read-modify-write of the edges.
    if (flags?.fast && (inner.canFastZero !== true || !inner.writeZeroes || !this.#aligned(offset, length))) {
      const why =
        inner.canFastZero && inner.writeZeroes
          ? "a fast zero must be aligned to the image's blocks"
          : 'this image cannot zero fast';
      return Promise.reject(new BlockError('ENOTSUP', why, at(inner, 'writeZeroes', offset, length)));
    }
    if (!inner.writeZeroes) return this.#writeZeroBuffers(offset, length);
    if (length <= this.#maxZero && this.#aligned(offset, length))
      return this.#send('writeZeroes', () => inner.writeZeroes!(offset, length, flags));
    return this.#zeroPadded(offset, length, flags);
  }

  #zeroPadded(offset: number, length: number, flags: WriteZeroesFlags | undefined): Promise<void> {
    const end = offset + length;
    const { mid, midEnd, head, tail } = this.#edges(offset, end);
    const parts: Array<() => Promise<void>> = [];
    if (head) parts.push(() => this.#readModifyWrite('writeZeroes', offset, mid - offset, undefined));
    // One piece at a time: a huge zero request must not become thousands in flight.
    parts.push(async () => {
      for (let s = mid; s < midEnd; s += this.#maxZero) {
        const n = Math.min(this.#maxZero, midEnd - s);
        await this.#send('writeZeroes', () => this.#inner.writeZeroes!(s, n, flags));
      }
    });
    if (tail) parts.push(() => this.#readModifyWrite('writeZeroes', midEnd, end - midEnd, undefined));
    return this.#runPieces(parts);
  }

  /** Zeroes for a driver without writeZeroes: a buffer of them written piece by piece. */
  async #writeZeroBuffers(offset: number, length: number): Promise<void> {
    const zeroes = (this.#zeroes ??= this.#alloc(Math.min(this.#maxIo, 1 << 20)).fill(0));
    for (let done = 0; done < length; done += zeroes.length) {
      const n = Math.min(zeroes.length, length - done);
      await this.write(offset + done, n === zeroes.length ? zeroes : zeroes.subarray(0, n));
    }
  }

  async discard(offset: number, length: number): Promise<void> {
    const err = this.#refuse('discard', offset, length, true);
    if (err) throw err;
    const inner = this.#inner;
    if (!inner.discard) return;
    // Advisory: only the whole blocks inside the range (the image's end counts as one).
    const align = this.#align;
    const start = Math.ceil(offset / align) * align;
    const end = offset + length === inner.size ? offset + length : offset + length - ((offset + length) % align);
    for (let s = start; s < end; s += this.#maxZero) {
      const n = Math.min(this.#maxZero, end - s);
      await this.#send('discard', () => inner.discard!(s, n));
    }
  }

  flush(): Promise<void> {
    if (this.#closed) return Promise.reject(this.#closedError('flush'));
    const inner = this.#inner;
    return inner.flush ? call(() => inner.flush!()) : Promise.resolve();
  }

  /**
   * Nothing is sent after close: queued writes fail with EBADF. On a backend that needs
   * alignment (its writes are counted), the writes in flight finish first.
   */
  close(): Promise<void> {
    if (this.#closed) return Promise.resolve();
    this.#closed = true;
    const close = (): Promise<void> => call(() => this.#inner.close());
    return this.#serializer ? this.#serializer.exclusive(close) : close();
  }

  resize(size: number): Promise<void> {
    const inner = this.#inner;
    if (this.#closed) return Promise.reject(this.#closedError('resize'));
    if (this.#readOnly)
      return Promise.reject(new BlockError('EROFS', this.#readOnlyReason, { op: 'resize', location: inner.location }));
    if (!Number.isSafeInteger(size) || size < 0)
      return Promise.reject(
        new BlockError('EINVAL', `invalid size ${size}`, { op: 'resize', location: inner.location }),
      );
    const resize = (): Promise<void> => call(() => inner.resize!(size));
    return this.#serializer ? this.#serializer.exclusive(resize) : resize();
  }

  // ---- copy steps -------------------------------------------------------------------

  /**
   * A copy step (copyTo on a source, copyFrom on a target) is one chunk: checked like a
   * read or a write, and declined (false) rather than split or padded when it is larger
   * than maxTransfer, unaligned, or in memory the driver cannot use. The caller then
   * reads and writes the chunk through the gate.
   */
  #mayCopy(op: 'read' | 'write', offset: number, length: number, request: CopyRequest): boolean {
    const err = this.#refuse(op, offset, length, op === 'write');
    if (err) throw err;
    if (request.offload) return length <= this.#maxIo && this.#aligned(offset, length);
    return request.buffer.length >= length && this.#fits(offset, length, request.buffer);
  }

  async copyTo(
    offset: number,
    length: number,
    target: BlockBackend,
    targetOffset: number,
    request: CopyRequest,
  ): Promise<boolean> {
    return (
      this.#mayCopy('read', offset, length, request) &&
      this.#inner.copyTo!(offset, length, target, targetOffset, request)
    );
  }

  async copyFrom(offset: number, length: number, source: BlockBackend, request: CopyRequest): Promise<boolean> {
    // Behind a read-modify-write, wait, then check against what the image is by then (as write).
    const wait = this.#serializer?.waiting;
    if (wait) await wait;
    if (!this.#mayCopy('write', offset, length, request)) return false;
    return this.#send('write', () => this.#inner.copyFrom!(offset, length, source, request));
  }
}

/** A copy of a segment list, for a request held back after its caller moved on. */
function copyOf(segments: SegmentList): SegmentList {
  const copy = new SegmentList(segments.count);
  copy.array.set(segments.array.subarray(0, 3 * segments.count));
  copy.count = segments.count;
  return copy;
}
