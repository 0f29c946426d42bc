/**
 * Batch files: one template (or several sources, concatenated) to many targets, each
 * with options of its own, as JSON:
 *
 *   {
 *     "source": "nfs://filer/templates/rhel9.qcow2",          (or "sources": [...])
 *     "sourceFormat": "qcow2",
 *     "options": { "targetFormat": "raw", "workers": 8 },      (defaults for every target)
 *     "targets": [
 *       "nfs://filer/vms/vm1.raw",
 *       { "target": "iscsi://portal/iqn.2026-01.org.example:lun/1", "noCreate": true, "outOfOrder": true }
 *     ],
 *     "targetsPerJob": 4,          (read once: up to 4 targets with equal options in one job)
 *     "caps": { "nfs://filer": 2, "*": 8 },
 *     "attempts": 3
 *   }
 *
 * Every field is checked before anything is queued; an error names the field
 * (`targets[3].workers`).
 */
import { BlockError } from '@blockconv/core';
import { checkCap } from './caps.js';
import type { ConvertJobData } from './jobs.js';

/** Options a batch may set per target (or as defaults): ConvertJobData's, sources and targets aside. */
const TARGET_OPTIONS = {
  targetFormat: 'string',
  noCreate: 'boolean',
  workers: 'integer',
  bufferSize: 'integer',
  outOfOrder: 'boolean',
  compress: 'boolean',
  minSparse: 'integer',
  checksum: 'boolean',
  checkpointBytes: 'integer',
  checkpointSeconds: 'number',
  rateLimit: 'integer',
  targetOptions: 'options',
  createOptions: 'options',
} as const;

type TargetOptionName = keyof typeof TARGET_OPTIONS;

export interface ConvertBatch {
  readonly jobs: ConvertJobData[];
  readonly caps: Record<string, number>;
  readonly attempts?: number;
}

function bad(field: string, why: string): never {
  throw new BlockError('EINVAL', `batch: ${field}: ${why}`, { field });
}

function checkValue(field: string, kind: string, v: unknown): unknown {
  const ok =
    kind === 'string'
      ? typeof v === 'string' && v !== ''
      : kind === 'boolean'
        ? typeof v === 'boolean'
        : kind === 'integer'
          ? Number.isSafeInteger(v) && (v as number) >= 0
          : kind === 'number'
            ? typeof v === 'number' && Number.isFinite(v) && v >= 0
            : typeof v === 'object' &&
              v !== null &&
              !Array.isArray(v) &&
              Object.values(v).every((x) => typeof x === 'string');
  if (!ok)
    bad(
      field,
      `expected ${kind === 'options' ? 'an object of strings' : kind === 'integer' ? 'a whole number' : `a ${kind}`}, got ${JSON.stringify(v)}`,
    );
  return v;
}

function targetOptions(field: string, o: Record<string, unknown>, skip: readonly string[]): Partial<ConvertJobData> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(o)) {
    if (skip.includes(k)) continue;
    const kind = TARGET_OPTIONS[k as TargetOptionName];
    if (!kind) bad(`${field}.${k}`, `unknown option (known: ${Object.keys(TARGET_OPTIONS).join(', ')})`);
    out[k] = checkValue(`${field}.${k}`, kind, v);
  }
  return out as Partial<ConvertJobData>;
}

/** Reads a batch (parsed JSON) into jobs: targets with equal options share a job up to targetsPerJob. */
export function parseBatch(input: unknown): ConvertBatch {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) bad('(top)', 'a batch is a JSON object');
  const b = input as Record<string, unknown>;
  const known = new Set([
    'source',
    'sources',
    'sourceFormat',
    'options',
    'targets',
    'targetsPerJob',
    'caps',
    'attempts',
  ]);
  for (const k of Object.keys(b)) if (!known.has(k)) bad(k, `unknown field (known: ${[...known].join(', ')})`);
  if ((b.source === undefined) === (b.sources === undefined)) bad('source', 'give "source" or "sources" (one of them)');
  const sources =
    b.source !== undefined
      ? [checkValue('source', 'string', b.source) as string]
      : Array.isArray(b.sources) && b.sources.length
        ? b.sources.map((s, i) => checkValue(`sources[${i}]`, 'string', s) as string)
        : bad('sources', 'expected a non-empty list of locations');
  const sourceFormat =
    b.sourceFormat === undefined ? undefined : (checkValue('sourceFormat', 'string', b.sourceFormat) as string);
  const defaults =
    b.options === undefined
      ? {}
      : typeof b.options === 'object' && b.options !== null && !Array.isArray(b.options)
        ? targetOptions('options', b.options as Record<string, unknown>, [])
        : bad('options', 'expected an object');
  if (!Array.isArray(b.targets) || b.targets.length === 0) bad('targets', 'expected a non-empty list');
  const perJob =
    b.targetsPerJob === undefined
      ? 1
      : Number.isSafeInteger(b.targetsPerJob) && (b.targetsPerJob as number) >= 1
        ? (b.targetsPerJob as number)
        : bad('targetsPerJob', `expected a whole number of at least 1, got ${JSON.stringify(b.targetsPerJob)}`);
  const attempts =
    b.attempts === undefined
      ? undefined
      : Number.isSafeInteger(b.attempts) && (b.attempts as number) >= 1
        ? (b.attempts as number)
        : bad('attempts', `expected a whole number of at least 1, got ${JSON.stringify(b.attempts)}`);
  const caps: Record<string, number> = {};
  if (b.caps !== undefined) {
    if (typeof b.caps !== 'object' || b.caps === null || Array.isArray(b.caps))
      bad('caps', 'expected an object of server: count');
    for (const [s, k] of Object.entries(b.caps as Record<string, unknown>)) {
      try {
        caps[s] = checkCap(s, k);
      } catch (err) {
        bad(`caps.${s}`, (err as Error).message);
      }
    }
  }
  const seen = new Set<string>();
  const groups = new Map<string, { options: Partial<ConvertJobData>; targets: string[] }>();
  b.targets.forEach((t, i) => {
    const field = `targets[${i}]`;
    let name: string;
    let own: Partial<ConvertJobData> = {};
    if (typeof t === 'string') name = checkValue(field, 'string', t) as string;
    else if (typeof t === 'object' && t !== null && !Array.isArray(t)) {
      name = checkValue(`${field}.target`, 'string', (t as Record<string, unknown>).target) as string;
      own = targetOptions(field, t as Record<string, unknown>, ['target']);
    } else bad(field, 'expected a location or an object with "target"');
    if (seen.has(name)) bad(field, `${name} is named twice`);
    seen.add(name);
    const options = { ...defaults, ...own };
    const key = JSON.stringify(
      Object.keys(options)
        .sort()
        .map((k) => [k, options[k as keyof typeof options]]),
    );
    const g = groups.get(key) ?? { options, targets: [] };
    g.targets.push(name);
    groups.set(key, g);
  });
  const jobs: ConvertJobData[] = [];
  for (const g of groups.values()) {
    for (let i = 0; i < g.targets.length; i += perJob) {
      const [target, ...tee] = g.targets.slice(i, i + perJob);
      jobs.push({
        ...g.options,
        sources,
        ...(sourceFormat ? { sourceFormat } : {}),
        target: target!,
        ...(tee.length ? { tee } : {}),
      });
    }
  }
  return { jobs, caps, ...(attempts ? { attempts } : {}) };
}
