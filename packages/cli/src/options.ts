/**
 * Option parsers and options that several commands share: integers and sizes in range,
 * qemu-img's k=v lists, cache modes, driver open options, --output and --progress.
 * Commander calls a parser with each value; InvalidArgumentError becomes its usage error.
 */
import { InvalidArgumentError, Option } from 'commander';
import { parseSize, type CacheMode } from '@blockconv/core';

export const CACHE_MODES: readonly CacheMode[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

/** Option values of the form k=v,k2=v2 (qemu-img's -o; ",," is a literal comma). */
export function keyValues(v: string, prev: Record<string, string> = {}): Record<string, string> {
  const out = { ...prev };
  for (const part of v.replace(/,,/g, '\0').split(',')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    if (eq <= 0) {
      if (part === 'help' || part === '?') {
        out.help = 'true';
        continue;
      }
      throw new InvalidArgumentError(`expected key=value, got "${part.replace(/\0/g, ',')}".`);
    }
    out[part.slice(0, eq)] = part.slice(eq + 1).replace(/\0/g, ',');
  }
  return out;
}

export function intOption(name: string, min: number, max: number) {
  return (v: string): number => {
    const n = Number(v);
    if (!/^\d+$/.test(v) || n < min || n > max)
      throw new InvalidArgumentError(`${name} must be an integer from ${min} to ${max}.`);
    return n;
  };
}

export function sizeOption(name: string) {
  return (v: string): number => {
    try {
      return parseSize(v, name);
    } catch (e) {
      throw new InvalidArgumentError(`${(e as Error).message}.`);
    }
  };
}

/** Per-image open options (driver-specific, declared by each driver); "help" lists them. */
export function openOptions(flag: string, what: string): Option {
  return new Option(
    flag,
    `open options of the ${what}, driver-specific ("help" lists them; so does "blockconv drivers")`,
  ).argParser(keyValues);
}

export function cacheOption(flag: string, what: string, dflt: CacheMode): Option {
  return new Option(flag, `cache mode for the ${what}`).choices(CACHE_MODES).default(dflt);
}

/** --output human|json, human by default. */
export function outputOption(description = 'output format'): Option {
  return new Option('--output <fmt>', description).choices(['human', 'json']).default('human');
}

/** --progress bar|json|none, beside -p (a bar). */
export function progressOption(): Option {
  return new Option('--progress <mode>', 'progress output: bar, json (JSON lines on stdout), none').choices([
    'bar',
    'json',
    'none',
  ]);
}
