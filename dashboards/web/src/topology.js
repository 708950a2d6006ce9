// The topology: services and the virtual nodes they call (databases, caches, queues, external
// APIs), coloured by health; edges labelled with calls and p99. Clicking a node or an edge
// filters the BT table below to the transactions that go through it.
import cytoscape from 'cytoscape';
import { api, timedApi, windowParams } from './api.js';
import { el, ms, notice, percent, time } from './dom.js';
import { btTable, legend } from './transactions.js';

const HEALTH_COLORS = { ok: '#2e9d5b', warn: '#e0a100', critical: '#d63c3c' };
const SHAPES = {
  user: 'ellipse',
  service: 'round-rectangle',
  database: 'barrel',
  cache: 'diamond',
  mq: 'hexagon',
  external: 'octagon',
};
/** Above this many edges labels and curves give way to speed. */
const LARGE = 300;

const nodeId = (name, type) => `${type}:${name}`;
const edgeId = (e) => `${nodeId(e.caller, e.caller_type)}->${nodeId(e.callee, e.callee_type)}`;

/** The graph on screen, so that a refresh with the same nodes and edges updates it in place. */
let live = null;

const signature = (topology) =>
  `${topology.nodes.map((n) => nodeId(n.name, n.type)).join(',')}|${topology.edges.map(edgeId).join(',')}`;

/** Renders into `view`; `request` is the topology request when the router already sent it. */
export async function render(view, request) {
  const window = windowParams();
  const { started, answer } = request ?? timedApi('/api/v1/topology', window);
  // The graph first; the BT table's data is asked for once the graph is drawn, so that the
  // two requests do not share the first render's time.
  let topology = await answer;
  const transactionsNow = () => api('/api/v1/transactions', window).then((r) => r.transactions);
  if (live && live.graph.isConnected && live.signature === signature(topology)) {
    // Same system: new figures and health, same layout, zoom and selection.
    live.refresh(topology, await transactionsNow());
    return;
  }
  let transactions = null;
  const fetched = performance.now();
  const graph = el('div', { id: 'topology-graph', 'data-testid': 'topology-graph' });
  const details = el('aside', { class: 'details', 'data-testid': 'selection' }, 'Click a node or an edge to see its figures and filter the transactions.');
  const tableBox = el('section', { 'data-testid': 'bt-section' });
  const filterLine = el('p', { class: 'filter-line', 'data-testid': 'bt-filter' });
  view.replaceChildren(
    el('h1', {}, 'Topology'),
    topology.nodes.length
      ? el('div', { class: 'topology' }, graph, details)
      : notice('No calls in this window yet. Point an agent or an OpenTelemetry SDK at the collector.'),
    healthLegend(),
    el('h2', {}, 'Business transactions'),
    filterLine,
    tableBox,
    legend(),
  );
  const showTable = (filter) => {
    filterLine.replaceChildren(
      filter
        ? el('span', {}, `Only transactions through ${filter.label} `, el('button', { onclick: () => select(null) }, 'show all'))
        : 'All transactions; click a node or an edge to filter.',
    );
    tableBox.replaceChildren(transactions ? btTable(transactions, filter ?? undefined) : notice('Loading transactions…'));
  };
  showTable(null);
  if (!topology.nodes.length) {
    transactions = await transactionsNow();
    showTable(null);
    return;
  }

  const large = topology.edges.length > LARGE;
  const cy = cytoscape({
    container: graph,
    elements: elements(topology),
    style: style(large),
    layout: layout(topology),
    minZoom: 0.05,
    maxZoom: 4,
    wheelSensitivity: 0.3,
    textureOnViewport: large,
    hideEdgesOnViewport: large,
    pixelRatio: large ? 1 : 'auto',
  });
  let byEdge = new Map(topology.edges.map((e) => [edgeId(e), e]));
  let selected = null;
  const select = (target) => {
    selected = target;
    cy.elements().removeClass('selected');
    if (!target) {
      details.replaceChildren('Click a node or an edge to see its figures and filter the transactions.');
      showTable(null);
      return;
    }
    target.addClass('selected');
    if (target.isEdge()) {
      const e = byEdge.get(target.id());
      details.replaceChildren(figures(`${e.caller} → ${e.callee}`, e));
      showTable({
        label: `${e.caller} → ${e.callee}`,
        bts: new Set(e.bts),
        services: e.caller_type === 'service' ? new Set([e.caller]) : undefined,
      });
    } else {
      const n = target.data('view');
      const touching = topology.edges.filter(
        (e) => nodeId(e.caller, e.caller_type) === target.id() || nodeId(e.callee, e.callee_type) === target.id(),
      );
      details.replaceChildren(figures(`${n.name} (${n.type})`, n));
      showTable({
        label: n.name,
        bts: new Set(touching.flatMap((e) => e.bts)),
        services: n.type === 'service' ? new Set([n.name]) : undefined,
      });
    }
  };
  cy.on('tap', 'node, edge', (event) => select(event.target));
  cy.on('tap', (event) => {
    if (event.target === cy) select(null);
  });
  cy.one('render', () => {
    // First render, measured from the request: the browser test reads it.
    const now = performance.now();
    window_.sightlineTopology = { apiMs: fetched - started, drawMs: now - fetched, totalMs: now - started, sinceNavigationMs: now };
    graph.dataset.rendered = 'true';
    transactionsNow().then((loaded) => {
      transactions = loaded;
      select(selected);
    });
  });
  window_.sightline = { cy };
  live = {
    graph,
    signature: signature(topology),
    refresh: (next, nextTransactions) => {
      [topology, transactions] = [next, nextTransactions];
      byEdge = new Map(topology.edges.map((e) => [edgeId(e), e]));
      for (const data of elements(topology).map((e) => e.data)) cy.getElementById(data.id).data(data);
      select(selected);
    },
  };
}

