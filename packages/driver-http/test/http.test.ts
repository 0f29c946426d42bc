// The HTTP driver against Debian's nginx and a server of ours that injects failures.
await import('./suites/faults.js');
await import('./suites/nginx.js');
await import('./suites/install.js');
