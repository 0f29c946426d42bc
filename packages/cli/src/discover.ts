/**
 * Finds installed driver packages, so that users install only the drivers they need:
 * - packages named `@blockconv/driver-*`, `blockconv-driver-*` or `@SCOPE/blockconv-driver-*`
 *   in any node_modules directory that Node would search from this CLI or from the
 *   current directory;
 * - modules named in BLOCKCONV_DRIVERS, comma-separated: package names (found in the
 *   node_modules the current directory would search), package folders, or entry files.
 * A driver package exports `drivers` (an array of BlockDriver) or a default export
 * that is a driver or an array of them. A package that names what it serves in its
 * package.json (`"blockconv": {"schemes": [...], "formats": [...]}`) is imported only
 * when one of those is used, so that a convert of local files never loads the NFS or
 * iSCSI addons; a package without that field is imported at start. The package.json
 * is read from the package's folder, so its "exports" need not list it. A format
 * package may also give each format's magic, byte strings each at an offset:
 * `"magic": {"vmdk": [{"offset": 0, "hex": "4b444d56"}, {"offset": 0, "text": "# Disk DescriptorFile"}]}`
 * (a plain hex string means those bytes at offset 0): probing then imports it only for
 * images that hold one of them.
 * Its secret URL parameters (`"secretParameters": [...]`, as ProtocolDriver declares
 * them) are redacted from the start, before the package is imported: a command may
 * print a location before it opens it.
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import {
  DriverRegistry,
  declareSecretParameters,
  matchesMagic,
  type BlockDriver,
  type FormatMagic,
} from '@blockconv/core';

export interface LoadedPackage {
  readonly name: string;
  readonly path: string;
  readonly drivers: readonly string[];
}

export interface FailedPackage {
  readonly name: string;
  readonly path: string;
  readonly error: string;
}

export interface Discovery {
  readonly registry: DriverRegistry;
  readonly loaded: readonly LoadedPackage[];
  readonly failed: readonly FailedPackage[];
  /** Imports every package found, including the lazily loaded ones (`blockconv drivers`). */
  loadAll(): Promise<void>;
}

/** What a package says it serves, from its package.json. */
interface PackageMeta {
  readonly schemes: readonly string[];
  readonly formats: readonly string[];
  /** Per format, byte strings of which one its images hold: hex at offset 0, or a list of {offset, hex | text}. */
  readonly magic?: Readonly<Record<string, unknown>>;
  readonly secretParameters?: readonly string[];
}

/** A package.json magic entry as byte strings at offsets; undefined when it does not parse (then no preselection). */
export function parseMagic(value: unknown): FormatMagic[] | undefined {
  if (typeof value === 'string')
    return /^([0-9a-f]{2})+$/i.test(value) ? [{ offset: 0, bytes: Buffer.from(value, 'hex') }] : undefined;
  if (!Array.isArray(value) || value.length === 0) return undefined;
  const out: FormatMagic[] = [];
  for (const m of value as Array<{ offset?: unknown; hex?: unknown; text?: unknown }>) {
    const offset = m?.offset ?? 0;
    if (typeof offset !== 'number' || !Number.isSafeInteger(offset) || offset < 0 || offset >= 4096) return undefined;
    if (typeof m.hex === 'string' && /^([0-9a-f]{2})+$/i.test(m.hex))
      out.push({ offset, bytes: Buffer.from(m.hex, 'hex') });
    else if (typeof m.text === 'string' && m.text.length > 0) out.push({ offset, bytes: m.text });
    else return undefined;
  }
  return out;
}

/** What a package found in `nodeModules` says of itself: read from its folder, whatever its "exports" list. */
function metaOf(nodeModules: string, name: string): PackageMeta | undefined {
  try {
    const pkg = JSON.parse(readFileSync(join(nodeModules, name, 'package.json'), 'utf8')) as {
      blockconv?: Partial<PackageMeta>;
    };
    const b = pkg.blockconv;
    if (!b || (!Array.isArray(b.schemes) && !Array.isArray(b.formats))) return undefined;
    const secretParameters = Array.isArray(b.secretParameters)
      ? b.secretParameters.filter((n) => typeof n === 'string')
      : undefined;
    return { schemes: b.schemes ?? [], formats: b.formats ?? [], magic: b.magic, secretParameters };
  } catch {
    return undefined; // no readable package.json: import it to find out
  }
}

const PACKAGE_RE = /^(@blockconv\/driver-|blockconv-driver-|@[^/]+\/blockconv-driver-)/;

/** node_modules directories Node searches from `dir` upwards. */
function searchPaths(dir: string): string[] {
  return createRequire(join(dir, 'noop.js')).resolve.paths('x') ?? [];
}

function candidatesIn(nodeModules: string): string[] {
  let entries: string[];
  try {
    entries = readdirSync(nodeModules);
  } catch {
    return [];
  }
  const out: string[] = [];
  for (const e of entries) {
    if (e.startsWith('@')) {
      let scoped: string[] = [];
      try {
        scoped = readdirSync(join(nodeModules, e));
      } catch {
        /* unreadable scope */
      }
      for (const s of scoped) if (PACKAGE_RE.test(`${e}/${s}`)) out.push(`${e}/${s}`);
    } else if (PACKAGE_RE.test(e)) {
      out.push(e);
    }
  }
  return out;
}

