export { main, buildProgram, describe, type MainOptions } from './main.js';
export { discoverDrivers, type Discovery, type LoadedPackage, type FailedPackage } from './discover.js';
