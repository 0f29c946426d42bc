/**
 * Drivers written against API 1 keep loading: the registry passes them through this
 * adapter, which shows each API 1 backend to the core as an API 2 one, and each API 2
 * backend (a format's file, a resolved backing image) to an API 1 driver as an API 1 one.
 *
 * What API 1 called a capability is renamed, the segment lists change shape (API 1's
 * Float64Array triples and pairs become SegmentLists), and API 1's two copy-pair
 * protocols (copyTo/copyFrom offload, pipeTo/pipeFrom fused copies) are dropped: an
 * API 1 driver's chunks are then read and written by the core, as they are whenever a
 * pair declines. Nothing here runs for API 2 drivers.
 */
import { BlockError } from '../errors.js';
import { forwardBackend } from '../forward.js';
import { SegmentList } from '../segments.js';
import type {
  BlockBackend,
  BlockDriver,
  CreateResult,
  FormatDriver,
  GatedBackend,
  ImageResolver,
  ProtocolDriver,
} from '../types.js';

/** The API 1 members that API 2 renamed or reshaped; the rest of BlockBackend is the same. */
interface BackendV1 {
  readonly readsZeroesInitially?: boolean;
  readonly canWriteZeroes?: boolean;
  readonly hasBlockStatus?: boolean;
  readonly cheapHoleReads?: boolean;
  readSegments?(into: Uint8Array, segments: Float64Array, count: number): Promise<void>;
  writeSegments?(offset: number, data: Uint8Array, segments: Float64Array, count: number): Promise<void>;
  writeScattered?(from: Uint8Array, segments: Float64Array, count: number): Promise<void>;
  readonly backing?: unknown;
}

type AnyBackend = BlockBackend & BackendV1;

/** API 1 members with no API 2 meaning: hidden from either side. */
const DROPPED = {
  copyTo: undefined,
  copyFrom: undefined,
  pipeTo: undefined,
  pipeFrom: undefined,
  writeScattered: undefined,
} as const;

/** Each view remembers what it shows, so a backend crossing back is itself again. */
const shown = new WeakMap<object, object>();

function view<T extends object>(inner: object, overrides: object): T {
  const v = forwardBackend(inner as BlockBackend, overrides as Partial<BlockBackend>) as unknown as T;
  shown.set(v, inner);
  return v;
}

/** An API 1 backend as API 2 sees it. */
export function fromApi1(b: AnyBackend): BlockBackend {
  const original = shown.get(b);
  if (original) return original as BlockBackend; // an API 2 backend we showed as API 1
  const overrides = Object.defineProperties(
    {
      ...DROPPED,
      readSegments: b.readSegments
        ? (into: Uint8Array, list: SegmentList) => b.readSegments!(into, list.array, list.count)
        : undefined,
      writeSegments: b.writeScattered
        ? (from: Uint8Array, list: SegmentList) => b.writeScattered!(from, list.array, list.count)
        : undefined,
    },
    {
      zeroInitialized: { get: () => b.readsZeroesInitially === true, enumerable: true },
      canZero: { get: () => b.canWriteZeroes !== false, enumerable: true },
      canBlockStatus: { get: () => b.hasBlockStatus !== false, enumerable: true },
      canReadHolesCheaply: { get: () => b.cheapHoleReads === true, enumerable: true },
      backing: { get: () => (b.backing ? fromApi1(b.backing as AnyBackend) : undefined), enumerable: true },
    },
  );
  return view<BlockBackend>(b, overrides);
}

