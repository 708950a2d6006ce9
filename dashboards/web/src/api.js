// The collector's HTTP API, as the dashboard reads it. Every view goes through `api`.

/** The window the header's selector chose, as from/to in Unix ms. */
export function windowParams() {
  const minutes = Number(document.getElementById('range')?.value ?? 15);
  const to = Date.now();
  return { from: String(to - minutes * 60_000), to: String(to) };
}

/** GETs (or POSTs) a JSON endpoint; throws the API's own error message on 4xx/5xx. */
export async function api(path, params = {}, init = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ''));
  const response = await fetch(`${path}${query.size ? `?${query}` : ''}`, init);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error ?? `${path} answered ${response.status}`);
  }
  return body;
}

/** `api`, and when the request went out: for views that report how long their first render took. */
export function timedApi(path, params) {
  return { started: performance.now(), answer: api(path, params) };
}
