// The NBD driver against real servers from Debian (qemu-nbd, nbdkit).
await import('./suites/conformance.js');
await import('./suites/driver.js');
await import('./suites/errors.js');
await import('./suites/cli.js');
await import('./suites/serve.js');
await import('./suites/install.js');
await import('./suites/server.js');
