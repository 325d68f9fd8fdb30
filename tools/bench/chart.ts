// The ratios of the table as a horizontal bar chart, in plain SVG (no dependency): one group per
// phase, one bar per contender, a line at 1.0 (the exec-cat baseline) and dashed target lines.
import type { ContenderResult } from './report.js'

const ROW = 22
const LABEL_W = 170
const PLOT_W = 460
const PAD = 16

export function renderChart(results: ContenderResult[], title: string): string {
  const phases = (['save', 'restore'] as const).filter((p) => results.some((r) => r.phase === p))
  const maxRatio = Math.max(1.2, ...results.map((r) => r.ratio ?? 0))
  const xMax = Math.ceil(maxRatio * 1.1 * 4) / 4
  const x = (v: number): number => LABEL_W + (v / xMax) * PLOT_W
  const out: string[] = []
  let y = PAD + 24
  for (const phase of phases) {
    const rows = results.filter((r) => r.phase === phase)
    out.push(text(PAD, y + 8, `${phase} (median time / exec-cat)`, 'font-weight="bold"'))
    y += ROW
    const top = y
    for (const r of rows) {
      out.push(text(LABEL_W - 8, y + 15, r.id, 'text-anchor="end"'))
      if (r.ratio !== undefined) {
        const w = Math.max(1, x(r.ratio) - LABEL_W)
        const fill = r.id.startsWith('snapctl') ? '#d9822b' : r.id === 'exec-cat' ? '#777' : '#4a7ab5'
        out.push(`<rect x="${LABEL_W}" y="${y + 3}" width="${w.toFixed(1)}" height="${ROW - 6}" fill="${fill}"/>`)
        out.push(text(LABEL_W + w + 4, y + 15, `${r.ratio.toFixed(2)}x  ${r.medianS!.toFixed(3)} s`))
      } else {
        out.push(text(LABEL_W + 4, y + 15, r.error ? 'failed' : 'not measured', 'fill="#b00"'))
      }
      y += ROW
    }
    const limits = phase === 'save' ? [1.05, 1.1] : [1.1]
    out.push(vline(x(1), top, y, '#000', ''))
    for (const [i, l] of limits.entries()) {
      out.push(vline(x(l), top, y, '#b00', 'stroke-dasharray="4 3"'))
      // Two limits sit close together: the lower one is labelled on its left.
      const left = i === 0 && limits.length > 1
      out.push(text(x(l) + (left ? -2 : 2), top - 3, `${l.toFixed(2)}`, `fill="#b00" font-size="10"${left ? ' text-anchor="end"' : ''}`))
    }
    y += ROW / 2
  }
  // x axis
  for (let v = 0; v <= xMax + 1e-9; v += 0.25) {
    out.push(vline(x(v), y, y + 4, '#000', ''))
    out.push(text(x(v), y + 16, v.toFixed(2), 'text-anchor="middle" font-size="10"'))
  }
  const height = y + 28
  const width = LABEL_W + PLOT_W + 140
  return [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" font-family="sans-serif" font-size="12">`,
    `<rect width="100%" height="100%" fill="#fff"/>`,
    text(PAD, PAD + 6, title, 'font-weight="bold" font-size="14"'),
    ...out,
    '</svg>',
    '',
  ].join('\n')
}

function text(x: number, y: number, s: string, attrs = ''): string {
  return `<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" ${attrs}>${escapeXml(s)}</text>`
}

function vline(x: number, y1: number, y2: number, stroke: string, attrs: string): string {
  return `<line x1="${x.toFixed(1)}" y1="${y1}" x2="${x.toFixed(1)}" y2="${y2}" stroke="${stroke}" ${attrs}/>`
}

function escapeXml(s: string): string {
  return s.replace(/[&<>"]/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;' })[c]!)
}
