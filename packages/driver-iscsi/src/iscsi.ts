/**
 * The "iscsi" protocol: an existing LUN of an iSCSI target, reached with libiscsi from
 * user space (no kernel initiator), one session per opened image with many SCSI tasks
 * in flight.
 *
 * URLs are qemu's and libiscsi's: iscsi://[user[%password]@]host[:port]/target-iqn/lun.
 * CHAP credentials, so that no password needs to sit on a command line:
 *   LIBISCSI_CHAP_USERNAME / LIBISCSI_CHAP_PASSWORD   (libiscsi's and qemu's names)
 *   BLOCKCONV_ISCSI_PASSWORD_FILE=<file>              (first line = password)
 *   driver options (-o / -l): user=, password-file=, password-env= (the name of an
 *   environment variable holding it: how a fleet job names a worker's secret)
 * A user in the URL wins over the options, which win over the environment. The password
 * never appears in `location`, messages or errors (core's redactLocation; a password
 * from the environment or a file is registered with the redactor too). libiscsi's own
 * URL options (?header_digest=, target_user=, target_password= for mutual CHAP) are
 * not taken: this driver refuses query strings, but declares target_password secret,
 * since the refusal quotes the URL.
 * Driver options: timeout=<seconds> without any byte moving on the session while tasks
 * (or the login) wait, after which they fail (default 30; 0 = none).
 *
 * What the LUN tells and the driver does with it (after QEMU's block/iscsi.c):
 * - READ CAPACITY(16): size and block size (512 or 4096 bytes = requestAlignment);
 *   LBPME (thin) and LBPRZ (unmapped blocks read zeroes).
 * - Block Limits VPD (0xB0): max and optimal transfer, max WRITE SAME and UNMAP lengths;
 *   fallbacks when the page or a field is absent (0).
 * - Logical Block Provisioning VPD (0xB2): UNMAP and WRITE SAME with UNMAP supported.
 * - writeZeroes = WRITE SAME(16) of a zero block, with the UNMAP bit when the LUN is thin,
 *   reads unmapped blocks as zeroes and the caller allows it; discard = UNMAP; block
 *   status = GET LBA STATUS (thin LUNs only); flush = SYNCHRONIZE CACHE(16).
 * - zeroInitialized only when GET LBA STATUS says, at open, that the whole LUN is
 *   deallocated and LBPRZ holds: a LUN is never created, so old data may be there.
 * - No create: convert to a LUN with -n.
 */
import * as fs from 'node:fs';
import { isIP } from 'node:net';
import { lookup } from 'node:dns/promises';
import {
  BLOCK_API_VERSION,
  BlockError,
  REDACTED,
  redactLocation,
  registerSecret,
  settleAll,
  timeoutOption,
  type BlockBackend,
  type BlockLimits,
  type Extent,
  type OpenOptions,
  type ProtocolDriver,
  type WriteFlags,
  type WriteZeroesFlags,
} from '@blockconv/core';
import { IscsiSession, type Capacity, type LbaStatus } from '@blockconv/libiscsi';

const MiB = 1024 * 1024;
/** Transfer limit when the Block Limits page gives none; bounds per-task memory. */
const DEFAULT_MAX_TRANSFER = 4 * MiB;
const MAX_TRANSFER_CAP = 16 * MiB;
const DEFAULT_OPTIMAL_TRANSFER = 1 * MiB;
/** One WRITE SAME / UNMAP covers at most this much (the core splits larger requests). */
const MAX_ZEROES_CAP = 256 * MiB;
const DEFAULT_TIMEOUT_S = 30;
/**
 * Descriptors asked per GET LBA STATUS (the most the binding allows: 1 MiB of answer).
 * One request then answers the block status queries of tens of thousands of extents
 * from the cache below. QEMU asks for one descriptor a time, and tgtd walks the rest
 * of the LUN's file (SEEK_DATA/SEEK_HOLE) for every request, whatever is asked: on a
 * fragmented LUN, few large requests are worth a lot (one walk of a 6,813-extent LUN
 * costs tgtd ~40 ms).
 */
const LBA_STATUS_DESCRIPTORS = 65535;
const DEFAULT_PORT = 3260;

export interface IscsiUrl {
  readonly host: string;
  readonly port: number;
  readonly target: string;
  readonly lun: number;
  readonly user?: string;
  readonly password?: string;
  /** The URL without the password, for messages. */
  readonly display: string;
}

function invalid(message: string, location: string): BlockError {
  return new BlockError('EINVAL', message, { op: 'open', location });
}

