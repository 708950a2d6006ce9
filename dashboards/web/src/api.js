// The collector's HTTP API, as the dashboard reads it. Every view goes through `api`.

/** The window the header's selector chose, as from/to in Unix ms. */
export function windowParams() {
  const minutes = Number(document.getElementById('range')?.value ?? 15);
  const to = Date.now();
  return { from: String(to - minutes * 60_000), to: String(to) };
}

/** The API asks for its token (the collector was configured with `auth.api_token`). */
export class TokenRequired extends Error {}

/** GETs (or POSTs) a JSON endpoint; throws the API's own error message on 4xx/5xx. */
export async function api(path, params = {}, init = {}) {
  const query = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined && v !== ''));
  const response = await fetch(`${path}${query.size ? `?${query}` : ''}`, init);
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) throw new TokenRequired(body.error ?? 'the API needs a token');
  if (!response.ok) {
    throw new Error(body.error ?? `${path} answered ${response.status}`);
  }
  return body;
}

/** Hands the token to the collector, which keeps it in an HTTP-only cookie; false if wrong. */
export async function login(token) {
  const response = await fetch('/api/v1/login', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ token }),
  });
  return response.ok;
}

/** `api`, and when the request went out: for views that report how long their first render took. */
export function timedApi(path, params) {
  return { started: performance.now(), answer: api(path, params) };
}
