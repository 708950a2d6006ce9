// Services and their agents: versions (deployment times), instances, agent status, and the
// business transactions stuck right now with the call they are inside.
import { api, windowParams } from './api.js';
import { el, go, ms, notice, time } from './dom.js';

/** Stuck transactions listed per service, longest open first. */
const STUCK_ROWS = 20;

export async function render(view) {
  const { services } = await api('/api/v1/services', windowParams());
  view.replaceChildren(el('h1', {}, 'Services & agents'));
  if (!services.length) {
    view.append(notice('No services have reported in this window.'));
    return;
  }
  const stuckTotal = services.reduce((n, s) => n + s.stuck.length, 0);
  if (stuckTotal) {
    view.append(el('p', { class: 'notice bad', 'data-testid': 'stuck-banner' }, `${stuckTotal} business transactions are stuck right now.`));
  }
  for (const s of services) {
    view.append(
      el(
        'section',
        { class: 'service-card', 'data-service': s.name },
        el('h2', {}, s.name),
        el('p', {}, 'Versions: ', s.versions.map((v) => el('span', { class: 'chip', title: `first seen ${new Date(v.first_seen * 1000).toLocaleString()}` }, `${v.version} (since ${time(v.first_seen * 1000)})`))),
        s.agents.length
          ? el(
              'table',
              { class: 'agents' },
              el('thead', {}, el('tr', {}, ['Agent instance', 'Version', 'Status', 'Last heartbeat', 'Queue', 'Dropped spans'].map((h) => el('th', {}, h)))),
              el(
                'tbody',
                {},
                s.agents.map((a) =>
                  el(
                    'tr',
                    {},
                    el('td', { class: 'mono' }, a.instance),
                    el('td', {}, a.version),
                    el('td', {}, el('span', { class: `badge agent-${a.status}` }, a.status)),
                    el('td', {}, time(a.last_heartbeat * 1000)),
                    el('td', { class: 'num' }, a.queue_depth),
                    el('td', { class: `num ${a.dropped_spans ? 'bad' : ''}` }, a.dropped_spans),
                  ),
                ),
              ),
            )
          : el('p', { class: 'muted' }, 'No Sightline agent (spans arrive over OTLP).'),
        s.stuck.length
          ? el(
              'table',
              { class: 'stuck', 'data-testid': 'stuck' },
              el('thead', {}, el('tr', {}, ['Stuck transaction', 'Operation', 'Open for', 'Inside', 'Instance'].map((h) => el('th', {}, h)))),
              el(
                'tbody',
                {},
                s.stuck.slice(0, STUCK_ROWS).map((x) =>
                  el(
                    'tr',
                    { class: 'clickable', onclick: () => go(`trace/${x.trace_id}`), title: 'Open the trace (once it finishes)' },
                    el('td', { class: 'bt' }, x.bt),
                    el('td', {}, x.operation),
                    el('td', { class: 'num bad' }, ms(x.elapsed_ms)),
                    el('td', {}, x.current_operation ? `${x.current_peer} ${x.current_operation}` : '–'),
                    el('td', { class: 'mono' }, x.instance),
                  ),
                ),
              ),
            )
          : '',
        s.stuck.length > STUCK_ROWS ? el('p', { class: 'muted' }, `The ${STUCK_ROWS} longest open of ${s.stuck.length} stuck.`) : '',
      ),
    );
  }
}
