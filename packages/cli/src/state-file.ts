/**
 * Where `convert` keeps its resume state: one JSON file per target, replaced atomically
 * (written beside, synced, renamed), so that a kill at any instant leaves the previous
 * state or the new one, never half of one. Holds no secret (the core redacts locations).
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { BlockError, checkStateShape, redactLocation, type ResumeState } from '@blockconv/core';

/** The state directory: $BLOCKCONV_STATE_DIR, else $XDG_STATE_HOME/blockconv, else ~/.local/state/blockconv. */
export function stateDirectory(): string {
  if (process.env.BLOCKCONV_STATE_DIR) return process.env.BLOCKCONV_STATE_DIR;
  const base = process.env.XDG_STATE_HOME || path.join(os.homedir(), '.local', 'state');
  return path.join(base, 'blockconv');
}

/** The default state file of a convert to `target`: named by a digest of its redacted location. */
export function defaultStatePath(target: string): string {
  const key = createHash('sha256').update(redactLocation(target)).digest('hex').slice(0, 16);
  return path.join(stateDirectory(), `convert-${key}.json`);
}

/** The state in `file`, undefined if there is none; a clear error if it cannot be read. */
export async function readState(file: string): Promise<ResumeState | undefined> {
  let text: string;
  try {
    text = await fs.readFile(file, 'utf8');
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new BlockError('EIO', `cannot read the resume state ${file}: ${(err as Error).message}`, { field: 'state' });
  }
  let state: unknown;
  try {
    state = JSON.parse(text);
  } catch (err) {
    throw new BlockError(
      'EINVAL',
      `the resume state ${file} is not JSON (${(err as Error).message}): remove it to start again`,
      { field: 'state' },
    );
  }
  try {
    checkStateShape(state);
  } catch (err) {
    throw new BlockError('EINVAL', `the resume state ${file}: ${(err as Error).message}`, { field: 'state' });
  }
  return state;
}

export async function writeState(file: string, state: ResumeState): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  const tmp = `${file}.${process.pid}.tmp`;
  const fh = await fs.open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(`${JSON.stringify(state, null, 1)}\n`);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, file);
}

export async function removeState(file: string): Promise<void> {
  await fs.rm(file, { force: true });
}
