/** Shared fixtures: temp dirs, scratch mounts and loop devices (we may be root). */
import { execFileSync, spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as assert from 'uvu/assert';
import { DriverRegistry } from '@blockconv/core';
import { drivers } from '../src/index.js';

/** A fresh directory on /var/tmp: a disk file system (ext4 here) with O_DIRECT and holes. */
export function diskTempDir(prefix = 'blockconv-raw-'): string {
  return fs.mkdtempSync(path.join('/var/tmp', prefix));
}

/** Bytes of `file` in the page cache, by fincore (util-linux). */
export function cachedBytes(file: string): number {
  return Number(
    execFileSync('fincore', ['--bytes', '--noheadings', '--output', 'RES', file], { encoding: 'utf8' }).trim(),
  );
}

export function removeDir(dir: string): void {
  fs.rmSync(dir, { recursive: true, force: true });
}

/** Runs a command; undefined when it fails (not root, no such tool, no permission). */
export function tryExec(cmd: string, args: string[]): string | undefined {
  try {
    return execFileSync(cmd, args, { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
  } catch {
    return undefined;
  }
}

/**
 * Mounts a scratch file system (e.g. tmpfs size=1m, ramfs) on a new directory.
 * Returns undefined when mounting is not possible here, so the caller can skip.
 */
export function scratchMount(type: string, options?: string): { dir: string; unmount(): void } | undefined {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `blockconv-${type}-`));
  const args = ['-t', type, ...(options ? ['-o', options] : []), type, dir];
  if (tryExec('mount', args) === undefined) {
    fs.rmdirSync(dir);
    return undefined;
  }
  return {
    dir,
    unmount() {
      tryExec('umount', [dir]);
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Whether `mount` works at all (checked once, synchronously, to pick test or test.skip). */
export const canMount: boolean = (() => {
  const m = scratchMount('tmpfs', 'size=64k');
  m?.unmount();
  return m !== undefined;
})();

/** Attaches `file` as a loop device; undefined when losetup is unavailable. */
export function attachLoop(file: string): { dev: string; detach(): void } | undefined {
  const dev = tryExec('losetup', ['-f', '--show', file]);
  if (!dev) return undefined;
  return { dev, detach: () => void tryExec('losetup', ['-d', dev]) };
}

export const canLoop: boolean = (() => {
  const dir = diskTempDir();
  try {
    const f = path.join(dir, 'probe.img');
    fs.writeFileSync(f, Buffer.alloc(1 << 20));
    const loop = attachLoop(f);
    loop?.detach();
    return loop !== undefined;
  } finally {
    removeDir(dir);
  }
})();

export const hasQemuImg: boolean = tryExec('qemu-img', ['--version']) !== undefined;

export const isRoot: boolean = process.getuid?.() === 0;

/** A buffer of `n` bytes filled with `byte`. */
export function filled(n: number, byte: number): Uint8Array {
  return new Uint8Array(n).fill(byte);
}

/** Walks block status over the whole image, merging neighbours of the same kind. */
export async function extents(img: {
  size: number;
  blockStatus(o: number, l: number): Promise<{ kind: string; length: number }>;
}): Promise<Array<{ start: number; length: number; kind: string }>> {
  const out: Array<{ start: number; length: number; kind: string }> = [];
  for (let pos = 0; pos < img.size; ) {
    const e = await img.blockStatus(pos, img.size - pos);
    if (e.length <= 0) throw new Error(`empty extent at ${pos}`);
    const last = out[out.length - 1];
    if (last && last.kind === e.kind) last.length += e.length;
    else out.push({ start: pos, length: e.length, kind: e.kind });
    pos += e.length;
  }
  return out;
}

/**
 * Awaits `fn`, which must reject with an error whose properties match `expected`
 * (uvu/assert has no async `rejects`). Returns the error for further checks.
 */
export async function rejects(
  fn: () => Promise<unknown>,
  expected: Record<string, unknown>,
): Promise<Error & Record<string, unknown>> {
  let error: unknown;
  try {
    await fn();
  } catch (err) {
    error = err;
  }
  if (!(error instanceof Error))
    throw new Error(`expected a rejection with ${JSON.stringify(expected)}, got ${String(error)}`);
  const e = error as Error & Record<string, unknown>;
  for (const [key, value] of Object.entries(expected)) {
    if (e[key] !== value) throw new Error(`expected ${key} = ${String(value)}, got ${String(e[key])} (${e.message})`);
  }
  return e;
}

/** Asserts that two raw images hold the same bytes (qemu-img compare). */
export function identical(a: string, b: string): void {
  const r = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b], { encoding: 'utf8' });
  assert.is(r.status, 0, `${a} and ${b}: ${r.stdout}${r.stderr}`);
}

/** Bytes of data (allocated) in a raw file, by block status. */
export async function dataBytes(file: string): Promise<number> {
  const b = await new DriverRegistry().register(...drivers).open(file, { readOnly: true, format: 'raw' });
  try {
    return (await extents(b)).filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0);
  } finally {
    await b.close();
  }
}
