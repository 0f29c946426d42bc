/**
 * Opening a convert's target(s) the one way the CLI and fleet workers both need: created
 * at the sources' size, or opened when it exists (-n) or is being resumed (after the
 * registry reclaims what the interruption leaked). With several targets, one that cannot
 * be opened or created is left out with its reason, and the others go on.
 */
import { BlockError, toBlockError } from '../errors.js';
import type { DriverRegistry } from '../registry.js';
import type { BlockBackend, CacheMode } from '../types.js';
import { UnopenedTarget } from './fanout.js';
import type { ResumeState } from './resume.js';

export interface OpenTargetsOptions {
  /** Target format (-O); raw when absent. */
  readonly format?: string;
  /** Create each target (default); false opens existing ones (-n). */
  readonly create?: boolean;
  /**
   * Bytes of the sources: the size a target is created with, and the least an existing
   * one must have. A promise lets existing targets (-n, a resume) open while the sources
   * still do, each a mount or a login: only the size check waits for it. If it rejects,
   * what opened is closed and its error is thrown.
   */
  readonly size: number | Promise<number>;
  /** Resuming: the targets exist and are opened; leaks are reclaimed first; dropped ones stay out. */
  readonly resume?: ResumeState;
  readonly cache?: CacheMode;
  /** Driver options of the opened targets (--target-opts). */
  readonly openOptions?: Readonly<Record<string, string>>;
  /** Creation options (-o). */
  readonly createOptions?: Readonly<Record<string, string>>;
  readonly signal?: AbortSignal;
}

async function openOne(reg: DriverRegistry, name: string, o: OpenTargetsOptions): Promise<BlockBackend> {
  const format = o.format ?? 'raw';
  if (o.resume) {
    await reg.reclaimForResume(name, { format, cache: o.cache, options: o.openOptions, signal: o.signal });
    return reg.open(name, { format, cache: o.cache, options: o.openOptions, signal: o.signal });
  }
  if (o.create !== false)
    return reg.create(name, await o.size, {
      format,
      cache: o.cache,
      options: o.createOptions,
      openOptions: o.openOptions,
      signal: o.signal,
    });
  const t = await reg.open(name, { format, cache: o.cache, options: o.openOptions, signal: o.signal });
  let size: number;
  try {
    size = await o.size;
  } catch (err) {
    await t.close().catch(() => {});
    throw err;
  }
  if (t.size < size) {
    await t.close().catch(() => {});
    throw new BlockError(
      'ERANGE',
      `target is smaller than the source (${t.size} < ${size} bytes); -n writes into an existing image, which must be at least as large`,
      { location: name },
    );
  }
  return t;
}

/**
 * Opens (or creates) the named targets at once, in order. One target: its error is
 * thrown. Several: one that fails is an UnopenedTarget carrying its error, which
 * convert({ targets }) reports as failed; only when all fail is the first error thrown.
 */
export async function openTargets(
  reg: DriverRegistry,
  names: readonly string[],
  o: OpenTargetsOptions,
): Promise<BlockBackend[]> {
  const dropped = new Set(o.resume?.failedTargets?.map((f) => f.index) ?? []);
  const settled = await Promise.allSettled(
    names.map((n, i) =>
      dropped.has(i)
        ? Promise.reject(new BlockError('EIO', 'left out: it failed in the interrupted run', { location: n }))
        : openOne(reg, n, o),
    ),
  );
  const first = settled.find((s): s is PromiseRejectedResult => s.status === 'rejected');
  if (first && (names.length === 1 || settled.every((s) => s.status === 'rejected'))) {
    await Promise.all(settled.map((s) => (s.status === 'fulfilled' ? s.value.close().catch(() => {}) : undefined)));
    throw first.reason;
  }
  return settled.map((s, i) =>
    s.status === 'fulfilled'
      ? s.value
      : new UnopenedTarget(names[i]!, toBlockError(s.reason, { op: 'open', location: names[i] })),
  );
}
