/**
 * The soak of issue 15: N consecutive converts through the library API in one process,
 * cycling through every driver (file raw and qcow2, NFS, an iSCSI LUN) and through error
 * cases (a missing source, a corrupt image, a missing NFS file, a LUN that does not
 * exist, a target too small, a cancelled copy). After a warm-up, it samples resident
 * memory (after a GC), open file descriptors, sockets and libuv handles; leaks show as
 * growth from the first sample to the last.
 *
 *   node --expose-gc --import tsx tools/soak.ts [--converts N] [--json]
 *
 * Needs the loopback NFS and iSCSI servers (started if they are not running) and a build.
 * CI runs 60 converts (packages/cli/test/soak.test.ts).
 */
import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { BlockError, DriverRegistry, convert, type BlockBackend } from '@blockconv/core';
import { drivers as rawDrivers } from '@blockconv/driver-raw';
import { drivers as qcow2Drivers } from '@blockconv/driver-qcow2';
import { drivers as nfsDrivers } from '@blockconv/driver-nfs';
import { drivers as iscsiDrivers } from '@blockconv/driver-iscsi';
import { BASE_URL, EXPORT_DIR, ensureServer as ensureNfs } from './test/nfs-server.js';
import { IQN, LUNS, PORTAL, ensureServer as ensureIscsi } from './test/iscsi-server.js';

const MiB = 1024 * 1024;

export interface Sample {
  readonly after: number;
  readonly rssMiB: number;
  readonly heapMiB: number;
  readonly fds: number;
  readonly sockets: number;
  readonly handles: number;
}

export interface SoakResult {
  readonly converts: number;
  readonly failedAsExpected: number;
  readonly first: Sample;
  readonly last: Sample;
  readonly samples: readonly Sample[];
  /** Anything that went unlike its case said (an error that was not a BlockError, a copy that failed). */
  readonly surprises: readonly string[];
}

function sample(after: number): Sample {
  (globalThis as { gc?: () => void }).gc?.();
  const fdDir = '/proc/self/fd';
  let fds = 0;
  let sockets = 0;
  for (const f of fs.readdirSync(fdDir)) {
    fds++;
    try {
      if (fs.readlinkSync(path.join(fdDir, f)).startsWith('socket:')) sockets++;
    } catch {
      /* the readdir's own fd */
    }
  }
  const m = process.memoryUsage();
  return {
    after,
    rssMiB: Math.round(m.rss / MiB),
    heapMiB: Math.round(m.heapUsed / MiB),
    fds,
    sockets,
    handles: process.getActiveResourcesInfo().length,
  };
}

interface Case {
  readonly name: string;
  /** Expected BlockError code, when the case is an error case. */
  readonly fails?: string;
  readonly run: (reg: DriverRegistry, dir: string) => Promise<void>;
}

async function copy(
  reg: DriverRegistry,
  from: string,
  to: string,
  o: { format?: string; targetFormat?: string; existing?: boolean; cancelAfter?: number } = {},
): Promise<void> {
  const src = await reg.open(from, { readOnly: true, ...(o.format ? { format: o.format } : {}) });
  let dst: BlockBackend | undefined;
  try {
    dst = o.existing
      ? await reg.open(to, { format: 'raw' })
      : await reg.create(to, src.size, { format: o.targetFormat ?? 'raw' });
    const ac = new AbortController();
    if (o.cancelAfter !== undefined)
      setTimeout(() => ac.abort(new BlockError('ECANCELED', 'cancelled by the soak')), o.cancelAfter);
    await convert({ sources: [src], target: dst, workers: 4, signal: ac.signal });
  } finally {
    await dst?.close();
    await src.close();
  }
}

