export { main, buildProgram, type MainOptions } from './main.js';
export { describe } from './errors.js';
export { discoverDrivers, type Discovery, type LoadedPackage, type FailedPackage } from './discover.js';
