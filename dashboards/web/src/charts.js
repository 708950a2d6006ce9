// Charts, drawn by uPlot: sparklines, overlaid latency distributions, a timeline with
// deployment markers.
import uPlot from 'uplot';

/** A tiny line of a series (x: Unix ms) with no axes. */
export function sparkline(container, times, values, color = '#3b6fd8') {
  const opts = {
    width: 120,
    height: 28,
    pxAlign: 0,
    cursor: { show: false },
    legend: { show: false },
    select: { show: false },
    scales: { x: { time: false } },
    axes: [{ show: false }, { show: false }],
    series: [{}, { stroke: color, width: 1.5, fill: `${color}22`, points: { show: false } }],
  };
  return new uPlot(opts, [times.map((t) => t / 1000), values], container);
}

/**
 * Two latency distributions overlaid: each side's share of calls per latency bucket (log x).
 * `sides` is [{ label, color, histogram: [[bucket µs, count], ...] }].
 */
export function distributions(container, sides, width = 520) {
  const buckets = [...new Set(sides.flatMap((s) => s.histogram.map(([b]) => b)))].sort((a, b) => a - b);
  // Coarser bins (10 per decade) so that the shapes read as curves, not combs.
  const bin = (us) => Math.round(Math.log10(Math.max(us, 1)) * 10) / 10;
  const bins = [...new Set(buckets.map(bin))].sort((a, b) => a - b);
  const index = new Map(bins.map((b, i) => [b, i]));
  const series = sides.map((side) => {
    const total = side.histogram.reduce((sum, [, c]) => sum + c, 0) || 1;
    const values = new Array(bins.length).fill(0);
    for (const [bucket, c] of side.histogram) values[index.get(bin(bucket))] += c / total;
    return values;
  });
  const opts = {
    width,
    height: 200,
    scales: { x: { time: false } },
    axes: [
      { label: 'latency', values: (u, ticks) => ticks.map((t) => fmtMs(10 ** t / 1000)) },
      { label: 'share of calls', values: (u, ticks) => ticks.map((t) => `${(t * 100).toFixed(0)}%`) },
    ],
    series: [
      { label: 'latency', value: (u, v) => (v === null ? '–' : fmtMs(10 ** v / 1000)) },
      ...sides.map((s) => ({
        label: s.label,
        stroke: s.color,
        fill: `${s.color}33`,
        width: 2,
        paths: uPlot.paths.stepped({ align: 0 }),
        value: (u, v) => (v === null ? '–' : `${(v * 100).toFixed(1)}%`),
      })),
    ],
  };
  return new uPlot(opts, [bins, ...series], container);
}

/** p99 per minute with vertical lines where versions first appeared. */
export function timeline(container, times, values, markers, width = 520) {
  const opts = {
    width,
    height: 180,
    axes: [{}, { label: 'p99', values: (u, ticks) => ticks.map((t) => fmtMs(t)) }],
    series: [{}, { label: 'p99', stroke: '#3b6fd8', width: 1.5, value: (u, v) => (v === null ? '–' : fmtMs(v)) }],
    hooks: {
      draw: [
        (u) => {
          const { ctx } = u;
          ctx.save();
          ctx.font = `${11 * devicePixelRatio}px sans-serif`;
          for (const marker of markers) {
            const x = u.valToPos(marker.time / 1000, 'x', true);
            if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
            ctx.strokeStyle = '#c0392b';
            ctx.setLineDash([4, 3]);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
            ctx.fillStyle = '#c0392b';
            ctx.fillText(`deploy ${marker.label}`, x + 4, u.bbox.top + 12 * devicePixelRatio);
          }
          ctx.restore();
        },
      ],
    },
  };
  return new uPlot(opts, [times.map((t) => t / 1000), values], container);
}

function fmtMs(value) {
  if (value >= 1000) return `${(value / 1000).toFixed(value >= 10_000 ? 0 : 1)} s`;
  if (value >= 1) return `${value.toFixed(value >= 10 ? 0 : 1)} ms`;
  return `${(value * 1000).toFixed(0)} µs`;
}
