/**
 * @blockconv/driver-raw: the "file" protocol (local files and block devices) and
 * the "raw" format. Register with `registry.register(...drivers)`.
 */
import type { BlockDriver } from '@blockconv/core';
import { fileDriver } from './file.js';
import { rawDriver } from './raw.js';

export { fileDriver, openFile, createFile, type FileBackend } from './file.js';
export { rawDriver, type RawBackend } from './raw.js';

export const drivers: readonly BlockDriver[] = [fileDriver, rawDriver];
export default drivers;