/** An API 2 backend (gated) as an API 1 driver expects to see it. */
export function toApi1(b: GatedBackend): GatedBackend {
  const original = shown.get(b);
  if (original) return original as GatedBackend;
  const scattered = (from: Uint8Array, triples: Float64Array, count: number): Promise<void> => {
    const list = over(triples, count);
    return b.writeSegments ? b.writeSegments(from, list) : writeEach(b, from, list);
  };
  const overrides = Object.defineProperties(
    {
      ...DROPPED,
      readSegments: b.readSegments
        ? (into: Uint8Array, triples: Float64Array, count: number) => {
            return b.readSegments!(into, over(triples, count));
          }
        : undefined,
      writeScattered: scattered,
      // API 1's pairs: [start, end) of `data`, written at offset + start.
      writeSegments: (offset: number, data: Uint8Array, pairs: Float64Array, count: number) => {
        const triples = new Float64Array(3 * count);
        for (let i = 0; i < count; i++) {
          triples[3 * i] = offset + pairs[2 * i]!;
          triples[3 * i + 1] = pairs[2 * i + 1]! - pairs[2 * i]!;
          triples[3 * i + 2] = pairs[2 * i]!;
        }
        return scattered(data, triples, count);
      },
    },
    {
      readsZeroesInitially: { get: () => b.zeroInitialized, enumerable: true },
      canWriteZeroes: { get: () => b.canZero, enumerable: true },
      hasBlockStatus: { get: () => b.canBlockStatus, enumerable: true },
      cheapHoleReads: { get: () => b.canReadHolesCheaply, enumerable: true },
      backing: { get: () => (b.backing ? toApi1(b.backing) : undefined), enumerable: true },
    },
  );
  return view<GatedBackend>(b, overrides);
}

/** API 1's first `count` triples as a SegmentList over the same memory (a view, not a copy). */
function over(triples: Float64Array, count: number): SegmentList {
  return new SegmentList(triples.subarray(0, 3 * count), count);
}

async function writeEach(b: GatedBackend, from: Uint8Array, list: SegmentList): Promise<void> {
  for (let i = 0; i < list.count; i++) {
    const pos = list.positionAt(i);
    await b.write(list.offsetAt(i), from.subarray(pos, pos + list.lengthAt(i)));
  }
}

function resolverToApi1(r: ImageResolver | undefined): ImageResolver | undefined {
  if (!r) return undefined;
  return {
    open: async (location, options) => toApi1(await r.open(location, options)),
    ...(r.create
      ? { create: async (location, size, options) => toApi1(await r.create!(location, size, options)) }
      : {}),
  };
}

/** API 1's CreateResult said readsZeroes. */
function createResultFromApi1(r: void | (CreateResult & { readsZeroes?: boolean })): void | CreateResult {
  if (!r) return r;
  return { zeroInitialized: r.zeroInitialized ?? r.readsZeroes };
}

/** An API 1 driver as an API 2 one: same name and options, its backends shown through the views above. */
export function adaptApi1Driver(d: BlockDriver): BlockDriver {
  if (d.kind === 'protocol') {
    const p = d as ProtocolDriver;
    const adapted: ProtocolDriver = {
      ...p,
      apiVersion: 2,
      open: async (location, options) => fromApi1((await p.open(location, options)) as AnyBackend),
      create: p.create
        ? async (location, size, options) => createResultFromApi1(await p.create!(location, size, options))
        : undefined,
    };
    return adapted;
  }
  if (d.kind === 'format') {
    const f = d as FormatDriver;
    const adapted: FormatDriver = {
      ...f,
      apiVersion: 2,
      open: async (file, options) =>
        fromApi1(
          (await f.open(toApi1(file), { ...options, resolver: resolverToApi1(options.resolver) })) as AnyBackend,
        ),
      create: f.create
        ? async (file, size, options) =>
            createResultFromApi1(
              await f.create!(toApi1(file), size, { ...options, resolver: resolverToApi1(options.resolver) }),
            )
        : undefined,
      check: f.check
        ? (file, options) => f.check!(toApi1(file), { ...options, resolver: resolverToApi1(options.resolver) })
        : undefined,
    };
    return adapted;
  }
  throw new BlockError('EINVAL', `driver "${(d as BlockDriver).name}" has unknown kind`);
}
