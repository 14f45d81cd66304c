import { h, replace, clock, stateBadge } from '../lib/dom.js';

// The event log, live: every event the manager publishes (VM lifecycle,
// hosts, protections, audited calls), newest first, with a filter.
export function eventsView(root, ctx) {
  const body = h('tbody');
  const filter = h('input', { type: 'search', placeholder: 'Filter: type, VM, host, message…', oninput: () => redraw() });
  const audit = h('input', { type: 'checkbox', onchange: () => redraw() });
  const prog = h('input', { type: 'checkbox', onchange: () => redraw() });
  replace(root, h('h1', {}, 'Events'),
    h('div', { class: 'toolbar' }, filter, h('label', {}, audit, ' audited API calls'), h('label', {}, prog, ' progress')),
    h('div', { class: 'card' }, h('table', { class: 'events', id: 'events' },
      h('thead', {}, h('tr', {}, ['Time', 'Type', 'VM', 'Host', 'State', 'Message'].map((t) => h('th', {}, t)))), body)));
  const matches = (e) => {
    if (e.type === 'audit' && !audit.checked) return false;
    if (e.type === 'vm.progress' && !prog.checked) return false;
    const q = filter.value.trim().toLowerCase();
    return !q || [e.type, e.vm, e.host, e.state, e.message, e.audit && e.audit.action, e.audit && e.audit.actor]
      .some((f) => f && String(f).toLowerCase().includes(q));
  };
  const row = (e, fresh) => h('tr', { class: fresh ? 'fresh' : '', 'data-type': e.type, 'data-seq': e.seq },
    h('td', { class: 'muted' }, clock(e.time)), h('td', {}, e.type),
    h('td', {}, e.vm ? h('a', { href: '#/vms/' + encodeURIComponent(e.vm) }, e.vm) : ''),
    h('td', {}, e.host || ''), h('td', {}, e.state ? stateBadge(e.state) : ''),
    h('td', {}, e.audit ? `${e.audit.actor} ${e.audit.action} → ${e.audit.status}${e.audit.error ? ': ' + e.audit.error : ''}` : e.message || ''));
  const redraw = () => replace(body, ctx.log.events.filter(matches).reverse().slice(0, 300).map((e) => row(e, false)));
  redraw();
  const off = ctx.log.listen((e) => {
    if (!matches(e)) return;
    body.prepend(row(e, true));
    while (body.children.length > 300) body.lastChild.remove();
  });
  return off;
}
