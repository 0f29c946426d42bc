/**
 * Pass-through layers (the raw format, future filters) present another backend as
 * their own. Copying its members one by one silently drops every member added to
 * BlockBackend later (the raw format once lost canReadHolesCheaply that way), so this
 * forwards all of them: data as it is, accessors live, methods bound to the inner
 * backend (whose private state they need). Built once at open; nothing per request.
 */
import type { BlockBackend } from './types.js';

export function forwardBackend(inner: BlockBackend, overrides: Partial<BlockBackend>): BlockBackend {
  const out: object = {};
  for (let o: object | null = inner; o && o !== Object.prototype; o = Object.getPrototypeOf(o) as object | null) {
    for (const key of Object.getOwnPropertyNames(o)) {
      if (key === 'constructor' || key in overrides || Object.hasOwn(out, key)) continue;
      const d = Object.getOwnPropertyDescriptor(o, key)!;
      if (d.get) {
        Object.defineProperty(out, key, {
          get: () => (inner as unknown as Record<string, unknown>)[key],
          enumerable: true,
          configurable: true,
        });
      } else {
        const v = d.value as unknown;
        Object.defineProperty(out, key, {
          value: typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(inner) : v,
          enumerable: true,
          configurable: true,
        });
      }
    }
  }
  // Accessors among the overrides stay accessors (live capabilities), values stay values.
  for (const [key, d] of Object.entries(Object.getOwnPropertyDescriptors(overrides))) {
    Object.defineProperty(out, key, { ...d, enumerable: true, configurable: true });
  }
  return out as BlockBackend;
}
