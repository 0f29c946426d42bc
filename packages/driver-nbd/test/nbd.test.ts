// The NBD driver against real servers from Debian (qemu-nbd, nbdkit).
await import('./suites/conformance.js');
