// The loopback NFS server for tests, shared by the NFS packages.
export * from '../../../tools/test/nfs-server.js';