/** The file a package folder's import resolves to: its "exports" (import or default condition), else "main", else index.js. */
function packageEntry(dir: string): string {
  const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { exports?: unknown; main?: string };
  let target: unknown = pkg.exports;
  if (target && typeof target === 'object' && '.' in target) target = (target as Record<string, unknown>)['.'];
  while (target && typeof target === 'object') {
    const t = target as Record<string, unknown>;
    target = t.import ?? t.node ?? t.default;
  }
  return join(dir, typeof target === 'string' ? target : (pkg.main ?? 'index.js'));
}

/** A BLOCKCONV_DRIVERS entry as a file to import: a path (file or package folder), or a package name. */
function driverEntry(spec: string): string {
  if (isAbsolute(spec) || spec.startsWith('.')) {
    const path = resolve(spec);
    return statSync(path).isDirectory() ? packageEntry(path) : path;
  }
  // ESM-only packages may not resolve through require(): look for the folder instead.
  for (const nm of searchPaths(process.cwd())) {
    const dir = join(nm, spec);
    if (existsSync(join(dir, 'package.json'))) return packageEntry(dir);
  }
  throw new Error(`package ${spec} not found in node_modules from ${process.cwd()}`);
}

function driversOf(mod: Record<string, unknown>): BlockDriver[] {
  const pick = (v: unknown): BlockDriver[] =>
    Array.isArray(v) ? (v as BlockDriver[]) : v && typeof v === 'object' && 'kind' in v ? [v as BlockDriver] : [];
  const named = pick(mod.drivers);
  return named.length ? named : pick(mod.default);
}

export async function discoverDrivers(
  fromDirs: readonly string[] = [import.meta.dirname ?? process.cwd(), process.cwd()],
): Promise<Discovery> {
  const registry = new DriverRegistry();
  const loaded: LoadedPackage[] = [];
  const failed: FailedPackage[] = [];
  const seen = new Set<string>();
  const pending = new Map<string, { entry: string; promise?: Promise<void> }>();
  const byScheme = new Map<string, string>();
  const byFormat = new Map<string, string>();
  /** Packages whose every format declares a magic: probed only for images that hold one. */
  const magicOf = new Map<string, FormatMagic[]>();

  /** Imports a lazily listed package once. */
  const loadLazy = (name: string): Promise<void> => {
    const p = pending.get(name);
    if (!p) return Promise.resolve();
    p.promise ??= load(name, p.entry);
    return p.promise;
  };

  const load = async (name: string, entry: string): Promise<void> => {
    try {
      const mod = (await import(pathToFileURL(entry).href)) as Record<string, unknown>;
      const drivers = driversOf(mod);
      if (drivers.length === 0) throw new Error('exports no drivers (expected `drivers` or a default export)');
      registry.register(...drivers);
      loaded.push({ name, path: entry, drivers: drivers.map((d) => d.name) });
    } catch (err) {
      failed.push({ name, path: entry, error: err instanceof Error ? err.message.split('\n')[0]! : String(err) });
    }
  };

  for (const dir of fromDirs) {
    for (const nm of searchPaths(dir)) {
      for (const name of candidatesIn(nm)) {
        if (seen.has(name)) continue; // the nearest copy wins, as Node's resolution does
        seen.add(name);
        let entry: string;
        try {
          // From the folder, as import would: an ESM-only package's "exports" need no "require" condition.
          entry = packageEntry(join(nm, name));
        } catch (err) {
          failed.push({
            name,
            path: join(nm, name),
            error: err instanceof Error ? err.message.split('\n')[0]! : String(err),
          });
          continue;
        }
        const meta = metaOf(nm, name);
        if (!meta) {
          await load(name, entry);
          continue;
        }
        pending.set(name, { entry });
        if (meta.secretParameters) declareSecretParameters(meta.secretParameters);
        for (const sc of meta.schemes) if (!byScheme.has(sc.toLowerCase())) byScheme.set(sc.toLowerCase(), name);
        for (const f of meta.formats) if (!byFormat.has(f)) byFormat.set(f, name);
        const magics = meta.formats.map((f) => parseMagic(meta.magic?.[f]));
        if (meta.formats.length && magics.every((m) => m !== undefined))
          magicOf.set(name, magics.flat() as FormatMagic[]);
      }
    }
  }

  for (const spec of (process.env.BLOCKCONV_DRIVERS ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean)) {
    if (seen.has(spec)) continue;
    seen.add(spec);
    let entry: string;
    try {
      entry = driverEntry(spec);
    } catch (err) {
      failed.push({ name: spec, path: spec, error: err instanceof Error ? err.message.split('\n')[0]! : String(err) });
      continue;
    }
    await load(spec, entry);
  }
  const mayClaim = (pkg: string, head: Uint8Array | undefined): boolean => {
    const magics = magicOf.get(pkg);
    return !magics || !head || matchesMagic(magics, head);
  };
  registry.setLoader(async (kind, name, head) => {
    if (kind === 'format' && name === '*')
      await Promise.all([...new Set(byFormat.values())].filter((p) => mayClaim(p, head)).map(loadLazy));
    else await loadLazy((kind === 'scheme' ? byScheme : byFormat).get(name) ?? '');
  });
  const loadAll = async (): Promise<void> => {
    await Promise.all([...pending.keys()].map(loadLazy));
  };
  return { registry, loaded, failed, loadAll };
}
