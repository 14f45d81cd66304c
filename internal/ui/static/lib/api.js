// The REST API, called with the signed-in token. Errors carry the API's
// own message (it says what to do), shown to the user as is.

const KEY = 'vigil.token';

export const session = {
  get token() { return sessionStorage.getItem(KEY) || ''; },
  set token(t) { if (t) sessionStorage.setItem(KEY, t); else sessionStorage.removeItem(KEY); },
};

export class APIError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export async function call(method, path, body, opts = {}) {
  const token = session.token;
  const headers = { Authorization: 'Bearer ' + token };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: opts.signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new APIError(0, 'unreachable', 'the manager did not answer (' + e.message + '): is it running?');
  }
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!resp.ok) {
    const msg = (data && data.error) || text || resp.statusText;
    const err = new APIError(resp.status, data && data.code, msg);
    // Only a refusal of the token in use signs out (not a late answer to
    // a call made before the user signed in again).
    if (resp.status === 401 && token && token === session.token) window.dispatchEvent(new CustomEvent('vigil:unauthorized', { detail: err }));
    throw err;
  }
  return data;
}

export const get = (path, opts) => call('GET', path, undefined, opts);
export const vmPath = (name) => '/v1/vms/' + encodeURIComponent(name);

// stream reads a streaming answer (the serial console, the event stream)
// chunk by chunk into onText until signal aborts or the server ends it.
export async function stream(path, accept, onText, signal) {
  const resp = await fetch(path, { headers: { Authorization: 'Bearer ' + session.token, Accept: accept }, signal });
  if (!resp.ok) {
    const text = await resp.text();
    let msg = text;
    try { msg = JSON.parse(text).error || text; } catch { /* plain text */ }
    throw new APIError(resp.status, '', msg);
  }
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onText(value);
  }
}
