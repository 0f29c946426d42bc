/**
 * Promise-based binding over libiscsi's asynchronous API (Debian's libiscsi 1.19).
 *
 * One IscsiSession is one iSCSI session (one TCP connection) to one LUN. Its socket is
 * driven from Node's event loop (uv_poll on libiscsi's fd, re-armed from
 * iscsi_which_events after every submit and service call, plus a 100 ms timer for
 * libiscsi's task timeouts), so any number of SCSI tasks can be in flight on it
 * without threads. Buffers passed to read16/write16 must stay untouched until the
 * promise settles (the binding keeps them referenced until then); reads land in them
 * directly.
 *
 * Failures reject with an IscsiError: a one-line message naming the SCSI command and
 * the cause (sense key and ASC/ASCQ spelt out for CHECK CONDITION), `code` ('EIO',
 * 'ERANGE', 'EROFS', 'ENOSPC', 'ENOTSUP', 'EACCES' for a refused login, 'ENOENT' for
 * no such target or LUN, 'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'ECANCELED' for
 * tasks in flight when the session was closed, 'EBADF' after it), and the raw
 * `status` and `sense` fields. No password ever appears in a message.
 */
import { createRequire } from 'node:module';

export interface SenseData {
  readonly key: number;
  readonly asc: number;
  readonly ascq: number;
  /** libiscsi's names, e.g. "ILLEGAL_REQUEST", "LBA_OUT_OF_RANGE". */
  readonly keyName: string;
  readonly ascqName: string;
}

export interface IscsiError extends Error {
  readonly code: string;
  /** The SCSI command or session step, e.g. "READ(16)", "login". */
  readonly op: string;
  /** SCSI status (2 = CHECK CONDITION) or libiscsi's transport status. */
  readonly status?: number;
  readonly sense?: SenseData;
}

export interface Capacity {
  /** Number of blocks minus one (READ CAPACITY(16)'s RETURNED LOGICAL BLOCK ADDRESS). */
  readonly lastLba: number;
  readonly blockSize: number;
  /** Logical block provisioning management enabled: the LUN is thin. */
  readonly lbpme: boolean;
  /** Unmapped blocks read as zeroes. */
  readonly lbprz: boolean;
  readonly lbppbe: number;
}

/** Block Limits VPD page (0xB0); counts are in blocks, 0 = no limit reported. */
export interface BlockLimitsPage {
  readonly maxTransferBlocks: number;
  readonly optimalTransferBlocks: number;
  readonly optimalGranularityBlocks: number;
  readonly maxUnmapBlocks: number;
  readonly maxUnmapDescriptors: number;
  readonly optimalUnmapGranularity: number;
  readonly maxWriteSameBlocks: number;
}

/** Logical Block Provisioning VPD page (0xB2). */
export interface ProvisioningPage {
  /** UNMAP supported. */
  readonly lbpu: boolean;
  /** WRITE SAME(16) with UNMAP supported. */
  readonly lbpws: boolean;
  readonly lbpws10: boolean;
  readonly lbprz: boolean;
  readonly anc: boolean;
  /** 0 none, 1 resource, 2 thin. */
  readonly provisioningType: number;
}

export interface StandardInquiry {
  readonly deviceType: number;
  readonly vendor: string;
  readonly product: string;
  readonly revision: string;
}

/** One GET LBA STATUS descriptor. provisioning: 0 mapped, 1 deallocated, 2 anchored. */
export interface LbaStatus {
  readonly lba: number;
  readonly blocks: number;
  readonly provisioning: number;
}

export interface IscsiSessionOptions {
  /** Our initiator IQN; default a unique one per session (no two sessions clash). */
  readonly initiatorName?: string;
  /** Seconds after which a task or login fails with ETIMEDOUT, counted from when it is queued; 0 = never (libiscsi's default). */
  readonly timeoutSec?: number;
  /**
   * Stall timeout in milliseconds: tasks in flight fail (ETIMEDOUT) when the session's
   * socket has moved no byte either way for this long. Unlike timeoutSec, a slow link
   * with many tasks queued never trips it.
   */
  readonly stallMs?: number;
}

export interface LoginParams {
  /** host:port, e.g. "127.0.0.1:3260" ("[::1]:3260" for IPv6). */
  readonly portal: string;
  readonly target: string;
  readonly lun: number;
  /** CHAP user; the password is used for the login only and never echoed. */
  readonly user?: string;
  readonly password?: string;
}