export async function runSoak(converts: number, log: (l: string) => void = () => {}): Promise<SoakResult> {
  ensureNfs();
  ensureIscsi();
  const reg = new DriverRegistry().register(...rawDrivers, ...qcow2Drivers, ...nfsDrivers, ...iscsiDrivers);
  const dir = fs.mkdtempSync('/var/tmp/blockconv-soak-');
  const nfsName = `soak-${process.pid}.raw`;
  const raw = path.join(dir, 'source.raw');
  // Data, zeroes and a hole: 8 MiB.
  const data = Buffer.alloc(8 * MiB);
  crypto.randomFillSync(data, 0, 3 * MiB);
  crypto.randomFillSync(data, 6 * MiB, MiB);
  fs.writeFileSync(raw, data);
  const big = path.join(dir, 'big.raw');
  const corrupt = path.join(dir, 'corrupt.qcow2');
  // A qcow2 header whose L1 table lies past the end of the file.
  const h = Buffer.alloc(512);
  h.writeUInt32BE(0x514649fb, 0);
  h.writeUInt32BE(3, 4);
  h.writeUInt32BE(16, 20);
  h.writeBigUInt64BE(BigInt(8 * MiB), 24);
  h.writeUInt32BE(1, 36);
  h.writeBigUInt64BE(1n << 40n, 40);
  h.writeBigUInt64BE(65536n, 48);
  h.writeUInt32BE(1, 56);
  h.writeUInt32BE(4, 96);
  h.writeUInt32BE(104, 100);
  fs.writeFileSync(corrupt, h);
  const lun = LUNS.disk512.url;
  const cases: Case[] = [
    { name: 'file raw -> raw', run: (r, d) => copy(r, raw, path.join(d, 'out.raw')) },
    { name: 'raw -> qcow2', run: (r, d) => copy(r, raw, path.join(d, 'out.qcow2'), { targetFormat: 'qcow2' }) },
    {
      name: 'qcow2 -> raw',
      run: (r, d) => copy(r, path.join(d, 'out.qcow2'), path.join(d, 'back.raw'), { format: 'qcow2' }),
    },
    { name: 'raw -> NFS', run: (r) => copy(r, raw, `${BASE_URL}/${nfsName}`) },
    { name: 'NFS -> raw', run: (r, d) => copy(r, `${BASE_URL}/${nfsName}`, path.join(d, 'from-nfs.raw')) },
    { name: 'raw -> LUN', run: (r) => copy(r, raw, lun, { existing: true }) },
    { name: 'LUN -> raw', run: (r, d) => copy(r, lun, path.join(d, 'from-lun.raw')) },
    {
      name: 'missing source',
      fails: 'ENOENT',
      run: (r, d) => copy(r, path.join(d, 'nothing-here.raw'), path.join(d, 'x.raw')),
    },
    {
      name: 'corrupt qcow2',
      fails: 'ECORRUPT',
      run: (r, d) => copy(r, corrupt, path.join(d, 'x.raw'), { format: 'qcow2' }),
    },
    {
      name: 'missing NFS file',
      fails: 'ENOENT',
      run: (r, d) => copy(r, `${BASE_URL}/soak-missing-${process.pid}.raw`, path.join(d, 'x.raw')),
    },
    {
      name: 'no such LUN',
      fails: 'ENOENT',
      run: (r, d) => copy(r, `iscsi://${PORTAL}/${IQN}:disk512/9`, path.join(d, 'x.raw')),
    },
    { name: 'target too small', fails: 'ERANGE', run: (r) => copy(r, raw, LUNS.small.url, { existing: true }) },
    {
      name: 'cancelled copy to NFS',
      fails: 'ECANCELED',
      run: (r) => copy(r, big, `${BASE_URL}/${nfsName}`, { cancelAfter: 5 }),
    },
  ];
  fs.writeFileSync(big, crypto.randomBytes(32 * MiB));
  const samples: Sample[] = [];
  const surprises: string[] = [];
  let failedAsExpected = 0;
  const warmup = Math.min(cases.length * 2, Math.floor(converts / 3));
  try {
    for (let i = 0; i < converts; i++) {
      const c = cases[i % cases.length]!;
      try {
        await c.run(reg, dir);
        if (c.fails) surprises.push(`convert ${i} (${c.name}): succeeded, expected ${c.fails}`);
      } catch (err) {
        if (!(err instanceof BlockError))
          surprises.push(`convert ${i} (${c.name}): not a BlockError: ${(err as Error)?.stack ?? err}`);
        else if (!c.fails) surprises.push(`convert ${i} (${c.name}): ${err.code}: ${err.message}`);
        else if (err.code !== c.fails && !(c.fails === 'ENOENT' && err.code === 'EACCES'))
          surprises.push(`convert ${i} (${c.name}): ${err.code} (expected ${c.fails}): ${err.message}`);
        else failedAsExpected++;
      }
      if (i + 1 === warmup || (i + 1 > warmup && ((i + 1 - warmup) % cases.length === 0 || i + 1 === converts))) {
        const s = sample(i + 1);
        samples.push(s);
        log(
          `after ${s.after} converts: RSS ${s.rssMiB} MiB, heap ${s.heapMiB} MiB, ${s.fds} fds (${s.sockets} sockets), ${s.handles} handles`,
        );
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
    fs.rmSync(path.join(EXPORT_DIR, nfsName), { force: true });
  }
  return { converts, failedAsExpected, first: samples[0]!, last: samples.at(-1)!, samples, surprises };
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { values } = parseArgs({
    options: { converts: { type: 'string', default: '500' }, json: { type: 'boolean' } },
  });
  if (!/^\d+$/.test(values.converts!)) {
    console.error(`soak: --converts must be a whole number, got "${values.converts}"`);
    process.exit(2);
  }
  if (!(globalThis as { gc?: unknown }).gc) console.error('soak: run with node --expose-gc for RSS after a GC');
  const r = await runSoak(Number(values.converts), (l) => console.error(l));
  if (values.json) console.log(JSON.stringify(r, null, 2));
  else {
    console.log('| | after converts | RSS (after GC) | heap | fds | sockets | libuv handles |');
    console.log('|---|---|---|---|---|---|---|');
    for (const [k, s] of [
      ['first', r.first],
      ['last', r.last],
    ] as const)
      console.log(
        `| ${k} | ${s.after} | ${s.rssMiB} MiB | ${s.heapMiB} MiB | ${s.fds} | ${s.sockets} | ${s.handles} |`,
      );
    console.log(
      `\n${r.converts} converts, ${r.failedAsExpected} failed as their case expects, ${r.surprises.length} surprises${r.surprises.length ? `:\n${r.surprises.join('\n')}` : '.'}`,
    );
  }
  process.exitCode = r.surprises.length ? 1 : 0;
}
