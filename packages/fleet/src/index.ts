/**
 * @blockconv/fleet: convert jobs across many hosts on BullMQ + Redis. BullMQ brings the
 * jobs, retries with backoff, progress and concurrency; this package adds what is
 * specific to block copies:
 * - a job's last checkpoint (the core's ResumeState) is stored in the job's data, so a
 *   retried job resumes where it stopped, on whichever worker picks it up (worker.ts);
 * - caps per storage server across all workers (caps.ts);
 * - batches: one template to many targets, read once for the targets a job shares (batch.ts);
 * - jobs never carry secrets, only references resolved on the workers (jobs.ts);
 * - a dashboard, bull-board's (dashboard.ts).
 * The core never depends on this package; it uses only the core's public API.
 */
export * from './jobs.js';
export * from './worker.js';
export { parseBatch, type ConvertBatch } from './batch.js';
export { acquireCaps, capHolders, getServerCaps, serverOf, setServerCaps, CapLease, CAPS_KEY } from './caps.js';
export { startDashboard, type Dashboard, type DashboardOptions } from './dashboard.js';
