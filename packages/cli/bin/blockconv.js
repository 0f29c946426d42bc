#!/usr/bin/env node
// libuv's thread pool carries every file read and write; its default of 4 threads
// would cap the workers' concurrency. It must be sized before first use.
process.env.UV_THREADPOOL_SIZE ??= '16';
// A closed pipe (blockconv map | head) is not an error worth a stack trace.
for (const s of [process.stdout, process.stderr]) s.on('error', (e) => { if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0); else throw e; });
const { main } = await import('../dist/main.bundle.js');
process.exitCode = await main(process.argv);
