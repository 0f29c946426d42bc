/**
 * Driver registry and image resolution: a location string picks a protocol driver by
 * its URL scheme (no scheme = "file"), then a format driver by name or by probing, and
 * the format is layered on the protocol backend as in QEMU.
 */
import { BlockError, toBlockError } from './errors.js';
import { adaptApi1Driver } from './compat/api1.js';
import { gateBackend, type GateFacts } from './gate.js';
import { declareSecretParameters, redactCredentials, redactLocation } from './redact.js';
import {
  BLOCK_API_VERSION,
  SUPPORTED_API_VERSIONS,
  type BlockBackend,
  type FormatMagic,
  type GatedBackend,
  type BlockDriver,
  type CacheMode,
  type CheckOptions,
  type CheckResult,
  type CreateOptions,
  type CreateResult,
  type FormatDriver,
  type ImageResolver,
  type OpenOptions,
  type ProtocolDriver,
} from './types.js';

/** Packages of the blockconv project that provide each scheme or format. */
const KNOWN_PACKAGES: Readonly<Record<string, { pkg: string; needs?: string }>> = {
  file: { pkg: '@blockconv/driver-raw' },
  raw: { pkg: '@blockconv/driver-raw' },
  qcow2: { pkg: '@blockconv/driver-qcow2' },
  nfs: { pkg: '@blockconv/driver-nfs', needs: 'libnfs (Debian: libnfs-dev)' },
  iscsi: { pkg: '@blockconv/driver-iscsi', needs: 'libiscsi (Debian: libiscsi-dev)' },
  nbd: { pkg: '@blockconv/driver-nbd' },
  'nbd+unix': { pkg: '@blockconv/driver-nbd' },
  nbds: { pkg: '@blockconv/driver-nbd' },
  'nbds+unix': { pkg: '@blockconv/driver-nbd' },
  http: { pkg: '@blockconv/driver-http' },
  https: { pkg: '@blockconv/driver-http' },
};

export interface ParsedLocation {
  /** Lower-case scheme; "file" for plain paths. */
  readonly scheme: string;
  /** What the protocol driver receives: the path for files, the whole URL otherwise. */
  readonly location: string;
}

const SCHEME_RE = /^([a-zA-Z][a-zA-Z0-9+.-]*):\/\//;

export function parseLocation(location: string): ParsedLocation {
  if (location === '') throw new BlockError('EINVAL', 'empty image location');
  const m = SCHEME_RE.exec(location);
  if (!m) return { scheme: 'file', location };
  const scheme = m[1]!.toLowerCase();
  if (scheme === 'file') {
    try {
      return { scheme, location: decodeURIComponent(new URL(location).pathname) };
    } catch {
      throw new BlockError('EINVAL', `malformed file URL "${location}"`);
    }
  }
  return { scheme, location };
}

export interface ImageOpenOptions extends OpenOptions {
  /** Format name (-f); probed when absent. */
  readonly format?: string;
}

export interface ImageCreateOptions extends CreateOptions {
  /** Format name (-O); "raw" when absent. */
  readonly format?: string;
  /** Open options (OpenOptions.options) for the image once created, checked as open() checks them. */
  readonly openOptions?: Readonly<Record<string, string>>;
}

/** How much of an image's start the probe reads. */
const PROBE_BYTES = 4096;

/**
 * Loads drivers on demand (e.g. the CLI importing an installed package only when its
 * scheme or format is used): asked for a scheme or format name, or for every format
 * that may claim an image whose first bytes are `head` (`'*'`, before probing), it
 * registers what it finds. Missing ones are not an error here; the lookup that follows
 * reports them.
 */
export type DriverLoader = (kind: 'scheme' | 'format', name: string, head?: Uint8Array) => Promise<void>;

export class DriverRegistry implements ImageResolver {
  readonly #protocols = new Map<string, ProtocolDriver>();
  readonly #formats = new Map<string, FormatDriver>();
  readonly #byScheme = new Map<string, ProtocolDriver>();
  #loader?: DriverLoader;

  /** Sets the on-demand loader consulted by open/create before they look drivers up. */
  setLoader(loader: DriverLoader | undefined): this {
    this.#loader = loader;
    return this;
  }

