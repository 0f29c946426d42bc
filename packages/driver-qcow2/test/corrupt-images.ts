/**
 * The damaged images the tests make, each from a valid image written by qemu-img and
 * qemu-io, then patched byte by byte (none is committed), and what qemu-img check
 * says about each. corrupt.test.ts opens the ones reading must refuse; check.test.ts
 * runs qemu-img check and blockconv check on every one and compares the answers.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  KiB,
  MiB,
  be64,
  create,
  findL2Entry,
  firstL2,
  headerOf,
  patch,
  qemuImg,
  qemuIo,
  readBytes,
  u32,
  u64,
} from './helpers.js';

/**
 * How opening an image for reading must fail: a BlockError with this code, naming this
 * field (and offset); `atImage`: its location is the image itself (not one it refers to).
 */
export interface Expect {
  code: string;
  field?: string;
  offset?: number;
  message?: RegExp;
  atImage?: boolean;
}

/**
 * What a check answers: its exit code and, when it printed a report, the counts in it.
 * `report: false`: the check could not be completed and printed none (qemu-img: "Could
 * not open ..." or "Check failed", exit 1). Counts left out are compared between the
 * two tools but not pinned (they follow from qemu-io's layout in ways not worth spelling out).
 */
export interface Verdict {
  readonly status: number;
  readonly report?: boolean;
  readonly corruptions?: number;
  readonly leaks?: number;
  readonly checkErrors?: number;
}

export interface Made {
  readonly image: string;
  /** How opening it for reading fails (corrupt.test.ts), when it must. */
  readonly open?: Expect;
}

export interface CorruptImage {
  readonly name: string;
  readonly make: (dir: string) => Made;
  /** What qemu-img check (7.2) says: asserted, so that a change of the oracle is noticed. */
  readonly qemu: Verdict;
  /** Where blockconv answers otherwise on purpose: its answer and why. qemu-img is then not run if it would hang. */
  readonly ours?: Verdict & { readonly why: string; readonly qemuHangs?: boolean };
  /** Repairs to compare too: `check -r <mode>` on a copy each, then a plain check of the result. */
  readonly repair?: ReadonlyArray<'leaks' | 'all'>;
  /** Why the repairs' corruptions-fixed count differs, where it does (the outcome must not). */
  readonly repairDiffers?: string;
}

let serial = 0;
function name(dir: string, what: string): string {
  return path.join(dir, `${what}-${serial++}.qcow2`);
}

/** 4 MiB, 64 KiB clusters: data at 0..1 MiB and at 2 MiB. */
export function valid(dir: string, options: Record<string, string | number | boolean> = {}): string {
  const f = create(name(dir, 'img'), 4 * MiB, options);
  qemuIo(f, ['write -P 1 0 1M', 'write -P 2 2M 64k']);
  return f;
}

/** An image with data, a zero cluster, a compressed cluster and a discard, written by qemu-io. */
export function sample(dir: string, options: Record<string, string | boolean> = {}): string {
  const image = create(name(dir, 'sample'), 16 * MiB, options);
  qemuIo(image, ['write -P 1 0 1M', 'write -z 2M 64k', 'write -c -P 2 4M 64k', 'write -P 3 6M 512k', 'discard 6M 64k']);
  return image;
}

export function compressed(dir: string, type: 'zlib' | 'zstd'): string {
  const src = create(path.join(dir, `src${serial++}.raw`), 2 * MiB, {}, 'raw');
  qemuIo(src, ['write -P 3 0 1M'], ['-f', 'raw']);
  const f = name(dir, `c-${type}`);
  qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, f);
  return f;
}

/** Offset in the file of the first refcount block (from the table's first entry). */
export function firstRefblock(image: string): number {
  return Number(readBytes(image, headerOf(image).refcountTableOffset, 8).readBigUInt64BE(0));
}

/** Offset of the refcount entry of cluster `c` in the first refcount block (16-bit refcounts). */
export function refcountEntry(image: string, c: number): number {
  return firstRefblock(image) + c * 2;
}

