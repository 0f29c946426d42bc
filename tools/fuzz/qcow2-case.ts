/**
 * One process of the qcow2 fuzz campaign (qcow2-fuzz.ts forks it): for each mutant it
 * is sent, it runs what a user runs — info, map, check, convert to raw, checksum —
 * through the library in this process, then qemu-img convert as the reference, and
 * answers with what happened. The parent bounds its time and restarts it after a crash
 * or a hang; this process measures its own peak RSS per case (VmHWM, reset before each
 * case through /proc/self/clear_refs) and its file descriptors and libuv handles.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import {
  BlockError,
  DriverRegistry,
  HashPool,
  checksumImage,
  convert,
  mapImage,
  type BlockBackend,
} from '@blockconv/core';
import { drivers as rawDrivers } from '@blockconv/driver-raw';
import { drivers as qcow2Drivers } from '@blockconv/driver-qcow2';

export interface CaseRequest {
  readonly id: number;
  readonly image: string;
  /** Where this process may write its raw outputs (a tmpfs directory of its own). */
  readonly outDir: string;
  /** Images larger than this are not converted by qemu-img nor compared byte for byte. */
  readonly compareLimit: number;
  /** A bound on each of our operations; past it the case is a hang. */
  readonly opTimeoutMs: number;
}

export type OpName = 'info' | 'map' | 'check' | 'convert' | 'checksum';

export interface OpResult {
  readonly op: OpName;
  readonly ok: boolean;
  /** The one-line reason of a BlockError. */
  readonly error?: string;
  readonly ms: number;
}

export interface Defect {
  readonly kind: 'exception' | 'multi-line error' | 'hang' | 'mismatch' | 'map' | 'fd leak';
  readonly op?: OpName;
  readonly detail: string;
}

export interface CaseReply {
  readonly id: number;
  readonly ops: readonly OpResult[];
  readonly defects: readonly Defect[];
  /** qemu-img convert: 'ok', its error, or 'skipped' (over compareLimit). */
  readonly qemu: { readonly ok: boolean; readonly error?: string; readonly skipped?: boolean };
  /** Both converted and compared equal; or not compared. */
  readonly compared: 'equal' | 'differ' | 'not compared';
  readonly virtualSize?: number;
  readonly rssPeak: number;
}

const registry = new DriverRegistry().register(...rawDrivers, ...qcow2Drivers);
// One hashing thread for all cases: starting one per checksum would cost more than the case.
const pool = new HashPool(1);
// Warnings about damaged images are expected by the hundred: keep them off stderr.
process.removeAllListeners('warning');
process.on('warning', () => {});

function peakRss(): number {
  const m = /VmHWM:\s+(\d+) kB/.exec(fs.readFileSync('/proc/self/status', 'utf8'));
  return m ? Number(m[1]) * 1024 : 0;
}

function resetPeak(): void {
  try {
    fs.writeFileSync('/proc/self/clear_refs', '5');
  } catch {
    /* older kernels: the peak is then the process's */
  }
}

const fdCount = (): number => fs.readdirSync('/proc/self/fd').length;

class Hang extends Error {}

