// Request service times of a lazy restore, summarised as README's `latencyMs`.

export function percentiles(values: number[]): { p50: number; p99: number; max: number } {
  if (values.length === 0) return { p50: 0, p99: 0, max: 0 }
  const v = Float64Array.from(values).sort()
  const at = (q: number): number => v[Math.min(v.length - 1, Math.floor(q * v.length))]
  const round = (x: number): number => Math.round(x * 1000) / 1000
  return { p50: round(at(0.5)), p99: round(at(0.99)), max: round(v[v.length - 1]) }
}
