/**
 * Shared fixtures: images made at test time with qemu-img/qemu-io (none committed),
 * conversions through the library and the CLI, and qemu-img as the reference.
 */
import { execFile, execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  BlockError,
  DriverRegistry,
  convert,
  type BlockBackend,
  type ImageOpenOptions,
  type SegmentList,
  type ProtocolDriver,
} from '@blockconv/core';
import { drivers as rawDrivers, fileDriver } from '@blockconv/driver-raw';
import { drivers as qcow2Drivers } from '../src/index.js';

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

export const CLI = fileURLToPath(new URL('../../cli/bin/blockconv.js', import.meta.url));

export function registry(): DriverRegistry {
  return new DriverRegistry().register(...rawDrivers, ...qcow2Drivers);
}

/** A fresh directory on /var/tmp: a disk file system with holes and O_DIRECT. */
export function tempDir(prefix = 'blockconv-qcow2-'): string {
  return fs.mkdtempSync(path.join('/var/tmp', prefix));
}

export function removeDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

export function qemuImg(...args: string[]): string {
  return execFileSync('qemu-img', args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs qemu-io commands on an image (each -c one command). */
export function qemuIo(image: string, commands: string[], extra: string[] = []): void {
  execFileSync('qemu-io', [...extra, ...commands.flatMap((c) => ['-c', c]), image], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
}

/** Creates an image; `options` as for qemu-img create -o. */
export function create(
  file: string,
  size: number | string,
  options: Record<string, string | number | boolean> = {},
  format = 'qcow2',
): string {
  const o = Object.entries(options)
    .map(([k, v]) => `${k}=${typeof v === 'boolean' ? (v ? 'on' : 'off') : v}`)
    .join(',');
  qemuImg('create', '-q', '-f', format, ...(o ? ['-o', o] : []), file, String(size));
  return file;
}

/** Writes a mixed pattern: whole clusters, sub-cluster pieces at odd offsets, zero writes, a discard. */
export function writeMixed(image: string, clusterSize: number, size: number, extra: string[] = []): void {
  const c = clusterSize;
  const cmds = [
    `write -P 0x11 0 ${Math.min(3 * c, size)}`,
    `write -P 0x22 ${Math.min(5 * c, size - 4096)} 4096`,
    `write -P 0x33 ${Math.floor(size / 2) - 1536} 3072`,
    `write -P 0x44 ${size - 8192} 8192`,
  ];
  if (size >= 12 * c) {
    cmds.push(
      `write -P 0x55 ${8 * c} ${2 * c}`,
      `write -z ${9 * c} ${c}`,
      `write -P 0x66 ${10 * c + 512} 1024`,
      `discard ${c} ${c}`,
    );
  }
  qemuIo(image, [...cmds, ...extra]);
}

/** Converts with qemu-img to raw (the reference). */
export function qemuConvert(image: string, out: string, extra: string[] = []): void {
  qemuImg('convert', ...extra, '-O', 'raw', image, out);
}

/** Converts through the library: registry, open, create raw, convert. */
export async function libConvert(image: string, out: string, options: ImageOpenOptions = {}): Promise<void> {
  const reg = registry();
  const src = await reg.open(image, { readOnly: true, ...options });
  try {
    const dst = await reg.create(out, src.size, { format: 'raw' });
    try {
      await convert({ sources: [src], target: dst, workers: 4 });
    } finally {
      await dst.close();
    }
  } finally {
    await src.close();
  }
}

export interface CliResult {
  status: number;
  stdout: string;
  stderr: string;
}

let built = false;

/**
 * The CLI loads this package from dist/: rebuild it when a source file is newer, so
 * that `npm test` right after an edit tests the edit (nx's test target builds first anyway).
 */
function ensureBuilt(): void {
  if (built) return;
  const root = fileURLToPath(new URL('..', import.meta.url));
  const newest = (dir: string, ext: string): number =>
    Math.max(
      0,
      ...fs
        .readdirSync(dir)
        .filter((f) => f.endsWith(ext))
        .map((f) => fs.statSync(path.join(dir, f)).mtimeMs),
    );
  const dist = path.join(root, 'dist');
  if (!fs.existsSync(dist) || newest(path.join(root, 'src'), '.ts') > newest(dist, '.js')) {
    execFileSync(
      process.execPath,
      [
        fileURLToPath(new URL('../../../node_modules/typescript/bin/tsc', import.meta.url)),
        '-p',
        path.join(root, 'tsconfig.json'),
      ],
      { stdio: 'inherit' },
    );
  }
  built = true;
}

export function cli(...args: string[]): CliResult {
  ensureBuilt();
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  return { status: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** The CLI run in the background, so that several runs overlap. */
export function cliAsync(...args: string[]): Promise<CliResult> {
  ensureBuilt();
  return new Promise((resolve) => {
    execFile(process.execPath, [CLI, ...args], { encoding: 'utf8', maxBuffer: 64 * MiB }, (err, stdout, stderr) => {
      const status = err
        ? typeof (err as { code?: unknown }).code === 'number'
          ? (err as { code: number }).code
          : -1
        : 0;
      resolve({ status, stdout, stderr });
    });
  });
}

/** Byte comparison of two files (both small enough to compare in chunks). */
export function sameFiles(a: string, b: string): boolean {
  const r = spawnSync('cmp', ['-s', a, b]);
  return r.status === 0;
}

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** Map entries as they are: core's mapImage reports what qemu-img map reports. */
export function normalizeMap(entries: MapEntry[]): MapEntry[] {
  return entries.map((e) => ({ ...e }));
}

export function qemuMap(image: string): MapEntry[] {
  return JSON.parse(qemuImg('map', '--output=json', image)) as MapEntry[];
}

export async function cliMap(image: string): Promise<MapEntry[]> {
  const r = await cliAsync('map', '--output=json', image);
  if (r.status !== 0) throw new Error(`blockconv map failed: ${r.stderr}`);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** Reads `length` bytes at `offset` of a file. */
export function readBytes(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}

/** Overwrites bytes of a file in place. */
export function patch(file: string, offset: number, bytes: Uint8Array | number[]): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

export function u32(n: number): number[] {
  return [(n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff];
}

export function u64(n: number): number[] {
  return [...u32(Math.floor(n / 0x1_0000_0000)), ...u32(n >>> 0)];
}

/** The header fields tests patch around. */
export function headerOf(file: string): {
  clusterSize: number;
  l1Offset: number;
  l1Size: number;
  refcountTableOffset: number;
  snapshotsOffset: number;
} {
  const h = readBytes(file, 0, 72);
  const big = (o: number) => Number(h.readBigUInt64BE(o));
  return {
    clusterSize: 2 ** h.readUInt32BE(20),
    l1Offset: big(40),
    l1Size: h.readUInt32BE(36),
    refcountTableOffset: big(48),
    snapshotsOffset: big(64),
  };
}

/** The first non-zero L1 entry's L2 table offset. */
export function firstL2(file: string): { l1Index: number; l2Offset: number } {
  const h = headerOf(file);
  const l1 = readBytes(file, h.l1Offset, h.l1Size * 8);
  for (let i = 0; i < h.l1Size; i++) {
    const off = Number(l1.readBigUInt64BE(i * 8) & 0x00ff_ffff_ffff_fe00n);
    if (off) return { l1Index: i, l2Offset: off };
  }
  throw new Error('no L2 table');
}

/** Offset in the file of the first L2 entry whose raw value satisfies `pred`. */
export function findL2Entry(file: string, pred: (entry: bigint) => boolean): { at: number; entry: bigint } {
  const h = headerOf(file);
  const { l2Offset } = firstL2(file);
  const l2 = readBytes(file, l2Offset, h.clusterSize);
  for (let i = 0; i < h.clusterSize / 8; i++) {
    const e = l2.readBigUInt64BE(i * 8);
    if (pred(e)) return { at: l2Offset + i * 8, entry: e };
  }
  throw new Error('no such L2 entry');
}

export function be64(n: bigint): number[] {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(n);
  return [...b];
}

/** Turns the backing format extension into an unknown one (skipped by readers), so the backing format is probed. */
export function dropBackingFormat(file: string): void {
  const head = readBytes(file, 0, 4096);
  let off = head.readUInt32BE(4) === 3 ? head.readUInt32BE(100) : 72;
  while (off + 8 <= head.length) {
    const type = head.readUInt32BE(off);
    const len = head.readUInt32BE(off + 4);
    if (type === 0) break;
    if (type === 0xe2792aca) {
      patch(file, off, u32(0x0000abcd));
      return;
    }
    off += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error('no backing format extension');
}

/** Awaits `p`, which must reject with a BlockError; returns it. */
export async function blockError(p: Promise<unknown>): Promise<BlockError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof BlockError) return err;
    throw new Error(`expected a BlockError, got ${String(err)}`, { cause: err });
  }
  throw new Error('expected a BlockError, but it succeeded');
}

/** Opens through a registry and reads the whole image (in 1 MiB requests): the library path of a convert. */
export async function readAll(image: string, options: ImageOpenOptions = {}): Promise<Uint8Array> {
  const img = await registry().open(image, { readOnly: true, ...options });
  try {
    return await readWhole(img);
  } finally {
    await img.close();
  }
}

export async function readWhole(img: BlockBackend): Promise<Uint8Array> {
  const out = new Uint8Array(img.size);
  for (let pos = 0; pos < img.size; pos += MiB) {
    await img.read(pos, Math.min(MiB, img.size - pos), out.subarray(pos));
  }
  return out;
}

/** `reads` counts pieces read (each segment of a readSegments call), `requests` the calls. */
export interface SpyStats {
  requests: number;
  reads: number;
  bytes: number;
  maxEnd: number;
  outside: number;
  size: number;
  log: Array<[number, number]>;
}

/**
 * Wraps a backend, calling `onRead` before every read (once per segment of a
 * readSegments) and `onRequest` once per call; everything else passes through.
 */
export function spyOn(
  b: BlockBackend,
  onRead: (offset: number, length: number) => void,
  onRequest: () => void = () => {},
): BlockBackend {
  const spy: BlockBackend = {
    driverName: b.driverName,
    location: b.location,
    size: b.size,
    readOnly: b.readOnly,
    limits: b.limits,
    canZero: b.canZero,
    canDiscard: b.canDiscard,
    zeroInitialized: b.zeroInitialized,
    canCompress: b.canCompress,
    canBlockStatus: b.canBlockStatus,
    canReadHolesCheaply: b.canReadHolesCheaply,
    canWriteOutOfOrder: b.canWriteOutOfOrder,
    read: (offset, length, into) => {
      onRequest();
      onRead(offset, length);
      return b.read(offset, length, into);
    },
    write: (o, d, f) => b.write(o, d, f),
    writeZeroes: (o, l, f) => b.writeZeroes(o, l, f),
    discard: (o, l) => b.discard(o, l),
    blockStatus: (o, l) => b.blockStatus(o, l),
    flush: () => b.flush(),
    close: () => b.close(),
  };
  return Object.assign(spy, {
    ...(b.allocBuffer ? { allocBuffer: b.allocBuffer.bind(b) } : {}),
    ...(b.allocatedSize ? { allocatedSize: b.allocatedSize.bind(b) } : {}),
    ...(b.readSegments
      ? {
          readSegments: (into: Uint8Array, segments: SegmentList) => {
            onRequest();
            for (let i = 0; i < segments.count; i++) onRead(segments.offsetAt(i), segments.lengthAt(i));
            return b.readSegments!(into, segments);
          },
        }
      : {}),
  });
}

/**
 * A registry whose file protocol records every read: tests assert that a damaged
 * image never makes the driver read outside a file nor read far more than it holds.
 */
export function spyRegistry(options: { log?: boolean } = {}): { reg: DriverRegistry; stats: Map<string, SpyStats> } {
  const stats = new Map<string, SpyStats>();
  const spyFile: ProtocolDriver = {
    ...fileDriver,
    async open(location, openOptions) {
      const b = await fileDriver.open(location, openOptions);
      const s: SpyStats = { requests: 0, reads: 0, bytes: 0, maxEnd: 0, outside: 0, size: b.size, log: [] };
      stats.set(location, s);
      return spyOn(
        b,
        (offset, length) => {
          s.reads++;
          s.bytes += length;
          s.maxEnd = Math.max(s.maxEnd, offset + length);
          if (offset < 0 || offset + length > b.size) s.outside++;
          if (options.log) s.log.push([offset, length]);
        },
        () => {
          s.requests++;
        },
      );
    },
  };
  const reg = new DriverRegistry().register(...rawDrivers, ...qcow2Drivers, spyFile);
  return { reg, stats };
}