/** A host cluster holding guest data (from qemu-img map). */
export function dataCluster(image: string): number {
  const mapped = JSON.parse(qemuImg('map', '--output=json', image)) as Array<{ data: boolean; offset?: number }>;
  return mapped.find((m) => m.data && m.offset !== undefined)!.offset!;
}

function patched(dir: string, at: number, bytes: number[], open?: Expect): Made {
  const image = valid(dir);
  patch(image, at, bytes);
  return { image, open };
}

function headerFieldVerdict(what: string): Verdict {
  // Without the magic the image is probed as raw, which has no checks.
  if (what === 'bad magic') return { status: 63, report: false };
  // Without a refcount table QEMU still opens an image for a check: every refcount then reads 0.
  if (what === 'refcount_table_clusters 0') return { status: 2, corruptions: 38, leaks: 0 };
  // The rest cannot be opened (an encrypted image not without its key; blockconv does not read them).
  return { status: 1, report: false };
}

/** The images corrupt.test.ts opens: reading each must fail with a BlockError naming the field. */
export const openFailures: readonly CorruptImage[] = [
  {
    name: 'truncated to less than a header',
    make: (dir) => {
      const image = valid(dir);
      fs.truncateSync(image, 40);
      return { image, open: { code: 'ECORRUPT', field: 'header', message: /too small to hold a qcow2 header/ } };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'truncated file: L2 table past the end',
    make: (dir) => {
      const image = valid(dir);
      const h = headerOf(image);
      const { l1Index, l2Offset } = firstL2(image);
      fs.truncateSync(image, l2Offset + 4096);
      return {
        image,
        open: {
          code: 'ECORRUPT',
          field: 'L1 entry',
          offset: h.l1Offset + 8 * l1Index,
          message: /L2 table at 0x[0-9a-f]+ lies outside the file/,
        },
      };
    },
    qemu: { status: 2, corruptions: 17, leaks: 0 },
  },
  {
    name: 'truncated file: data clusters past the end',
    make: (dir) => {
      const image = valid(dir);
      const { entry } = findL2Entry(image, (e) => e !== 0n);
      fs.truncateSync(image, Number(entry & 0x00ff_ffff_ffff_fe00n) + 64 * KiB * 4);
      return { image, open: { code: 'ECORRUPT', field: 'L2 entry', message: /lies past the end of the file/ } };
    },
    qemu: { status: 2, corruptions: 13, leaks: 0 },
  },
  {
    name: 'L1 table offset past the end of the file',
    make: (dir) => {
      const image = valid(dir);
      patch(image, 40, u64(fs.statSync(image).size + 64 * KiB * 16));
      return {
        image,
        open: { code: 'ECORRUPT', field: 'l1_table_offset', offset: 40, message: /runs past the end of the file/ },
      };
    },
    qemu: { status: 2, corruptions: 1, leaks: 19 },
  },
  {
    name: 'L2 entry past the end of the file',
    make: (dir) => {
      const image = valid(dir);
      const { at, entry } = findL2Entry(image, (e) => e !== 0n);
      patch(image, at, be64((entry & ~0x00ff_ffff_ffff_fe00n) | BigInt(1 << 30)));
      return {
        image,
        open: {
          code: 'ECORRUPT',
          field: 'L2 entry',
          offset: at,
          message: /cluster offset 0x40000000 lies past the end of the file/,
        },
      };
    },
    qemu: { status: 2, corruptions: 2, leaks: 1 },
  },
  {
    name: 'unaligned L2 table offset in the L1 table',
    make: (dir) => {
      const image = valid(dir);
      const h = headerOf(image);
      const { l1Index, l2Offset } = firstL2(image);
      patch(image, h.l1Offset + 8 * l1Index, be64(BigInt(l2Offset + 512) | (1n << 63n)));
      return {
        image,
        open: {
          code: 'ECORRUPT',
          field: 'L1 entry',
          offset: h.l1Offset + 8 * l1Index,
          message: /L2 table offset 0x[0-9a-f]+ is not aligned/,
        },
      };
    },
    qemu: { status: 2 },
  },
  {
    name: 'unaligned data cluster offset in an L2 entry',
    make: (dir) => {
      const image = valid(dir);
      const { at, entry } = findL2Entry(image, (e) => e !== 0n);
      patch(image, at, be64(entry + 512n));
      return {
        image,
        open: { code: 'ECORRUPT', field: 'L2 entry', offset: at, message: /is not aligned to a cluster/ },
      };
    },
    qemu: { status: 2, corruptions: 2, leaks: 0 },
  },
  ...[8, 22, 0xffffffff].map(
    (bits): CorruptImage => ({
      name: `cluster_bits ${bits} out of range`,
      make: (dir) =>
        patched(dir, 20, u32(bits), {
          code: 'ECORRUPT',
          field: 'cluster_bits',
          offset: 20,
          message: new RegExp(`cluster_bits ${bits} is out of range`),
        }),
      qemu: { status: 1, report: false },
    }),
  ),
  {
    name: 'header_length too small',
    make: (dir) =>
      patched(dir, 100, u32(100), {
        code: 'ECORRUPT',
        field: 'header_length',
        offset: 100,
        message: /header_length 100 is too small/,
      }),
    qemu: { status: 1, report: false },
  },
  {
    name: 'header_length larger than a cluster',
    make: (dir) =>
      patched(dir, 100, u32(0x1000_0000), {
        code: 'ECORRUPT',
        field: 'header_length',
        offset: 100,
        message: /exceeds the cluster size/,
      }),
    qemu: { status: 1, report: false },
  },
  {
    name: 'l1_size larger than QEMU allows',
    make: (dir) =>
      patched(dir, 36, u32(0x7fff_ffff), {
        code: 'ECORRUPT',
        field: 'l1_size',
        offset: 36,
        message: /l1_size 2147483647 is too large/,
      }),
    qemu: { status: 1, report: false },
  },
  {
    name: "l1_size within QEMU's limit but 8 MiB of table in a small file",
    make: (dir) =>
      patched(dir, 36, u32(0x0010_0000), {
        code: 'ECORRUPT',
        field: 'l1_table_offset',
        message: /runs past the end of the file/,
      }),
    // The table then reads the data clusters (0x01 bytes) as L2 offsets: many corruptions, counted alike.
    qemu: { status: 2 },
  },
  {
    name: 'l1_size too small for the virtual size',
    make: (dir) =>
      patched(dir, 24, u64(2 ** 40), {
        code: 'ECORRUPT',
        field: 'l1_size',
        offset: 36,
        message: /too small for the virtual size/,
      }),
    qemu: { status: 1, report: false },
  },
  ...(['zlib', 'zstd'] as const).flatMap((type): CorruptImage[] => [
    {
      name: `compressed cluster descriptor past the end of the file (${type})`,
      make: (dir) => {
        const image = compressed(dir, type);
        const { at, entry } = findL2Entry(image, (e) => (e & (1n << 62n)) !== 0n);
        const offsetMask = (1n << 54n) - 1n; // 64 KiB clusters: offset in bits 0..53
        patch(image, at, be64((entry & ~offsetMask) | BigInt(fs.statSync(image).size + 12345)));
        return {
          image,
          open: {
            code: 'ECORRUPT',
            field: 'L2 entry',
            offset: at,
            message: /compressed cluster descriptor points to 0x[0-9a-f]+, outside the file/,
          },
        };
      },
      // Less than a cluster past the end, which a check allows (compressed data is read
      // by whole sectors), and still in the last cluster, where the refcount counts it.
      qemu: { status: 0, corruptions: 0, leaks: 0 },
    },
    {
      name: `garbage compressed data (${type})`,
      make: (dir) => {
        const image = compressed(dir, type);
        const { entry } = findL2Entry(image, (e) => (e & (1n << 62n)) !== 0n);
        const host = Number(entry & ((1n << 54n) - 1n));
        patch(
          image,
          host,
          Array.from({ length: 64 }, (_, i) => (i * 37 + 11) & 0xff),
        );
        return {
          image,
          open: {
            code: 'ECORRUPT',
            field: 'compressed cluster',
            offset: host,
            message: new RegExp(`compressed cluster at guest offset 0: ${type}`),
          },
        };
      },
      // The metadata is sound: check does not decompress.
      qemu: { status: 0, corruptions: 0, leaks: 0 },
    },
  ]),
  {
    name: 'backing file loop through another image',
    make: (dir) => {
      const a = name(dir, 'loop-a');
      const b = name(dir, 'loop-b');
      create(a, MiB);
      create(b, MiB, { backing_file: path.basename(a), backing_fmt: 'qcow2' });
      qemuImg('rebase', '-u', '-f', 'qcow2', '-b', path.basename(b), '-F', 'qcow2', a);
      return {
        image: a,
        open: {
          code: 'ECORRUPT',
          field: 'backing_file',
          message: /backing file loop: .*loop-a-\d+\.qcow2 -> .*loop-b-\d+\.qcow2 -> .*loop-a-\d+\.qcow2/,
          atImage: true,
        },
      };
    },
    qemu: { status: 1, report: false },
    ours: {
      status: 1,
      report: false,
      why: 'qemu-img 7.2 opens a looping chain forever (it spins at 100 % CPU); blockconv names the loop',
      qemuHangs: true,
    },
  },
  {
    name: 'backing file that is the image itself',
    make: (dir) => {
      const self = name(dir, 'loop-self');
      create(self, MiB);
      qemuImg('rebase', '-u', '-f', 'qcow2', '-b', path.basename(self), '-F', 'qcow2', self);
      return { image: self, open: { code: 'ECORRUPT', field: 'backing_file', message: /backing file loop/ } };
    },
    qemu: { status: 1, report: false },
    ours: {
      status: 1,
      report: false,
      why: 'qemu-img 7.2 opens a looping chain forever; blockconv names the loop',
      qemuHangs: true,
    },
  },
  {
    name: 'a backing chain deeper than the cap',
    make: (dir) => {
      let prev = name(dir, 'deep');
      create(prev, MiB);
      for (let i = 1; i <= 66; i++) {
        const next = name(dir, 'deep');
        create(next, MiB, { backing_file: path.basename(prev), backing_fmt: 'qcow2' });
        prev = next;
      }
      return {
        image: prev,
        open: { code: 'ENOTSUP', field: 'backing_file', message: /backing chain deeper than 64 images/ },
      };
    },
    qemu: { status: 0, corruptions: 0, leaks: 0 },
    ours: {
      status: 1,
      report: false,
      why: 'blockconv opens at most 64 images of a chain (MAX_CHAIN_DEPTH) rather than recurse without bound; qemu-img has no cap',
    },
  },
  {
    name: 'missing backing file',
    make: (dir) => {
      const base = name(dir, 'gone');
      create(base, MiB);
      const top = create(name(dir, 'orphan'), MiB, { backing_file: path.basename(base), backing_fmt: 'qcow2' });
      fs.rmSync(base);
      return {
        image: top,
        open: {
          code: 'ENOENT',
          field: 'backing_file',
          message: /cannot open backing file "gone-\d+\.qcow2"/,
          atImage: true,
        },
      };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'missing external data file',
    make: (dir) => {
      const data = path.join(dir, `gone${serial++}.data`);
      const image = create(name(dir, 'nodata'), MiB, { data_file: data });
      fs.rmSync(data);
      return { image, open: { code: 'ENOENT', field: 'data_file', message: /cannot open data file/ } };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'unknown incompatible feature bit',
    make: (dir) =>
      patched(dir, 72, u64(1 << 7), {
        code: 'ENOTSUP',
        field: 'incompatible_features',
        message: /unsupported qcow2 feature: bit 7 \(known/,
      }),
    qemu: { status: 1, report: false },
  },
  {
    name: 'unknown incompatible feature bit, named in the feature name table',
    make: (dir) => {
      const image = valid(dir);
      patch(image, 72, u64(1 << 7));
      // Rename the table's entry for incompatible bit 0 into one for bit 7.
      const entry = readBytes(image, 0, 4096).indexOf(Buffer.from('dirty bit'));
      if (entry <= 0) throw new Error('qemu-img wrote no feature name table');
      patch(image, entry - 1, [7]);
      return {
        image,
        open: {
          code: 'ENOTSUP',
          field: 'incompatible_features',
          message: /unsupported qcow2 feature: bit 7 "dirty bit"/,
        },
      };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'extended L2: subclusters both allocated and zero',
    make: (dir) => {
      const image = create(name(dir, 'bad-el2'), MiB, { extended_l2: true });
      qemuIo(image, ['write -P 1 0 4k']);
      const { at } = findL2Entry(image, (e) => e !== 0n);
      patch(image, at + 8, [0, 0, 0, 1, 0, 0, 0, 1]); // zero bit 0 and allocation bit 0
      return {
        image,
        open: { code: 'ECORRUPT', field: 'L2 entry', offset: at + 8, message: /both allocated and zero/ },
      };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
  },
  ...(
    [
      ['bad magic', 0, [0x51, 0x46, 0x49, 0xfc], { code: 'ECORRUPT', field: 'magic', message: /bad magic/ }],
      ['version 4', 4, u32(4), { code: 'ENOTSUP', field: 'version', message: /version 4 is not supported/ }],
      [
        'AES encryption',
        32,
        u32(1),
        { code: 'ENOTSUP', field: 'crypt_method', message: /encrypted qcow2 images \(AES\)/ },
      ],
      ['unknown crypt_method', 32, u32(9), { code: 'ECORRUPT', field: 'crypt_method', offset: 32 }],
      ['refcount_order 7', 96, u32(7), { code: 'ECORRUPT', field: 'refcount_order', offset: 96 }],
      [
        'compression type without its feature bit',
        104,
        [1],
        { code: 'ECORRUPT', field: 'incompatible_features', message: /compression type feature bit is clear/ },
      ],
      ['refcount_table_clusters 0', 56, u32(0), { code: 'ECORRUPT', field: 'refcount_table_clusters', offset: 56 }],
      [
        'refcount table offset not cluster aligned',
        48,
        u64(3 * 512),
        { code: 'ECORRUPT', field: 'refcount_table_offset', offset: 48 },
      ],
      ['virtual size 2^60', 24, u64(2 ** 60), { code: 'ENOTSUP', field: 'size' }],
    ] as const
  ).map(
    ([what, at, bytes, open]): CorruptImage => ({
      name: `header field: ${what}`,
      make: (dir) => patched(dir, at, [...bytes], open),
      qemu: headerFieldVerdict(what),
    }),
  ),
  {
    name: 'header field: backing file name too long for its place',
    make: (dir) => {
      const image = valid(dir);
      patch(image, 8, u64(1024));
      patch(image, 16, u32(2000));
      return { image, open: { code: 'ECORRUPT', field: 'backing_file_size', offset: 16 } };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'a header extension running past the header area',
    make: (dir) => {
      const image = valid(dir);
      const h = readBytes(image, 0, 112);
      patch(image, h.readUInt32BE(100) + 4, u32(0x10_0000));
      return {
        image,
        open: {
          code: 'ECORRUPT',
          field: 'header extension',
          offset: h.readUInt32BE(100),
          message: /running past the end of the header area/,
        },
      };
    },
    qemu: { status: 1, report: false },
  },
  {
    name: 'snapshot table past the end of the file',
    make: (dir) => {
      const image = valid(dir);
      qemuImg('snapshot', '-c', 'one', image);
      patch(image, 64, u64(fs.statSync(image).size + 64 * KiB));
      return { image, open: { code: 'ECORRUPT', field: 'snapshots_offset', offset: 64 } };
    },
    // The file's size is not a multiple of the cluster size: the offset is unaligned, which fails a check.
    qemu: { status: 1, report: false },
  },
  {
    name: 'snapshot table entry running past the end of the file',
    make: (dir) => {
      const image = valid(dir);
      qemuImg('snapshot', '-c', 'one', image);
      patch(image, headerOf(image).snapshotsOffset + 14, [0xff, 0xff]); // name_size 65535
      return {
        image,
        open: {
          code: 'ECORRUPT',
          field: 'snapshot table',
          message: /snapshot 0: entry at \d+ runs past the end of the file/,
        },
      };
    },
    // A check reads the name past the end as zeroes; the longer table then covers a cluster with refcount 0.
    qemu: { status: 2, corruptions: 1, leaks: 0 },
  },
];

/** The first refcount table entry pointed elsewhere (the layout of valid(): table, block, L1, L2, data). */
function reftableEntry0(dir: string, where: (image: string) => bigint): Made {
  const image = valid(dir);
  patch(image, headerOf(image).refcountTableOffset, be64(where(image)));
  return { image };
}

function headerPatch(dir: string, at: number, bytes: (image: string) => number[]): Made {
  const image = valid(dir);
  patch(image, at, bytes(image));
  return { image };
}

const l1Of = (image: string): bigint => BigInt(headerOf(image).l1Offset);
const l2Of = (image: string): bigint => BigInt(firstL2(image).l2Offset);

/**
 * Images qemu-img check opens and checks: clean ones, leaks, refcounts too low, and
 * the refcount structure misplaced in every way: entries past the end of the file,
 * unaligned or with reserved bits, blocks over other metadata or data or each other,
 * the table itself unaligned, past the end, too large, over other metadata, or absent.
 */
export const checkCases: readonly CorruptImage[] = [
  { name: 'clean image', make: (dir) => ({ image: sample(dir) }), qemu: { status: 0, corruptions: 0, leaks: 0 } },
  {
    name: 'clean image, compat 0.10',
    make: (dir) => ({ image: sample(dir, { compat: '0.10' }) }),
    qemu: { status: 0, corruptions: 0, leaks: 0 },
  },
  {
    name: 'clean image, extended L2',
    make: (dir) => ({ image: sample(dir, { extended_l2: true }) }),
    qemu: { status: 0, corruptions: 0, leaks: 0 },
  },
  {
    name: 'clean image, 1-bit refcounts, 4 KiB clusters',
    make: (dir) => ({ image: sample(dir, { refcount_bits: '1', cluster_size: '4096' }) }),
    qemu: { status: 0, corruptions: 0, leaks: 0 },
  },
  {
    name: 'clean image with a snapshot',
    make: (dir) => {
      const image = sample(dir);
      qemuImg('snapshot', '-c', 's1', image);
      qemuIo(image, ['write -P 9 0 128k']);
      return { image };
    },
    qemu: { status: 0, corruptions: 0, leaks: 0 },
  },
  {
    name: 'a leaked cluster (refcount 1, no reference)',
    make: (dir) => {
      const image = sample(dir);
      const cs = headerOf(image).clusterSize;
      const clusters = Math.ceil(fs.statSync(image).size / cs);
      fs.truncateSync(image, (clusters + 1) * cs);
      patch(image, refcountEntry(image, clusters), [0, 1]);
      return { image };
    },
    qemu: { status: 3, corruptions: 0, leaks: 1 },
    repair: ['leaks', 'all'],
  },
  {
    name: 'a data cluster with refcount 2 and one reference',
    make: (dir) => {
      const image = sample(dir);
      patch(image, refcountEntry(image, dataCluster(image) / headerOf(image).clusterSize), [0, 2]);
      return { image };
    },
    // The refcount and the copied flag that no longer matches it.
    qemu: { status: 2, corruptions: 1, leaks: 1 },
    repair: ['leaks', 'all'],
  },
  {
    name: 'a cluster in use with refcount 0',
    make: (dir) => {
      const image = sample(dir);
      patch(image, refcountEntry(image, dataCluster(image) / headerOf(image).clusterSize), [0, 0]);
      return { image };
    },
    // The refcount and the copied flag that no longer matches it. -r leaks cannot mend a
    // refcount of 0 in place and fails; -r all rebuilds the refcount structure.
    qemu: { status: 2, corruptions: 2, leaks: 0 },
    repair: ['leaks', 'all'],
  },
  {
    name: 'a data cluster whose copied flag is clear',
    make: (dir) => {
      const image = sample(dir);
      const { at, entry } = findL2Entry(image, (e) => (e & (1n << 63n)) !== 0n);
      patch(image, at, be64(entry & ~(1n << 63n)));
      return { image };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
    repair: ['leaks', 'all'],
  },
  {
    name: 'an unaligned L2 entry',
    make: (dir) => {
      const image = sample(dir);
      const { at, entry } = findL2Entry(image, (e) => e !== 0n);
      patch(image, at, be64(entry + 0x200n));
      return { image };
    },
    qemu: { status: 2, corruptions: 2, leaks: 0 },
  },
  {
    name: 'an L1 entry with reserved bits set',
    make: (dir) => {
      const image = sample(dir);
      const h = headerOf(image);
      const { l1Index } = firstL2(image);
      const entry = readBytes(image, h.l1Offset + 8 * l1Index, 8).readBigUInt64BE(0);
      patch(image, h.l1Offset + 8 * l1Index, be64(entry | 1n));
      return { image };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
  },
  {
    name: 'extended L2: an unallocated cluster with allocation bits',
    make: (dir) => {
      const image = create(name(dir, 'bitmap'), MiB, { extended_l2: true });
      qemuIo(image, ['write -P 1 0 64k', 'write -P 2 128k 2k']);
      const { l2Offset } = firstL2(image);
      patch(image, l2Offset + 16 + 12, [0, 0, 0, 1]); // entry 1 (unallocated): allocation bit 0
      return { image };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
  },
  {
    name: 'a lazy-refcounts image left dirty',
    make: (dir) => {
      const image = create(name(dir, 'lazy'), 16 * MiB, { lazy_refcounts: true });
      qemuIo(image, ['write -P 1 0 1M']);
      // What a crash leaves: refcounts not yet written, the dirty bit set.
      patch(image, refcountEntry(image, dataCluster(image) / headerOf(image).clusterSize), [0, 0]);
      patch(image, 72 + 7, [0x01]);
      return { image };
    },
    qemu: { status: 2, corruptions: 2, leaks: 0 },
    repair: ['all'],
  },
  {
    name: 'the corrupt bit set on a sound image',
    make: (dir) => headerPatch(dir, 72, () => u64(2)),
    // A repair that finds nothing wrong clears the bit.
    qemu: { status: 0, corruptions: 0, leaks: 0 },
    repair: ['leaks'],
  },

  // Refcount table entries.
  {
    name: 'refcount table entry past the end of the file',
    make: (dir) => reftableEntry0(dir, () => 4n << 30n),
    qemu: { status: 2, corruptions: 40, leaks: 0 },
    repair: ['leaks', 'all'],
    // -r leaks fails (the structure must be rebuilt). -r all: qemu-img first grows the file
    // to 4 GiB to hold the block (one more "fixed"); blockconv grows no file to where an
    // entry points, and the rebuild leaves the same refcount structure.
    repairDiffers: 'qemu-img grows the file to hold a refcount block outside it, blockconv does not',
  },
  {
    name: 'refcount table entry not cluster aligned',
    make: (dir) => reftableEntry0(dir, (image) => BigInt(firstRefblock(image) + 0x200)),
    // Its block cannot be read: every cluster it describes is a check error. -r all
    // fails too (the block still counts as metadata, and the rebuild's new block would overlap it).
    qemu: { status: 1, corruptions: 1, leaks: 0, checkErrors: 22 },
    repair: ['all'],
  },
  {
    name: 'refcount table entry with reserved bits set',
    make: (dir) => reftableEntry0(dir, (image) => BigInt(firstRefblock(image) + 1)),
    qemu: { status: 2, corruptions: 1, leaks: 1 },
    repair: ['all'],
  },
  {
    name: 'refcount table entry beyond what a request can address',
    make: (dir) => reftableEntry0(dir, (image) => BigInt(firstRefblock(image)) | (1n << 63n)),
    qemu: { status: 1, corruptions: 1, leaks: 0, checkErrors: 22 },
    repair: ['all'],
  },
  {
    name: 'refcount block over the L1 table',
    make: (dir) => reftableEntry0(dir, l1Of),
    qemu: { status: 2, corruptions: 39, leaks: 2 },
    repair: ['all'],
  },
  {
    name: 'refcount block over an L2 table',
    make: (dir) => reftableEntry0(dir, l2Of),
    qemu: { status: 2, corruptions: 30, leaks: 11 },
    repair: ['all'],
  },
  {
    name: 'refcount block over a data cluster',
    make: (dir) => reftableEntry0(dir, (image) => BigInt(dataCluster(image))),
    qemu: { status: 2, corruptions: 19, leaks: 22 },
  },
  {
    name: 'refcount block over the refcount table',
    make: (dir) => reftableEntry0(dir, (image) => BigInt(headerOf(image).refcountTableOffset)),
    qemu: { status: 2, corruptions: 40, leaks: 1 },
    repair: ['all'],
  },
  {
    name: 'two refcount table entries naming one block',
    make: (dir) => {
      const image = valid(dir);
      patch(image, headerOf(image).refcountTableOffset + 8, be64(BigInt(firstRefblock(image))));
      return { image };
    },
    qemu: { status: 2, corruptions: 2, leaks: 0 },
    repair: ['all'],
  },
  {
    name: 'refcount block whose own refcount is 0',
    make: (dir) => {
      const image = valid(dir);
      patch(image, refcountEntry(image, firstRefblock(image) / headerOf(image).clusterSize), [0, 0]);
      return { image };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
    repair: ['leaks', 'all'],
  },
  {
    name: 'refcount table whose own refcount is 0',
    make: (dir) => {
      const image = valid(dir);
      const h = headerOf(image);
      patch(image, refcountEntry(image, h.refcountTableOffset / h.clusterSize), [0, 0]);
      return { image };
    },
    qemu: { status: 2, corruptions: 1, leaks: 0 },
    repair: ['all'],
  },

  // The refcount table itself (header fields 48 and 56).
  {
    name: 'refcount table offset not cluster aligned',
    make: (dir) => headerPatch(dir, 48, (image) => u64(headerOf(image).refcountTableOffset + 0x200)),
    qemu: { status: 1, report: false },
  },
  {
    name: 'refcount table offset past the end of the file',
    make: (dir) => headerPatch(dir, 48, () => u64(16 * MiB)),
    qemu: { status: 2, corruptions: 39, leaks: 0 },
    repair: ['all'],
  },
  {
    name: 'refcount table offset beyond any file',
    make: (dir) => headerPatch(dir, 48, () => [0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0]),
    qemu: { status: 1, report: false },
  },
  {
    name: 'refcount table of 8 MiB (128 clusters) in a small file',
    make: (dir) => headerPatch(dir, 56, () => u32(128)),
    // The table reads the blocks and data after it as entries: many corruptions, counted alike.
    qemu: { status: 2 },
  },
  {
    name: 'refcount table larger than 8 MiB',
    make: (dir) => headerPatch(dir, 56, () => u32(129)),
    qemu: { status: 1, report: false },
  },
  {
    name: 'refcount table size beyond any file',
    make: (dir) => headerPatch(dir, 56, () => u32(0xffff_ffff)),
    qemu: { status: 1, report: false },
  },
  {
    name: 'refcount table over the header',
    make: (dir) => headerPatch(dir, 48, () => u64(0)),
    qemu: { status: 2, corruptions: 66, leaks: 0 },
  },
  {
    name: 'refcount table over the L1 table',
    make: (dir) => headerPatch(dir, 48, (image) => u64(headerOf(image).l1Offset)),
    // The L1 entries' copied flag makes them offsets past 2^63: their blocks cannot be read.
    qemu: { status: 1, corruptions: 1, leaks: 0, checkErrors: 22 },
    repair: ['all'],
  },
  {
    name: 'refcount table over its refcount block',
    make: (dir) => headerPatch(dir, 48, (image) => u64(firstRefblock(image))),
    qemu: { status: 2, corruptions: 45, leaks: 0 },
  },
  {
    name: 'no refcount table (refcount_table_clusters 0)',
    make: (dir) => headerPatch(dir, 56, () => u32(0)),
    qemu: { status: 2, corruptions: 38, leaks: 0 },
    repair: ['all'],
  },
];
