// Version comparison: per-BT verdicts from the same engine as `sightline gate`, the two
// latency distributions overlaid, time per stage side by side, and the p99 over time with
// deployment markers.
import { api, windowParams } from './api.js';
import { distributions, timeline } from './charts.js';
import { change, el, go, ms, notice, percent, routeParams, STAGE_COLORS } from './dom.js';

const BASELINE_COLOR = '#3b6fd8';
const CANDIDATE_COLOR = '#d63c3c';

export async function render(view) {
  const params = routeParams();
  const { services } = await api('/api/v1/services', windowParams());
  const withVersions = services.filter((s) => s.versions.length >= 2);
  const service = params.get('service') ?? withVersions[0]?.name ?? '';
  const versions = (services.find((s) => s.name === service)?.versions ?? []).map((v) => v.version);
  const baseline = params.get('baseline') ?? versions[0] ?? '';
  const candidate = params.get('candidate') ?? versions[1] ?? '';
  const pick = (name, value, options) =>
    el('select', { name }, options.map((o) => el('option', { value: o, selected: o === value }, o)));
  const form = el(
    'form',
    {
      class: 'controls',
      onsubmit: (e) => {
        e.preventDefault();
        const data = new FormData(e.target);
        go('compare', Object.fromEntries(data.entries()));
      },
    },
    el('label', {}, 'Service ', el('select', {
      name: 'service',
      onchange: (e) => go('compare', { service: e.target.value }),
    }, services.map((s) => el('option', { value: s.name, selected: s.name === service }, s.name)))),
    el('label', {}, 'Baseline ', pick('baseline', baseline, versions)),
    el('label', {}, 'Candidate ', pick('candidate', candidate, versions)),
    el('button', { type: 'submit' }, 'Compare'),
  );
  view.replaceChildren(el('h1', {}, 'Compare versions'), form);
  if (!service || !baseline || !candidate || baseline === candidate) {
    view.append(notice('Pick a service with two versions in the window (a canary beside production, or before and after a deploy).'));
    return;
  }
  const window = params.get('from') ? { from: params.get('from'), to: params.get('to') ?? '' } : windowParams();
  const [report, { transactions }] = await Promise.all([
    api('/api/v1/compare', { service, baseline, candidate, ...window }),
    api('/api/v1/transactions', { ...window, service }),
  ]);
  const markers = (services.find((s) => s.name === service)?.versions ?? [])
    .filter((v) => v.version === baseline || v.version === candidate)
    .reduce((merged, v) => {
      // Versions deployed in the same minute share one marker.
      const at = merged.find((m) => m.time === v.first_seen * 1000);
      if (at) at.label += `, ${v.version}`;
      else merged.push({ time: v.first_seen * 1000, label: v.version });
      return merged;
    }, []);
  view.append(
    el(
      'p',
      { class: `verdict verdict-${report.verdict}`, 'data-testid': 'overall-verdict' },
      `${service} ${candidate} vs ${baseline}: ${report.verdict.toUpperCase()}`,
      report.reweighted_mean_ratio ? ` · mean ${change(report.reweighted_mean_ratio)} at the baseline's traffic mix` : '',
      ` · ${report.block_seconds} s blocks`,
    ),
    verdictTable(report),
  );
  for (const bt of report.transactions) {
    const sides = report.sides[bt.bt];
    const series = transactions.find((t) => t.bt === bt.bt)?.series ?? [];
    const card = el('section', { class: `bt-card verdict-border-${bt.verdict}`, 'data-bt': bt.bt });
    const dist = el('div', { class: 'chart' });
    const line = el('div', { class: 'chart' });
    card.append(
      el('h2', {}, bt.bt, ' ', el('span', { class: `badge verdict-${bt.verdict}` }, bt.verdict)),
      el('p', { class: 'reason' }, bt.reason),
      el(
        'div',
        { class: 'charts' },
        el('figure', {}, el('figcaption', {}, 'Latency distribution'), dist),
        el('figure', {}, el('figcaption', {}, 'Time per call by stage'), stageBars(sides, bt, baseline, candidate)),
        el('figure', {}, el('figcaption', {}, `p99 per minute in ${service}, deployments marked`), line),
      ),
    );
    view.append(card);
    distributions(dist, [
      { label: baseline, color: BASELINE_COLOR, histogram: sides.baseline.histogram },
      { label: candidate, color: CANDIDATE_COLOR, histogram: sides.candidate.histogram },
    ], 460);
    if (series.length > 1) {
      timeline(line, series.map((p) => p.minute), series.map((p) => p.p99_ms), markers, 460);
    } else {
      line.append(notice('Too few minutes yet.'));
    }
  }
}