interface NativeContext {
  connect(portal: string, target: string, lun: number, user?: string, password?: string): Promise<void>;
  logout(): Promise<void>;
  read16(lba: number, blocks: number, blockSize: number, buffer: Uint8Array): Promise<void>;
  write16(lba: number, blockSize: number, buffer: Uint8Array, fua: boolean): Promise<void>;
  writeSame16(lba: number, blocks: number, blockSize: number, unmap: boolean): Promise<void>;
  unmap(lba: number, blocks: number): Promise<void>;
  getLbaStatus(lba: number, maxDescriptors: number): Promise<LbaStatus[]>;
  synchronizeCache16(): Promise<void>;
  readCapacity16(): Promise<Capacity>;
  inquiry(page: number): Promise<unknown>;
  destroy(): void;
  readonly outstanding: number;
  readonly peakOutstanding: number;
  readonly fd: number;
  readonly destroyed: boolean;
}

interface Native {
  IscsiContext: new (options: { initiatorName: string; timeoutSec?: number; stallMs?: number }) => NativeContext;
}

// An ESM module cannot import a .node file; createRequire can. src/ (tsx) and dist/
// (built) both sit beside build/. A missing addon (no libiscsi at install time) does not
// fail the import: `available` says so, and using the binding throws loadError's text.
let native: Native | undefined;
/** Why the addon could not be loaded, when it could not. */
export let loadError: Error | undefined;
try {
  native = createRequire(import.meta.url)('../build/Release/iscsi_binding.node') as Native;
} catch (err) {
  loadError = new Error(
    `the @blockconv/libiscsi addon is not built (it needs libiscsi, Debian: libiscsi-dev; then \`npm rebuild @blockconv/libiscsi\`): ${(err as Error).message}`,
    { cause: err },
  );
}
/** Whether the native addon loaded. */
export const available: boolean = native !== undefined;

function addon(): Native {
  if (!native) throw loadError!;
  return native;
}

const UNIT_ATTENTION = 0x6;
/** Unit attentions in a row before a command fails (one per condition the target reports). */
const UNIT_ATTENTION_RETRIES = 5;

/** SCSI sense keys (SPC-4), as words. */
const SENSE_KEYS: Readonly<Record<number, string>> = {
  0x0: 'no sense',
  0x1: 'recovered error',
  0x2: 'not ready',
  0x3: 'medium error',
  0x4: 'hardware error',
  0x5: 'illegal request',
  0x6: 'unit attention',
  0x7: 'data protect',
  0x8: 'blank check',
  0x9: 'vendor specific',
  0xa: 'copy aborted',
  0xb: 'aborted command',
  0xd: 'volume overflow',
  0xe: 'miscompare',
};

/** The ASC/ASCQ pairs a block target commonly returns, as words (SPC-4 annex). */
const ASC_ASCQ: Readonly<Record<number, string>> = {
  0x0400: 'logical unit not ready',
  0x0401: 'logical unit becoming ready',
  0x0402: 'logical unit not ready, initializing command required',
  0x0403: 'logical unit not ready, manual intervention required',
  0x0c00: 'write error',
  0x1100: 'unrecovered read error',
  0x1a00: 'parameter list length error',
  0x2000: 'invalid command operation code',
  0x2100: 'logical block address out of range',
  0x2400: 'invalid field in CDB',
  0x2500: 'logical unit not supported',
  0x2600: 'invalid field in parameter list',
  0x2700: 'write protected',
  0x2707: 'space allocation failed (thin pool full)',
  0x2800: 'medium may have changed',
  0x2900: 'power on, reset or bus device reset occurred',
  0x2a01: 'mode parameters changed',
  0x2a09: 'capacity data has changed',
  0x3a00: 'medium not present',
  0x3e03: 'logical unit failed self-test',
  0x4400: 'internal target failure',
  0x4700: 'SCSI parity error',
};

const STATUS_NAMES: Readonly<Record<number, string>> = {
  0x02: 'CHECK CONDITION',
  0x04: 'CONDITION MET',
  0x08: 'BUSY',
  0x18: 'RESERVATION CONFLICT',
  0x28: 'TASK SET FULL',
  0x30: 'ACA ACTIVE',
  0x40: 'TASK ABORTED',
};

const hex = (n: number): string => `0x${n.toString(16).padStart(2, '0')}`;

