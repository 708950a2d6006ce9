// Alerts: what fires now (most severe first), what resolved lately, the SLOs with their burn
// rates and error budget, and whether the evaluator itself is keeping up.
import { api } from './api.js';
import { el, notice, time } from './dom.js';

const KIND_NAMES = {
  rate_drop: 'Rate drop',
  error_rate: 'Error rate',
  latency: 'Latency',
  slo_burn: 'SLO burn',
  stuck: 'Stuck',
  agent_silent: 'Agent silent',
  dependency: 'Dependency',
  evaluator_stalled: 'Evaluator stalled',
};

function alertRow(a) {
  return el(
    'tr',
    { 'data-kind': a.kind, 'data-severity': a.severity, 'data-state': a.state },
    el('td', {}, el('span', { class: `badge severity-${a.severity}` }, a.severity)),
    el('td', {}, KIND_NAMES[a.kind] ?? a.kind),
    el('td', {}, a.service),
    el('td', { class: 'summary' }, a.summary),
    el('td', {}, time(a.started_at * 1000)),
    el('td', {}, a.resolved_at ? time(a.resolved_at * 1000) : '–'),
  );
}

function alertTable(alerts, testid) {
  return el(
    'table',
    { class: 'alerts', 'data-testid': testid },
    el('thead', {}, el('tr', {}, ['Severity', 'Kind', 'Service', 'What', 'Since', 'Resolved'].map((h) => el('th', {}, h)))),
    el('tbody', {}, alerts.map(alertRow)),
  );
}

const burn = (x) => `${x.toFixed(1)}x`;

export async function render(view) {
  const [{ active, recent, evaluator }, { slos }] = await Promise.all([api('/api/v1/alerts'), api('/api/v1/slos')]);
  view.replaceChildren(el('h1', {}, 'Alerts'));
  view.append(
    evaluator.stalled
      ? notice(`Alert evaluation has not completed for ${evaluator.lag_secs} s: no alert can be raised meanwhile. ${evaluator.last_error}`, 'bad')
      : el('p', { class: 'muted', 'data-testid': 'evaluator' }, `Evaluated every ${evaluator.interval_secs} s; last ${evaluator.lag_secs} s ago.`),
  );
  view.append(el('h2', {}, `Firing (${active.length})`));
  view.append(active.length ? alertTable(active, 'active-alerts') : notice('Nothing is firing.', 'good'));
  if (recent.length) {
    view.append(el('h2', {}, 'Resolved lately'), alertTable(recent.slice(0, 50), 'recent-alerts'));
  }
  view.append(el('h2', {}, 'Service-level objectives'));
  if (!slos.length) {
    view.append(el('p', { class: 'muted' }, 'No SLOs: add [[alerts.slos]] to sightline.toml or PUT /api/v1/slos/{name}.'));
    return;
  }
  view.append(
    el(
      'table',
      { class: 'slos', 'data-testid': 'slos' },
      el('thead', {}, el('tr', {}, ['SLO', 'Service', 'Transaction', 'Objective', 'Burn 5 min / 1 h', 'Burn 30 min / 6 h', 'Budget left'].map((h) => el('th', {}, h)))),
      el(
        'tbody',
        {},
        slos.flatMap((s) =>
          s.objectives.map((o) =>
            el(
              'tr',
              { 'data-slo': s.slo.name },
              el('td', {}, s.slo.name),
              el('td', {}, s.slo.service),
              el('td', {}, s.slo.bt || s.slo.operation),
              el('td', {}, o.objective === 'latency' ? `${o.target * 100}% under ${s.slo.latency_ms} ms` : `${o.target * 100}% without error`),
              el('td', { class: `num ${o.alert === 'critical' ? 'bad' : ''}` }, `${burn(o.burn_rates.last_5m)} / ${burn(o.burn_rates.last_1h)}`),
              el('td', { class: `num ${o.alert === 'warning' ? 'bad' : ''}` }, `${burn(o.burn_rates.last_30m)} / ${burn(o.burn_rates.last_6h)}`),
              el('td', { class: `num ${o.budget_remaining < 0 ? 'bad' : ''}` }, `${Math.round(o.budget_remaining * 100)}%`),
            ),
          ),
        ),
      ),
    ),
  );
}
