/**
 * `blockconv dashboard`: bull-board's web UI over the convert queue — queues, jobs, their
 * progress (bytes, rate, ETA, percent), results (checksums, each target's outcome) and
 * failures. bull-board is the UI; this is its configuration. Bound to 127.0.0.1 unless
 * told otherwise: the page can retry and remove jobs, and has no login of its own.
 * Jobs never hold secrets (jobs.ts), so neither does the page.
 */
import type { Server } from 'node:http';
import { Queue } from 'bullmq';
import { createBullBoard } from '@bull-board/api';
import { BullMQAdapter } from '@bull-board/api/bullMQAdapter';
import { ExpressAdapter } from '@bull-board/express';
import express from 'express';
import { BlockError } from '@blockconv/core';
import { CONVERT_QUEUE, checkRedis, connection } from './jobs.js';

export interface DashboardOptions {
  readonly redis: string;
  /** TCP port; 0 picks a free one. */
  readonly port: number;
  /** Address to listen on; default 127.0.0.1. */
  readonly host?: string;
  /** No retry, clean or promote buttons. */
  readonly readOnly?: boolean;
}

export interface Dashboard {
  /** http://host:port/ */
  readonly url: string;
  close(): Promise<void>;
}

export async function startDashboard(o: DashboardOptions): Promise<Dashboard> {
  await checkRedis(o.redis);
  const host = o.host ?? '127.0.0.1';
  const queue = new Queue(CONVERT_QUEUE, { connection: connection(o.redis) });
  queue.on('error', () => {});
  const serverAdapter = new ExpressAdapter();
  serverAdapter.setBasePath('/');
  createBullBoard({
    queues: [new BullMQAdapter(queue, { readOnlyMode: o.readOnly === true, description: 'blockconv convert jobs' })],
    serverAdapter,
    options: { uiConfig: { boardTitle: 'blockconv fleet' } },
  });
  const app = express();
  app.use('/', serverAdapter.getRouter());
  const server = await new Promise<Server>((resolve, reject) => {
    const s = app.listen(o.port, host);
    s.once('listening', () => resolve(s));
    s.once('error', (err: NodeJS.ErrnoException) =>
      reject(
        new BlockError(err.code ?? 'EIO', `dashboard: cannot listen on ${host}:${o.port}: ${err.message}`, {
          field: 'port',
        }),
      ),
    );
  });
  const addr = server.address();
  const port = typeof addr === 'object' && addr ? addr.port : o.port;
  return {
    url: `http://${host.includes(':') ? `[${host}]` : host}:${port}/`,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      await queue.close();
    },
  };
}
