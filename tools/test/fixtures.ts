/**
 * Small fixtures the driver packages' tests share: scratch directories, running tools
 * and the CLI, awaiting a rejection, qemu-img compare, sparse raw images, free ports.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

/** This checkout's CLI. */
export const CLI = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../../packages/cli/bin/blockconv.js');

export const MiB = 1024 * 1024;

/** A new scratch directory under the system's temporary directory. */
export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function run(cmd: string, args: string[], env?: NodeJS.ProcessEnv): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
}

/** Runs the blockconv CLI (in `cwd`, when given: drivers are found from there too); never throws. */
export function cli(
  args: string[],
  env: NodeJS.ProcessEnv = {},
  timeoutMs = 120_000,
  cwd?: string,
): { status: number | null; stdout: string; stderr: string; ms: number } {
  const start = Date.now();
  const r = spawnSync(process.execPath, [CLI, ...args], {
    encoding: 'utf8',
    timeout: timeoutMs,
    env: { ...process.env, ...env },
    cwd,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr, ms: Date.now() - start };
}

/** Awaits a rejection and returns the error (uvu has no async `rejects`). */
export async function failure(fn: () => Promise<unknown>): Promise<Error & { code?: string }> {
  try {
    await fn();
  } catch (err) {
    return err as Error & { code?: string };
  }
  throw new Error('expected a rejection');
}

/** qemu-img compare; its exit status (0 identical, 1 different) and output. */
export function compare(
  a: string,
  b: string,
  formats: [string, string] = ['raw', 'raw'],
): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', ['compare', '-f', formats[0], '-F', formats[1], a, b], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

/** A free loopback TCP port (bound, then released). */
export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.once('error', reject);
  });
}

/** A raw file of `size` bytes with random data in the given MiB ranges. */
export function sparseImage(file: string, size: number, dataMiB: readonly [number, number][]): void {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, size);
  for (const [at, n] of dataMiB) {
    execFileSync('dd', [
      'if=/dev/urandom',
      `of=${file}`,
      'bs=1M',
      `seek=${at}`,
      `count=${n}`,
      'conv=notrunc',
      'status=none',
    ]);
  }
}
