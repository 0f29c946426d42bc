/**
 * Fixtures for the NBD driver tests: real servers from Debian (qemu-nbd, nbdkit) on Unix
 * sockets or loopback TCP in a temporary directory, one per test that needs it, and the CLI.
 */
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const CLI = path.resolve(here, '../../cli/bin/blockconv.js');

export const MiB = 1024 * 1024;

export function tmpDir(): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'blockconv-nbd-'));
}

export function run(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
}

/** Runs the blockconv CLI; never throws. */
export function cli(args: string[], env: NodeJS.ProcessEnv = {}, timeoutMs = 120_000): { status: number | null; stdout: string; stderr: string; ms: number } {
  const start = Date.now();
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8', timeout: timeoutMs, env: { ...process.env, ...env } });
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

export interface Server {
  /** nbd+unix:// (or nbd:// for TCP) URL of the default export. */
  readonly url: string;
  readonly socket?: string;
  readonly port?: number;
  readonly process: ChildProcess;
  /** URL of another export name on the same server. */
  urlOf(exportName: string): string;
  stop(): Promise<void>;
  /** SIGKILL: the server vanishes mid-request. */
  kill(): void;
}

function canConnect(opts: net.NetConnectOpts): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(opts);
    s.once('connect', () => { s.destroy(); resolve(true); });
    s.once('error', () => resolve(false));
  });
}

async function waitReady(child: ChildProcess, opts: net.NetConnectOpts, what: string, stderr: () => string): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (Date.now() < deadline) {
    if (child.exitCode !== null) throw new Error(`${what} exited (${child.exitCode}): ${stderr()}`);
    if (await canConnect(opts)) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  child.kill('SIGKILL');
  throw new Error(`${what} did not start listening in 15 s: ${stderr()}`);
}

function server(cmd: string, args: string[], where: { socket?: string; port?: number }, what: string): Promise<Server> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  child.stderr!.on('data', (d: Buffer) => { err += d.toString(); });
  const opts: net.NetConnectOpts = where.socket ? { path: where.socket } : { host: '127.0.0.1', port: where.port! };
  const urlOf = (name: string): string => where.socket
    ? `nbd+unix:///${encodeURIComponent(name)}?socket=${where.socket}`
    : `nbd://127.0.0.1:${where.port}/${encodeURIComponent(name)}`;
  return waitReady(child, opts, what, () => err).then(() => ({
    url: urlOf(''),
    ...where,
    process: child,
    urlOf,
    kill: () => { child.kill('SIGKILL'); },
    stop: async () => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(t);
    },
  }));
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

/**
 * nbdkit in the foreground: `nbdkit(dir, ['memory', '64M'])`, or with filters first
 * (`['--filter=error', 'memory', '64M', 'error-rate=1']`). TCP when `tcp` is set.
 */
export async function nbdkit(dir: string, args: string[], tcp = false): Promise<Server> {
  if (tcp) {
    const port = await freePort();
    return server('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), ...args], { port }, 'nbdkit');
  }
  const socket = path.join(dir, `nbdkit-${Math.random().toString(36).slice(2, 8)}.sock`);
  return server('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], { socket }, 'nbdkit');
}

/** qemu-nbd serving `file` (format `format`) until stopped; `extra` e.g. ['-r'], ['-x', 'name']. */
export function qemuNbd(dir: string, file: string, format: 'raw' | 'qcow2', extra: string[] = []): Promise<Server> {
  const socket = path.join(dir, `qemu-nbd-${Math.random().toString(36).slice(2, 8)}.sock`);
  return server('qemu-nbd', ['-t', '-e', '8', '-k', socket, '-f', format, '--cache=writeback', ...extra, file], { socket }, 'qemu-nbd');
}

/** A raw file of `size` bytes with random data in the given MiB ranges. */
export function sparseImage(file: string, size: number, dataMiB: readonly [number, number][]): void {
  fs.closeSync(fs.openSync(file, 'w'));
  fs.truncateSync(file, size);
  for (const [at, n] of dataMiB) {
    execFileSync('dd', ['if=/dev/urandom', `of=${file}`, 'bs=1M', `seek=${at}`, `count=${n}`, 'conv=notrunc', 'status=none']);
  }
}

/** qemu-img compare; returns its exit status (0 identical, 1 different) and output. */
export function compare(a: string, b: string, formats: [string, string] = ['raw', 'raw']): { status: number | null; out: string } {
  const r = spawnSync('qemu-img', ['compare', '-f', formats[0], '-F', formats[1], a, b], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}
