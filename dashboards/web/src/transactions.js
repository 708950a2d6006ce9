// Business transactions: RED per (service, BT) with a sparkline and the stage breakdown.
import { api, windowParams } from './api.js';
import { sparkline } from './charts.js';
import { el, go, ms, notice, percent, routeParams, STAGE_COLORS } from './dom.js';

/** Rows shown before "show all": a table of hundreds of rows helps nobody at first sight. */
const FIRST_ROWS = 50;

/**
 * The BT table, busiest first. `filter` (optional): { label, bts: Set, services: Set|undefined }.
 */
export function btTable(transactions, filter, limit = FIRST_ROWS) {
  const matching = transactions
    .filter((t) => !filter || (filter.bts.has(t.bt) && (!filter.services || filter.services.has(t.service))))
    .sort((a, b) => b.calls - a.calls);
  const rows = matching.slice(0, limit);
  const table = el(
    'table',
    { class: 'bt-table', 'data-testid': 'bt-table' },
    el(
      'thead',
      {},
      el(
        'tr',
        {},
        ['Service', 'Business transaction', 'Calls/min', 'Errors', 'p50', 'p99', 'Calls (per minute)', 'Where the time goes'].map(
          (h) => el('th', {}, h),
        ),
      ),
    ),
  );
  const body = el('tbody');
  for (const t of rows) {
    const spark = el('td', { class: 'spark' });
    const row = el(
      'tr',
      {
        'data-bt': t.bt,
        'data-service': t.service,
        class: 'clickable',
        title: `Traces of ${t.bt} in ${t.service}`,
        onclick: () => go('traces', { service: t.service, bt: t.bt }),
      },
      el('td', {}, t.service),
      el('td', { class: 'bt' }, t.bt),
      el('td', { class: 'num' }, t.rate_per_min.toFixed(1)),
      el('td', { class: `num ${t.error_rate >= 0.05 ? 'bad' : ''}` }, `${t.errors} (${percent(t.error_rate)})`),
      el('td', { class: 'num' }, ms(t.p50_ms)),
      el('td', { class: 'num' }, ms(t.p99_ms)),
      spark,
      el('td', {}, stageBar(t.stages)),
    );
    body.append(row);
    // Drawn after the page's first paint: sparklines are the least urgent thing on it.
    setTimeout(() => {
      const series = t.series ?? [];
      if (series.length > 1) sparkline(spark, series.map((p) => p.minute), series.map((p) => p.calls));
    }, 0);
  }
  table.append(body);
  if (matching.length > rows.length) {
    const more = el(
      'button',
      { onclick: () => wrapper.replaceWith(btTable(transactions, filter, Infinity)) },
      `show all ${matching.length} transactions`,
    );
    const wrapper = el('div', {}, table, el('p', { class: 'muted' }, `The ${rows.length} busiest of ${matching.length}. `, more));
    return wrapper;
  }
  if (!rows.length) {
    return el('div', {}, table, notice(filter ? `No transactions through ${filter.label}.` : 'No transactions in this window yet.'));
  }
  return table;
}

/** Shares of a BT's time by stage, as one stacked bar with the mean ms of each stage. */
export function stageBar(stages) {
  const bar = el('div', { class: 'stage-bar' });
  for (const s of stages ?? []) {
    if (s.share < 0.005) continue;
    bar.append(
      el(
        'span',
        {
          class: `stage stage-${s.stage}`,
          'data-stage': s.stage,
          style: { width: `${(s.share * 100).toFixed(1)}%`, background: STAGE_COLORS[s.stage] ?? '#999' },
          title: `${s.stage}: ${percent(s.share, 0)} of the time, ${ms(s.mean_ms)} per call`,
        },
        s.share >= 0.15 ? s.stage : '',
      ),
    );
  }
  return bar;
}

/** The Transactions view: every BT, or one service's. */
export async function render(view) {
  const params = routeParams();
  const service = params.get('service') ?? '';
  const { transactions } = await api('/api/v1/transactions', { ...windowParams(), service });
  const services = [...new Set(transactions.map((t) => t.service))].sort();
  const select = el(
    'select',
    { onchange: (e) => go('transactions', { service: e.target.value }) },
    el('option', { value: '' }, 'all services'),
    services.map((s) => el('option', { value: s, selected: s === service }, s)),
  );
  view.replaceChildren(
    el('h1', {}, 'Business transactions'),
    el('div', { class: 'controls' }, el('label', {}, 'Service ', select)),
    btTable(transactions),
    legend(),
  );
}

export function legend() {
  return el(
    'p',
    { class: 'legend' },
    'Stages: ',
    Object.entries(STAGE_COLORS).map(([stage, color]) =>
      el('span', { class: 'legend-item' }, el('i', { style: { background: color } }), stage),
    ),
  );
}
