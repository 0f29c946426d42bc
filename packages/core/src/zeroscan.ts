/**
 * Finding zero runs in data buffers (qemu-img's -S): the hot path of every convert,
 * so it avoids per-byte JavaScript. A unit whose first word is non-zero (the common
 * case for real data) is rejected by one typed-array load; otherwise memcmp, through
 * Buffer#compare, checks it against a zero page, greedily over large spans.
 */
import { SegmentList } from './segments.js';

/** Largest span compared in one call while a zero run is extended. */
const SPAN = 64 * 1024;
const ZEROES = Buffer.alloc(SPAN);

/** Per-buffer views made once, so the scan allocates nothing per request. */
export class ZeroScanner {
  readonly #bytes: Buffer;
  readonly #words: Int32Array;
  /** The data segments of the last scan: image offsets (base + position), lengths, positions in the buffer. */
  readonly data: SegmentList;
  /** Its zero runs, in the same form (the known holes among them). */
  readonly zeroes: SegmentList;
  #base = 0;
  /** While scanning: where the data segment being built starts. */
  #dataStart = 0;

  constructor(
    buffer: Uint8Array,
    readonly unit: number,
    readonly minRun: number,
  ) {
    if (buffer.byteOffset % 4 !== 0) throw new RangeError('scan buffer must be 4-byte aligned');
    this.#bytes = Buffer.from(buffer.buffer, buffer.byteOffset, buffer.byteLength);
    this.#words = new Int32Array(buffer.buffer, buffer.byteOffset, buffer.byteLength >> 2);
    const maxSegments = Math.ceil(buffer.byteLength / unit) + 1;
    this.data = new SegmentList(maxSegments);
    this.zeroes = new SegmentList(maxSegments);
  }

  /** Is [off, off+len) all zero? */
  #isZero(off: number, len: number): boolean {
    if (this.#words[off >> 2] !== 0) return false;
    for (let done = 0; done < len; done += SPAN) {
      const n = Math.min(SPAN, len - done);
      if (this.#bytes.compare(ZEROES, 0, n, off + done, off + done + n) !== 0) return false;
    }
    return true;
  }

  /**
   * Splits buffer[0, length) into data segments and zero runs, both placed at image
   * offset `base` + position. Zero runs shorter than minRun stay inside data; runs are
   * whole units, so they keep the target's alignment. `length` need not be a multiple
   * of the unit (the image's tail). `known` holds zero runs already known (holes the
   * source reported, never read into the buffer; ascending positions): they become
   * zero runs unscanned, and the buffer's bytes there are not looked at.
   */
  scan(length: number, base = 0, known?: SegmentList): void {
    this.data.clear();
    this.zeroes.clear();
    this.#base = base;
    this.#dataStart = 0;
    let pos = 0;
    const knownCount = known?.count ?? 0;
    for (let k = 0; k < knownCount; k++) {
      const start = known!.positionAt(k);
      const end = start + known!.lengthAt(k);
      this.#scanRange(pos, start);
      this.#zero(start, end);
      pos = end;
    }
    this.#scanRange(pos, length);
    if (length > this.#dataStart) this.data.push(base + this.#dataStart, length - this.#dataStart, this.#dataStart);
  }

  /** Finds the zero runs of [from, to). */
  #scanRange(from: number, to: number): void {
    const unit = this.unit;
    let pos = from;
    while (pos < to) {
      const n = Math.min(unit, to - pos);
      if (n < unit || !this.#isZero(pos, n)) {
        pos += n;
        continue;
      }
      // A zero unit: extend the run by galloping (doubling spans while they are zero,
      // halving after a miss), so a run costs O(its length) in memcmp and O(log) calls.
      const runStart = pos;
      pos += n;
      let step = unit;
      while (pos < to) {
        const room = to - pos - ((to - pos) % unit);
        if (room === 0) break;
        const span = Math.min(step, room);
        if (this.#isZero(pos, span)) {
          pos += span;
          // Spans stay whole units: a unit larger than SPAN is compared in one call.
          step = Math.min(step * 2, Math.max(unit, SPAN - (SPAN % unit)));
        } else if (span === unit) {
          break;
        } else {
          step = Math.max(unit, span / 2 - ((span / 2) % unit));
        }
      }
      if (pos - runStart >= this.minRun) this.#zero(runStart, pos);
    }
  }

  /** A zero run [start, end) of the buffer: joined to the one before when they touch. */
  #zero(start: number, end: number): void {
    if (start > this.#dataStart) this.data.push(this.#base + this.#dataStart, start - this.#dataStart, this.#dataStart);
    this.zeroes.append(this.#base + start, end - start, start);
    this.#dataStart = end;
  }
}

/** Is all of `u` zero? (memcmp against a zero page, span by span.) */
export function isZero(u: Uint8Array): boolean {
  const b = Buffer.from(u.buffer, u.byteOffset, u.byteLength);
  for (let done = 0; done < b.length; done += SPAN) {
    const n = Math.min(SPAN, b.length - done);
    if (b.compare(ZEROES, 0, n, done, done + n) !== 0) return false;
  }
  return true;
}

/** Do `a` and `b` hold the same bytes? */
export function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return (
    a.length === b.length &&
    Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))
  );
}
