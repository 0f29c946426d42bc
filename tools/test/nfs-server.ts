/**
 * The loopback NFS-Ganesha of tools/nfs-server.sh for tests: started if it is not
 * running, and left as found. Test processes register in the state dir; when a test
 * run started the server (marker file), the last one of them to exit stops it, so
 * overlapping runs neither pull the server from under each other nor leave it behind.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

const script = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../nfs-server.sh');
export const EXPORT_DIR = process.env.NFS_EXPORT_DIR ?? '/var/tmp/blockconv-nfs/export';
const STATE_DIR = process.env.NFS_STATE_DIR ?? '/var/tmp/blockconv-nfs/state';
export const BASE_URL = 'nfs://127.0.0.1/export';

function running(): boolean {
  try {
    execFileSync('bash', [script, 'status'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Makes sure the server runs; idempotent within the process. */
export function ensureServer(): void {
  const users = path.join(STATE_DIR, 'users');
  fs.mkdirSync(users, { recursive: true });
  const me = path.join(users, String(process.pid));
  if (fs.existsSync(me)) return;
  fs.writeFileSync(me, '');
  const marker = path.join(STATE_DIR, 'started-by-tests');
  if (!running()) {
    execFileSync('bash', [script, 'start'], { stdio: ['ignore', 'ignore', 'inherit'] });
    fs.writeFileSync(marker, '');
  }
  process.on('exit', () => {
    fs.rmSync(me, { force: true });
    const others = fs.readdirSync(users).map(Number).filter((pid) => pid !== process.pid && alive(pid));
    if (others.length > 0 || !fs.existsSync(marker)) return;
    fs.rmSync(marker, { force: true });
    execFileSync('bash', [script, 'stop'], { stdio: 'ignore' });
  });
}

/** A unique file name inside the export, for one test. */
export function scratchName(prefix: string): string {
  return `${prefix}-${process.pid}-${Math.random().toString(36).slice(2, 8)}.raw`;
}