async function bounded<T>(ms: number, what: string, f: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      f(),
      new Promise<never>((_, reject) => {
        timer = setTimeout(() => reject(new Hang(`${what}: no answer after ${ms} ms`)), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function runCase(req: CaseRequest): Promise<CaseReply> {
  resetPeak();
  const fdsBefore = fdCount();
  const ops: OpResult[] = [];
  const defects: Defect[] = [];
  let virtualSize: number | undefined;
  const ourRaw = `${req.outDir}/ours.raw`;
  const theirRaw = `${req.outDir}/theirs.raw`;
  fs.rmSync(ourRaw, { force: true });
  fs.rmSync(theirRaw, { force: true });
  let checksum: string | undefined;

  const run = async (op: OpName, f: () => Promise<void>): Promise<boolean> => {
    const t = performance.now();
    try {
      await bounded(req.opTimeoutMs, op, f);
      ops.push({ op, ok: true, ms: performance.now() - t });
      return true;
    } catch (err) {
      const ms = performance.now() - t;
      if (err instanceof Hang) {
        defects.push({ kind: 'hang', op, detail: err.message });
      } else if (!(err instanceof BlockError)) {
        defects.push({ kind: 'exception', op, detail: (err as Error)?.stack ?? String(err) });
      } else if (!err.message || err.message.includes('\n')) {
        defects.push({ kind: 'multi-line error', op, detail: JSON.stringify(err.message) });
      }
      ops.push({ op, ok: false, error: err instanceof Error ? err.message.split('\n')[0] : String(err), ms });
      return false;
    }
  };

  // Each operation opens the image itself, as a separate command would.
  const withImage = async (f: (img: BlockBackend) => Promise<void>): Promise<void> => {
    const img = await registry.open(req.image, { format: 'qcow2', readOnly: true });
    try {
      virtualSize = img.size;
      await f(img);
    } finally {
      await img.close();
    }
  };

  await run('info', () =>
    withImage(async (img) => {
      await img.allocatedSize?.();
      JSON.stringify(await img.info?.());
    }),
  );
  await run('map', () =>
    withImage(async (img) => {
      let next = 0;
      for await (const e of mapImage(img)) {
        if (e.start !== next || !(e.length > 0)) throw new Error(`map entry ${JSON.stringify(e)} after ${next}`);
        next = e.start + e.length;
      }
      if (next !== img.size) throw new Error(`map ends at ${next}, the image at ${img.size}`);
    }),
  );
  await run('check', async () => {
    await registry.check(req.image, { format: 'qcow2' });
  });
  const converted = await run('convert', () =>
    withImage(async (img) => {
      const dst = await registry.create(ourRaw, img.size, { format: 'raw' });
      try {
        await convert({ sources: [img], target: dst, workers: 4 });
      } finally {
        await dst.close();
      }
    }),
  );
  await run('checksum', () =>
    withImage(async (img) => {
      checksum = (await checksumImage(img, { pool })).checksum;
    }),
  );
  for (const d of defects)
    if (d.op === 'map' && d.kind === 'exception' && d.detail.includes('map entry')) Object.assign(d, { kind: 'map' });

  let qemu: CaseReply['qemu'];
  let compared: CaseReply['compared'] = 'not compared';
  const small = virtualSize !== undefined && virtualSize <= req.compareLimit;
  if (virtualSize !== undefined && !small) {
    qemu = { ok: false, skipped: true };
  } else {
    const r = spawnSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', req.image, theirRaw], {
      encoding: 'utf8',
      timeout: 60_000,
      cwd: path.dirname(req.image),
    });
    qemu =
      r.status === 0
        ? { ok: true }
        : { ok: false, error: (r.error?.message ?? r.stderr.trim().split('\n')[0]) || `exit ${r.status}` };
  }
  if (converted && qemu.ok) {
    const same = spawnSync('cmp', ['-s', ourRaw, theirRaw]).status === 0;
    compared = same ? 'equal' : 'differ';
    if (!same)
      defects.push({ kind: 'mismatch', op: 'convert', detail: "converted bytes differ from qemu-img convert's" });
  }
  // The digest of the image must be the digest of what it converts to.
  if (converted && checksum !== undefined && small) {
    const raw = await registry.open(ourRaw, { format: 'raw', readOnly: true });
    try {
      const c = (await checksumImage(raw, { pool })).checksum;
      if (c !== checksum)
        defects.push({
          kind: 'mismatch',
          op: 'checksum',
          detail: `checksum ${checksum} but the converted image's is ${c}`,
        });
    } finally {
      await raw.close();
    }
  }
  fs.rmSync(ourRaw, { force: true });
  fs.rmSync(theirRaw, { force: true });
  const fdsAfter = fdCount();
  if (fdsAfter > fdsBefore)
    defects.push({ kind: 'fd leak', detail: `${fdsAfter - fdsBefore} file descriptors more after the case` });
  return { id: req.id, ops, defects, qemu, compared, virtualSize, rssPeak: peakRss() };
}

// A rejection or exception nobody caught is a crash of the case being run.
let current: CaseRequest | undefined;
const die = (err: unknown): void => {
  process.send?.({ id: current?.id ?? -1, crash: (err as Error)?.stack ?? String(err) });
  setTimeout(() => process.exit(70), 50);
};
process.on('uncaughtException', die);
process.on('unhandledRejection', die);

process.on('message', (req: CaseRequest) => {
  current = req;
  runCase(req).then((reply) => {
    current = undefined;
    process.send?.(reply);
  }, die);
});
// Ready once the hashing thread runs: it opens its own descriptors (event loop, wakeups)
// as it starts, which the first case's fd count would otherwise take for a leak.
void pool.hash(new ArrayBuffer(65536), 65536).then(() => process.send?.({ ready: true }), die);
