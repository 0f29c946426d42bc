/**
 * The request gate: every backend the registry opens (protocols, formats, backing files,
 * external data files) is wrapped in one, so that the core, not each driver, enforces
 * the interface's rules for every request, whoever makes it: convert, compare, a format
 * driver reading its protocol, an embedding program. As QEMU's block layer does in
 * bdrv_co_preadv/pwritev for every driver:
 * - a closed backend (EBADF), a change to a read-only one (EROFS), a request outside the
 *   image (ERANGE): one check, the same codes whatever the driver;
 * - reads and writes are split at maxTransfer, writeZeroes and discard at maxWriteZeroes;
 * - unaligned reads go through a bounce buffer; unaligned writes and zeroes are padded
 *   with a read-modify-write of the edge blocks, serialised against every other write
 *   to the backend (see WriteSerializer); unaligned discards shrink to whole blocks
 *   (discard is advisory);
 * - memory not on a minMemAlignment boundary goes through an aligned bounce buffer;
 * - copy offload (copyTo/copyFrom) and fused copies (pipeTo/pipeFrom) are checked as
 *   a read and a write; what would need padding or splitting is declined, so the caller
 *   reads and writes it instead.
 *
 * A driver therefore only sees requests that lie inside the image, start on a multiple
 * of requestAlignment and are a multiple of it long (or end at the image's end, when
 * its size is not a multiple), are at most maxTransfer (maxWriteZeroes for zeroes and
 * discards), and change nothing on a read-only or closed backend; compressed writes
 * cover whole compressionUnit blocks (others are refused). Pieces of a split request go
 * out one by one to a target that takes one write at a time. Nothing is sent after
 * close(). Reads and writes that already respect all that go straight to the driver:
 * the gate adds a few comparisons, and allocates nothing unless the backend needs
 * alignment (then a closure and a promise per write, to know which are in flight).
 */
import { BlockError } from './errors.js';
import { forwardBackend } from './forward.js';
import { settleAll } from './settle.js';
import type { BlockBackend, BlockLimits, Extent, PipeRequest, WriteFlags, WriteZeroesFlags } from './types.js';

const GATED = Symbol.for('@blockconv/core.gated');

/** The backend a gate wraps, for tests and diagnostics; the backend itself when not gated. */
export function ungated(backend: BlockBackend): BlockBackend {
  return (backend as { [GATED]?: BlockBackend })[GATED] ?? backend;
}

export function isGated(backend: BlockBackend): boolean {
  return (backend as { [GATED]?: BlockBackend })[GATED] !== undefined;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && Math.log2(n) % 1 === 0;
}

/**
 * Checks that a backend's limits are data the gate can honour; a driver that declares
 * nonsense fails at open with a message naming the field, not later with odd requests.
 */
export function checkLimits(b: BlockBackend): void {
  const l = b.limits;
  const bad = (field: string, why: string): never => {
    throw new BlockError('EINVAL', `driver "${b.driverName}" declares invalid limits: ${why}`, { op: 'open', location: b.location, field: `limits.${field}` });
  };
  if (!l) bad('', 'no limits');
  if (!isPowerOfTwo(l.requestAlignment)) bad('requestAlignment', `${l.requestAlignment} is not a power of two`);
  if (!Number.isSafeInteger(l.maxTransfer) || l.maxTransfer < l.requestAlignment || l.maxTransfer % l.requestAlignment !== 0) {
    bad('maxTransfer', `${l.maxTransfer} is not a positive multiple of requestAlignment (${l.requestAlignment})`);
  }
  if (!Number.isSafeInteger(l.optimalTransfer) || l.optimalTransfer <= 0 || l.optimalTransfer > l.maxTransfer) {
    bad('optimalTransfer', `${l.optimalTransfer} is not between 1 and maxTransfer (${l.maxTransfer})`);
  }
  if (l.maxWriteZeroes !== undefined && (!Number.isSafeInteger(l.maxWriteZeroes) || l.maxWriteZeroes < l.requestAlignment)) {
    bad('maxWriteZeroes', `${l.maxWriteZeroes} is less than one block (${l.requestAlignment})`);
  }
  if (l.preferredAlignment !== undefined && (!isPowerOfTwo(l.preferredAlignment) || l.preferredAlignment % l.requestAlignment !== 0)) {
    bad('preferredAlignment', `${l.preferredAlignment} is not a power of two and a multiple of requestAlignment (${l.requestAlignment})`);
  }
  // A compression unit may be finer than the alignment (512-byte qcow2 clusters on O_DIRECT).
  if (l.compressionUnit !== undefined && (!isPowerOfTwo(l.compressionUnit) || l.compressionUnit > l.maxTransfer)) {
    bad('compressionUnit', `${l.compressionUnit} is not a power of two of at most maxTransfer (${l.maxTransfer})`);
  }
  const mem = l.minMemAlignment ?? 1;
  if (!isPowerOfTwo(mem)) bad('minMemAlignment', `${mem} is not a power of two`);
  if (mem > 1 && typeof b.allocBuffer !== 'function') bad('minMemAlignment', `${mem} needs allocBuffer()`);
  if (!Number.isSafeInteger(b.size) || b.size < 0) bad('size', `${b.size} is not a byte count`);
}

