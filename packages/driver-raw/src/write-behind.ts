/**
 * Write-behind for long writes through the page cache (the file protocol's
 * write-behind=on|off option).
 *
 * A copy that only writes leaves the kernel to decide when its data goes to disk:
 * past the background dirty threshold the flusher starts, past the dirty limit the
 * writer is throttled in bursts (balance_dirty_pages), and a cache full of dirty
 * target pages makes reclaim expensive for everyone. Measured on a 16 GiB copy to
 * ext4, that doubled the system time and the wall time (docs/PERFORMANCE.md). Here
 * each completed large write starts its own writeback at once and waits out, then
 * drops from the cache, the one written WINDOWS writes earlier, as nbdcopy does.
 */
import * as fs from 'node:fs';
import { BlockError } from '@blockconv/core';
import * as fileio from '@blockconv/fileio';

/** Written ranges whose writeback runs while later ones are written (64 MiB of 2 MiB chunks). */
const WINDOWS = 32;
/**
 * Writes smaller than this are left to the kernel: they are metadata or random I/O,
 * where waiting for an older write would only slow them down. Streaming copies write
 * chunks (2 MiB, the file protocol's optimalTransfer) or their data runs.
 */
const MIN_WRITE = 256 * 1024;
/** statfs magic numbers of memory file systems, whose pages never go to a disk. */
const TMPFS_MAGIC = 0x01021994;
const RAMFS_MAGIC = 0x858458f6;

export class WriteBehind {
  readonly #fd: number;
  /** [offset, length] pairs, a ring; the slot at #next is the oldest. */
  readonly #ring = new Float64Array(2 * WINDOWS);
  #next = 0;
  /** Writing behind only once the file is larger than this (cache=unsafe); -1: always. */
  readonly #above: number;
  #active: boolean;

  constructor(fd: number, size: number, above = -1) {
    this.#fd = fd;
    this.#above = above;
    this.#active = size > above;
  }

  /**
   * The file grew (a format allocating at its end: qcow2 starts small). An unsafe
   * target that outgrows the threshold is written behind from then on.
   */
  grown(size: number): void {
    if (size > this.#above) this.#active = true;
  }

  /** Called after [offset, offset + length) was written; waits when the disk is behind. */
  written(offset: number, length: number): Promise<void> | undefined {
    if (!this.#active || length < MIN_WRITE) return undefined;
    const i = 2 * this.#next;
    const evictOffset = this.#ring[i]!;
    const evictLength = this.#ring[i + 1]!;
    this.#ring[i] = offset;
    this.#ring[i + 1] = length;
    this.#next = (this.#next + 1) % WINDOWS;
    return fileio.writeBehind(this.#fd, offset, length, evictOffset, evictLength);
  }
}

export interface WriteBehindTarget {
  readonly fd: number;
  readonly location: string;
  readonly isDevice: boolean;
  /** Bytes of the file or device: the most a copy to it can write. */
  readonly size: number;
  /** cache=unsafe: nothing will be flushed, so data may stay dirty at exit. */
  readonly unsafe: boolean;
}

/** The write-behind=on|off open option (default on). */
export function parseWriteBehindOption(location: string, value: string | undefined): boolean {
  if (value === undefined || value === 'on') return true;
  if (value === 'off') return false;
  throw new BlockError('EINVAL', `option write-behind: expected on or off, got "${value}"`, { op: 'open', location });
}

/**
 * The write-behind for a writable buffered fd, or undefined where it has no use (a
 * file in memory: tmpfs, ramfs). With cache=unsafe it waits while the file is no
 * larger than the kernel's background dirty threshold: nothing flushes an unsafe
 * target, and below that threshold the kernel neither writes back nor throttles, so a
 * copy that fits ends without waiting for the disk. A larger one is written behind
 * from its first write: letting the threshold's worth pile up first and then writing
 * behind measured slower than writing behind throughout (docs/PERFORMANCE.md); only a
 * file that grows past it (a qcow2 being filled) starts late.
 */
export async function writeBehindFor(t: WriteBehindTarget): Promise<WriteBehind | undefined> {
  if (!t.isDevice) {
    const type = await fs.promises.statfs(t.location).then(
      (s) => s.type,
      () => undefined,
    );
    if (type === TMPFS_MAGIC || type === RAMFS_MAGIC) return undefined;
  }
  return new WriteBehind(t.fd, t.size, t.unsafe ? await backgroundDirtyBytes() : -1);
}

/**
 * vm.dirty_background_bytes, or vm.dirty_background_ratio of the available memory
 * (close to the kernel's "dirtyable" memory); 0 when /proc does not say.
 */
async function backgroundDirtyBytes(): Promise<number> {
  const read = (file: string): Promise<string> => fs.promises.readFile(file, 'utf8').catch(() => '');
  const [bytes, ratio, meminfo] = await Promise.all([
    read('/proc/sys/vm/dirty_background_bytes'),
    read('/proc/sys/vm/dirty_background_ratio'),
    read('/proc/meminfo'),
  ]);
  if (Number(bytes) > 0) return Number(bytes);
  const available = /^MemAvailable:\s+(\d+) kB/m.exec(meminfo);
  const percent = Number(ratio);
  if (!available || !(percent > 0)) return 0;
  return Math.floor((percent / 100) * Number(available[1]) * 1024);
}
