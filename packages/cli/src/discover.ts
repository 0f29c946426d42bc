/**
 * Finds installed driver packages, so that users install only the drivers they need:
 * - packages named `@blockconv/driver-*`, `blockconv-driver-*` or `@SCOPE/blockconv-driver-*`
 *   in any node_modules directory that Node would search from this CLI or from the
 *   current directory;
 * - modules named in BLOCKCONV_DRIVERS (comma-separated package names or paths).
 * A driver package exports `drivers` (an array of BlockDriver) or a default export
 * that is a driver or an array of them.
 */
import { readdirSync } from 'node:fs';
import { createRequire } from 'node:module';
import { isAbsolute, join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { DriverRegistry, type BlockDriver } from '@blockconv/core';

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
      try { scoped = readdirSync(join(nodeModules, e)); } catch { /* unreadable scope */ }
      for (const s of scoped) if (PACKAGE_RE.test(`${e}/${s}`)) out.push(`${e}/${s}`);
    } else if (PACKAGE_RE.test(e)) {
      out.push(e);
    }
  }
  return out;
}

function driversOf(mod: Record<string, unknown>): BlockDriver[] {
  const pick = (v: unknown): BlockDriver[] =>
    Array.isArray(v) ? (v as BlockDriver[]) : v && typeof v === 'object' && 'kind' in v ? [v as BlockDriver] : [];
  const named = pick(mod.drivers);
  return named.length ? named : pick(mod.default);
}

export async function discoverDrivers(fromDirs: readonly string[] = [import.meta.dirname ?? process.cwd(), process.cwd()]): Promise<Discovery> {
  const registry = new DriverRegistry();
  const loaded: LoadedPackage[] = [];
  const failed: FailedPackage[] = [];
  const seen = new Set<string>();

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
          entry = createRequire(join(nm, 'noop.js')).resolve(name);
        } catch (err) {
          failed.push({ name, path: join(nm, name), error: err instanceof Error ? err.message.split('\n')[0]! : String(err) });
          continue;
        }
        await load(name, entry);
      }
    }
  }

  for (const spec of (process.env.BLOCKCONV_DRIVERS ?? '').split(',').map((s) => s.trim()).filter(Boolean)) {
    if (seen.has(spec)) continue;
    seen.add(spec);
    let entry: string;
    try {
      entry = isAbsolute(spec) || spec.startsWith('.') ? resolve(spec) : createRequire(join(process.cwd(), 'noop.js')).resolve(spec);
    } catch (err) {
      failed.push({ name: spec, path: spec, error: err instanceof Error ? err.message.split('\n')[0]! : String(err) });
      continue;
    }
    await load(spec, entry);
  }
  return { registry, loaded, failed };
}
