/** Fixtures for the iSCSI driver tests: the loopback target, the CLI, failures. */
export * from './server.js';
export { CLI, cli, failure, run } from '../../../tools/test/fixtures.js';
