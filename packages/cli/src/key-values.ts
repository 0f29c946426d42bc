/** Option values of the form k=v,k2=v2 (qemu-img's -o; ",," is a literal comma). */
import { InvalidArgumentError } from 'commander';

export function keyValues(v: string, prev: Record<string, string> = {}): Record<string, string> {
  const out = { ...prev };
  for (const part of v.replace(/,,/g, '\0').split(',')) {
    if (!part) continue;
    const eq = part.indexOf('=');
    if (eq <= 0) {
      if (part === 'help' || part === '?') { out.help = 'true'; continue; }
      throw new InvalidArgumentError(`expected key=value, got "${part.replace(/\0/g, ',')}".`);
    }
    out[part.slice(0, eq)] = part.slice(eq + 1).replace(/\0/g, ',');
  }
  return out;
}
