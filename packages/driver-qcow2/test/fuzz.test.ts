/**
 * Seeded byte-flip fuzzing of headers and tables of valid images: for every mutant,
 * blockconv either returns exactly the bytes `qemu-img convert` returns, or fails
 * with a BlockError; never another exception, a crash or a hang. A failure message
 * names the seed and case so it can be replayed (QCOW2_FUZZ_SEED, QCOW2_FUZZ_CASES).
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockError } from '@blockconv/core';
import { suite } from 'uvu';
import * as assert from 'uvu/assert';
import { KiB, MiB, create, findL2Entry, firstL2, headerOf, qemuImg, qemuIo, readAll, readBytes, removeDir, tempDir } from './helpers.js';

const SEED = Number(process.env.QCOW2_FUZZ_SEED ?? 20251125);
const CASES = Number(process.env.QCOW2_FUZZ_CASES ?? 300);
/** Longest either side may take on one mutant before it counts as a hang. */
const HANG_MS = 10_000;

interface Base {
  name: string;
  file: string;
  /** [start, end) byte ranges worth mutating. */
  regions: Array<[number, number]>;
}

/** xorshift32: small, seedable, the same everywhere. */
function prng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    return x / 0x1_0000_0000;
  };
}

function regionsOf(file: string, extra: Array<[number, number]> = []): Array<[number, number]> {
  const h = headerOf(file);
  const head = readBytes(file, 0, 4096);
  const headerArea = Math.min(h.clusterSize, 1024, head.readUInt32BE(4) === 3 ? head.readUInt32BE(100) + 512 : 512);
  const { l2Offset } = firstL2(file);
  return [
    [0, 112], // the fixed header, where one flip matters most: weighted by listing it twice
    [0, headerArea],
    [h.l1Offset, h.l1Offset + Math.max(8, h.l1Size * 8)],
    [l2Offset, l2Offset + Math.min(h.clusterSize, 4096)],
    ...extra,
  ];
}