  /** Gives the loader a chance to register what `location` and `format` need. */
  async #load(location: string | undefined, format: string | undefined | '*'): Promise<void> {
    if (!this.#loader) return;
    if (location !== undefined) {
      const { scheme } = parseLocation(location);
      if (!this.#byScheme.has(scheme)) await this.#loader('scheme', scheme);
    }
    if (format !== undefined && (format === '*' || !this.#formats.has(format))) await this.#loader('format', format);
  }

  /** Registers drivers; a later registration of the same name replaces the earlier one. */
  register(...drivers: readonly BlockDriver[]): this {
    for (const given of drivers) {
      const version = given.apiVersion as number;
      if (!SUPPORTED_API_VERSIONS.includes(version)) {
        throw new BlockError(
          'ENOTSUP',
          `driver "${given.name}" implements driver API version ${String(given.apiVersion)}; this @blockconv/core implements versions ${SUPPORTED_API_VERSIONS.join(' and ')}`,
          { field: 'apiVersion' },
        );
      }
      const d = version === BLOCK_API_VERSION ? given : adaptApi1Driver(given);
      if (d.kind === 'protocol') {
        if (d.secretParameters) declareSecretParameters(d.secretParameters);
        this.#protocols.set(d.name, d);
        for (const s of d.schemes) this.#byScheme.set(s.toLowerCase(), d);
      } else if (d.kind === 'format') {
        this.#formats.set(d.name, d);
      } else {
        throw new BlockError('EINVAL', `driver "${(d as BlockDriver).name}" has unknown kind`);
      }
    }
    return this;
  }

  get protocols(): readonly ProtocolDriver[] {
    return [...this.#protocols.values()];
  }
  get formats(): readonly FormatDriver[] {
    return [...this.#formats.values()];
  }

  protocolFor(location: string): { driver: ProtocolDriver; location: string } {
    const parsed = parseLocation(location);
    const driver = this.#byScheme.get(parsed.scheme);
    if (!driver) throw missingDriver('scheme', parsed.scheme);
    return { driver, location: parsed.location };
  }

  format(name: string): FormatDriver {
    const driver = this.#formats.get(name);
    if (!driver) {
      if (KNOWN_PACKAGES[name] || this.#formats.size === 0) throw missingDriver('format', name);
      throw new BlockError('EINVAL', `unknown format "${name}" (known: ${[...this.#formats.keys()].join(', ')})`);
    }
    return driver;
  }

  /** Opens a protocol backend only (no format layer). */
  async openProtocol(location: string, options: OpenOptions = {}): Promise<GatedBackend> {
    await this.#load(location, undefined);
    learnSecrets(location);
    const { driver, location: loc } = this.protocolFor(location);
    let backend: BlockBackend;
    try {
      backend = redactedLocation(await driver.open(loc, driver.readOnly ? { ...options, readOnly: true } : options));
    } catch (err) {
      throw toBlockError(err, { op: 'open', location });
    }
    return await gated(backend, driver.readOnly ? { readOnlyReason: readOnlyProtocol(driver) } : undefined);
  }

  /** Opens an image: protocol, then the named or probed format on top. */
  async open(location: string, options: ImageOpenOptions = {}): Promise<GatedBackend> {
    await this.#load(location, options.format); // probing loads the formats that may claim the bytes
    const formatDriver = options.format === undefined ? undefined : this.format(options.format);
    const { driver: protocol } = this.protocolFor(location);
    // Checked before any driver sees them when the format is known; after probing otherwise.
    if (formatDriver) checkOpenOptions(options.options, protocol, formatDriver, location);
    const file = await this.openProtocol(location, options);
    try {
      const fmt = formatDriver ?? (await this.probe(file, location));
      checkOpenOptions(options.options, protocol, fmt, location);
      const onlyReads = protocol.readOnly ? readOnlyProtocol(protocol) : fmt.readOnly ? readOnlyFormat(fmt) : undefined;
      const readOnly = onlyReads !== undefined ? { readOnly: true } : {};
      return await gated(
        redactedLocation(await fmt.open(file, { ...options, ...readOnly, resolver: this })),
        onlyReads !== undefined ? { readOnlyReason: onlyReads } : undefined,
      );
    } catch (err) {
      await file.close().catch(() => {});
      throw toBlockError(err, { op: 'open', location });
    }
  }

  /** Checks an image's format metadata (qemu-img check): the named or probed format's check. */
  async check(
    location: string,
    options: CheckOptions & {
      readonly format?: string;
      readonly cache?: CacheMode;
      readonly options?: Readonly<Record<string, string>>;
    } = {},
  ): Promise<CheckResult> {
    await this.#load(location, options.format);
    const formatDriver = options.format === undefined ? undefined : this.format(options.format);
    const { driver: protocol } = this.protocolFor(location);
    const file = await this.openProtocol(location, {
      readOnly: options.repair === undefined,
      cache: options.cache,
      signal: options.signal,
      options: options.options,
    });
    try {
      const fmt = formatDriver ?? (await this.probe(file, location));
      checkOpenOptions(options.options, protocol, fmt, location);
      // field "format": the CLI exits 63 for this, as qemu-img check does.
      if (!fmt.check)
        throw new BlockError('ENOTSUP', `format "${fmt.name}" does not support checks`, {
          op: 'check',
          location,
          field: 'format',
        });
      const r = await fmt.check(file, { ...options, resolver: this });
      return { ...r, messages: r.messages.map(redactCredentials) };
    } catch (err) {
      throw toBlockError(err, { op: 'check', location });
    } finally {
      await file.close().catch(() => {});
    }
  }

  /**
   * Before a resumed convert opens its target: clusters the interruption left allocated
   * but unreferenced are reclaimed (check with repair 'leaks'); a target with real
   * corruption is refused. Formats without checks (raw) have nothing to reclaim.
   */
  async reclaimForResume(
    location: string,
    options: {
      readonly format?: string;
      readonly cache?: CacheMode;
      readonly options?: Readonly<Record<string, string>>;
      readonly signal?: AbortSignal;
    } = {},
  ): Promise<void> {
    let r: CheckResult;
    try {
      r = await this.check(location, { ...options, repair: 'leaks' });
    } catch (err) {
      if (err instanceof BlockError && err.code === 'ENOTSUP' && err.field === 'format') return;
      throw err;
    }
    if (r.corruptions > 0 || r.checkErrors > 0) {
      throw new BlockError(
        'ECORRUPT',
        `cannot resume: the target has ${r.corruptions} corruptions and ${r.checkErrors} check errors (blockconv check says what); start again without resuming`,
        { location, op: 'resume' },
      );
    }
  }

  /** Picks the format whose probe is most confident; raw when none claims the bytes. */
  async probe(file: BlockBackend, location: string): Promise<FormatDriver> {
    const head = await readHead(file);
    // The loader may skip packages whose declared magic does not match the head.
    await this.#loader?.('format', '*', head);
    let best: FormatDriver | undefined;
    let bestScore = 0;
    for (const f of this.#formats.values()) {
      const score = probeScore(f, head, location);
      if (score > bestScore) {
        best = f;
        bestScore = score;
      }
    }
    if (!best) throw missingDriver('format', 'raw');
    return best;
  }

  /**
   * Creates an image and returns it opened read-write. The protocol object is created
   * (a smaller existing file is replaced), then the format writes its metadata into it.
   */
  async create(location: string, size: number, options: ImageCreateOptions = {}): Promise<GatedBackend> {
    if (!Number.isSafeInteger(size) || size < 0) throw new BlockError('EINVAL', `invalid image size ${size}`);
    await this.#load(location, options.format ?? 'raw');
    learnSecrets(location);
    const fmt = this.format(options.format ?? 'raw');
    if (fmt.readOnly)
      throw new BlockError('EROFS', `${readOnlyFormat(fmt)}: it cannot create images`, {
        op: 'create',
        location,
        field: 'format',
      });
    if (!fmt.create) throw new BlockError('ENOTSUP', `format "${fmt.name}" cannot create images`, { location });
    const { driver, location: loc } = this.protocolFor(location);
    if (driver.readOnly)
      throw new BlockError('EROFS', `${readOnlyProtocol(driver)}: it cannot create images`, { op: 'create', location });
    if (!driver.create) {
      throw new BlockError('ENOTSUP', `${driver.name} cannot create images; use an existing one with -n`, { location });
    }
    // Before anything is created: a typo must not cost an existing file its contents.
    checkOpenOptions(options.openOptions, driver, fmt, location);
    const protocolSize = fmt.protocolSizeFor ? fmt.protocolSizeFor(size, options) : 0;
    let made: void | CreateResult;
    try {
      made = await driver.create(loc, protocolSize, options);
    } catch (err) {
      throw toBlockError(err, { op: 'create', location });
    }
    const opened = await this.openProtocol(location, {
      cache: options.cache,
      signal: options.signal,
      options: options.openOptions,
    });
    // The format's create sees what the protocol said (file.zeroInitialized), e.g. to
    // tell whether preallocated clusters read as zeroes.
    const file = made?.zeroInitialized ? gateBackend(opened, { zeroInitialized: true }) : opened;
    try {
      const formatted = await fmt.create(file, size, { ...options, resolver: this });
      const zeroInitialized = (formatted?.zeroInitialized ?? made?.zeroInitialized) === true;
      const image = await fmt.open(file, {
        cache: options.cache,
        signal: options.signal,
        options: options.openOptions,
        resolver: this,
      });
      return await gated(redactedLocation(image), zeroInitialized ? { zeroInitialized: true } : undefined);
    } catch (err) {
      await file.close().catch(() => {});
      throw toBlockError(err, { op: 'create', location });
    }
  }
}

/** The first PROBE_BYTES of an image (fewer when it is smaller), for probing. */
async function readHead(file: BlockBackend): Promise<Uint8Array> {
  if (file.size === 0) return new Uint8Array(0);
  const align = file.limits.requestAlignment;
  const len = Math.min(roundUp(PROBE_BYTES, align), roundUp(file.size, align));
  const buf = file.allocBuffer ? file.allocBuffer(len) : new Uint8Array(len);
  return (await file.read(0, Math.min(len, file.size), buf)).subarray(0, Math.min(PROBE_BYTES, file.size));
}

/** Whether `head` holds one of the byte strings at its offset. */
export function matchesMagic(magic: readonly FormatMagic[], head: Uint8Array): boolean {
  return magic.some((m) => {
    const bytes = typeof m.bytes === 'string' ? new TextEncoder().encode(m.bytes) : m.bytes;
    if (m.offset + bytes.length > head.length) return false;
    for (let i = 0; i < bytes.length; i++) if (head[m.offset + i] !== bytes[i]) return false;
    return true;
  });
}

/** A format's confidence for `head`: its magic preselects, its probe decides; magic alone is 100. */
function probeScore(f: FormatDriver, head: Uint8Array, location: string): number {
  if (f.magic && !matchesMagic(f.magic, head)) return 0;
  if (f.probe) return f.probe(head, location);
  return f.magic ? 100 : 0;
}

/** Every backend the registry hands out goes through the request gate (gate.ts); one with invalid limits is closed and refused. */
async function gated(backend: BlockBackend, facts?: GateFacts): Promise<GatedBackend> {
  try {
    return gateBackend(backend, facts);
  } catch (err) {
    await backend.close().catch(() => {});
    throw err;
  }
}

function readOnlyProtocol(driver: ProtocolDriver): string {
  return `the ${driver.name} driver only reads (a source, never a target)`;
}

function readOnlyFormat(driver: FormatDriver): string {
  return `the ${driver.name} format driver only reads (a source, never a target)`;
}

/**
 * Refuses open options that neither driver of the image declares (a typo would
 * otherwise be ignored), naming the ones they take.
 */
function checkOpenOptions(
  options: Readonly<Record<string, string>> | undefined,
  protocol: ProtocolDriver,
  format: FormatDriver,
  location: string,
): void {
  if (!options) return;
  const known = new Set([...(protocol.openOptions ?? []), ...(format.openOptions ?? [])].map((o) => o.name));
  for (const key of Object.keys(options)) {
    if (known.has(key)) continue;
    const takes = (d: BlockDriver): string =>
      `${d.name} takes ${d.openOptions?.length ? d.openOptions.map((o) => o.name).join(', ') : 'none'}`;
    throw new BlockError('EINVAL', `unknown open option "${key}" (${takes(protocol)}; ${takes(format)})`, {
      op: 'open',
      location,
      field: key,
    });
  }
}

/**
 * Notes the secrets of a location before a driver sees it, so that whatever text the
 * driver or its native library makes of them is masked too (redact.ts). Called after
 * the scheme's driver is loaded: its secretParameters are declared by then.
 */
function learnSecrets(location: string): void {
  redactLocation(location);
}

/** A backend whose driver left a credential in `location` gets the redacted one. */
function redactedLocation(backend: BlockBackend): BlockBackend {
  const shown = redactLocation(backend.location);
  if (shown !== backend.location)
    Object.defineProperty(backend, 'location', { value: shown, enumerable: true, configurable: true });
  return backend;
}

function missingDriver(what: 'scheme' | 'format', name: string): BlockError {
  const known = KNOWN_PACKAGES[name];
  const hint = known
    ? `install ${known.pkg}${known.needs ? ` (needs ${known.needs})` : ''}`
    : `install a package that provides it (see "blockconv drivers")`;
  return new BlockError('ENODRIVER', `no driver for ${what} "${name}": ${hint}`);
}

export function roundUp(n: number, align: number): number {
  return Math.ceil(n / align) * align;
}

export function roundDown(n: number, align: number): number {
  return Math.floor(n / align) * align;
}

/**
 * Resolves a backing file name written inside an image against the image's own
 * location, as QEMU does: absolute paths and URLs stand as they are, relative names
 * are taken from the directory of the image (on the same server for URLs).
 */
export function resolveRelative(base: string, name: string): string {
  if (SCHEME_RE.test(name) || name.startsWith('/')) return name;
  const m = SCHEME_RE.exec(base);
  if (m && m[1]!.toLowerCase() !== 'file') {
    const q = base.indexOf('?');
    const path = q < 0 ? base : base.slice(0, q);
    const query = q < 0 ? '' : base.slice(q);
    return path.slice(0, path.lastIndexOf('/') + 1) + name + query;
  }
  const path = parseLocation(base).location;
  const slash = path.lastIndexOf('/');
  return slash < 0 ? name : path.slice(0, slash + 1) + name;
}