/** One line describing a SCSI status and its sense data. */
export function describeScsiError(
  status: number | undefined,
  sense: SenseData | undefined,
): { code: string; text: string } {
  if (sense) {
    const pair = (sense.asc << 8) | sense.ascq;
    const key = SENSE_KEYS[sense.key] ?? `sense key ${hex(sense.key)}`;
    const what =
      ASC_ASCQ[pair] ?? (sense.ascqName ? sense.ascqName.toLowerCase().replace(/_/g, ' ') : 'unknown condition');
    let code = 'EIO';
    if (pair === 0x2100) code = 'ERANGE';
    else if (pair === 0x2000 || (sense.key === 0x5 && pair === 0x2400)) code = 'ENOTSUP';
    else if (pair === 0x2500) code = 'ENOENT';
    else if (pair === 0x2707) code = 'ENOSPC';
    else if (sense.key === 0x7) code = 'EROFS';
    else if (sense.key === 0x5) code = 'EINVAL';
    return {
      code,
      text: `${key}: ${what} (sense key ${hex(sense.key)}, ASC/ASCQ ${hex(sense.asc)}/${hex(sense.ascq)})`,
    };
  }
  const name = status === undefined ? 'unknown status' : (STATUS_NAMES[status] ?? `SCSI status ${hex(status)}`);
  const code = status === 0x08 || status === 0x28 ? 'EBUSY' : status === 0x18 ? 'EACCES' : 'EIO';
  return { code, text: `target answered ${name}` };
}

/** Login failures: libiscsi's text carries the iSCSI login status class and detail. */
function describeLoginError(message: string): { code: string; text: string } {
  if (/Authentication failure|Authorization failure/i.test(message)) {
    return { code: 'EACCES', text: 'login refused: CHAP authentication failed (wrong or missing user/password)' };
  }
  if (/Target not found|Target removed/i.test(message))
    return { code: 'ENOENT', text: 'login refused: no such target on this portal' };
  if (/Connection refused/i.test(message))
    return { code: 'ECONNREFUSED', text: 'connection refused (is an iSCSI target listening on this portal?)' };
  if (/TestUnitReady|LOGICAL_UNIT_NOT_SUPPORTED|lun/i.test(message) && /not supported|LOGICAL_UNIT/i.test(message)) {
    return { code: 'ENOENT', text: 'no such LUN on this target' };
  }
  if (/timed? ?out/i.test(message)) return { code: 'ETIMEDOUT', text: `login timed out (${message})` };
  return { code: 'EIO', text: `login failed: ${message}` };
}

function refine(err: unknown, password: string | undefined): unknown {
  const e = err as { code?: string; message?: string; op?: string; status?: number; sense?: SenseData } | null;
  if (!e || typeof e.message !== 'string') return err;
  let code = e.code ?? 'EIO';
  let text = e.message;
  if (e.op === 'login' && code !== 'ECANCELED') ({ code, text } = describeLoginError(text));
  else if (text === 'SCSI error') ({ code, text } = describeScsiError(e.status, e.sense));
  // libiscsi never puts the password in its text, but nothing from below gets out unchecked.
  if (password) text = text.split(password).join('***');
  e.message = `${e.op ? `${e.op}: ` : ''}${text.replace(/\s+/g, ' ').trim()}`;
  Object.defineProperty(e, 'code', { value: code, enumerable: true, writable: true });
  return e;
}

let sessions = 0;

/** One iSCSI session to one LUN. Call close() (logout) or destroy() when done. */
export class IscsiSession {
  readonly #n: NativeContext;
  #password: string | undefined;

  constructor(options: IscsiSessionOptions = {}) {
    const initiatorName = options.initiatorName ?? `iqn.2026-11.org.blockconv:initiator-${process.pid}-${++sessions}`;
    this.#n = new (addon().IscsiContext)({ initiatorName, timeoutSec: options.timeoutSec, stallMs: options.stallMs });
  }

  /** Connects to the portal, logs in to the target (CHAP when a user is given) and checks the LUN. */
  async login(p: LoginParams): Promise<void> {
    this.#password = p.password;
    try {
      await this.#wrap(this.#n.connect(p.portal, p.target, p.lun, p.user, p.password));
    } finally {
      this.#password = undefined;
    }
  }

  /** READ(16) of `blocks` blocks at `lba` into `buffer` (at least blocks*blockSize bytes). */
  read16(lba: number, blocks: number, blockSize: number, buffer: Uint8Array): Promise<void> {
    return this.#task(() => this.#n.read16(lba, blocks, blockSize, buffer));
  }

