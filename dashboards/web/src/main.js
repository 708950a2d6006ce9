// The dashboard's entry: routes the URL fragment (#/topology, #/compare?..., #/trace/<id>) to
// a view, and renders it again when the window changes or every 30 s.
import 'uplot/dist/uPlot.min.css';
import './style.css';
import * as compare from './compare.js';
import { el, notice } from './dom.js';
import * as services from './services.js';
import * as topology from './topology.js';
import * as traces from './traces.js';
import * as transactions from './transactions.js';

const VIEWS = {
  topology: topology.render,
  transactions: transactions.render,
  compare: compare.render,
  traces: traces.render,
  services: services.render,
};
/** Views that follow live data (the topology in place); the others change only when asked. */
const LIVE = new Set(['topology', 'transactions', 'services']);

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
    if (name === 'trace' && arg) await traces.renderTrace(view, arg);
    else if (VIEWS[name]) await VIEWS[name](view);
    else view.replaceChildren(notice(`No view called ${name}.`));
  } catch (error) {
    if (turn === rendering) view.replaceChildren(el('h1', {}, 'Sightline'), notice(error.message, 'bad'));
  } finally {
    if (turn === rendering) view.removeAttribute('aria-busy');
  }
}

window.addEventListener('hashchange', route);
document.getElementById('range').addEventListener('change', route);
setInterval(() => {
  const name = location.hash.replace(/^#\/?/, '').split(/[/?]/)[0] || 'topology';
  if (LIVE.has(name) && !document.hidden) route();
}, 30_000);
route();