function metric(m, points = false) {
  if (!m) return el('td', { class: 'num muted' }, '–');
  const fmt = points
    ? (v) => `${v >= 0 ? '+' : ''}${(v * 100).toFixed(2)}pt`
    : (v) => change(v);
  return el(
    'td',
    { class: `num verdict-text-${m.verdict}`, title: `interval ${fmt(m.low)} .. ${fmt(m.high)}, band ${points ? fmt(m.band) : `+${(m.band * 100).toFixed(0)}%`}` },
    fmt(m.estimate),
    el('small', {}, ` [${fmt(m.low)}, ${fmt(m.high)}]`),
  );
}

function verdictTable(report) {
  return el(
    'table',
    { class: 'verdicts', 'data-testid': 'verdicts' },
    el('thead', {}, el('tr', {}, ['Transaction', 'Verdict', 'p50', 'p99', 'Errors', 'Stage that grew', 'Calls (base / cand)', 'Reason'].map((h) => el('th', {}, h)))),
    el(
      'tbody',
      {},
      report.transactions.map((bt) =>
        el(
          'tr',
          { 'data-bt': bt.bt, 'data-verdict': bt.verdict, 'data-stage': bt.stage?.[0] ?? '' },
          el('td', { class: 'bt' }, bt.bt),
          el('td', {}, el('span', { class: `badge verdict-${bt.verdict}` }, bt.verdict)),
          metric(bt.p50),
          metric(bt.p99),
          metric(bt.errors, true),
          el('td', { class: 'stage-grew' }, bt.stage ? `${bt.stage[0]} ${bt.stage[1] >= 0 ? '+' : ''}${ms(bt.stage[1])}` : '–'),
          el('td', { class: 'num' }, `${bt.baseline_calls} / ${bt.candidate_calls}`),
          el('td', { class: 'reason' }, bt.reason),
        ),
      ),
    ),
  );
}

/** Mean ms per call by stage, baseline above candidate, on one scale. */
function stageBars(sides, bt, baseline, candidate) {
  const stages = [...new Set([...Object.keys(sides.baseline.stages_ms), ...Object.keys(sides.candidate.stages_ms)])];
  const total = (s) => Object.values(s.stages_ms).reduce((a, b) => a + b, 0);
  const max = Math.max(total(sides.baseline), total(sides.candidate), 1e-9);
  const row = (label, side) =>
    el(
      'div',
      { class: 'stage-row' },
      el('span', { class: 'stage-label' }, label),
      el(
        'div',
        { class: 'stage-bar wide', style: { width: `${((total(side) / max) * 100).toFixed(1)}%` } },
        stages.map((stage) => {
          const value = side.stages_ms[stage] ?? 0;
          return el(
            'span',
            {
              class: `stage ${bt.stage?.[0] === stage ? 'grew' : ''}`,
              'data-stage': stage,
              style: { width: `${((value / total(side)) * 100).toFixed(1)}%`, background: STAGE_COLORS[stage] ?? '#999' },
              title: `${stage}: ${ms(value)} per call`,
            },
            value / max >= 0.12 ? `${stage} ${ms(value)}` : '',
          );
        }),
      ),
    );
  return el(
    'div',
    { class: 'stage-compare', 'data-testid': 'stage-bars' },
    row(baseline, sides.baseline),
    row(candidate, sides.candidate),
    el('p', { class: 'muted' }, `errors ${percent(bt.baseline_error_rate, 2)} → ${percent(bt.candidate_error_rate, 2)}`),
  );
}
