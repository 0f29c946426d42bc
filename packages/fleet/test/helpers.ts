/** Fixtures shared by the fleet tests. */
import type { Queue } from 'bullmq';

/** Waits until the job reports more than `bytes` done (or `timeoutMs` passed: the test's assertions then say what is wrong). */
export async function waitForProgress(queue: Queue, id: string, bytes: number, timeoutMs = 20_000): Promise<void> {
  for (const end = Date.now() + timeoutMs; Date.now() < end;) {
    const job = await queue.getJob(id);
    if (((job?.progress as { done?: number } | undefined)?.done ?? 0) > bytes) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}