/**
 * Lets writes run concurrently, except a read-modify-write, which runs alone: it waits
 * for the writes in flight, and writes that arrive meanwhile wait for it (and are then
 * checked again, as the image may have been resized or closed). Otherwise a write
 * landing between the read and the write-back of a block would be undone.
 * Read-modify-writes are rare (the unaligned tail of an image, a format's small
 * metadata update on an O_DIRECT file), so a barrier is cheaper than tracking the range
 * of every write.
 */
class WriteSerializer {
  #inFlight = 0;
  /** Set while a read-modify-write waits or runs; resolves when the last one queued ends. */
  #exclusive: Promise<void> | null = null;
  #drained: (() => void) | null = null;
  readonly #untrack = (): void => {
    if (--this.#inFlight === 0 && this.#drained) { const d = this.#drained; this.#drained = null; d(); }
  };

  /** What a new write must wait for first, if anything. */
  get waiting(): Promise<void> | null {
    return this.#exclusive;
  }

  /** Starts a plain write now (the caller has waited for `waiting`), counting it in flight. */
  track<T>(start: () => Promise<T>): Promise<T> {
    this.#inFlight++;
    let p: Promise<T>;
    try {
      p = start();
    } catch (err) {
      this.#untrack();
      return Promise.reject(err);
    }
    p.then(this.#untrack, this.#untrack);
    return p;
  }

  /** Runs `body` once no other write is in flight, holding new writes back until it ends. */
  async exclusive<T>(body: () => Promise<T>): Promise<T> {
    const before = this.#exclusive;
    let release!: () => void;
    const mine = new Promise<void>((r) => { release = r; });
    const tail = before ? before.then(() => mine) : mine;
    this.#exclusive = tail;
    try {
      if (before) await before;
      if (this.#inFlight > 0) await new Promise<void>((r) => { this.#drained = r; });
      return await body();
    } finally {
      if (this.#exclusive === tail) this.#exclusive = null;
      release();
    }
  }
}

/** Error details for one request. */
function at(b: BlockBackend, op: string, offset: number, length: number) {
  return { op, location: b.location, offset, length };
}

/** Facts the opener knows better than the driver: what a create() said, a read-only protocol. */
export interface GateFacts {
  readonly readsZeroesInitially?: boolean;
  /** The backend must be read-only, for this reason (it reports readOnly and readOnlyReason). */
  readonly readOnlyReason?: string;
}

/** Calls a driver method, turning a synchronous throw (a careless driver) into a rejection. */
function call<T>(start: () => Promise<T>): Promise<T> {
  try {
    return start();
  } catch (err) {
    return Promise.reject(err);
  }
}

/**
 * Wraps `inner` in the request gate. Idempotent: a gated backend is returned as it is.
 * Every other member (capabilities, info, a driver's own extras) is forwarded.
 */
export function gateBackend(inner: BlockBackend, facts?: GateFacts): BlockBackend {
  if (isGated(inner)) {
    if (!facts) return inner;
    inner = ungated(inner); // a new gate with the facts, in place of the old one
  }
  checkLimits(inner);
  const forcedReadOnly = facts?.readOnlyReason;
  const readOnly = forcedReadOnly !== undefined || inner.readOnly;
  const readOnlyReason = forcedReadOnly ?? inner.readOnlyReason ?? 'image is read-only';
  const l: BlockLimits = inner.limits;
  const align = l.requestAlignment;
  const memAlign = l.minMemAlignment ?? 1;
  /** Largest read/write piece: maxTransfer, in whole blocks. */
  const maxIo = l.maxTransfer - (l.maxTransfer % align);
  const maxZero = Math.max(align, (l.maxWriteZeroes ?? l.maxTransfer) - ((l.maxWriteZeroes ?? l.maxTransfer) % align));
  const compressionUnit = l.compressionUnit ?? align;
  // Backends without alignment never need a read-modify-write, so their writes are not tracked.
  const serializer = align > 1 ? new WriteSerializer() : undefined;
  // The pieces of a split request go out one by one to a target that takes one write at a time.
  const oneAtATime = inner.canWriteOutOfOrder === false;
  let closed = false;
  const closedError = (op: string): BlockError => new BlockError('EBADF', 'image is closed', { op, location: inner.location });

  const alloc = (n: number): Uint8Array => (memAlign > 1 ? inner.allocBuffer!(n) : new Uint8Array(n));
  const memOk = (u: Uint8Array | undefined): boolean => memAlign === 1 || u === undefined || u.byteOffset % memAlign === 0;
  /** Null when the request may proceed; else the error to reject it with. */
  const refuse = (op: string, offset: number, length: number, writes: boolean): BlockError | null => {
    if (closed) return closedError(op);
    if (writes && readOnly) return new BlockError('EROFS', readOnlyReason, at(inner, op, offset, length));
    const size = inner.size;
    if (!(Number.isSafeInteger(offset) && Number.isSafeInteger(length) && offset >= 0 && length >= 0 && offset + length <= size)) {
      return new BlockError('ERANGE', `request outside the image (size ${size})`, at(inner, op, offset, length));
    }
    return null;
  };
  /** Aligned as the driver needs it: start on a block, whole blocks or up to the end. */
  const isAligned = (offset: number, length: number): boolean =>
    offset % align === 0 && (length % align === 0 || offset + length === inner.size);
  /** One piece of a split write: after any read-modify-write queued before it, never after close. */
  const send = <T>(op: string, start: () => Promise<T>): Promise<T> => {
    if (!serializer) return closed ? Promise.reject(closedError(op)) : call(start);
    const wait = serializer.waiting;
    if (wait) return wait.then(() => send(op, start));
    return closed ? Promise.reject(closedError(op)) : serializer.track(start);
  };
  /** Runs the pieces of one request: all in flight, or one by one; every started one settles before an error is thrown. */
  const runPieces = async (pieces: ReadonlyArray<() => Promise<unknown>>): Promise<void> => {
    if (oneAtATime || pieces.length === 1) {
      for (const piece of pieces) await piece();
      return;
    }
    const started: Array<Promise<unknown>> = [];
    try {
      for (const piece of pieces) started.push(piece());
    } finally {
      await settleAll(started);
    }
  };

  /** Splits [offset, end) into unaligned edge blocks (bounced or read-modify-written) and an aligned middle. */
  const edges = (offset: number, end: number): { mid: number; midEnd: number; head: boolean; tail: boolean } => {
    let mid = offset;
    let midEnd = end;
    let head = false;
    let tail = false;
    if (offset % align !== 0) {
      mid = Math.min(offset - (offset % align) + align, end);
      head = true;
    }
    if (midEnd > mid && midEnd % align !== 0 && midEnd !== inner.size) {
      midEnd = Math.max(mid, midEnd - (midEnd % align));
      tail = end > midEnd;
    }
    return { mid, midEnd, head, tail };
  };

  /** Reads [pos, pos+n) into dest through an aligned bounce buffer covering whole blocks. */
  const bounceRead = async (pos: number, n: number, dest: Uint8Array): Promise<void> => {
    const start = pos - (pos % align);
    const end = Math.min(Math.ceil((pos + n) / align) * align, inner.size);
    for (let s = start; s < end; s += maxIo) {
      const e = Math.min(s + maxIo, end);
      const lo = Math.max(s, pos);
      const hi = Math.min(e, pos + n);
      if (hi <= lo) continue;
      const got = await inner.read(s, e - s, alloc(e - s));
      dest.set(got.subarray(lo - s, hi - s), lo - pos);
    }
  };

  /** A read the driver can take as it is, or already split: straight to it. */
  const readDirect = async (offset: number, length: number, out: Uint8Array): Promise<void> => {
    const got = await inner.read(offset, length, out);
    if (got.buffer !== out.buffer || got.byteOffset !== out.byteOffset) out.set(got.subarray(0, length));
  };

  const readSlow = async (offset: number, length: number, into: Uint8Array | undefined): Promise<Uint8Array> => {
    const out = into ? into.subarray(0, length) : alloc(length);
    const end = offset + length;
    const pieces: Array<() => Promise<void>> = [];
    // Unaligned head and tail blocks through bounces; the aligned middle in maxIo pieces.
    const { mid, midEnd, head, tail } = edges(offset, end);
    if (head) pieces.push(() => bounceRead(offset, mid - offset, out.subarray(0, mid - offset)));
    if (tail) pieces.push(() => bounceRead(midEnd, end - midEnd, out.subarray(midEnd - offset)));
    for (let s = mid; s < midEnd; s += maxIo) {
      const n = Math.min(maxIo, midEnd - s);
      const dest = out.subarray(s - offset, s - offset + n);
      pieces.push(memOk(dest) ? () => readDirect(s, n, dest) : () => bounceRead(s, n, dest));
    }
    const started: Array<Promise<void>> = [];
    try {
      for (const piece of pieces) started.push(piece());
    } finally {
      await settleAll(started);
    }
    return out;
  };

  /**
   * Writes the unaligned [pos, pos+n) — `data`, or zeroes when absent — by reading the
   * whole blocks around it, patching them and writing them back, alone (see WriteSerializer).
   */
  const readModifyWrite = (op: string, pos: number, n: number, data: Uint8Array | undefined, flags?: WriteFlags): Promise<void> =>
    serializer!.exclusive(async () => {
      // Checked again: the image may have been closed or resized while this waited.
      if (closed) throw closedError(op);
      if (pos + n > inner.size) throw new BlockError('ERANGE', `request outside the image (size ${inner.size})`, at(inner, op, pos, n));
      const start = pos - (pos % align);
      const end = Math.min(Math.ceil((pos + n) / align) * align, inner.size);
      const block = alloc(end - start);
      const got = await inner.read(start, end - start, block);
      if (got.buffer !== block.buffer || got.byteOffset !== block.byteOffset) block.set(got.subarray(0, end - start));
      if (data) block.set(data.subarray(0, n), pos - start);
      else block.fill(0, pos - start, pos - start + n);
      if (closed) throw closedError(op);
      await inner.write(start, block, flags);
    });

  const writeSlow = (offset: number, data: Uint8Array, flags: WriteFlags | undefined): Promise<void> => {
    const end = offset + data.length;
    if (flags?.compress && (offset % compressionUnit !== 0 || (data.length % compressionUnit !== 0 && end !== inner.size))) {
      return Promise.reject(new BlockError('EINVAL', `compressed writes cover whole ${compressionUnit}-byte compression units`, at(inner, 'write', offset, data.length)));
    }
    const { mid, midEnd, head, tail } = edges(offset, end);
    const pieces: Array<() => Promise<void>> = [];
    if (head) pieces.push(() => readModifyWrite('write', offset, mid - offset, data, flags));
    // Compressed writes stay whole compression units (checked above): split on those.
    const unit = flags?.compress ? compressionUnit : align;
    const step = Math.max(unit, maxIo - (maxIo % unit));
    for (let s = mid; s < midEnd; s += step) {
      const piece = data.subarray(s - offset, Math.min(s + step, midEnd) - offset);
      const at = s;
      if (memOk(piece)) {
        pieces.push(() => send('write', () => inner.write(at, piece, flags)));
      } else {
        pieces.push(() => {
          const copy = alloc(piece.length);
          copy.set(piece);
          return send('write', () => inner.write(at, copy, flags));
        });
      }
    }
    if (tail) pieces.push(() => readModifyWrite('write', midEnd, end - midEnd, data.subarray(midEnd - offset), flags));
    return runPieces(pieces);
  };

  const zeroSlow = (offset: number, length: number, flags: WriteZeroesFlags | undefined): Promise<void> => {
    const end = offset + length;
    const { mid, midEnd, head, tail } = edges(offset, end);
    const parts: Array<() => Promise<void>> = [];
    if (head) parts.push(() => readModifyWrite('writeZeroes', offset, mid - offset, undefined));
    // One piece at a time: a huge zero request must not become thousands in flight.
    parts.push(async () => {
      for (let s = mid; s < midEnd; s += maxZero) {
        const n = Math.min(maxZero, midEnd - s);
        await send('writeZeroes', () => inner.writeZeroes(s, n, flags));
      }
    });
    if (tail) parts.push(() => readModifyWrite('writeZeroes', midEnd, end - midEnd, undefined));
    return runPieces(parts);
  };

  const gate: { -readonly [K in keyof BlockBackend]?: BlockBackend[K] } = {
    ...(facts?.readsZeroesInitially ? { readsZeroesInitially: true } : {}),
    ...(forcedReadOnly !== undefined ? { readOnly: true, readOnlyReason: forcedReadOnly } : {}),
    read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
      const err = refuse('read', offset, length, false);
      if (err) return Promise.reject(err);
      if (into && into.length < length) {
        return Promise.reject(new BlockError('EINVAL', `buffer of ${into.length} bytes cannot hold ${length}`, at(inner, 'read', offset, length)));
      }
      if (length === 0) return Promise.resolve(into ? into.subarray(0, 0) : new Uint8Array(0));
      if (length <= maxIo && isAligned(offset, length) && memOk(into)) {
        // Inline, not through call(): no closure per read on the copy's hot path.
        try { return inner.read(offset, length, into); } catch (e) { return Promise.reject(e); }
      }
      return readSlow(offset, length, into);
    },

    write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
      // Behind a read-modify-write, wait, then check against what the image is by then.
      const wait = serializer?.waiting;
      if (wait) return wait.then(() => gate.write!(offset, data, flags));
      const err = refuse('write', offset, data.length, true);
      if (err) return Promise.reject(err);
      if (data.length === 0) return Promise.resolve();
      if (data.length <= maxIo && isAligned(offset, data.length) && memOk(data) && (!flags?.compress || offset % compressionUnit === 0)) {
        if (!serializer) {
          try { return inner.write(offset, data, flags); } catch (e) { return Promise.reject(e); }
        }
        return serializer.track(() => inner.write(offset, data, flags));
      }
      return writeSlow(offset, data, flags);
    },

    writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
      const wait = serializer?.waiting;
      if (wait) return wait.then(() => gate.writeZeroes!(offset, length, flags));
      const err = refuse('writeZeroes', offset, length, true);
      if (err) return Promise.reject(err);
      if (length === 0) return Promise.resolve();
      // A fast zero is all or nothing at metadata speed: no read-modify-write of the edges.
      if (flags?.fast && (inner.canFastZero !== true || !isAligned(offset, length))) {
        return Promise.reject(new BlockError('ENOTSUP', inner.canFastZero ? 'a fast zero must be aligned to the image\'s blocks' : 'this image cannot zero fast', at(inner, 'writeZeroes', offset, length)));
      }
      if (length <= maxZero && isAligned(offset, length)) return send('writeZeroes', () => inner.writeZeroes(offset, length, flags));
      return zeroSlow(offset, length, flags);
    },

    async discard(offset: number, length: number): Promise<void> {
      const err = refuse('discard', offset, length, true);
      if (err) throw err;
      // Advisory: only the whole blocks inside the range (the image's end counts as one).
      const start = Math.ceil(offset / align) * align;
      const end = offset + length === inner.size ? offset + length : offset + length - ((offset + length) % align);
      for (let s = start; s < end; s += maxZero) {
        const n = Math.min(maxZero, end - s);
        await send('discard', () => inner.discard(s, n));
      }
    },

    async blockStatus(offset: number, length: number): Promise<Extent> {
      if (closed) throw closedError('blockStatus');
      const size = inner.size;
      if (!(Number.isSafeInteger(offset) && offset >= 0 && offset < size)) {
        throw new BlockError('ERANGE', `block status outside the image (size ${size})`, at(inner, 'blockStatus', offset, length));
      }
      const ext = await inner.blockStatus(offset, Number.isSafeInteger(length) && length > 0 ? Math.min(length, size - offset) : size - offset);
      if (!(ext.length > 0)) throw new BlockError('EIO', 'driver returned an empty extent', at(inner, 'blockStatus', offset, length));
      // The length is a hint that may run on, but never past the end of the image.
      return offset + ext.length <= size ? ext : { ...ext, length: size - offset };
    },

    flush(): Promise<void> {
      if (closed) return Promise.reject(closedError('flush'));
      return call(() => inner.flush());
    },

    /**
     * Nothing is sent after close: queued writes fail with EBADF. On a backend that needs
     * alignment (its writes are counted), the writes in flight finish first.
     */
    close(): Promise<void> {
      if (closed) return Promise.resolve();
      closed = true;
      return serializer ? serializer.exclusive(() => call(() => inner.close())) : call(() => inner.close());
    },
  };

