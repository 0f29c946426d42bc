/**
 * Caps per storage server, across every worker: at most K jobs at once that read from or
 * write to one server (an NFS server, an iSCSI portal). BullMQ's own concurrency is per
 * worker or per queue; per-group limits are not in its open-source edition, so this is
 * a small counting semaphore in Redis:
 * - the caps are a hash (server -> K; "*" for any server not named), set with the jobs;
 * - each server has a sorted set of the jobs holding a slot, scored by when the slot
 *   lapses: a worker renews its jobs' slots while they run, and a dead worker's slots
 *   lapse by themselves (as its jobs' locks do);
 * - one Lua script takes the slots of every server a job touches, all or none, so two
 *   jobs can never each hold half of what the other needs.
 * A job that cannot have its slots is put back as delayed (the worker is free at once
 * for jobs to other servers) and tried again shortly.
 */
import type { Redis } from 'ioredis';

export const CAPS_KEY = 'blockconv:caps';
const SLOTS_PREFIX = 'blockconv:cap-slots:';

/** Takes the slots of every server in ARGV[4..] for member ARGV[1], all or none (1 or 0). */
const ACQUIRE = `
local now = tonumber(ARGV[2])
for i = 2, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local limit = redis.call('HGET', KEYS[1], ARGV[i + 2])
  if not limit then limit = redis.call('HGET', KEYS[1], '*') end
  if limit and not redis.call('ZSCORE', KEYS[i], ARGV[1]) and redis.call('ZCARD', KEYS[i]) >= tonumber(limit) then
    return 0
  end
end
for i = 2, #KEYS do redis.call('ZADD', KEYS[i], ARGV[3], ARGV[1]) end
return 1
`;

/**
 * The storage servers a location touches, as caps name them: `nfs://HOST`,
 * `iscsi://HOST:PORT` (3260 when not given), `SCHEME://HOST[:PORT]` for other URLs;
 * nothing for local paths.
 */
export function serverOf(location: string): string | undefined {
  const m = /^([a-z][a-z0-9+.-]*):\/\/(?:[^@/]*@)?(\[[^\]]+\]|[^/:?#]*)(?::(\d+))?/i.exec(location);
  if (!m?.[2]) return undefined;
  const scheme = m[1]!.toLowerCase();
  const host = m[2].toLowerCase();
  if (scheme === 'iscsi') return `iscsi://${host}:${m[3] ?? '3260'}`;
  if (scheme === 'nfs') return `nfs://${host}`;
  return `${scheme}://${host}${m[3] ? `:${m[3]}` : ''}`;
}

/** Checks a cap's name and value; throws a one-line message naming it. */
export function checkCap(server: string, k: unknown): number {
  if (server !== '*' && serverOf(server) !== server)
    throw new Error(`cap for "${server}": name a server as nfs://HOST or iscsi://HOST:PORT (or "*" for every server)`);
  if (!Number.isSafeInteger(k) || (k as number) < 1)
    throw new Error(`cap for ${server}: must be a whole number of at least 1, got ${JSON.stringify(k)}`);
  return k as number;
}

/** Sets caps (server -> most jobs at once) for every worker. */
export async function setServerCaps(redis: Redis, caps: Readonly<Record<string, number>>): Promise<void> {
  const entries = Object.entries(caps).map(([s, k]) => [s, String(checkCap(s, k))] as const);
  if (entries.length) await redis.hset(CAPS_KEY, Object.fromEntries(entries));
}

export async function getServerCaps(redis: Redis): Promise<Record<string, number>> {
  const h = await redis.hgetall(CAPS_KEY);
  return Object.fromEntries(Object.entries(h).map(([k, v]) => [k, Number(v)]));
}

/** Slots held by one job; renewed until released. */
export class CapLease {
  readonly #timer?: NodeJS.Timeout;
  #released = false;

  constructor(
    private readonly redis: Redis,
    readonly servers: readonly string[],
    private readonly member: string,
    private readonly leaseMs: number,
  ) {
    if (servers.length === 0) return;
    this.#timer = setInterval(
      () => {
        void this.#renew();
      },
      Math.max(100, Math.floor(leaseMs / 3)),
    );
    this.#timer.unref();
  }

  async #renew(): Promise<void> {
    if (this.#released) return;
    const until = Date.now() + this.leaseMs;
    await Promise.all(this.servers.map((s) => this.redis.zadd(SLOTS_PREFIX + s, 'XX', until, this.member))).catch(
      () => {},
    );
  }

  async release(): Promise<void> {
    if (this.#released) return;
    this.#released = true;
    if (!this.#timer) return;
    clearInterval(this.#timer);
    await Promise.all(this.servers.map((s) => this.redis.zrem(SLOTS_PREFIX + s, this.member))).catch(() => {});
  }
}

/** Takes a slot on every server for `member` (a job id); null if any server is at its cap. */
export async function acquireCaps(
  redis: Redis,
  servers: readonly string[],
  member: string,
  leaseMs: number,
): Promise<CapLease | null> {
  const unique = [...new Set(servers)].sort();
  if (unique.length === 0) return new CapLease(redis, [], member, leaseMs);
  const now = Date.now();
  const ok = await redis.eval(
    ACQUIRE,
    1 + unique.length,
    CAPS_KEY,
    ...unique.map((s) => SLOTS_PREFIX + s),
    member,
    now,
    now + leaseMs,
    ...unique,
  );
  return ok === 1 ? new CapLease(redis, unique, member, leaseMs) : null;
}

/** Jobs holding a slot on a server now (for tests and `jobs`). */
export async function capHolders(redis: Redis, server: string): Promise<string[]> {
  return redis.zrangebyscore(SLOTS_PREFIX + server, Date.now(), '+inf');
}