function makeBases(dir: string): Base[] {
  const bases: Base[] = [];
  const plain = create(path.join(dir, 'plain.qcow2'), 2 * MiB);
  qemuIo(plain, ['write -P 1 0 256k', 'write -z 64k 64k', 'write -P 2 1M 4k', 'discard 128k 64k']);
  qemuImg('snapshot', '-c', 'snap', plain);
  qemuIo(plain, ['write -P 3 0 64k']);
  const snapAt = headerOf(plain).snapshotsOffset;
  bases.push({ name: 'v3 64k with a snapshot', file: plain, regions: regionsOf(plain, [[snapAt, snapAt + 64]]) });

  const small = create(path.join(dir, 'small.qcow2'), 256 * KiB, { cluster_size: 512, compat: '0.10' });
  qemuIo(small, ['write -P 4 0 8k', 'write -P 5 100k 1536', 'write -P 6 255k 1k']);
  bases.push({ name: 'v2 512-byte clusters', file: small, regions: regionsOf(small) });

  for (const type of ['zlib', 'zstd']) {
    const src = create(path.join(dir, `${type}.raw`), MiB, {}, 'raw');
    qemuIo(src, ['write -P 7 0 256k', 'write -P 8 512k 64k'], ['-f', 'raw']);
    const c = path.join(dir, `${type}.qcow2`);
    qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${type}`, src, c);
    const { entry } = findL2Entry(c, (e) => (e & (1n << 62n)) !== 0n);
    const host = Number(entry & ((1n << 54n) - 1n));
    bases.push({ name: `compressed ${type}`, file: c, regions: regionsOf(c, [[host, host + 256]]) });
  }

  const ext = create(path.join(dir, 'el2.qcow2'), MiB, { extended_l2: true, cluster_size: 16 * KiB });
  qemuIo(ext, ['write -P 9 0 3k', 'write -z 8k 1k', 'write -P 10 40k 16k']);
  bases.push({ name: 'extended L2', file: ext, regions: regionsOf(ext) });
  return bases;
}

type Outcome = { ok: true; data: Buffer } | { ok: false; why: string };

function qemuOutcome(image: string, out: string): Outcome {
  fs.rmSync(out, { force: true });
  const r = spawnSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, out], { encoding: 'utf8', timeout: HANG_MS });
  if (r.error) return { ok: false, why: `qemu-img: ${r.error.message}` };
  if (r.status !== 0) return { ok: false, why: r.stderr.trim() };
  return { ok: true, data: fs.readFileSync(out) };
}

async function ourOutcome(image: string): Promise<Outcome> {
  let timer: NodeJS.Timeout | undefined;
  const hang = new Promise<never>((_, reject) => { timer = setTimeout(() => reject(new Error(`no answer after ${HANG_MS} ms`)), HANG_MS); });
  try {
    const data = await Promise.race([readAll(image, { format: 'qcow2' }), hang]);
    return { ok: true, data: Buffer.from(data.buffer, data.byteOffset, data.byteLength) };
  } catch (err) {
    if (err instanceof BlockError) return { ok: false, why: err.message };
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

const test = suite('fuzz: byte flips in headers and tables');
let dir = '';
test.before(() => { dir = tempDir('blockconv-qcow2-fuzz-'); });
test.after(() => removeDir(dir));

test(`${CASES} mutants (seed ${SEED}): qemu-img's bytes or a BlockError`, async () => {
  const bases = makeBases(dir);
  const originals = bases.map((b) => fs.readFileSync(b.file));
  const rand = prng(SEED);
  const mutant = path.join(dir, 'mutant.qcow2');
  const qemuOut = path.join(dir, 'mutant.raw');
  const tally = { same: 0, refused: 0, bothRefused: 0 };
  for (let i = 0; i < CASES; i++) {
    const b = Math.floor(rand() * bases.length);
    const base = bases[b]!;
    const bytes = Buffer.from(originals[b]!);
    const [start, end] = base.regions[Math.floor(rand() * base.regions.length)]!;
    const flips = 1 + Math.floor(rand() * 3);
    const changes: string[] = [];
    for (let f = 0; f < flips; f++) {
      const at = start + Math.floor(rand() * Math.min(end - start, bytes.length - start));
      // Single bit flips mostly, whole random bytes sometimes.
      const mask = rand() < 0.7 ? 1 << Math.floor(rand() * 8) : 1 + Math.floor(rand() * 255);
      bytes[at]! ^= mask;
      changes.push(`${at}^0x${mask.toString(16)}`);
    }
    fs.writeFileSync(mutant, bytes);
    const what = `case ${i} (seed ${SEED}), ${base.name}, flips ${changes.join(' ')}`;
    const ours = await ourOutcome(mutant).catch((err: unknown) => {
      throw new Error(`${what}: not a BlockError: ${(err as Error)?.stack ?? String(err)}`);
    });
    const theirs = qemuOutcome(mutant, qemuOut);
    if (ours.ok) {
      const problem = !theirs.ok ? `blockconv read the image but qemu-img refused it: ${theirs.why}` : !theirs.data.equals(ours.data) ? 'data differs from qemu-img\'s' : '';
      if (problem && process.env.QCOW2_FUZZ_ALL) { console.log(`${what}: ${problem}`); continue; }
      assert.ok(!problem, `${what}: ${problem}`);
      tally.same++;
    } else if (theirs.ok) {
      if (process.env.QCOW2_FUZZ_ALL) console.log(`REFUSED ${base.name}: ${ours.why.replace(/^\S+ /, '')}`);
      tally.refused++;
    } else {
      tally.bothRefused++;
    }
  }
  if (process.env.QCOW2_TIMING) console.log(`fuzz: ${JSON.stringify(tally)}`);
  assert.ok(tally.same > CASES / 10, `most mutants of data-bearing bytes still read: ${JSON.stringify(tally)}`);
});

test.run();
