/**
 * The qcow2 fuzz campaign (issue 15): structure-aware mutants of valid images
 * (qcow2-bases.ts, qcow2-mutate.ts), each run through info, map, check, convert and
 * checksum in a pool of processes (qcow2-case.ts) under a time and a memory bound,
 * and compared with qemu-img convert. A case is a defect when it crashes, hangs, goes
 * over the memory bound, throws anything but a one-line BlockError, leaks a file
 * descriptor, or converts to bytes other than qemu-img's. Refusals where qemu-img
 * reads the image are counted and listed with their reasons; so are images that
 * blockconv reads and qemu-img refuses.
 *
 *   tsx tools/fuzz/qcow2-fuzz.ts [--cases N] [--seed S] [--jobs J] [--case I] [--cli-every K]
 *                                [--op-timeout-ms T] [--report FILE.jsonl] [--json]
 *
 * Every case replays alone from (seed, index): `--case I` reruns one, keeps the mutant
 * and prints its mutations. Sampled cases (--cli-every) also run the real `blockconv`
 * command, which must exit with a one-line error and no stack trace.
 */
import { fork, spawnSync, type ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { makeBases, type Base } from './qcow2-bases.js';
import type { CaseReply, CaseRequest, Defect, OpName } from './qcow2-case.js';
import { layoutOf, type Layout } from './qcow2-layout.js';
import { caseSeed, mutate, prng } from './qcow2-mutate.js';

const MiB = 1024 * 1024;
const CLI = fileURLToPath(new URL('../../packages/cli/bin/blockconv.js', import.meta.url));
const RUNNER = fileURLToPath(new URL('./qcow2-case.ts', import.meta.url));

export interface CampaignOptions {
  readonly cases: number;
  readonly seed: number;
  /** Processes running cases at once. */
  readonly jobs?: number;
  /** Run only this case (and keep its mutant). */
  readonly only?: number;
  /** Peak RSS allowed per case (bytes). */
  readonly rssLimit?: number;
  /** Bound on each of info, map, check, convert, checksum. */
  readonly opTimeoutMs?: number;
  /** Every K-th case also runs the blockconv command (0: never). */
  readonly cliEvery?: number;
  /** Lines for each case worth a look (defects, refusals, leniency) as JSON; default none. */
  readonly reportFile?: string;
  readonly log?: (line: string) => void;
}

export interface CaseRecord {
  readonly index: number;
  readonly base: string;
  readonly changes: readonly string[];
  readonly defects: readonly Defect[];
  readonly reply?: CaseReply;
}

export interface CampaignResult {
  readonly cases: number;
  readonly seed: number;
  readonly crashes: number;
  readonly hangs: number;
  readonly overMemory: number;
  readonly mismatches: number;
  /** Exceptions other than a one-line BlockError, fd leaks, broken maps, CLI faults. */
  readonly otherDefects: number;
  /** qemu-img converted; blockconv refused (a reason each). */
  readonly refused: number;
  /** blockconv converted; qemu-img refused. */
  readonly lenient: number;
  readonly bothRefused: number;
  readonly equal: number;
  readonly notCompared: number;
  readonly cliRuns: number;
  readonly maxRss: number;
  /** Cases over the bound in a long-running process but within it when run again in a fresh one. */
  readonly rssDrift: number;
  readonly driftPeak: number;
  readonly maxOpMs: Readonly<Record<OpName, number>>;
  readonly refusalReasons: ReadonlyArray<[string, number]>;
  readonly lenientCases: readonly string[];
  readonly defects: readonly CaseRecord[];
  readonly elapsedMs: number;
}

interface Slot {
  child: ChildProcess;
  ready: Promise<void>;
  dir: string;
}

function spawnRunner(dir: string): Slot {
  const child = fork(RUNNER, [], { execArgv: ['--import', 'tsx'], stdio: ['ignore', 'ignore', 'pipe', 'ipc'] });
  child.stderr?.resume();
  const ready = new Promise<void>((resolve, reject) => {
    const onMsg = (m: { ready?: boolean }): void => {
      if (m.ready) {
        child.off('message', onMsg);
        resolve();
      }
    };
    child.on('message', onMsg);
    child.once('exit', (code) => reject(new Error(`fuzz runner exited (${code}) before it was ready`)));
  });
  ready.catch(() => {});
  return { child, ready, dir };
}

/** Sends one case; resolves with the reply, or a crash/hang record when the process dies or goes quiet. */
function runOn(
  slot: Slot,
  req: CaseRequest,
  caseTimeoutMs: number,
): Promise<{ reply?: CaseReply; crash?: string; hang?: boolean }> {
  return new Promise((resolve) => {
    const done = (r: { reply?: CaseReply; crash?: string; hang?: boolean }): void => {
      clearTimeout(timer);
      slot.child.off('message', onMsg);
      slot.child.off('exit', onExit);
      resolve(r);
    };
    const onMsg = (m: CaseReply & { crash?: string }): void => {
      if (m.crash !== undefined) done({ crash: m.crash });
      else if (m.id === req.id) done({ reply: m });
    };
    const onExit = (code: number | null, signal: string | null): void =>
      done({ crash: `runner died: ${signal ?? `exit ${code}`}` });
    const timer = setTimeout(() => done({ hang: true }), caseTimeoutMs);
    slot.child.on('message', onMsg);
    slot.child.on('exit', onExit);
    slot.child.send(req);
  });
}

/** The real command on a sampled case: exit codes it documents, errors on one line, never a stack trace. */
function cliDefects(image: string, out: string): Defect[] {
  const defects: Defect[] = [];
  const runs: Array<[string[], number[]]> = [
    [
      ['info', '-f', 'qcow2', '--output', 'json', image],
      [0, 1],
    ],
    [
      ['map', '-f', 'qcow2', '--output', 'json', image],
      [0, 1],
    ],
    [
      ['check', '-f', 'qcow2', '--output', 'json', image],
      [0, 1, 2, 3],
    ],
    [
      ['convert', '-f', 'qcow2', '-O', 'raw', image, out],
      [0, 1],
    ],
    [
      ['checksum', '-f', 'qcow2', image],
      [0, 1],
    ],
  ];
  for (const [args, codes] of runs) {
    // Resume states go to a directory of the case's own, not the user's.
    const r = spawnSync(process.execPath, [CLI, ...args], {
      encoding: 'utf8',
      timeout: 120_000,
      maxBuffer: 256 * MiB,
      env: { ...process.env, XDG_STATE_HOME: path.dirname(out) },
    });
    const what = `blockconv ${args[0]}`;
    const errors = r.stderr
      .split('\n')
      .filter((l) => l && !l.startsWith('blockconv: warning: ') && !l.startsWith('blockconv: note: '));
    if (r.error || r.signal) defects.push({ kind: 'hang', detail: `${what}: ${r.error?.message ?? r.signal}` });
    else if (!codes.includes(r.status!))
      defects.push({ kind: 'exception', detail: `${what}: exit ${r.status}: ${r.stderr.slice(0, 2000)}` });
    else if (/^\s+at /m.test(r.stderr) || errors.length > 1 || errors.some((l) => !l.startsWith('blockconv: '))) {
      defects.push({ kind: 'multi-line error', detail: `${what}: ${JSON.stringify(r.stderr.slice(0, 2000))}` });
    } else if (r.status === 0 && args.includes('json')) {
      try {
        JSON.parse(r.stdout);
      } catch {
        defects.push({ kind: 'exception', detail: `${what}: exit 0 but its JSON does not parse` });
      }
    }
  }
  fs.rmSync(out, { force: true });
  return defects;
}

/** Groups refusal reasons: numbers and names taken out, so that one cause is one line. */
function reasonKey(why: string): string {
  return why
    .replace(/^\S+?: /, '')
    .replace(/\/\S+/g, 'PATH')
    .replace(/0x[0-9a-f]+/gi, 'N')
    .replace(/\d+/g, 'N')
    .slice(0, 160);
}

export async function runCampaign(o: CampaignOptions): Promise<CampaignResult> {
  const started = performance.now();
  const log = o.log ?? (() => {});
  const jobs = Math.max(1, o.jobs ?? Math.min(2, os.cpus().length));
  const rssLimit = o.rssLimit ?? 256 * MiB;
  const opTimeoutMs = o.opTimeoutMs ?? 20_000;
  const caseTimeoutMs = 5 * opTimeoutMs + 90_000;
  const work = fs.mkdtempSync(path.join('/var/tmp', 'blockconv-fuzz-'));
  const shm = fs.mkdtempSync(path.join(fs.existsSync('/dev/shm') ? '/dev/shm' : os.tmpdir(), 'blockconv-fuzz-'));
  const baseDir = path.join(work, 'bases');
  const bases: Base[] = makeBases(baseDir);
  const originals = bases.map((b) => fs.readFileSync(b.file));
  const layouts: Layout[] = originals.map((b) => layoutOf(b));
  log(
    `qcow2 fuzz: ${o.only !== undefined ? `case ${o.only}` : `${o.cases} cases`}, seed ${o.seed}, ${bases.length} base images, ${jobs} processes, ${opTimeoutMs} ms per operation, ${rssLimit / MiB} MiB RSS`,
  );

  const t = {
    crashes: 0,
    hangs: 0,
    overMemory: 0,
    mismatches: 0,
    otherDefects: 0,
    refused: 0,
    lenient: 0,
    bothRefused: 0,
    equal: 0,
    notCompared: 0,
    cliRuns: 0,
    maxRss: 0,
    rssDrift: 0,
    driftPeak: 0,
  };
  const maxOpMs: Record<OpName, number> = { info: 0, map: 0, check: 0, convert: 0, checksum: 0 };
  const reasons = new Map<string, number>();
  const lenientCases: string[] = [];
  const defects: CaseRecord[] = [];
  const report = o.reportFile ? fs.openSync(o.reportFile, 'w') : undefined;
  const record = (r: CaseRecord): void => {
    if (report !== undefined) fs.writeSync(report, `${JSON.stringify(r)}\n`);
  };

  const indices = o.only !== undefined ? [o.only] : Array.from({ length: o.cases }, (_, i) => i);
  let next = 0;
  let finished = 0;
  let lastLog = performance.now();

  const worker = async (w: number): Promise<void> => {
    const dir = path.join(shm, `w${w}`);
    fs.mkdirSync(dir);
    let slot = spawnRunner(dir);
    try {
      await slot.ready;
      for (;;) {
        const k = next++;
        if (k >= indices.length) return;
        const index = indices[k]!;
        const rand = prng(caseSeed(o.seed, index));
        const b = Math.floor(rand() * bases.length);
        const { bytes, changes } = mutate(originals[b]!, layouts[b]!, rand);
        // Beside the base, so that relative backing and data file names resolve.
        const image = path.join(baseDir, `mutant-${w}-${path.basename(bases[b]!.file)}`);
        fs.writeFileSync(image, bytes);
        const req: CaseRequest = { id: index, image, outDir: dir, compareLimit: 256 * MiB, opTimeoutMs };
        let r = await runOn(slot, req, caseTimeoutMs);
        if (r.reply && r.reply.rssPeak > rssLimit) {
          // Measured again in a fresh process: a process that ran thousands of cases may
          // have grown by itself (the soak test is the leak check), and the bound is per case.
          slot.child.kill('SIGKILL');
          slot = spawnRunner(dir);
          await slot.ready;
          const again = await runOn(slot, req, caseTimeoutMs);
          if (again.reply && again.reply.rssPeak <= rssLimit) {
            t.rssDrift++;
            t.driftPeak = Math.max(t.driftPeak, r.reply.rssPeak);
          }
          r = again;
        }
        const caseDefects: Defect[] = [...(r.reply?.defects ?? [])];
        if (r.crash !== undefined) caseDefects.push({ kind: 'exception', detail: `crash: ${r.crash}` });
        if (r.hang) caseDefects.push({ kind: 'hang', detail: `no answer in ${caseTimeoutMs} ms` });
        const reply = r.reply;
        if (reply) {
          t.maxRss = Math.max(t.maxRss, reply.rssPeak);
          for (const op of reply.ops) maxOpMs[op.op] = Math.max(maxOpMs[op.op], op.ms);
          if (reply.rssPeak > rssLimit) {
            t.overMemory++;
            caseDefects.push({ kind: 'exception', detail: `peak RSS ${(reply.rssPeak / MiB).toFixed(0)} MiB` });
          }
        }
        if (o.cliEvery && (index % o.cliEvery === 0 || o.only !== undefined)) {
          t.cliRuns++;
          caseDefects.push(...cliDefects(image, path.join(dir, 'cli.raw')));
        }
        if (r.crash !== undefined) t.crashes++;
        if (caseDefects.some((d) => d.kind === 'hang')) t.hangs++;
        if (caseDefects.some((d) => d.kind === 'mismatch')) t.mismatches++;
        if (
          caseDefects.some((d) => d.kind !== 'hang' && d.kind !== 'mismatch') &&
          r.crash === undefined &&
          !(reply && reply.rssPeak > rssLimit && caseDefects.length === 1)
        )
          t.otherDefects++;
        const entry: CaseRecord = { index, base: bases[b]!.name, changes, defects: caseDefects, reply };
        if (caseDefects.length) defects.push(entry);
        if (reply && !caseDefects.length) {
          const conv = reply.ops.find((x) => x.op === 'convert')!;
          if (reply.qemu.skipped) t.notCompared++;
          else if (conv.ok && reply.qemu.ok) t.equal++;
          else if (!conv.ok && reply.qemu.ok) {
            t.refused++;
            const key = reasonKey(conv.error!);
            reasons.set(key, (reasons.get(key) ?? 0) + 1);
          } else if (conv.ok && !reply.qemu.ok) {
            t.lenient++;
            if (lenientCases.length < 200)
              lenientCases.push(
                `case ${index} (${bases[b]!.name}; ${changes.join('; ')}): qemu-img: ${reply.qemu.error}`,
              );
          } else t.bothRefused++;
          if (reply.qemu.ok !== conv.ok) record(entry);
        } else if (caseDefects.length) {
          record(entry);
          log(
            `DEFECT case ${index} (seed ${o.seed}, ${bases[b]!.name}; ${changes.join('; ')}): ${caseDefects.map((d) => `${d.kind}${d.op ? ` in ${d.op}` : ''}: ${d.detail.split('\n').slice(0, 4).join(' | ').slice(0, 400)}`).join('; ')}`,
          );
        }
        if (o.only !== undefined) {
          log(`case ${index}: base ${bases[b]!.name}; mutant kept at ${image}`);
          for (const c of changes) log(`  ${c}`);
          for (const op of reply?.ops ?? []) log(`  ${op.op}: ${op.ok ? 'ok' : op.error} (${op.ms.toFixed(0)} ms)`);
          log(
            `  qemu-img convert: ${reply?.qemu.ok ? 'ok' : reply?.qemu.error}; compared: ${reply?.compared}; peak RSS ${((reply?.rssPeak ?? 0) / MiB).toFixed(0)} MiB`,
          );
        } else {
          fs.rmSync(image, { force: true });
        }
        if (!reply || r.crash !== undefined || caseDefects.some((d) => d.kind === 'hang' || d.kind === 'fd leak')) {
          // A process that crashed, hung or leaked is not trusted with the next case.
          slot.child.kill('SIGKILL');
          slot = spawnRunner(dir);
          await slot.ready;
        }
        finished++;
        if (performance.now() - lastLog > 30_000) {
          lastLog = performance.now();
          log(
            `  ${finished}/${indices.length} cases, ${defects.length} with defects, ${((performance.now() - started) / 1000).toFixed(0)} s`,
          );
        }
      }
    } finally {
      slot.child.kill('SIGKILL');
    }
  };
  try {
    await Promise.all(Array.from({ length: Math.min(jobs, indices.length) }, (_, w) => worker(w)));
  } finally {
    if (report !== undefined) fs.closeSync(report);
    fs.rmSync(shm, { recursive: true, force: true });
    if (o.only === undefined) fs.rmSync(work, { recursive: true, force: true });
  }
  return {
    cases: indices.length,
    seed: o.seed,
    ...t,
    maxOpMs,
    refusalReasons: [...reasons].sort((a, b) => b[1] - a[1]),
    lenientCases,
    defects,
    elapsedMs: performance.now() - started,
  };
}

/** The figures as Markdown, for docs/RELIABILITY.md. */
export function summarize(r: CampaignResult): string {
  const lines = [
    `| cases | crashes | hangs | over memory | mismatches | other defects | equal to qemu-img | refused (qemu-img reads) | read (qemu-img refuses) | both refuse | not compared (size) | max peak RSS | CLI runs |`,
    `|---|---|---|---|---|---|---|---|---|---|---|---|---|`,
    `| ${r.cases} | ${r.crashes} | ${r.hangs} | ${r.overMemory} | ${r.mismatches} | ${r.otherDefects} | ${r.equal} | ${r.refused} | ${r.lenient} | ${r.bothRefused} | ${r.notCompared} | ${(r.maxRss / MiB).toFixed(0)} MiB | ${r.cliRuns} |`,
    '',
    `Slowest operation: ${Object.entries(r.maxOpMs)
      .map(([k, v]) => `${k} ${v.toFixed(0)} ms`)
      .join(', ')}; ${(r.elapsedMs / 1000).toFixed(0)} s in all.`,
    ...(r.rssDrift
      ? [
          ``,
          `${r.rssDrift} cases went over the bound in a process that had run many cases (peak ${(r.driftPeak / MiB).toFixed(0)} MiB) and stayed within it when run again in a fresh process.`,
        ]
      : []),
  ];
  if (r.refusalReasons.length) {
    lines.push('', 'Refused where qemu-img reads the image (reason, cases):', '');
    for (const [why, n] of r.refusalReasons.slice(0, 40)) lines.push(`- ${n}: ${why}`);
  }
  if (r.lenientCases.length) {
    lines.push('', `Read where qemu-img refuses (${r.lenient}; first ${Math.min(20, r.lenientCases.length)}):`, '');
    for (const c of r.lenientCases.slice(0, 20)) lines.push(`- ${c}`);
  }
  return lines.join('\n');
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const { values } = parseArgs({
    options: {
      cases: { type: 'string', default: '1000' },
      seed: { type: 'string', default: '1' },
      jobs: { type: 'string' },
      case: { type: 'string' },
      'cli-every': { type: 'string', default: '0' },
      'op-timeout-ms': { type: 'string' },
      report: { type: 'string' },
      json: { type: 'boolean' },
    },
  });
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    if (!/^\d+$/.test(v)) {
      console.error(`qcow2-fuzz: --${name} must be a whole number, got "${v}"`);
      process.exit(2);
    }
    return Number(v);
  };
  const r = await runCampaign({
    cases: num('cases', values.cases)!,
    seed: num('seed', values.seed)!,
    jobs: num('jobs', values.jobs),
    only: num('case', values.case),
    cliEvery: num('cli-every', values['cli-every']),
    opTimeoutMs: num('op-timeout-ms', values['op-timeout-ms']),
    reportFile: values.report,
    log: (l) => console.error(l),
  });
  console.log(values.json ? JSON.stringify(r, null, 2) : summarize(r));
  process.exitCode = r.crashes + r.hangs + r.overMemory + r.mismatches + r.otherDefects ? 1 : 0;
}
