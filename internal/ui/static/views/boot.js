import { get, call } from '../lib/api.js';
import { h, replace, ago, stateBadge } from '../lib/dom.js';
import { act } from './act.js';

const STAGES = [['dhcp', 'DHCP'], ['script', 'iPXE script'], ['loaded', 'image loaded'], ['host_up', 'host up'], ['configured', 'configured']];

// stages draws one network boot as its steps with the time each took.
function stages(b) {
  if (!b || !b.dhcp || b.dhcp.startsWith('0001-')) return h('span', { class: 'muted' }, 'never booted here');
  const t0 = Date.parse(b.dhcp);
  let prev = t0;
  return h('ol', { class: 'stages' }, STAGES.map(([k, label]) => {
    const t = b[k] && !b[k].startsWith('0001-') ? Date.parse(b[k]) : 0;
    const li = h('li', { class: t ? 'done' : 'todo', title: t ? new Date(t).toISOString() : 'not reached' },
      label, t && k !== 'dhcp' ? h('span', { class: 'muted' }, ` +${((t - prev) / 1000).toFixed(1)} s`) : null);
    if (t) prev = t;
    return li;
  }), h('li', { class: 'total muted' }, prev > t0 ? `${((prev - t0) / 1000).toFixed(1)} s in all, ${ago(b.dhcp)}` : ago(b.dhcp)));
}

// The stateless hosts: every machine that booted from the boot service,
// its stages at its last boot, and admission or quarantine.
export function bootView(root, ctx) {
  const body = h('tbody');
  const err = h('p', { class: 'error', role: 'alert' });
  const profilesBox = h('div');
  replace(root, h('h1', {}, 'Network boot'), err,
    h('div', { class: 'card' }, h('h2', {}, 'Machines'), h('table', { id: 'machines' },
      h('thead', {}, h('tr', {}, ['MAC', 'State', 'Host', 'Address', 'Profile', 'Boots', 'Last boot', ''].map((t) => h('th', {}, t)))), body)),
    h('div', { class: 'card' }, h('h2', {}, 'Profiles'), profilesBox));
  let profiles = [];
  const load = async () => {
    let ms;
    try {
      [ms, profiles] = await Promise.all([get('/v1/boot/machines'), get('/v1/boot/profiles')]);
      err.textContent = '';
    } catch (e) { err.textContent = e.message; return; }
    replace(profilesBox, profiles.length
      ? h('table', {}, h('thead', {}, h('tr', {}, ['Profile', 'Image', 'Storage pool', 'Updated'].map((t) => h('th', {}, t)))),
        h('tbody', {}, profiles.map((p) => h('tr', {}, h('td', {}, p.name), h('td', {}, (p.image || '').slice(0, 19)), h('td', {}, p.storage_pool || ''), h('td', {}, ago(p.updated_at))))))
      : h('p', { class: 'muted' }, 'No boot profiles: vigil boot profile set NAME --image DIGEST'));
    replace(body, ms.map((m) => h('tr', { 'data-mac': m.mac },
      h('td', {}, h('code', {}, m.mac), m.vendor ? h('div', { class: 'muted' }, `${m.vendor} ${m.product || ''}`) : null),
      h('td', {}, stateBadge(m.state), m.held ? ' held' : '', m.last_error ? h('div', { class: 'error' }, m.last_error) : null),
      h('td', {}, m.host_name || ''), h('td', {}, m.ip || ''), h('td', {}, m.profile || ''),
      h('td', { class: 'num' }, m.boots), h('td', {}, stages(m.last_boot)),
      h('td', {}, m.state === 'quarantined'
        ? admitForm(m)
        : h('button', { class: 'danger', onclick: () => {
          if (!confirm(`Quarantine ${m.mac}? It gets no configuration at its next boot.`)) return;
          act(`Quarantine ${m.mac}`, () => call('POST', `/v1/boot/machines/${encodeURIComponent(m.mac)}/quarantine`), load);
        } }, 'Quarantine')))));
    if (!ms.length) body.append(h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No machine has booted from the boot service yet.')));
  };
  const admitForm = (m) => {
    const prof = h('select', {}, profiles.map((p) => h('option', { value: p.name }, p.name)));
    const name = h('input', { placeholder: 'host name', size: 12 });
    return h('span', { class: 'toolbar' }, prof, name, h('button', { disabled: !profiles.length, onclick: () =>
      act(`Admit ${m.mac}`, () => call('POST', `/v1/boot/machines/${encodeURIComponent(m.mac)}/admit`, { profile: prof.value, host_name: name.value.trim() }), load) }, 'Admit'));
  };
  load();
  const timer = setInterval(load, 5000);
  const off = ctx.log.listen((e) => { if (e.type.startsWith('boot.') || e.type.startsWith('host.')) load(); });
  return () => { clearInterval(timer); off(); };
}
