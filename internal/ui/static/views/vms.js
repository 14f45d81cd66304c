import { get } from '../lib/api.js';
import { h, replace, bytes, ago, stateBadge } from '../lib/dom.js';

// addresses are where a VM can be reached: what its guest reports, its NICs'
// kept addresses, and its forwarded port.
export function addresses(vm) {
  const out = new Set();
  for (const a of (vm.guest && vm.guest.addresses) || []) out.add(a);
  for (const n of vm.nics || []) if (n.ip) out.add(n.ip);
  if (vm.endpoint) out.add(vm.endpoint);
  return [...out];
}

// The VMs: state, host, addresses, heartbeat, with a filter on any of them.
export function vmsView(root, ctx) {
  const body = h('tbody');
  const err = h('p', { class: 'error', role: 'alert' });
  const count = h('span', { class: 'muted' });
  const filter = h('input', { type: 'search', id: 'filter', placeholder: 'Filter: name, state, host, address…', oninput: () => draw() });
  filter.value = sessionStorage.getItem('vigil.filter') || '';
  replace(root, h('h1', {}, 'Virtual machines'), err,
    h('div', { class: 'toolbar' }, filter, count),
    h('div', { class: 'card' }, h('table', { id: 'vms' },
      h('thead', {}, h('tr', {}, ['Name', 'State', 'Host', 'vCPUs', 'Memory', 'Addresses', 'Heartbeat', 'Protection'].map((t) => h('th', {}, t)))),
      body)));
  let vms = [];
  const draw = () => {
    const q = filter.value.trim().toLowerCase();
    sessionStorage.setItem('vigil.filter', filter.value);
    const shown = vms.filter((vm) => !q || [vm.name, vm.state, vm.host, vm.condition, vm.image, ...addresses(vm)]
      .some((f) => f && String(f).toLowerCase().includes(q)));
    count.textContent = `${shown.length} of ${vms.length}`;
    replace(body, shown.map((vm) => h('tr', { class: 'link', 'data-vm': vm.name, onclick: () => ctx.go('#/vms/' + encodeURIComponent(vm.name)) },
      h('td', {}, h('a', { href: '#/vms/' + encodeURIComponent(vm.name) }, vm.name)),
      h('td', {}, stateBadge(vm.state), vm.condition ? h('div', { class: 'muted' }, vm.condition) : null),
      h('td', {}, vm.host),
      h('td', { class: 'num' }, vm.cpus),
      h('td', { class: 'num' }, bytes(vm.memory_bytes)),
      h('td', {}, addresses(vm).join(', ')),
      h('td', {}, vm.guest ? ago(vm.guest.last_heartbeat) : ''),
      h('td', {}, vm.protection ? stateBadge(vm.protection.state) : ''))));
    if (!shown.length) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, vms.length ? 'No VM matches the filter.' : 'No VMs yet: vigil vm create NAME --start')));
  };
  const load = async () => {
    try { vms = await get('/v1/vms'); err.textContent = ''; } catch (e) { err.textContent = e.message; return; }
    vms.sort((a, b) => a.name.localeCompare(b.name));
    draw();
  };
  load();
  let pending = null;
  const off = ctx.log.listen((e) => {
    if (!e.vm || pending) return;
    pending = setTimeout(() => { pending = null; load(); }, 150);
  });
  const timer = setInterval(load, 5000);
  return () => { off(); clearInterval(timer); clearTimeout(pending); };
}
