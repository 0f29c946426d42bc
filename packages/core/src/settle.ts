/**
 * Waits for every part and throws the first error, so that nothing still uses a
 * caller's buffer after a request has failed. For the pieces of one request: the
 * gate's split requests, a driver's requests over several connections or tasks.
 */
export async function settleAll(parts: ReadonlyArray<Promise<unknown>>): Promise<void> {
  if (parts.length === 1) {
    await parts[0];
    return;
  }
  const results = await Promise.allSettled(parts);
  for (const r of results) if (r.status === 'rejected') throw r.reason;
}
