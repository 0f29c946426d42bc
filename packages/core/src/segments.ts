/**
 * SegmentList: the one shape every list of byte ranges takes in the driver interface.
 * Each segment is an (offset, length, position) triple: `length` bytes at `offset` of
 * an image, which sit at `position` of a buffer. Vectored reads and writes, the pieces
 * of a fused copy, the holes of a chunk and the zero runs a scan found all use it, so a
 * driver never decodes a stride convention of its own.
 *
 * The triples live in one preallocated Float64Array (`array`, 3 numbers per segment),
 * which native bindings may read directly; the list itself allocates nothing per use.
 */
export class SegmentList {
  /** The triples: [offset0, length0, position0, offset1, ...]; only `count` of them are valid. */
  readonly array: Float64Array;
  /** Segments in use. */
  count = 0;

  /** A list with room for `capacity` segments; or one over an existing triple array (shared, not copied). */
  constructor(capacity: number | Float64Array, count = 0) {
    this.array = typeof capacity === 'number' ? new Float64Array(3 * capacity) : capacity;
    if (this.array.length % 3 !== 0) throw new RangeError('a segment array holds whole triples');
    if (!(Number.isSafeInteger(count) && count >= 0 && 3 * count <= this.array.length))
      throw new RangeError('count exceeds the segment array');
    this.count = count;
  }

  /** Segments the list can hold. */
  get capacity(): number {
    return this.array.length / 3;
  }

  /** Image offset of segment i. */
  offsetAt(i: number): number {
    return this.array[3 * i]!;
  }

  lengthAt(i: number): number {
    return this.array[3 * i + 1]!;
  }

  /** Where segment i sits in the buffer. */
  positionAt(i: number): number {
    return this.array[3 * i + 2]!;
  }

  /** Image offset just past segment i. */
  endAt(i: number): number {
    return this.array[3 * i]! + this.array[3 * i + 1]!;
  }

  /** Sum of the segments' lengths. */
  totalLength(): number {
    let n = 0;
    for (let i = 0; i < this.count; i++) n += this.array[3 * i + 1]!;
    return n;
  }

  /** Appends a segment; a full list throws (lists are sized for the worst case up front). */
  push(offset: number, length: number, position: number): void {
    const i = this.count;
    if (3 * i >= this.array.length) throw new RangeError(`segment list full (${this.capacity} segments)`);
    this.array[3 * i] = offset;
    this.array[3 * i + 1] = length;
    this.array[3 * i + 2] = position;
    this.count = i + 1;
  }

  /**
   * Appends a segment, or lengthens the last one when this one continues it both in the
   * image and in the buffer (zero runs that touch become one).
   */
  append(offset: number, length: number, position: number): void {
    const last = this.count - 1;
    if (last >= 0 && this.endAt(last) === offset && this.positionAt(last) + this.lengthAt(last) === position) {
      this.array[3 * last + 1]! += length;
      return;
    }
    this.push(offset, length, position);
  }

  clear(): void {
    this.count = 0;
  }

  /** The segments as plain objects, for tests and messages (allocates: not for hot paths). */
  toArray(): Array<{ offset: number; length: number; position: number }> {
    const out = [];
    for (let i = 0; i < this.count; i++)
      out.push({ offset: this.offsetAt(i), length: this.lengthAt(i), position: this.positionAt(i) });
    return out;
  }

  /** A list of the given segments (allocates: for tests and setup). */
  static of(...segments: ReadonlyArray<readonly [offset: number, length: number, position: number]>): SegmentList {
    const list = new SegmentList(segments.length);
    for (const [o, l, p] of segments) list.push(o, l, p);
    return list;
  }
}

/**
 * A chunk's data around its holes: for each run of [offset, offset + length) between
 * the segments of `holes` (ascending, image offsets inside the range), appends (run
 * offset, run length, run position relative to `offset`) to `out`. Convert reads a
 * chunk with merged holes so, and a copyTo half tells its target where the chunk's
 * bytes lie so. `out` needs room for holes.count + 1.
 */
export function piecesAroundHoles(offset: number, length: number, holes: SegmentList, out: SegmentList): void {
  out.clear();
  let pos = offset;
  const end = offset + length;
  for (let h = 0; h <= holes.count; h++) {
    const runEnd = h < holes.count ? holes.offsetAt(h) : end;
    if (runEnd > pos) out.push(pos, runEnd - pos, pos - offset);
    if (h < holes.count) pos = holes.endAt(h);
  }
}
