// The live event stream (GET /v1/events?follow=1 as Server-Sent Events,
// read with fetch so it carries the token). It keeps the latest events and
// tells listeners of each new one; after a cut it reconnects from the last
// sequence number it saw, so nothing is missed or shown twice.

import { session, stream } from './api.js';

const KEEP = 500;

export class EventLog {
  constructor() {
    this.events = [];
    this.lastSeq = 0;
    this.listeners = new Set();
    this.onLive = () => {};
    this.ctrl = null;
  }

  // listen calls fn(event) for every new event until the returned func.
  listen(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  start() {
    this.stop();
    this.ctrl = new AbortController();
    this.run(this.ctrl.signal);
  }

  // stop ends the stream and forgets what it saw (the next user of the
  // tab signs in afresh).
  stop() {
    if (this.ctrl) this.ctrl.abort();
    this.ctrl = null;
    this.events = [];
    this.lastSeq = 0;
  }

  async run(signal) {
    let wait = 500;
    while (!signal.aborted && session.token) {
      let buf = '';
      this.fresh = true; // the next event is this connection's first
      try {
        const q = this.lastSeq ? '&since=' + this.lastSeq : '';
        await stream('/v1/events?follow=1' + q, 'text/event-stream', (chunk) => {
          this.onLive(true);
          wait = 500;
          buf += chunk;
          let i;
          while ((i = buf.indexOf('\n\n')) >= 0) {
            this.dispatch(parseSSE(buf.slice(0, i)));
            buf = buf.slice(i + 2);
          }
        }, signal);
      } catch (e) {
        if (signal.aborted) return;
        if (e.status === 401) {
          this.onLive(false);
          window.dispatchEvent(new CustomEvent('vigil:unauthorized', { detail: e }));
          return;
        }
      }
      this.onLive(false);
      await new Promise((r) => setTimeout(r, wait));
      wait = Math.min(wait * 2, 10000);
    }
  }

  dispatch(msg) {
    if (!msg || !msg.data) return; // a comment line (keep-alive)
    let e;
    try { e = JSON.parse(msg.data); } catch { return; }
    // Within a connection sequence numbers grow. A connection that starts
    // below what was seen talks to a manager that restarted (or another
    // one): its numbers are a new series, not old news.
    if (this.fresh && e.seq && e.seq <= this.lastSeq) this.lastSeq = 0;
    this.fresh = false;
    if (e.seq && e.seq <= this.lastSeq) return;
    this.lastSeq = e.seq || this.lastSeq;
    this.events.push(e);
    if (this.events.length > KEEP) this.events.splice(0, this.events.length - KEEP);
    for (const fn of this.listeners) fn(e);
  }
}

// parseSSE reads one Server-Sent Events message (its lines, without the
// blank line that ends it).
export function parseSSE(block) {
  const msg = { id: '', event: '', data: '' };
  const data = [];
  for (const line of block.split('\n')) {
    if (line === '' || line.startsWith(':')) continue;
    const i = line.indexOf(':');
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? '' : line.slice(i + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'id' || field === 'event') msg[field] = value;
  }
  msg.data = data.join('\n');
  return msg;
}
