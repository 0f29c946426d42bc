/**
 * The cursor: hands workers the next chunk of the sources, asking block status lazily,
 * so that there is never a list of all requests (memory stays O(workers x buffer)).
 */
import { toBlockError } from '../errors.js';
import { roundDown } from '../registry.js';
import { chainStatus } from '../status.js';
import { SegmentList } from '../segments.js';
import type { GatedBackend, ExtentKind } from '../types.js';
import { MAX_MERGED_HOLE, MAX_MERGED_HOLES } from './options.js';

/** A chunk of work: one extent piece of one source, mapped to target offsets. */
export interface Chunk {
  seq: number;
  source: GatedBackend;
  sourceOffset: number;
  targetOffset: number;
  length: number;
  /** 'data' must be read; 'zero' is known zeroes. */
  kind: Exclude<ExtentKind, 'unallocated'>;
}

/**
 * A worker's list of its chunk's holes, for ChunkCursor.next to fill: the small holes a
 * data chunk was merged across, from a source that can read around them (readSegments),
 * as source offsets, lengths and positions in the chunk, on the zero scan's units. They
 * need not be read: the source says they are zeroes. Empty for most chunks.
 */
export function holeList(): SegmentList {
  return new SegmentList(MAX_MERGED_HOLES);
}

/**
 * Walks the sources in order, asking block status lazily, and carves the next chunk.
 * Only one block-status query is in flight; other workers wait for it.
 */
export class ChunkCursor {
  #index = 0;
  #pos = 0;
  #base = 0;
  #extentEnd = 0;
  #extentKind: 'data' | 'zero' = 'data';
  #pending: Promise<void> | null = null;
  #seq = 0;
  /** Holes merged into the current data extent: absolute source offsets [start, end). */
  readonly #holes = new Float64Array(2 * MAX_MERGED_HOLES);
  #holeCount = 0;
  readonly #splitAt: number;

  constructor(
    private readonly sources: readonly GatedBackend[],
    private readonly align: number,
    private readonly maxData: number,
    private readonly maxZero: number,
    private readonly allData: boolean,
    /** Smallest hole that may be merged into a data chunk (the zero scan must find it again); 0: never. */
    private readonly minMergedHole: number,
    /** The zero scan's unit: a merged hole must sit on unit boundaries of the chunk. */
    private readonly unit: number,
    /**
     * Resuming: the target offset to start at (a chunk boundary of the interrupted run),
     * and one that no chunk crosses (the end of what must be rewritten in full).
     */
    place: { readonly start?: number; readonly splitAt?: number } = {},
  ) {
    let start = place.start ?? 0;
    while (this.#index < sources.length && start >= sources[this.#index]!.size) {
      start -= sources[this.#index]!.size;
      this.#base += sources[this.#index]!.size;
      this.#index++;
    }
    this.#pos = start;
    this.#splitAt = place.splitAt ?? 0;
  }

  get issued(): number {
    return this.#seq;
  }

  /** The next chunk; a merged data chunk's holes go into `holes` (from holeList()). */
  async next(holes: SegmentList): Promise<Chunk | null> {
    for (;;) {
      if (this.#pending) {
        await this.#pending;
        continue;
      }
      const src = this.sources[this.#index];
      if (!src) return null;
      if (this.#pos >= src.size) {
        this.#base += src.size;
        this.#index++;
        this.#pos = 0;
        this.#extentEnd = 0;
        continue;
      }
      if (this.#pos < this.#extentEnd) return this.#carve(src, holes);
      this.#pending = this.#query(src).finally(() => {
        this.#pending = null;
      });
    }
  }

  async #query(src: GatedBackend): Promise<void> {
    const pos = this.#pos;
    let at = pos;
    this.#holeCount = 0;
    try {
      if (this.allData || !src.canBlockStatus) {
        this.#extentEnd = src.size;
        this.#extentKind = 'data';
        return;
      }
      const ext = await chainStatus(src, pos, src.size - pos);
      let end = pos + Math.min(ext.length, src.size - pos);
      this.#extentKind = ext.kind === 'data' ? 'data' : 'zero';
      // Merge small holes and the data after them into this data extent, up to one buffer.
      if (ext.kind === 'data' && this.minMergedHole > 0 && src.canReadHolesCheaply) {
        while (end < src.size && end - pos < this.maxData && this.#holeCount < MAX_MERGED_HOLES) {
          at = end;
          const hole = await chainStatus(src, end, src.size - end);
          const holeEnd = end + hole.length;
          if (
            hole.kind !== 'zero' ||
            hole.length > MAX_MERGED_HOLE ||
            hole.length < this.minMergedHole ||
            (end - pos) % this.unit !== 0 ||
            hole.length % this.unit !== 0 ||
            holeEnd >= src.size ||
            holeEnd - pos >= this.maxData
          )
            break;
          at = holeEnd;
          const data = await chainStatus(src, holeEnd, src.size - holeEnd);
          if (data.kind !== 'data') break;
          this.#holes[2 * this.#holeCount] = end;
          this.#holes[2 * this.#holeCount + 1] = holeEnd;
          this.#holeCount++;
          end = Math.min(holeEnd + data.length, pos + this.maxData);
        }
      }
      this.#extentEnd = end;
    } catch (err) {
      throw toBlockError(err, { op: 'blockStatus', location: src.location, offset: at });
    }
  }

  #carve(src: GatedBackend, holes: SegmentList): Chunk {
    const start = this.#pos;
    let kind = this.#extentKind;
    let end = Math.min(this.#extentEnd, start + (kind === 'data' ? this.maxData : this.maxZero));
    if (end < src.size && end % this.align !== 0) {
      const aligned = roundDown(end, this.align);
      if (aligned > start) {
        end = aligned;
      } else {
        // The extent ends inside one aligned block: copy that block as data.
        end = Math.min(aligned + this.align, src.size);
        kind = 'data';
      }
    }
    const split = this.#splitAt - this.#base;
    if (start < split && end > split) end = split;
    this.#pos = end;
    holes.clear();
    if (kind === 'data' && src.readSegments) this.#clipHoles(start, end, holes);
    return {
      seq: this.#seq++,
      source: src,
      sourceOffset: start,
      targetOffset: this.#base + start,
      length: end - start,
      kind,
    };
  }

  /**
   * The merged holes inside [start, end), relative to start, shrunk to whole zero-scan
   * units of the chunk (the bytes cut off are read with the data: they read as zeroes).
   */
  #clipHoles(start: number, end: number, out: SegmentList): void {
    const unit = this.unit;
    for (let i = 0; i < this.#holeCount; i++) {
      const a = Math.ceil((Math.max(this.#holes[2 * i]!, start) - start) / unit) * unit;
      const b = roundDown(Math.min(this.#holes[2 * i + 1]!, end) - start, unit);
      if (b - a >= this.minMergedHole) out.push(start + a, b - a, a);
    }
  }
}
