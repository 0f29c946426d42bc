/**
 * @blockconv/driver-nbd: the "nbd" protocol (nbd://, nbd+unix://), a client of the NBD
 * protocol in TypeScript with no native parts. Register with `registry.register(...drivers)`.
 */
import type { BlockDriver } from '@blockconv/core';
import { nbdDriver } from './nbd.js';

export { nbdDriver, openNbd, parseNbdUrl, NbdBackend, type NbdUrl } from './nbd.js';
export { NbdConnection, type Endpoint, type ConnectOptions, type ExportInfo } from './connection.js';
export { NbdServer, type NbdServerOptions } from './server.js';
export * as protocol from './protocol.js';

export const drivers: readonly BlockDriver[] = [nbdDriver];
export default drivers;
