// Trace search and the waterfall of one trace.
import { api, windowParams } from './api.js';
import { el, go, ms, notice, routeParams, time } from './dom.js';

export async function render(view) {
  const params = routeParams();
  const filter = {
    service: params.get('service') ?? '',
    bt: params.get('bt') ?? '',
    min_duration_ms: params.get('min_duration_ms') ?? '',
    error: params.get('error') ?? '',
  };
  const form = el(
    'form',
    {
      class: 'controls',
      onsubmit: (e) => {
        e.preventDefault();
        go('traces', Object.fromEntries(new FormData(e.target).entries()));
      },
    },
    el('label', {}, 'Service ', el('input', { name: 'service', value: filter.service, size: 12 })),
    el('label', {}, 'Transaction ', el('input', { name: 'bt', value: filter.bt, size: 12 })),
    el('label', {}, 'Slower than (ms) ', el('input', { name: 'min_duration_ms', value: filter.min_duration_ms, size: 6, inputmode: 'numeric' })),
    el('label', {}, 'Errors only ', el('input', { type: 'checkbox', name: 'error', value: 'true', checked: filter.error === 'true' })),
    el('button', { type: 'submit' }, 'Search'),
  );
  view.replaceChildren(el('h1', {}, 'Traces'), form);
  const { traces } = await api('/api/v1/traces', { ...windowParams(), ...filter, limit: 50 });
  if (!traces.length) {
    view.append(notice('No traces match in this window (only sampled requests are kept as traces).'));
    return;
  }
  view.append(
    el(
      'table',
      { class: 'traces', 'data-testid': 'trace-list' },
      el('thead', {}, el('tr', {}, ['Start', 'Service', 'Operation', 'Transaction', 'Duration', 'Errors', 'Trace'].map((h) => el('th', {}, h)))),
      el(
        'tbody',
        {},
        traces.map((t) =>
          el(
            'tr',
            { class: 'clickable', 'data-trace': t.trace_id, onclick: () => go(`trace/${t.trace_id}`) },
            el('td', {}, time(t.start_us / 1000)),
            el('td', {}, t.service),
            el('td', {}, t.operation),
            el('td', { class: 'bt' }, t.bt),
            el('td', { class: 'num' }, ms(t.duration_us / 1000)),
            el('td', { class: `num ${t.error_spans ? 'bad' : ''}` }, t.error_spans),
            el('td', { class: 'mono' }, t.trace_id.slice(0, 12)),
          ),
        ),
      ),
    ),
  );
}

const SERVICE_COLORS = ['#3b6fd8', '#d9822b', '#2e9d5b', '#9b59b6', '#16a085', '#c0392b', '#7f8c8d', '#b7950b'];

/** One trace as a waterfall: a row per span, indented by depth, its bar placed in time. */
export async function renderTrace(view, traceId) {
  const trace = await api(`/api/v1/traces/${encodeURIComponent(traceId)}`);
  const spans = trace.spans;
  const start = Math.min(...spans.map((s) => s.start_us));
  const end = Math.max(...spans.map((s) => s.start_us + s.duration_us));
  const total = Math.max(end - start, 1);
  const services = [...new Set(spans.map((s) => s.service))];
  const color = (service) => SERVICE_COLORS[services.indexOf(service) % SERVICE_COLORS.length];
  const details = el('aside', { class: 'span-details', 'data-testid': 'span-details' }, 'Click a span for its attributes.');
  const rows = spans.map((s) =>
    el(
      'div',
      {
        class: `wf-row ${s.status === 'error' ? 'error' : ''}`,
        'data-span': s.span_id,
        onclick: () => details.replaceChildren(spanDetails(s)),
      },
      el(
        'div',
        { class: 'wf-name', style: { paddingLeft: `${s.depth * 14 + 4}px` } },
        el('b', { style: { color: color(s.service) } }, s.service),
        ' ',
        s.operation,
        s.peer ? el('span', { class: 'muted' }, ` → ${s.peer}`) : '',
      ),
      el(
        'div',
        { class: 'wf-track' },
        el(
          'span',
          {
            class: 'wf-bar',
            style: {
              left: `${(((s.start_us - start) / total) * 100).toFixed(3)}%`,
              width: `${Math.max((s.duration_us / total) * 100, 0.3).toFixed(3)}%`,
              background: s.status === 'error' ? '#d63c3c' : color(s.service),
            },
          },
        ),
      ),
      el('div', { class: 'wf-time' }, ms(s.duration_us / 1000)),
    ),
  );
  view.replaceChildren(
    el('h1', {}, 'Trace ', el('span', { class: 'mono' }, trace.trace_id)),
    el('p', {}, `${spans.length} spans · ${services.length} services · ${ms(total / 1000)} · business transaction ${spans[0]?.bt || '–'} `,
      el('a', { href: '#/traces' }, 'back to search')),
    el('div', { class: 'waterfall', 'data-testid': 'waterfall' }, rows),
    details,
  );
}

function spanDetails(s) {
  const fields = {
    service: `${s.service} ${s.service_version}`,
    instance: s.instance,
    kind: s.kind,
    component: s.component,
    peer: s.peer,
    bt: s.bt,
    status: s.status,
    error: s.error_type ? `${s.error_type}: ${s.error_message}` : '',
    ...s.attributes,
  };
  return el(
    'dl',
    {},
    Object.entries(fields)
      .filter(([, v]) => v !== '' && v !== undefined)
      .map(([k, v]) => [el('dt', {}, k), el('dd', {}, typeof v === 'object' ? JSON.stringify(v) : String(v))]),
  );
}