  if (inner.resize) {
    const resize = inner.resize.bind(inner);
    gate.resize = (size: number): Promise<void> => {
      if (closed) return Promise.reject(closedError('resize'));
      if (readOnly) return Promise.reject(new BlockError('EROFS', readOnlyReason, { op: 'resize', location: inner.location }));
      if (!Number.isSafeInteger(size) || size < 0) return Promise.reject(new BlockError('EINVAL', `invalid size ${size}`, { op: 'resize', location: inner.location }));
      return serializer ? serializer.exclusive(() => call(() => resize(size))) : call(() => resize(size));
    };
  }

  /**
   * Checks (offset, length, buffer position) triples of readSegments/writeScattered: the
   * error to reject with, or whether every piece can go to the driver as it is.
   */
  const checkPlaced = (op: 'read' | 'write', buffer: Uint8Array, segments: Float64Array, count: number): BlockError | boolean => {
    let direct = true;
    for (let i = 0; i < count; i++) {
      const offset = segments[3 * i]!;
      const length = segments[3 * i + 1]!;
      const pos = segments[3 * i + 2]!;
      const err = refuse(op, offset, length, op === 'write');
      if (err) return err;
      if (!(Number.isSafeInteger(pos) && pos >= 0 && pos + length <= buffer.length)) {
        return new BlockError('EINVAL', `segment ${i} runs past the end of the buffer`, at(inner, op, offset, length));
      }
      if (direct && !(length <= maxIo && isAligned(offset, length) && (memAlign === 1 || (buffer.byteOffset + pos) % memAlign === 0))) direct = false;
    }
    return direct;
  };