  /** WRITE(16) of all of `buffer` (whole blocks) at `lba`; FUA when asked. */
  write16(lba: number, blockSize: number, buffer: Uint8Array, fua = false): Promise<void> {
    return this.#task(() => this.#n.write16(lba, blockSize, buffer, fua));
  }

  /** WRITE SAME(16) of a zero block over `blocks` blocks; with `unmap` the target may deallocate them. */
  writeSame16(lba: number, blocks: number, blockSize: number, unmap = false): Promise<void> {
    return this.#task(() => this.#n.writeSame16(lba, blocks, blockSize, unmap));
  }

  /** UNMAP of one range. */
  unmap(lba: number, blocks: number): Promise<void> {
    return this.#task(() => this.#n.unmap(lba, blocks));
  }

  /**
   * GET LBA STATUS from `lba`: up to `maxDescriptors` descriptors (contiguous extents),
   * the first one covering `lba`. Asking for many saves round trips (and, with tgtd,
   * whose every GET LBA STATUS walks the rest of the LUN, a lot of target CPU).
   */
  getLbaStatus(lba: number, maxDescriptors = 1): Promise<LbaStatus[]> {
    return this.#task(() => this.#n.getLbaStatus(lba, maxDescriptors));
  }

  synchronizeCache16(): Promise<void> {
    return this.#task(() => this.#n.synchronizeCache16());
  }

  readCapacity16(): Promise<Capacity> {
    return this.#task(() => this.#n.readCapacity16());
  }

  inquiry(): Promise<StandardInquiry> {
    return this.#task(() => this.#n.inquiry(-1)) as Promise<StandardInquiry>;
  }

  /** VPD page numbers the LUN supports (page 0x00). */
  async supportedVpdPages(): Promise<number[]> {
    const r = (await this.#task(() => this.#n.inquiry(0x00))) as { pages: number[] } | null;
    return r?.pages ?? [];
  }

  blockLimits(): Promise<BlockLimitsPage | null> {
    return this.#task(() => this.#n.inquiry(0xb0)) as Promise<BlockLimitsPage | null>;
  }

  provisioning(): Promise<ProvisioningPage | null> {
    return this.#task(() => this.#n.inquiry(0xb2)) as Promise<ProvisioningPage | null>;
  }

  /**
   * Logs out (bounded by `timeoutMs`), then frees the session. Tasks still in flight
   * reject with ECANCELED. Never throws for a session that is already gone.
   */
  async close(timeoutMs = 5000): Promise<void> {
    if (this.#n.destroyed) return;
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        this.#n.logout().catch(() => {}),
        new Promise<void>((resolve) => {
          timer = setTimeout(resolve, timeoutMs);
        }),
      ]);
    } finally {
      clearTimeout(timer);
      this.#n.destroy();
    }
  }

  /** Drops the session at once (no logout). Tasks in flight reject with ECANCELED; idempotent. */
  destroy(): void {
    this.#n.destroy();
  }

  /**
   * A SCSI command, sent again when the target answers UNIT ATTENTION: the first command
   * after a target restart or reset gets one (SPC-4: the condition is reported once and
   * cleared), and a session that reconnected must not fail a copy for it.
   */
  #task<T>(send: () => Promise<T>, attempt = 1): Promise<T> {
    // No async frame on the hot path: the retry is only set up when a command fails.
    return send().catch((err: unknown) => {
      const sense = (err as { sense?: SenseData } | null)?.sense;
      if (sense?.key !== UNIT_ATTENTION || attempt >= UNIT_ATTENTION_RETRIES) throw refine(err, this.#password);
      return this.#task(send, attempt + 1);
    });
  }

  #wrap<T>(p: Promise<T>): Promise<T> {
    const password = this.#password;
    return p.catch((err: unknown) => {
      throw refine(err, password);
    });
  }

  /** Tasks submitted and not yet completed. */
  get outstanding(): number {
    return this.#n.outstanding;
  }
  /** Most tasks that were in flight at once, counted at submission. */
  get peakOutstanding(): number {
    return this.#n.peakOutstanding;
  }
  /** libiscsi's socket (-1 when not connected), for tests. */
  get fd(): number {
    return this.#n.fd;
  }
  get destroyed(): boolean {
    return this.#n.destroyed;
  }
}