/** Parses iscsi://[user[%password]@]host[:port]/target-iqn/lun. */
export function parseIscsiUrl(url: string): IscsiUrl {
  const shown = redactLocation(url);
  const m = /^iscsi:\/\/(?:([^@/]*)@)?(\[[^\]]*\]|[^/:@]*)(?::([^/]*))?\/([^/]*)\/([^/?#]*)$/i.exec(url);
  if (!m) throw invalid('invalid iSCSI URL: expected iscsi://[user[%password]@]host[:port]/target-iqn/lun', shown);
  const [, userinfo, hostPart, portText, target, lunText] = m as unknown as [
    string,
    string | undefined,
    string,
    string | undefined,
    string,
    string,
  ];
  const host = hostPart.startsWith('[') ? hostPart.slice(1, -1) : hostPart;
  if (!host) throw invalid('invalid iSCSI URL: no host', shown);
  let port = DEFAULT_PORT;
  if (portText !== undefined) {
    if (!/^\d+$/.test(portText) || Number(portText) < 1 || Number(portText) > 65535)
      throw invalid(`invalid iSCSI URL: bad port "${portText}"`, shown);
    port = Number(portText);
  }
  if (!target) throw invalid('invalid iSCSI URL: no target IQN', shown);
  if (!/^\d+$/.test(lunText) || Number(lunText) > 16383)
    throw invalid(`invalid iSCSI URL: bad LUN "${lunText}" (a number 0..16383)`, shown);
  let user: string | undefined;
  let password: string | undefined;
  if (userinfo !== undefined) {
    const pct = userinfo.indexOf('%');
    user = pct < 0 ? userinfo : userinfo.slice(0, pct);
    password = pct < 0 ? undefined : userinfo.slice(pct + 1);
    if (!user) throw invalid('invalid iSCSI URL: empty CHAP user', shown);
  }
  return { host, port, target, lun: Number(lunText), user, password, display: shown };
}

interface Credentials {
  user?: string;
  password?: string;
}

function readPasswordFile(file: string, location: string): string {
  try {
    return fs.readFileSync(file, 'utf8').split(/\r?\n/)[0]!;
  } catch (err) {
    throw new BlockError(
      'EACCES',
      `cannot read the CHAP password file ${file}: ${(err as NodeJS.ErrnoException).code ?? 'error'}`,
      { op: 'open', location },
    );
  }
}

/** CHAP credentials from the URL, else the driver options, else the environment. */
function credentials(u: IscsiUrl, options: Readonly<Record<string, string>> | undefined): Credentials {
  const env = process.env;
  const user = u.user ?? options?.user ?? env.LIBISCSI_CHAP_USERNAME ?? env.BLOCKCONV_ISCSI_USER;
  if (!user) return {};
  let password = u.password;
  if (password === undefined && options?.['password-file'])
    password = readPasswordFile(options['password-file'], u.display);
  const envName = options?.['password-env'];
  if (password === undefined && envName) {
    password = env[envName];
    if (password === undefined)
      throw new BlockError('EACCES', `CHAP password: the environment variable ${envName} (password-env) is not set`, {
        op: 'open',
        location: u.display,
        field: 'password-env',
      });
  }
  if (password === undefined && env.LIBISCSI_CHAP_PASSWORD !== undefined) password = env.LIBISCSI_CHAP_PASSWORD;
  if (password === undefined && env.BLOCKCONV_ISCSI_PASSWORD_FILE)
    password = readPasswordFile(env.BLOCKCONV_ISCSI_PASSWORD_FILE, u.display);
  if (password === undefined) {
    throw new BlockError(
      'EACCES',
      `CHAP user "${user}" given but no password: set LIBISCSI_CHAP_PASSWORD or BLOCKCONV_ISCSI_PASSWORD_FILE`,
      { op: 'open', location: u.display },
    );
  }
  registerSecret(password);
  return { user, password };
}

/** Codes of the binding kept as they are; others become EIO (message kept). */
const CODES = new Set([
  'ENOENT',
  'EACCES',
  'EROFS',
  'ENOSPC',
  'ETIMEDOUT',
  'ECONNREFUSED',
  'ECONNRESET',
  'ENOTFOUND',
  'EINVAL',
  'ECANCELED',
  'ERANGE',
  'ENOTSUP',
  'EBADF',
]);

interface Where {
  op: string;
  location: string;
  offset?: number;
  length?: number;
}

function iscsiError(err: unknown, where: Where, password?: string): BlockError {
  if (err instanceof BlockError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const raw = typeof e?.code === 'string' ? e.code : 'EIO';
  let text = typeof e?.message === 'string' ? e.message.replace(/\s+/g, ' ').trim() : String(err);
  // Also when too short for the redactor to look for in free text.
  if (password) text = text.split(password).join(REDACTED);
  return new BlockError(CODES.has(raw) ? raw : 'EIO', text, { ...where, cause: err });
}

interface Probe {
  cap: Capacity;
  limits: BlockLimits;
  thin: boolean;
  lbprz: boolean;
  unmapSupported: boolean;
  writeSameUnmap: boolean;
  maxUnmapBytes: number;
  allZero: boolean;
  vendor: string;
  product: string;
}

/** What the LUN says about itself: capacity, limits, provisioning. */
async function probe(s: IscsiSession, readOnly: boolean): Promise<Probe> {
  const cap = await s.readCapacity16();
  const bs = cap.blockSize;
  if (!(bs >= 512 && (bs & (bs - 1)) === 0))
    throw Object.assign(new Error(`unsupported block size ${bs}`), { code: 'ENOTSUP' });
  const inq = await s.inquiry();
  const pages = await s.supportedVpdPages().catch(() => [] as number[]);
  const bl = pages.includes(0xb0) ? await s.blockLimits().catch(() => null) : null;
  const lbp = cap.lbpme && pages.includes(0xb2) ? await s.provisioning().catch(() => null) : null;
  const blocksToBytes = (n: number | undefined, fallback: number, cap: number): number =>
    n && n > 0 ? Math.max(bs, Math.min(n * bs, cap)) : fallback;
  const maxTransfer =
    Math.floor(blocksToBytes(bl?.maxTransferBlocks, DEFAULT_MAX_TRANSFER, MAX_TRANSFER_CAP) / bs) * bs;
  const optimal = Math.min(
    maxTransfer,
    blocksToBytes(bl?.optimalTransferBlocks, DEFAULT_OPTIMAL_TRANSFER, MAX_TRANSFER_CAP),
  );
  const maxWriteSame = blocksToBytes(bl?.maxWriteSameBlocks, MAX_ZEROES_CAP, MAX_ZEROES_CAP);
  const maxUnmapBytes = blocksToBytes(bl?.maxUnmapBlocks, MAX_ZEROES_CAP, MAX_ZEROES_CAP);
  const thin = cap.lbpme;
  const lbprz = thin && (cap.lbprz || lbp?.lbprz === true);
  const size = (cap.lastLba + 1) * bs;
  // The LUN reads as zeroes now only if all of it is deallocated (and that reads zeroes).
  // Only targets care; tgtd walks the whole LUN to answer, so sources skip the question.
  let allZero = false;
  if (thin && lbprz && !readOnly) {
    const st = await s.getLbaStatus(0).catch(() => []);
    const first = st[0];
    allZero = first !== undefined && first.lba === 0 && first.provisioning !== 0 && first.blocks * bs >= size;
  }
  return {
    cap,
    limits: {
      requestAlignment: bs,
      maxTransfer,
      optimalTransfer: Math.max(bs, Math.floor(optimal / bs) * bs),
      maxWriteZeroes: Math.floor(maxWriteSame / bs) * bs,
      minMemAlignment: 1,
    },
    thin,
    lbprz,
    unmapSupported: thin && (lbp ? lbp.lbpu : true),
    writeSameUnmap: thin && lbprz && (lbp ? lbp.lbpws : true),
    maxUnmapBytes: Math.floor(maxUnmapBytes / bs) * bs,
    allZero,
    vendor: inq.vendor.trim(),
    product: inq.product.trim(),
  };
}

export class IscsiBackend implements BlockBackend {
  readonly driverName = 'iscsi';
  readonly location: string;
  readonly size: number;
  readonly readOnly: boolean;
  readonly limits: BlockLimits;
  readonly canZero = true;
  readonly canDiscard: boolean;
  readonly zeroInitialized: boolean;
  readonly canCompress = false;
  readonly canBlockStatus: boolean;
  readonly canReadHolesCheaply = false;
  readonly canWriteOutOfOrder = true;

  readonly #s: IscsiSession;
  readonly #p: Probe;
  readonly #bs: number;
  readonly #unsafe: boolean;
  /** The last GET LBA STATUS answer, valid until this backend changes the LUN. */
  #status?: LbaStatus[];
  #generation = 0;
  #lbaStatusRequests = 0;
  #writeSameWorks = true;
  #lbaStatusWorks = true;
  #closed = false;
  #zeroBuf?: Uint8Array;

  constructor(s: IscsiSession, p: Probe, o: { location: string; readOnly: boolean; unsafe: boolean }) {
    this.#s = s;
    this.#p = p;
    this.#bs = p.cap.blockSize;
    this.location = o.location;
    this.readOnly = o.readOnly;
    this.#unsafe = o.unsafe;
    this.size = (p.cap.lastLba + 1) * this.#bs;
    this.limits = p.limits;
    this.canDiscard = p.unmapSupported;
    this.canBlockStatus = p.thin;
    this.zeroInitialized = p.allZero;
  }

  /** Tasks in flight on the session and GET LBA STATUS requests sent, for tests and diagnostics. */
  get stats(): { outstanding: number; peakOutstanding: number; lbaStatusRequests: number } {
    return {
      outstanding: this.#s.outstanding,
      peakOutstanding: this.#s.peakOutstanding,
      lbaStatusRequests: this.#lbaStatusRequests,
    };
  }

  async read(offset: number, length: number, into?: Uint8Array): Promise<Uint8Array> {
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    if (length === 0) return out;
    try {
      await this.#s.read16(offset / this.#bs, length / this.#bs, this.#bs, out);
    } catch (err) {
      throw iscsiError(err, this.#where('read', offset, length));
    }
    return out;
  }

  async write(offset: number, data: Uint8Array, flags?: WriteFlags): Promise<void> {
    this.#changed();
    try {
      await this.#s.write16(offset / this.#bs, this.#bs, data, flags?.fua === true);
    } catch (err) {
      throw iscsiError(err, this.#where('write', offset, data.length));
    } finally {
      this.#changed();
    }
  }

  async writeZeroes(offset: number, length: number, flags?: WriteZeroesFlags): Promise<void> {
    this.#changed();
    const bs = this.#bs;
    const unmap = flags?.mayUnmap === true && this.#p.writeSameUnmap;
    try {
      if (this.#writeSameWorks) {
        try {
          // One WRITE SAME: the core's gate splits at maxWriteZeroes.
          await this.#s.writeSame16(offset / bs, length / bs, bs, unmap);
          return;
        } catch (err) {
          // A target without WRITE SAME: write zero buffers from now on (as nbdkit does).
          if ((err as { code?: string }).code !== 'ENOTSUP') throw err;
          this.#writeSameWorks = false;
        }
      }
      const zeroes = (this.#zeroBuf ??= new Uint8Array(Math.min(this.limits.maxTransfer, 1 * MiB)));
      const parts: Promise<void>[] = [];
      for (let done = 0; done < length; done += zeroes.length) {
        const n = Math.min(zeroes.length, length - done);
        parts.push(this.#s.write16((offset + done) / bs, bs, zeroes.subarray(0, n)));
      }
      await settleAll(parts);
    } catch (err) {
      throw iscsiError(err, this.#where('writeZeroes', offset, length));
    } finally {
      this.#changed();
    }
  }

  /** UNMAP on thin LUNs; advisory, so a no-op elsewhere. */
  async discard(offset: number, length: number): Promise<void> {
    this.#changed();
    if (!this.canDiscard) return;
    const bs = this.#bs;
    try {
      const parts: Promise<void>[] = [];
      for (let done = 0; done < length; done += this.#p.maxUnmapBytes) {
        parts.push(this.#s.unmap((offset + done) / bs, Math.min(this.#p.maxUnmapBytes, length - done) / bs));
      }
      await settleAll(parts);
    } catch (err) {
      throw iscsiError(err, this.#where('discard', offset, length));
    } finally {
      this.#changed();
    }
  }

  async blockStatus(offset: number, length: number): Promise<Extent> {
    const bs = this.#bs;
    const lba = Math.floor(offset / bs);
    const rest = this.size - offset;
    if (!this.canBlockStatus || !this.#lbaStatusWorks) return { kind: 'data', length: rest };
    let d = covering(this.#status, lba);
    if (!d) {
      const generation = this.#generation;
      this.#lbaStatusRequests++;
      let descriptors: LbaStatus[];
      try {
        descriptors = await this.#s.getLbaStatus(lba, LBA_STATUS_DESCRIPTORS);
      } catch (err) {
        if ((err as { code?: string }).code === 'ENOTSUP') {
          this.#lbaStatusWorks = false;
          return { kind: 'data', length: rest };
        }
        throw iscsiError(err, this.#where('blockStatus', offset, length));
      }
      // Not cached when a write started meanwhile: the answer may predate it.
      if (generation === this.#generation) this.#status = descriptors;
      d = covering(descriptors, lba);
    }
    if (!d) return { kind: 'data', length: Math.min(rest, Math.max(length, bs)) };
    const end = Math.min(this.size, (d.lba + d.blocks) * bs);
    // Deallocated or anchored blocks read as zeroes only when the LUN says LBPRZ.
    const kind = d.provisioning !== 0 && this.#p.lbprz ? 'zero' : 'data';
    return { kind, length: end - offset };
  }

  async flush(): Promise<void> {
    if (this.readOnly || this.#unsafe) return;
    try {
      await this.#s.synchronizeCache16();
    } catch (err) {
      throw iscsiError(err, { op: 'flush', location: this.location });
    }
  }

  /** Logs out (bounded) and frees the session; tasks still in flight reject. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#s.close(2000);
  }

  async info(): Promise<Record<string, unknown>> {
    const p = this.#p;
    return {
      vendor: p.vendor,
      product: p.product,
      blockSize: this.#bs,
      thinProvisioned: p.thin,
      unmappedReadsZero: p.lbprz,
      maxTransfer: this.limits.maxTransfer,
      optimalTransfer: this.limits.optimalTransfer,
    };
  }

  /**
   * What this backend changes its cached block status no longer tells. Called when a
   * change starts and when it ends, so that no GET LBA STATUS answer overlapping a
   * change in flight is cached.
   */
  #changed(): void {
    this.#status = undefined;
    this.#generation++;
  }

  #where(op: string, offset: number, length: number): Where {
    return { op, location: this.location, offset, length };
  }
}

/** The descriptor covering `lba` (descriptors ascend and are contiguous). */
function covering(list: readonly LbaStatus[] | undefined, lba: number): LbaStatus | undefined {
  if (!list || list.length === 0 || lba < list[0]!.lba) return undefined;
  let lo = 0;
  let hi = list.length - 1;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (list[mid]!.lba <= lba) lo = mid;
    else hi = mid - 1;
  }
  const d = list[lo]!;
  return lba < d.lba + d.blocks ? d : undefined;
}

async function resolveHost(host: string, location: string): Promise<string> {
  if (isIP(host)) return host;
  try {
    return (await lookup(host)).address;
  } catch (err) {
    throw new BlockError('ENOTFOUND', `unknown iSCSI portal host "${host}"`, { op: 'open', location, cause: err });
  }
}

/** Opens the LUN an iscsi:// URL names. */
export async function openIscsi(location: string, options: OpenOptions = {}): Promise<IscsiBackend> {
  options.signal?.throwIfAborted();
  const u = parseIscsiUrl(location);
  const creds = credentials(u, options.options);
  const timeoutSec = timeoutOption(u.display, options.options, DEFAULT_TIMEOUT_S);
  const address = await resolveHost(u.host, u.display);
  const portal = isIP(address) === 6 ? `[${address}]:${u.port}` : `${address}:${u.port}`;
  // A stall timeout, not libiscsi's per-task one: that counts from when a task is queued,
  // and a slow link with many tasks queued trips it while data still flows.
  const s = new IscsiSession({ stallMs: timeoutSec ? timeoutSec * 1000 : undefined });
  try {
    await s.login({ portal, target: u.target, lun: u.lun, user: creds.user, password: creds.password });
    const p = await probe(s, options.readOnly === true);
    return new IscsiBackend(s, p, {
      location: u.display,
      readOnly: options.readOnly === true,
      unsafe: options.cache === 'unsafe',
    });
  } catch (err) {
    s.destroy();
    throw iscsiError(err, { op: 'open', location: u.display }, creds.password);
  }
}

export const iscsiDriver: ProtocolDriver = {
  apiVersion: BLOCK_API_VERSION,
  kind: 'protocol',
  name: 'iscsi',
  description: 'existing iSCSI LUNs through libiscsi (no kernel initiator); convert to a LUN with -n',
  schemes: ['iscsi'],
  openOptions: [
    {
      name: 'timeout',
      description: 'seconds the target may send and take nothing while tasks wait, before they fail (0: wait forever)',
      default: String(DEFAULT_TIMEOUT_S),
    },
    { name: 'user', description: "CHAP user name (else the URL's, LIBISCSI_CHAP_USERNAME or BLOCKCONV_ISCSI_USER)" },
    {
      name: 'password-file',
      description: 'file holding the CHAP password (else LIBISCSI_CHAP_PASSWORD or BLOCKCONV_ISCSI_PASSWORD_FILE)',
    },
    { name: 'password-env', description: 'name of an environment variable holding the CHAP password' },
  ],
  secretParameters: ['target_password'],
  open: openIscsi,
};