  if (inner.readSegments) {
    const readSegments = inner.readSegments.bind(inner);
    gate.readSegments = (into: Uint8Array, segments: Float64Array, count: number): Promise<void> => {
      const checked = checkPlaced('read', into, segments, count);
      if (checked instanceof BlockError) return Promise.reject(checked);
      if (count === 0) return Promise.resolve();
      const direct = checked;
      if (direct) return call(() => readSegments(into, segments, count));
      // Some piece needs splitting or a bounce: each through read(), all in flight.
      const pieces: Array<() => Promise<unknown>> = [];
      for (let i = 0; i < count; i++) {
        const offset = segments[3 * i]!;
        const length = segments[3 * i + 1]!;
        const pos = segments[3 * i + 2]!;
        pieces.push(() => gate.read!(offset, length, into.subarray(pos, pos + length)));
      }
      return runPieces(pieces);
    };
  }

  if (inner.writeSegments) {
    const writeSegments = inner.writeSegments.bind(inner);
    gate.writeSegments = (offset: number, data: Uint8Array, segments: Float64Array, count: number): Promise<void> => {
      const wait = serializer?.waiting;
      if (wait) {
        const copy = segments.slice(0, 2 * count); // the caller may reuse the list once this returns
        return wait.then(() => gate.writeSegments!(offset, data, copy, count));
      }
      let direct = true;
      let prevEnd = 0;
      for (let i = 0; i < count; i++) {
        const s = segments[2 * i]!;
        const e = segments[2 * i + 1]!;
        const err = refuse('write', offset + s, e - s, true);
        if (err) return Promise.reject(err);
        if (!(Number.isSafeInteger(s) && s >= prevEnd && e >= s && e <= data.length)) {
          return Promise.reject(new BlockError('EINVAL', `segment ${i} is not inside the buffer, after the one before`, at(inner, 'write', offset + s, e - s)));
        }
        prevEnd = e;
        if (direct && !(e - s <= maxIo && isAligned(offset + s, e - s) && (memAlign === 1 || (data.byteOffset + s) % memAlign === 0))) direct = false;
      }
      if (count === 0) return Promise.resolve();
      if (direct) return send('write', () => writeSegments(offset, data, segments, count));
      const pieces: Array<() => Promise<void>> = [];
      for (let i = 0; i < count; i++) {
        const s = segments[2 * i]!;
        const e = segments[2 * i + 1]!;
        pieces.push(() => gate.write!(offset + s, data.subarray(s, e)));
      }
      return runPieces(pieces);
    };
  }

