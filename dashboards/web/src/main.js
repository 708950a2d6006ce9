// The dashboard's entry: routes the URL fragment (#/topology, #/compare?..., #/trace/<id>) to
// a view, and renders it again when the window changes or every 30 s.
import 'uplot/dist/uPlot.min.css';
import './style.css';
import { TokenRequired, api, login, timedApi, windowParams } from './api.js';
import { el, notice } from './dom.js';

/**
 * Each view's code loads on its first visit (the topology's graph library is most of the
 * bundle); a view's first API request goes out at the same moment rather than after the load.
 */
const VIEWS = {
  topology: { load: () => import('./topology.js'), data: '/api/v1/topology' },
  transactions: { load: () => import('./transactions.js') },
  compare: { load: () => import('./compare.js') },
  traces: { load: () => import('./traces.js') },
  trace: { load: () => import('./traces.js') },
  services: { load: () => import('./services.js') },
  alerts: { load: () => import('./alerts.js') },
};
/** Views that follow live data (the topology in place); the others change only when asked. */
const LIVE = new Set(['topology', 'transactions', 'services', 'alerts']);

/** The header's count of firing alerts, red while any is critical; on every view. */
async function alertCount() {
  const badge = document.getElementById('alert-count');
  try {
    const { active } = await api('/api/v1/alerts');
    badge.hidden = active.length === 0;
    badge.textContent = String(active.length);
    badge.classList.toggle('severity-critical', active.some((a) => a.severity === 'critical'));
    badge.classList.toggle('severity-warning', active.length > 0 && active.every((a) => a.severity !== 'critical'));
  } catch {
    badge.hidden = true; // the view reports why the API did not answer
  }
}

let rendering = 0;

async function route() {
  const view = document.getElementById('view');
  const path = location.hash.replace(/^#\/?/, '').split('?')[0] || 'topology';
  const [name, arg] = path.split('/');
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', a.dataset.view === name || (name === 'trace' && a.dataset.view === 'traces'));
  }
  const turn = ++rendering;
  view.setAttribute('aria-busy', 'true');
  try {
    const spec = VIEWS[name];
    if (!spec || (name === 'trace' && !arg)) {
      view.replaceChildren(notice(`No view called ${name}.`));
    } else {
      const early = spec.data ? timedApi(spec.data, windowParams()) : undefined;
      early?.answer.catch(() => {}); // reported by the view that awaits it
      const module = await spec.load();
      if (name === 'trace') await module.renderTrace(view, arg);
      else await module.render(view, early);
    }
  } catch (error) {
    if (turn !== rendering) return;
    if (error instanceof TokenRequired) view.replaceChildren(tokenForm());
    else view.replaceChildren(el('h1', {}, 'Sightline'), notice(error.message, 'bad'));
  } finally {
    if (turn === rendering) view.removeAttribute('aria-busy');
  }
}

/** Asks for the API token; once the collector takes it, the view renders again. */
function tokenForm() {
  const input = el('input', { type: 'password', id: 'token', autocomplete: 'current-password', required: true });
  const status = el('p', { class: 'muted' }, 'This collector asks for its API token (auth.api_token).');
  const form = el(
    'form',
    {
      class: 'token-form',
      onsubmit: async (event) => {
        event.preventDefault();
        if (await login(input.value)) route();
        else status.replaceChildren(notice('That token is not the API token.', 'bad'));
      },
    },
    el('h1', {}, 'Sightline'),
    status,
    el('label', { for: 'token' }, 'API token '),
    input,
    el('button', { type: 'submit' }, 'Open'),
  );
  return form;
}

window.addEventListener('hashchange', () => {
  route();
  alertCount();
});
document.getElementById('range').addEventListener('change', route);
setInterval(() => {
  const name = location.hash.replace(/^#\/?/, '').split(/[/?]/)[0] || 'topology';
  if (LIVE.has(name) && !document.hidden) route();
  if (!document.hidden) alertCount();
}, 30_000);
route();
alertCount();
