/**
 * A chunk's data around its holes, as readSegments triples: for each run between the
 * [start, end) pairs of `holes` (relative to the chunk, ascending), (offset + start,
 * run length, start). Convert reads a chunk with merged holes so, and a pipeTo half
 * tells its target where the chunk's bytes lie so. Returns the number of triples
 * written to `out`, which has room for holeCount + 1.
 */
export function piecesAroundHoles(offset: number, length: number, holes: Float64Array, holeCount: number, out: Float64Array): number {
  let n = 0;
  let pos = 0;
  for (let h = 0; h <= holeCount; h++) {
    const end = h < holeCount ? holes[2 * h]! : length;
    if (end > pos) {
      out[3 * n] = offset + pos;
      out[3 * n + 1] = end - pos;
      out[3 * n + 2] = pos;
      n++;
    }
    if (h < holeCount) pos = holes[2 * h + 1]!;
  }
  return n;
}
