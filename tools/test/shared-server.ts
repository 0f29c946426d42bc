/**
 * A loopback server of tools/ (nfs-server.sh, iscsi-server.sh) shared by test
 * processes: started if it is not running, and left as found. Test processes register
 * in the server's state dir; when a test run started it (marker file), the last one of
 * them to exit stops it, so overlapping runs neither pull the server from under each
 * other nor leave it behind.
 */
import { execFileSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Makes sure the server of `script` (start|stop|status) runs; idempotent within the process. */
export function ensureSharedServer(script: string, stateDir: string): void {
  const users = path.join(stateDir, 'users');
  fs.mkdirSync(users, { recursive: true });
  const me = path.join(users, String(process.pid));
  if (fs.existsSync(me)) return;
  fs.writeFileSync(me, '');
  const marker = path.join(stateDir, 'started-by-tests');
  let running = true;
  try {
    execFileSync('bash', [script, 'status'], { stdio: 'ignore' });
  } catch {
    running = false;
  }
  if (!running) {
    execFileSync('bash', [script, 'start'], { stdio: ['ignore', 'ignore', 'inherit'] });
    fs.writeFileSync(marker, '');
  }
  process.on('exit', () => {
    fs.rmSync(me, { force: true });
    const others = fs
      .readdirSync(users)
      .map(Number)
      .filter((pid) => pid !== process.pid && alive(pid));
    if (others.length > 0 || !fs.existsSync(marker)) return;
    fs.rmSync(marker, { force: true });
    execFileSync('bash', [script, 'stop'], { stdio: 'ignore' });
  });
}
