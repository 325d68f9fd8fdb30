// The QMP client lives in the library (src/qemu/qmp.ts: `snapctl save` and `restore` use it);
// tests, benchmarks and the demo take the same one from here.
export { QmpClient, QmpError, type QmpEvent } from '../src/qemu/qmp.js'