  if (inner.writeScattered) {
    const writeScattered = inner.writeScattered.bind(inner);
    gate.writeScattered = (from: Uint8Array, segments: Float64Array, count: number): Promise<void> => {
      const wait = serializer?.waiting;
      if (wait) {
        const copy = segments.slice(0, 3 * count);
        return wait.then(() => gate.writeScattered!(from, copy, count));
      }
      const checked = checkPlaced('write', from, segments, count);
      if (checked instanceof BlockError) return Promise.reject(checked);
      if (count === 0) return Promise.resolve();
      const direct = checked;
      if (direct) return send('write', () => writeScattered(from, segments, count));
      const pieces: Array<() => Promise<void>> = [];
      for (let i = 0; i < count; i++) {
        const offset = segments[3 * i]!;
        const length = segments[3 * i + 1]!;
        const pos = segments[3 * i + 2]!;
        pieces.push(() => gate.write!(offset, from.subarray(pos, pos + length)));
      }
      return runPieces(pieces);
    };
  }

  /**
   * Copy offload (copyTo on a source, copyFrom on a target): checked like a read or a
   * write, split at maxTransfer, pieces one by one. A range the driver could not take
   * as it is (unaligned for O_DIRECT) is declined (false): the caller's read and write
   * then go through the gate's padding.
   */
  const mayOffload = (op: 'read' | 'write', offset: number, length: number): boolean => {
    const err = refuse(op, offset, length, op === 'write');
    if (err) throw err;
    return isAligned(offset, length);
  };

