/**
 * @blockconv/driver-http: http:// and https:// sources (read-only), in TypeScript over
 * node:http. Register with `registry.register(...drivers)`.
 */
import type { BlockDriver } from '@blockconv/core';
import { httpDriver } from './http.js';

export { httpDriver, openHttp, HttpRangeBackend, HttpStreamBackend } from './http.js';

export const drivers: readonly BlockDriver[] = [httpDriver];
export default drivers;
