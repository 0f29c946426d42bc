/**
 * Mutations of a valid qcow2 file, chosen from its layout (qcow2-layout.ts): a field
 * set to a value that means something for its kind (a pointer to other metadata, past
 * the end, unaligned; a count off by one or huge; a flag bit set), a table entry made
 * to alias another, byte flips inside a structure, truncations at structure
 * boundaries, garbage appended. Every choice comes from `rand`, so a case replays
 * from its seed alone.
 */
import type { Field, Layout } from './qcow2-layout.js';

export type Rand = () => number;

/** xorshift32: small, seedable, the same everywhere. */
export function prng(seed: number): Rand {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

/** The seed of case `i` of a campaign: each case replays alone. */
export function caseSeed(seed: number, i: number): number {
  let h = (seed ^ 0x9e3779b9) >>> 0;
  h = Math.imul(h ^ i, 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

const pick = <T>(rand: Rand, xs: readonly T[]): T => xs[Math.floor(rand() * xs.length)]!;
const int = (rand: Rand, n: number): number => Math.floor(rand() * n);

function read(b: Buffer, fl: Field): bigint {
  switch (fl.width) {
    case 1:
      return BigInt(b[fl.at]!);
    case 2:
      return BigInt(b.readUInt16BE(fl.at));
    case 4:
      return BigInt(b.readUInt32BE(fl.at));
    case 8:
      return b.readBigUInt64BE(fl.at);
  }
}

function write(b: Buffer, fl: Field, v: bigint): void {
  const bits = BigInt(fl.width * 8);
  const x = BigInt.asUintN(Number(bits), v);
  switch (fl.width) {
    case 1:
      b[fl.at] = Number(x);
      break;
    case 2:
      b.writeUInt16BE(Number(x), fl.at);
      break;
    case 4:
      b.writeUInt32BE(Number(x), fl.at);
      break;
    case 8:
      b.writeBigUInt64BE(x, fl.at);
      break;
  }
}

/** A value for a field: what it held, nudged or replaced by one that means something for its kind. */
function valueFor(rand: Rand, fl: Field, old: bigint, lay: Layout): bigint {
  const max = (1n << BigInt(fl.width * 8)) - 1n;
  const c = BigInt(lay.clusterSize);
  const size = BigInt(lay.fileSize);
  const metaAt = BigInt(pick(rand, lay.metadataOffsets));
  const common: bigint[] = [
    0n,
    1n,
    max,
    max >> 1n,
    old + 1n,
    old - 1n,
    old ^ (1n << BigInt(int(rand, fl.width * 8))),
    1n << BigInt(int(rand, fl.width * 8)),
  ];
  switch (fl.kind) {
    case 'offset':
      return pick(rand, [
        ...common,
        size,
        size - c,
        size + c,
        metaAt,
        metaAt + 512n,
        old + c,
        old - c,
        old + 8n,
        1n << 56n,
        BigInt(int(rand, lay.fileSize)),
      ]);
    case 'count':
    case 'size':
      return pick(rand, [
        ...common,
        old * 2n,
        old + 1000n,
        0x7fffffffn,
        0x80000000n,
        0xffffffffn,
        old << 20n,
        BigInt(int(rand, 65536)),
      ]);
    case 'bits':
      return pick(rand, [...common, 8n, 9n, 16n, 21n, 22n, 31n, 32n, 63n, 64n, old + 2n]);
    case 'flags':
    case 'type':
      return pick(rand, [
        ...common,
        old | (1n << BigInt(int(rand, 8))),
        old | (1n << BigInt(int(rand, fl.width * 8))),
        2n,
        3n,
      ]);
    case 'l1': {
      // Keep or drop COPIED; point at another table, at metadata, past the end, unaligned.
      const copied = old & (1n << 63n);
      return pick(rand, [
        ...common,
        copied | metaAt,
        copied | (size + c),
        copied | ((old & ~(1n << 63n)) + 512n),
        old ^ (1n << 63n),
        old | (1n << 62n),
        old | 1n,
      ]);
    }
    case 'l2': {
      const flags = old & (7n << 61n);
      return pick(rand, [
        ...common,
        flags | metaAt,
        flags | (size + c),
        old + 512n,
        old ^ (1n << 62n),
        old ^ (1n << 63n),
        old | 1n,
        old ^ 1n,
        (1n << 62n) | metaAt,
        (1n << 62n) | (old & ((1n << 54n) - 1n)) | (0xffn << 54n),
        old | (0x3fn << 56n),
      ]);
    }
    case 'refcount':
      return pick(rand, [...common, 0n, 2n, max, old + 1n]);
    default:
      return pick(rand, common);
  }
}

/** A mutated copy of `src` and a line per change (which field, old and new value; which bytes). */
export function mutate(src: Buffer, lay: Layout, rand: Rand): { bytes: Buffer; changes: string[] } {
  let b = Buffer.from(src);
  const changes: string[] = [];
  const n = 1 + (rand() < 0.6 ? 0 : int(rand, 3));
  for (let k = 0; k < n; k++) {
    const r = rand();
    if (r < 0.55 && lay.fields.length) {
      const fl = pick(rand, lay.fields);
      if (fl.at + fl.width > b.length) continue;
      const old = read(b, fl);
      const v = valueFor(rand, fl, old, lay);
      write(b, fl, v);
      changes.push(`${fl.name}@${fl.at}: 0x${old.toString(16)} -> 0x${read(b, fl).toString(16)}`);
    } else if (r < 0.62 && lay.fields.length > 1) {
      // One table entry copied over another of the same kind: two owners of one cluster.
      const kind = pick(rand, ['l1', 'l2', 'offset'] as const);
      const same = lay.fields.filter((x) => x.kind === kind && x.at + 8 <= b.length);
      if (same.length < 2) continue;
      const from = pick(rand, same);
      const to = pick(rand, same);
      b.copy(b, to.at, from.at, from.at + 8);
      changes.push(`${to.name}@${to.at} := ${from.name}`);
    } else if (r < 0.85 && lay.regions.length) {
      const [name, start, end] = pick(rand, lay.regions);
      const flips = 1 + int(rand, 4);
      const at: string[] = [];
      for (let i = 0; i < flips; i++) {
        const o = start + int(rand, Math.max(1, Math.min(end, b.length) - start));
        if (o >= b.length) continue;
        const mask = rand() < 0.7 ? 1 << int(rand, 8) : 1 + int(rand, 255);
        b[o]! ^= mask;
        at.push(`${o}^0x${mask.toString(16)}`);
      }
      changes.push(`flip in ${name}: ${at.join(' ')}`);
    } else if (r < 0.94) {
      // Truncation: at a structure's start or inside it, or anywhere.
      const region = lay.regions.length ? pick(rand, lay.regions) : undefined;
      const len =
        region && rand() < 0.7
          ? region[1] + (rand() < 0.5 ? 0 : int(rand, Math.max(1, region[2] - region[1])))
          : int(rand, b.length);
      if (len >= b.length) continue;
      changes.push(
        `truncated to ${len} (${region && len >= region[1] && len < region[2] ? `in ${region[0]}` : 'bytes'})`,
      );
      b = b.subarray(0, len);
    } else {
      const extra = Buffer.alloc(1 + int(rand, 2 * lay.clusterSize));
      if (rand() < 0.5) for (let i = 0; i < extra.length; i++) extra[i] = int(rand, 256);
      changes.push(`appended ${extra.length} bytes`);
      b = Buffer.concat([b, extra]);
    }
  }
  if (!changes.length) {
    const o = int(rand, Math.min(b.length, 512));
    b[o]! ^= 1;
    changes.push(`flip at ${o}`);
  }
  return { bytes: b, changes };
}