const window_ = globalThis;

function elements(topology) {
  const nodes = topology.nodes.map((n) => ({
    group: 'nodes',
    data: {
      id: nodeId(n.name, n.type),
      label: n.name,
      type: n.type,
      health: n.health,
      view: n,
    },
  }));
  const edges = topology.edges.map((e) => ({
    group: 'edges',
    data: {
      id: edgeId(e),
      source: nodeId(e.caller, e.caller_type),
      target: nodeId(e.callee, e.callee_type),
      label: `${e.calls} · p99 ${ms(e.p99_ms)}`,
      health: e.health,
    },
  }));
  return [...nodes, ...edges];
}

function style(large) {
  return [
    {
      selector: 'node',
      style: {
        shape: 'ellipse',
        'background-color': '#888',
        label: 'data(label)',
        'font-size': 11,
        'text-valign': 'bottom',
        'text-margin-y': 4,
        width: 34,
        height: 34,
        'border-width': 2,
        'border-color': '#fff',
        'min-zoomed-font-size': 6,
      },
    },
    // Selectors, not functions: cytoscape caches styles per selector, and mapping functions
    // doubled the first render of a 2,000-edge graph.
    ...Object.entries(SHAPES).map(([type, shape]) => ({ selector: `node[type = "${type}"]`, style: { shape } })),
    ...Object.entries(HEALTH_COLORS).map(([health, color]) => ({
      selector: `[health = "${health}"]`,
      style: { 'background-color': color, 'line-color': color, 'target-arrow-color': color },
    })),
    { selector: 'node[type = "user"]', style: { 'background-color': '#555' } },
    {
      selector: 'edge',
      style: {
        width: large ? 1 : 2,
        'curve-style': large ? 'haystack' : 'bezier',
        'line-color': '#aaa',
        'target-arrow-color': '#aaa',
        'target-arrow-shape': large ? 'none' : 'triangle',
        'arrow-scale': 0.8,
        label: large ? '' : 'data(label)',
        'font-size': 9,
        'text-rotation': 'autorotate',
        'text-background-color': '#fff',
        'text-background-opacity': 0.85,
        'text-background-padding': 2,
        'min-zoomed-font-size': 7,
        opacity: large ? 0.5 : 1,
      },
    },
    { selector: 'edge[health = "critical"]', style: { width: large ? 2 : 4 } },
    { selector: '.selected', style: { 'overlay-color': '#3b6fd8', 'overlay-opacity': 0.25, 'overlay-padding': 6 } },
  ];
}

/**
 * Callers to the left, what they call to the right: a layered (breadth-first) layout. Large
 * systems get rings by degree (hubs in the middle), which lays out in a fraction of the time.
 */
function layout(topology) {
  if (topology.edges.length > LARGE) {
    return { name: 'concentric', animate: false, minNodeSpacing: 4, concentric: (n) => n.degree(), levelWidth: () => 4 };
  }
  const roots = topology.nodes.filter((n) => n.type === 'user').map((n) => `#${cssId(nodeId(n.name, n.type))}`);
  return {
    name: 'breadthfirst',
    directed: true,
    roots: roots.length ? roots.join(', ') : undefined,
    spacingFactor: topology.nodes.length > 50 ? 0.6 : 1.1,
    animate: false,
    // Turn the layers from top-down into left-to-right.
    transform: (node, position) => ({ x: position.y * 1.6, y: position.x }),
  };
}

function cssId(id) {
  return id.replace(/([^a-zA-Z0-9_-])/g, '\\$1');
}

function figures(title, v) {
  return el(
    'div',
    {},
    el('h3', {}, title),
    el(
      'dl',
      {},
      el('dt', {}, 'health'),
      el('dd', { class: `health-${v.health}` }, v.health, v.health_since ? ` since ${time(v.health_since)}` : ''),
      el('dt', {}, 'calls'),
      el('dd', {}, v.calls),
      el('dt', {}, 'errors'),
      el('dd', {}, `${v.errors} (${percent(v.error_rate)})`),
      el('dt', {}, 'p50 / p99'),
      el('dd', {}, `${ms(v.p50_ms)} / ${ms(v.p99_ms)}`),
      v.bts ? [el('dt', {}, 'transactions'), el('dd', {}, v.bts.join(', '))] : [],
    ),
  );
}

function healthLegend() {
  return el(
    'p',
    { class: 'legend' },
    'Health against the previous hour: ',
    Object.entries(HEALTH_COLORS).map(([h, c]) => el('span', { class: 'legend-item' }, el('i', { style: { background: c } }), h)),
    ' · shapes: service ▢, database ⛁, cache ◇, queue ⬡, external API ⯃',
  );
}
