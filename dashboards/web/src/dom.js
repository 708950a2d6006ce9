// Small DOM and formatting helpers shared by the views.

/** Creates an element: el('td', { class: 'num', title: 'x' }, 'text', childNode, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'style' && typeof value === 'object') Object.assign(node.style, value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** Milliseconds, with precision that suits their size. */
export function ms(value) {
  if (value === undefined || value === null || Number.isNaN(value)) return '–';
  if (value >= 10_000) return `${(value / 1000).toFixed(1)} s`;
  if (value >= 100) return `${value.toFixed(0)} ms`;
  if (value >= 10) return `${value.toFixed(1)} ms`;
  return `${value.toFixed(2)} ms`;
}

export function percent(fraction, digits = 1) {
  return `${(fraction * 100).toFixed(digits)}%`;
}

/** A signed change: ratio 1.23 -> "+23%". */
export function change(ratio) {
  if (ratio === undefined || ratio === null) return '–';
  const p = (ratio - 1) * 100;
  return `${p >= 0 ? '+' : ''}${p.toFixed(0)}%`;
}

export function count(n) {
  return n >= 1e6 ? `${(n / 1e6).toFixed(1)}M` : n >= 1e4 ? `${(n / 1e3).toFixed(1)}k` : String(Math.round(n));
}

export function time(unixMs) {
  return new Date(unixMs).toLocaleTimeString();
}

/** The hash route's parameters. */
export function routeParams() {
  const hash = location.hash.slice(1);
  const q = hash.indexOf('?');
  return new URLSearchParams(q >= 0 ? hash.slice(q + 1) : '');
}

/** Moves to a view with parameters (empty ones left out). */
export function go(view, params = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ''));
  location.hash = `#/${view}${query.size ? `?${query}` : ''}`;
}

/** A message in place of a view's content. */
export function notice(text, kind = 'info') {
  return el('p', { class: `notice ${kind}` }, text);
}

/** Stage colours, the same in every view. */
export const STAGE_COLORS = {
  own: '#6c8ebf',
  db: '#d9822b',
  cache: '#9b59b6',
  mq: '#16a085',
  downstream: '#7f8c8d',
};
