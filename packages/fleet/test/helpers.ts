/** Fixtures shared by the fleet tests: worker processes of the real CLI, and job polling. */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Queue } from 'bullmq';
import type { ConvertJobSummary } from '../src/index.js';

export const BIN = join(dirname(fileURLToPath(import.meta.url)), '..', '..', 'cli', 'bin', 'blockconv.js');

/** Waits until the job reports more than `bytes` done (or `timeoutMs` passed: the test's assertions then say what is wrong). */
export async function waitForProgress(queue: Queue, id: string, bytes: number, timeoutMs = 20_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; Date.now() < end; ) {
    const job = await queue.getJob(id);
    if (((job?.progress as { done?: number } | undefined)?.done ?? 0) > bytes) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A job start or end as a worker logs it. */
export interface WorkerEvent {
  readonly worker: string;
  readonly at: number;
  readonly job: string;
  readonly event: string;
  readonly target: string;
}

/** `blockconv worker` processes and the CLI, with one environment (Redis URL, state dir). */
export class FleetProcesses {
  readonly workers: ChildProcess[] = [];
  /** Every worker's job start/end/fail lines, parsed. */
  readonly events: WorkerEvent[] = [];
  readonly logs = new Map<string, string>();

  constructor(readonly env: NodeJS.ProcessEnv) {}

  cli(args: string[], timeout = 120_000): { code: number; stdout: string; stderr: string } {
    const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', env: this.env, timeout });
    return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
  }

  /** Runs the CLI in the background; resolves with its exit and output. */
  cliAsync(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
    return new Promise((resolve) => {
      const c = spawn(process.execPath, [BIN, ...args], { env: this.env, stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      c.stdout.on('data', (d: Buffer) => {
        stdout += d.toString();
      });
      c.stderr.on('data', (d: Buffer) => {
        stderr += d.toString();
      });
      c.on('exit', (code) => resolve({ code, stdout, stderr }));
    });
  }

  /** Polls `blockconv jobs` until the job has completed or failed for good (two minutes at most). */
  async jobEnd(id: string): Promise<ConvertJobSummary | undefined> {
    let job: ConvertJobSummary | undefined;
    for (let i = 0; i < 600 && job?.state !== 'completed' && job?.state !== 'failed'; i++) {
      job = (JSON.parse(this.cli(['jobs', '--output', 'json', id]).stdout) as ConvertJobSummary[])[0];
      await new Promise((res) => setTimeout(res, 200));
    }
    return job;
  }

  async startWorker(name: string, flags: string[] = [], env: NodeJS.ProcessEnv = {}): Promise<ChildProcess> {
    const w = spawn(process.execPath, [BIN, 'worker', '--name', name, ...flags], {
      env: { ...this.env, ...env },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.workers.push(w);
    this.logs.set(name, '');
    await new Promise<void>((resolve, reject) => {
      let partial = '';
      w.stderr!.on('data', (d: Buffer) => {
        this.logs.set(name, this.logs.get(name)! + d.toString());
        partial += d.toString();
        const lines = partial.split('\n');
        partial = lines.pop()!;
        for (const l of lines) {
          const m = /^worker \S+: (\S+) job (\S+) (start|end|fail) (.*?)(?: resuming at \d+| [0-9a-f]{64}|$)/.exec(l);
          if (m) this.events.push({ worker: name, at: Date.parse(m[1]!), job: m[2]!, event: m[3]!, target: m[4]! });
          if (l.includes('taking convert jobs')) resolve();
        }
      });
      w.on('exit', (c) => reject(new Error(`worker ${name} exited ${c}: ${this.logs.get(name)}`)));
    });
    return w;
  }

  async stopWorker(w: ChildProcess): Promise<void> {
    if (w.exitCode !== null || w.signalCode !== null) return;
    const exited = new Promise((r) => w.on('exit', r));
    w.kill('SIGTERM');
    await exited;
  }

  async stopAll(): Promise<void> {
    await Promise.all(this.workers.map((w) => this.stopWorker(w)));
  }

  /** Most jobs running at once according to the workers' start/end lines, optionally only those matching. */
  maxConcurrent(filter: (e: WorkerEvent) => boolean = () => true): number {
    const marks = this.events
      .filter(filter)
      .map((e) => [e.at, e.event === 'start' ? 1 : -1] as const)
      .sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    let now = 0;
    let max = 0;
    for (const [, d] of marks) {
      now += d;
      max = Math.max(max, now);
    }
    return max;
  }
}
