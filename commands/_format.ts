// Sizes and rates for people: one unit family everywhere (MiB for sizes, MiB/s for rates);
// below 1 MiB a size is given in KiB or bytes, so that small things never read "0.0 MiB".

const KiB = 1024
const MiB = 1024 * 1024

export function formatBytes(n: number): string {
  if (n < KiB) return `${n} ${n === 1 ? 'byte' : 'bytes'}`
  if (n < MiB) return `${(n / KiB).toFixed(1)} KiB`
  return `${(n / MiB).toFixed(1)} MiB`
}

/** `bytes` in `seconds`, as MiB/s. */
export function formatRate(bytes: number, seconds: number): string {
  const r = seconds > 0 ? bytes / MiB / seconds : 0
  return `${r < 10 ? r.toFixed(1) : r.toFixed(0)} MiB/s`
}
