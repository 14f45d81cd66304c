import { stream, call, vmPath } from '../lib/api.js';
import { h, replace } from '../lib/dom.js';

const KEEP = 200000; // characters of serial output kept on the page

// serialConsole streams the VM's serial console (its recent output, then
// what comes) until the returned func is called.
export function serialConsole(box, name) {
  const pre = h('pre', { class: 'console', id: 'serial', tabindex: 0 });
  const note = h('p', { class: 'muted' });
  replace(box, pre, note);
  const ctrl = new AbortController();
  let text = '';
  const follow = () => pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 20;
  stream(vmPath(name) + '/console?follow=1', 'text/plain', (chunk) => {
    const atEnd = follow();
    text = (text + chunk).slice(-KEEP);
    pre.textContent = text;
    if (atEnd) pre.scrollTop = pre.scrollHeight;
  }, ctrl.signal).then(
    () => { note.textContent = 'The console ended (the VM stopped?).'; },
    (e) => { if (!ctrl.signal.aborted) note.textContent = 'Console: ' + e.message; });
  return () => ctrl.abort();
}

// vncConsole shows the VM's screen with noVNC over the manager's WebSocket,
// opened with a one-use ticket (a browser cannot put a token on it).
export function vncConsole(box, name) {
  const screen = h('div', { id: 'vnc' });
  const note = h('p', { class: 'muted', id: 'vnc-status' }, 'Connecting…');
  replace(box, screen, note);
  let rfb = null, closed = false;
  (async () => {
    try {
      const [{ RFB }, t] = await Promise.all([import('../vendor/novnc.js'), call('POST', vmPath(name) + '/vnc/tickets')]);
      if (closed) return;
      const url = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${vmPath(name)}/vnc/websocket?ticket=${encodeURIComponent(t.ticket)}`;
      rfb = new RFB(screen, url, { wsProtocols: ['binary'] });
      rfb.scaleViewport = true;
      rfb.addEventListener('connect', () => { note.textContent = 'Connected: keyboard and mouse go to the VM while it has the focus.'; });
      rfb.addEventListener('disconnect', (e) => { note.textContent = e.detail.clean ? 'Disconnected.' : 'The connection was lost (is the VM running, and does it have a display?).'; });
      rfb.addEventListener('desktopname', (e) => { screen.title = e.detail.name; });
    } catch (e) {
      note.textContent = 'Screen: ' + e.message;
    }
  })();
  return () => { closed = true; if (rfb) rfb.disconnect(); };
}
