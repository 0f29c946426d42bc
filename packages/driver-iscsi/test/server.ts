// The loopback iSCSI target for tests, shared by the iSCSI packages.
export * from '../../../tools/test/iscsi-server.js';
