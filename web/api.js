// api.js - the dashboard's only way to the server: the public /v1 API with
// the API key the user entered (kept in sessionStorage for this tab).

const KEY_NAME = 'gemmaforge.apiKey';

export function getKey() {
  return sessionStorage.getItem(KEY_NAME) || '';
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
}

// An error answer of the API: {error: {code, message, param, details}}.
export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || 'http_' + status;
    this.param = e.param || null;
    this.details = e.details || null;
  }
}

function headers(extra) {
  const h = Object.assign({}, extra);
  const key = getKey();
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

async function parse(resp) {
  const type = resp.headers.get('Content-Type') || '';
  const body = type.includes('json') ? await resp.json().catch(() => null) : await resp.text();
  if (!resp.ok) throw new ApiError(resp.status, typeof body === 'object' ? body : null);
  return body;
}

// JSON request; resolves to the parsed body, rejects with ApiError.
export async function api(method, path, body) {
  const init = { method, headers: headers(body ? { 'Content-Type': 'application/json' } : {}) };
  if (body) init.body = JSON.stringify(body);
  return parse(await fetch(path, init));
}

export async function text(path) {
  return parse(await fetch(path, { headers: headers() }));
}

// multipart upload with progress (fetch cannot report upload progress).
export function upload(path, form, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('POST', path);
    const key = getKey();
    if (key) xhr.setRequestHeader('Authorization', 'Bearer ' + key);
    xhr.upload.onprogress = (e) => onProgress && e.lengthComputable && onProgress(e.loaded / e.total);
    xhr.onerror = () => reject(new ApiError(0, { error: { code: 'network_error', message: 'the upload failed' } }));
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* not JSON */ }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    };
    xhr.send(form);
  });
}

// Server-sent events over fetch (EventSource cannot send the API key):
// yields {id, event, data} with data parsed as JSON when it is.
export async function* sse(path, init, signal) {
  const resp = await fetch(path, Object.assign({}, init, {
    headers: headers(Object.assign({ Accept: 'text/event-stream' }, (init && init.headers) || {})), signal,
  }));
  if (!resp.ok || !(resp.headers.get('Content-Type') || '').startsWith('text/event-stream')) {
    await parse(resp);
    throw new ApiError(resp.status, null);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const ev = { id: null, event: 'message', data: '' };
      for (const line of block.split('\n')) {
        const i = line.indexOf(': ');
        if (i < 0) continue;
        const k = line.slice(0, i), v = line.slice(i + 2);
        if (k === 'data') ev.data += v;
        else if (k === 'id') ev.id = v;
        else if (k === 'event') ev.event = v;
      }
      if (ev.data && ev.data !== '[DONE]') {
        try { ev.data = JSON.parse(ev.data); } catch (_) { /* plain text */ }
      }
      yield ev;
    }
  }
}

// Saves an authenticated download as a file.
export async function download(path, filename) {
  const resp = await fetch(path, { headers: headers() });
  if (!resp.ok) await parse(resp);
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement('a');
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}
