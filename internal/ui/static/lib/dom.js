// Small helpers to build the page without a framework: h() makes an
// element, text is always set as text (never parsed as HTML), so nothing a
// VM or a host reports can inject markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k === 'style') Object.assign(el.style, v); // CSSOM: allowed by the page's CSP, unlike style attributes
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}

const SVG = 'http://www.w3.org/2000/svg';

// s() makes an SVG element.
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

// replace swaps el's children for the given ones.
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function bytes(n) {
  if (n === undefined || n === null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
}

// ago says how long before now t (an RFC 3339 string) was.
export function ago(t, now = Date.now()) {
  if (!t || t.startsWith('0001-')) return '';
  const s = Math.max(0, (now - Date.parse(t)) / 1000);
  if (s < 1) return 'now';
  if (s < 90) return Math.round(s) + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

export function clock(t) {
  const d = new Date(t);
  return d.toLocaleTimeString(undefined, { hour12: false }) + '.' + String(d.getMilliseconds()).padStart(3, '0');
}

export function stateBadge(state) {
  return h('span', { class: 'state ' + (state || '') }, state || '?');
}

// toast shows a message at the corner; with busy it stays (with a spinner)
// until its done() says how the work ended.
export function toast(text, kind = '', busy = false) {
  const box = document.getElementById('toasts');
  const el = h('div', { class: 'toast ' + kind, role: kind === 'error' ? 'alert' : 'status' },
    busy ? h('span', { class: 'spinner' }) : null, h('span', {}, text));
  box.append(el);
  const remove = (after) => setTimeout(() => el.remove(), after);
  if (!busy) remove(kind === 'error' ? 12000 : 4000);
  return {
    update(msg) {
      const span = el.lastChild;
      if (span) span.textContent = msg;
    },
    done(msg, k) {
      replace(el, h('span', {}, msg));
      el.className = 'toast ' + (k || '');
      el.setAttribute('role', k === 'error' ? 'alert' : 'status');
      remove(k === 'error' ? 12000 : 4000);
    },
  };
}