  if (inner.copyTo) {
    const copyTo = inner.copyTo.bind(inner);
    gate.copyTo = async (offset: number, length: number, target: BlockBackend, targetOffset: number): Promise<boolean> => {
      if (!mayOffload('read', offset, length)) return false;
      for (let done = 0; done < length; done += maxIo) {
        if (!(await copyTo(offset + done, Math.min(maxIo, length - done), target, targetOffset + done))) return false;
      }
      return true;
    };
  }

  if (inner.copyFrom) {
    const copyFrom = inner.copyFrom.bind(inner);
    gate.copyFrom = async (offset: number, length: number, source: BlockBackend, sourceOffset: number): Promise<boolean> => {
      // Behind a read-modify-write, wait, then check against what the image is by then (as write).
      const wait = serializer?.waiting;
      if (wait) await wait;
      if (!mayOffload('write', offset, length)) return false;
      for (let done = 0; done < length; done += maxIo) {
        const n = Math.min(maxIo, length - done);
        if (!(await send('write', () => copyFrom(offset + done, n, source, sourceOffset + done)))) return false;
      }
      return true;
    };
  }

  /**
   * A fused copy (pipeTo on a source, pipeFrom on a target): checked like a read or a
   * write. It is one chunk, so one that is larger than maxTransfer, unaligned, or in
   * memory the driver cannot use is declined (-1) rather than split: the caller then
   * reads and writes it through the gate.
   */
  const mayPipe = (op: 'read' | 'write', offset: number, length: number, request: PipeRequest): boolean =>
    mayOffload(op, offset, length) && length <= maxIo && request.buffer.length >= length && memOk(request.buffer);

  if (inner.pipeTo) {
    const pipeTo = inner.pipeTo.bind(inner);
    gate.pipeTo = async (offset: number, length: number, target: BlockBackend, targetOffset: number, request: PipeRequest): Promise<number> =>
      mayPipe('read', offset, length, request) ? pipeTo(offset, length, target, targetOffset, request) : -1;
  }

  if (inner.pipeFrom) {
    const pipeFrom = inner.pipeFrom.bind(inner);
    gate.pipeFrom = async (offset: number, length: number, source: BlockBackend, pieceCount: number, request: PipeRequest): Promise<number> => {
      const wait = serializer?.waiting;
      if (wait) await wait;
      if (!mayPipe('write', offset, length, request)) return -1;
      return send('write', () => pipeFrom(offset, length, source, pieceCount, request));
    };
  }

  const gated = forwardBackend(inner, gate);
  Object.defineProperty(gated, GATED, { value: inner });
  return gated;
}
