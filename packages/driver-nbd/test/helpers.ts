/**
 * Fixtures for the NBD driver tests: real servers from Debian (qemu-nbd, nbdkit) on Unix
 * sockets or loopback TCP in a temporary directory, one per test that needs it, and the CLI.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import * as path from 'node:path';
import { freePort, tmpDir as scratchDir } from '../../../tools/test/fixtures.js';

export { CLI, MiB, cli, compare, failure, freePort, run, sparseImage } from '../../../tools/test/fixtures.js';

export function tmpDir(): string {
  return scratchDir('blockconv-nbd-');
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
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitReady(
  child: ChildProcess,
  opts: net.NetConnectOpts,
  what: string,
  stderr: () => string,
): Promise<void> {
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
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  const opts: net.NetConnectOpts = where.socket ? { path: where.socket } : { host: '127.0.0.1', port: where.port! };
  const urlOf = (name: string): string =>
    where.socket
      ? `nbd+unix:///${encodeURIComponent(name)}?socket=${where.socket}`
      : `nbd://127.0.0.1:${where.port}/${encodeURIComponent(name)}`;
  return waitReady(child, opts, what, () => err).then(() => ({
    url: urlOf(''),
    ...where,
    process: child,
    urlOf,
    kill: () => {
      child.kill('SIGKILL');
    },
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

/**
 * nbdkit in the foreground: `nbdkit(dir, ['memory', '64M'])`, or with filters first
 * (`['--filter=error', 'memory', '64M', 'error-rate=1']`). TCP when `tcp` is set.
 */
export async function nbdkit(dir: string, args: string[], tcp = false): Promise<Server> {
  if (tcp) {
    const port = await freePort();
    return server(
      'nbdkit',
      ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port), ...args],
      { port },
      'nbdkit',
    );
  }
  const socket = path.join(dir, `nbdkit-${Math.random().toString(36).slice(2, 8)}.sock`);
  return server('nbdkit', ['-f', '--exit-with-parent', '-U', socket, ...args], { socket }, 'nbdkit');
}

/** qemu-nbd serving `file` (format `format`) until stopped; `extra` e.g. ['-r'], ['-x', 'name']. */
export function qemuNbd(dir: string, file: string, format: 'raw' | 'qcow2', extra: string[] = []): Promise<Server> {
  const socket = path.join(dir, `qemu-nbd-${Math.random().toString(36).slice(2, 8)}.sock`);
  return server(
    'qemu-nbd',
    ['-t', '-e', '8', '-k', socket, '-f', format, '--cache=writeback', ...extra, file],
    { socket },
    'qemu-nbd',
  );
}
