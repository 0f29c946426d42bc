#!/usr/bin/env node
// libuv's thread pool (4 threads unless UV_THREADPOOL_SIZE says otherwise) carries
// the file reads and writes. It is not sized here: an ES module entry is read through
// that pool, so it exists before this line could run, and 16 threads measured no
// faster than 4 on this project's machines (docs/PERFORMANCE.md, issue 16).
// A closed pipe (blockconv map | head) is not an error worth a stack trace.
for (const s of [process.stdout, process.stderr])
  s.on('error', (e) => {
    if (e.code === 'EPIPE') process.exit(process.exitCode ?? 0);
    else throw e;
  });
const { main } = await import('../dist/main.bundle.js');
process.exitCode = await main(process.argv);
