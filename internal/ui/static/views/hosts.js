import { get, call } from '../lib/api.js';
import { h, replace, bytes, ago, stateBadge } from '../lib/dom.js';
import { act } from './act.js';

// The hosts: state, capacity and what is reserved, VMs; drain and enable.
export function hostsView(root, ctx) {
  const body = h('tbody');
  const err = h('p', { class: 'error', role: 'alert' });
  replace(root, h('h1', {}, 'Hosts'), err,
    h('div', { class: 'card' }, h('table', { id: 'hosts' },
      h('thead', {}, h('tr', {}, ['Host', 'State', 'Accel', 'vCPUs reserved', 'Memory reserved', 'VMs', 'QEMU', 'Heartbeat', ''].map((t) => h('th', {}, t)))),
      body)));
  let closed = false;
  const load = async () => {
    let hosts;
    try { hosts = await get('/v1/hosts'); } catch (e) { if (!closed) err.textContent = e.message; return; }
    if (closed) return;
    err.textContent = '';
    replace(body, hosts.map((x) => {
      const memPct = x.memory_bytes ? (100 * x.reserved_memory_bytes) / x.memory_bytes : 0;
      const state = x.drained ? 'drained' : x.state;
      return h('tr', { 'data-host': x.name },
        h('td', {}, h('b', {}, x.name), x.storage_pool ? h('div', { class: 'muted' }, 'pool ' + x.storage_pool) : null),
        h('td', {}, stateBadge(state), x.drained && x.state !== 'up' ? [' ', stateBadge(x.state)] : null),
        h('td', {}, x.accel),
        h('td', { class: 'num' }, `${x.reserved_cpus} / ${x.cpus}`),
        h('td', {}, h('div', { class: 'bar', title: memPct.toFixed(0) + ' %' }, h('span', { style: { width: Math.min(100, memPct) + '%' } })),
          h('span', { class: 'muted' }, `${bytes(x.reserved_memory_bytes)} of ${bytes(x.memory_bytes)}`)),
        h('td', { class: 'num' }, x.vms),
        h('td', {}, x.qemu_version),
        h('td', {}, ago(x.last_heartbeat)),
        h('td', {}, x.drained
          ? h('button', { onclick: () => act(`Enable ${x.name}`, () => call('POST', `/v1/hosts/${encodeURIComponent(x.name)}/enable`), load) }, 'Enable')
          : h('button', { onclick: () => drain(x.name) }, 'Drain')));
    }));
  };
  const drain = (name) => {
    if (!confirm(`Drain ${name}? Its VMs move to other hosts and it takes no new ones.`)) return;
    act(`Drain ${name}`, () => call('POST', `/v1/hosts/${encodeURIComponent(name)}/drain`), load, (res) => {
      const moved = (res && res.moved) || [], stayed = (res && res.stayed) || [];
      return `${name} drained: ${moved.length} VM(s) moved` +
        (stayed.length ? `; ${stayed.length} stayed: ` + stayed.map((x) => `${x.vm} (${x.reason || x.error || '?'})`).join(', ') : '');
    });
  };
  load();
  const timer = setInterval(load, 5000);
  const off = ctx.log.listen((e) => { if (e.type.startsWith('host.')) load(); });
  return () => { closed = true; clearInterval(timer); off(); };
}
