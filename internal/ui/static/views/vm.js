import { get, call, vmPath } from '../lib/api.js';
import { h, replace, bytes, ago, clock, stateBadge } from '../lib/dom.js';
import { drawTree } from '../lib/tree.js';
import { usageCharts } from '../lib/chart.js';
import { addresses } from './vms.js';
import { act, progress } from './act.js';
import { serialConsole, vncConsole } from './console.js';

// Which actions a VM in each state can take (the API refuses the others
// with a reason; greying them out saves the round trip).
const can = {
  start: ['stopped', 'crashed', 'failed'],
  stop: ['running', 'paused', 'starting', 'recovering'],
  restart: ['running'],
  pause: ['running'],
  suspend: ['running', 'paused'],
  resume: ['paused', 'suspended'],
  snapshot: ['running', 'paused', 'stopped', 'suspended'],
  // Live when running; cold when off. Only a VM in a storage pool moves,
  // and not while protected.
  migrate: ['running', 'stopped', 'suspended', 'crashed', 'failed'],
  protect: ['running'],
};

// A VM's page: its actions, details, usage charts, snapshot tree,
// incidents, consoles and events, kept current by the event stream.
export function vmView(root, ctx, name) {
  const p = vmPath(name);
  const title = h('h1', {}, name, ' ');
  const err = h('p', { class: 'error', role: 'alert' });
  const toolbar = h('div', { class: 'toolbar', id: 'actions' });
  const details = h('dl', { class: 'kv', id: 'details' });
  const protection = h('div', { class: 'card', id: 'protection', hidden: true });
  const charts = h('div', { class: 'charts', id: 'charts' });
  const treeBox = h('div', { class: 'tree', id: 'tree' });
  const snapTotal = h('span', { class: 'muted', id: 'snap-total' });
  const snapInfo = h('div', { id: 'snapshot' });
  const incidents = h('div', { id: 'incidents' });
  const events = h('tbody');
  const consoleBox = h('div', { id: 'console' });
  replace(root, h('p', {}, h('a', { href: '#/vms' }, '← all VMs')), title, err, toolbar,
    h('div', { class: 'grid' },
      h('div', { class: 'card' }, h('h2', {}, 'Details'), details),
      h('div', { class: 'card' }, h('h2', {}, 'Usage (last 15 min)'), charts)),
    protection,
    h('div', { class: 'card' }, h('h2', {}, 'Snapshots ', snapTotal), treeBox, snapInfo),
    h('div', { class: 'grid' },
      h('div', { class: 'card' }, h('h2', {}, 'Console'), consoleBox),
      h('div', { class: 'card' }, h('h2', {}, 'Incidents'), incidents)),
    h('div', { class: 'card' }, h('h2', {}, 'Events'), h('table', { class: 'events', id: 'vm-events' }, events)));

  let vm = null, snaps = { snapshots: [] }, selected = '', hosts = [];
  let closed = false;

  const allowed = (key) => key === 'delete' || (can[key].includes(vm.state) && (key !== 'migrate' || (vm.storage_pool && !vm.protection)));
  const button = (label, key, fn, cls) => h('button', { class: cls, 'data-action': key, disabled: !allowed(key), onclick: fn }, label);
  const state = (action, extra = {}) => () => act(`${action} ${name}`, () => call('PUT', p + '/state', { action, ...extra }), refresh,
    (res) => `${name} is ${res.state}` + (res.last_operation && res.last_operation.paused_ms ? ` (guest paused ${res.last_operation.paused_ms.toFixed(1)} ms)` : ''), name);

  const drawActions = () => {
    const hostSel = h('select', { id: 'migrate-to', title: 'destination host' }, h('option', { value: '' }, 'any host'),
      hosts.filter((x) => x.name !== vm.host && x.state === 'up' && !x.drained).map((x) => h('option', { value: x.name }, x.name)));
    replace(toolbar,
      button('Start', 'start', state('start')),
      button('Stop', 'stop', state('stop')),
      button('Restart', 'restart', state('restart')),
      button('Pause', 'pause', state('pause')),
      button('Suspend', 'suspend', state('pause', { to_disk: true })),
      button('Resume', 'resume', state('resume')),
      button('Snapshot', 'snapshot', takeSnapshot),
      h('span', { class: 'muted' }, '|'),
      hostSel,
      button('Migrate', 'migrate', () => act(`Migrate ${name}`, () => call('POST', p + '/migrate', { to: hostSel.value }), refresh,
        (res) => `${name} now runs on ${res.host}` + (res.last_operation && res.last_operation.paused_ms ? ` (downtime ${res.last_operation.paused_ms.toFixed(1)} ms)` : ''), name)),
      vm.protection
        ? h('button', { 'data-action': 'unprotect', onclick: () => act(`Unprotect ${name}`, () => call('POST', p + '/unprotect'), refresh, () => `${name} is no longer protected`, name) }, 'Unprotect')
        : button('Protect', 'protect', () => act(`Protect ${name}`, () => call('POST', p + '/protect', { secondary_host: hostSel.value }), refresh,
          (res) => `${name} protected` + (res.protection && res.protection.secondary_host ? ` by ${res.protection.secondary_host}` : ''), name)),
      h('span', { class: 'muted' }, '|'),
      button('Delete', 'delete', del, 'danger'));
  };

  const takeSnapshot = () => {
    const def = 'snap-' + new Date().toISOString().slice(0, 19).replace(/[-:T]/g, '').replace(/^(\d{8})/, '$1-');
    const sn = prompt('Name of the snapshot (lower-case letters, digits and -):', def);
    if (!sn) return;
    act(`Snapshot ${sn}`, () => call('POST', p + '/snapshots', { name: sn }), refresh,
      (res) => `Snapshot ${res.name} taken` + (res.operation && res.operation.paused_ms ? ` (guest paused ${res.operation.paused_ms.toFixed(1)} ms)` : ''), name);
  };

  const del = () => {
    if (!confirm(`Delete ${name}? Its disk and every snapshot are deleted; this cannot be undone.`)) return;
    act(`Delete ${name}`, () => call('DELETE', p + '?force=1'), null, undefined, name).then((r) => { if (r !== undefined) ctx.go('#/vms'); });
  };

  const drawDetails = () => {
    const g = vm.guest || {};
    const op = vm.last_operation;
    const row = (k, v) => (v === undefined || v === '' || v === null ? null : [h('dt', {}, k), h('dd', { 'data-field': k }, v)]);
    replace(title, name, ' ', stateBadge(vm.state));
    replace(details,
      row('State', [stateBadge(vm.state), vm.condition ? ' ' + vm.condition : '']),
      row('Message', vm.message),
      row('Host', vm.host),
      row('vCPUs / memory / disk', `${vm.cpus} / ${bytes(vm.memory_bytes)} / ${bytes(vm.disk_bytes)}`),
      row('Image', vm.image || vm.iso || 'built-in guest'),
      row('Addresses', addresses(vm).join(', ')),
      row('Guest', g.boot_id ? `${g.os || ''} ${g.hostname || ''} boot ${g.boot_id.slice(0, 8)}, up ${Math.round(g.uptime_seconds)} s` : ''),
      row('Heartbeat', g.last_heartbeat ? `${ago(g.last_heartbeat)} (#${g.seq}${g.agent ? ', ' + g.agent : ''})` : ''),
      row('Recovery', `${vm.policy.recovery || ''}, hang after ${vm.policy.hang_timeout_seconds || 10} s`),
      row('Last operation', op ? `${op.action} in ${op.duration_ms.toFixed(0)} ms` + (op.paused_ms ? `, guest paused ${op.paused_ms.toFixed(1)} ms` : '') + (op.note ? ` — ${op.note}` : '') : ''));
    const pr = vm.protection;
    protection.hidden = !pr;
    if (pr) {
      replace(protection, h('h2', {}, 'Protection ', stateBadge(pr.state)), h('dl', { class: 'kv' },
        row('Secondary', pr.secondary_host), row('Interval', pr.interval_ms + ' ms'),
        row('Last checkpoint', pr.last_checkpoint ? ago(pr.last_checkpoint) : ''), row('RPO', pr.rpo_ms ? pr.rpo_ms.toFixed(0) + ' ms' : ''),
        row('Pause p50 / p99', pr.checkpoints ? `${pr.pause_p50_ms.toFixed(1)} / ${pr.pause_p99_ms.toFixed(1)} ms` : ''),
        row('Per checkpoint', pr.bytes_per_checkpoint ? bytes(pr.bytes_per_checkpoint) : ''), row('Message', pr.message)));
    }
  };

  const drawSnapshots = () => {
    const list = snaps.snapshots || [];
    snapTotal.textContent = list.length ? `${list.length}, holding ${bytes(snaps.total_bytes)}` : '';
    if (!list.length) { replace(treeBox, h('p', { class: 'muted' }, 'No snapshots yet.')); replace(snapInfo); return; }
    replace(treeBox, drawTree(list, selected, (sn) => { selected = sn; drawSnapshots(); }));
    const sn = list.find((x) => x.name === selected);
    if (!sn) { replace(snapInfo, h('p', { class: 'muted' }, 'Select a snapshot to revert to it or delete it.')); return; }
    replace(snapInfo, h('div', { class: 'toolbar' },
      h('b', {}, sn.name), h('span', { class: 'muted' }, `${sn.vm_state}, ${sn.consistency}, holds ${bytes(sn.size_bytes)}, taken ${ago(sn.created)}`),
      h('button', { 'data-action': 'revert', onclick: () => {
        if (!confirm(`Revert ${name} to ${sn.name}? Its present state is lost unless a snapshot holds it.`)) return;
        act(`Revert ${name} to ${sn.name}`, () => call('POST', `${p}/snapshots/${encodeURIComponent(sn.name)}/revert`), refresh, (r) => `${name} reverted to ${sn.name}: ${r.state}`, name);
      } }, 'Revert'),
      h('button', { class: 'danger', 'data-action': 'delete-snapshot', onclick: () => {
        if (!confirm(`Delete snapshot ${sn.name}? It frees ${bytes(sn.size_bytes)}.`)) return;
        act(`Delete snapshot ${sn.name}`, () => call('DELETE', `${p}/snapshots/${encodeURIComponent(sn.name)}`), () => { selected = ''; refresh(); });
      } }, 'Delete')));
  };

  const drawIncidents = (list) => {
    if (!list.length) { replace(incidents, h('p', { class: 'muted' }, 'None: this VM never needed recovering.')); return; }
    replace(incidents, list.slice().reverse().map((i) => h('details', { class: 'incident' },
      h('summary', {}, h('b', {}, i.kind), ` ${ago(i.detected_at)} on ${i.host || '?'}: ${i.action}`, i.recovered_in_ms ? `, recovered in ${(i.recovered_in_ms / 1000).toFixed(2)} s` : ''),
      h('ol', { class: 'timeline' }, (i.timeline || []).map((t) => h('li', {}, h('time', {}, clock(t.time)), t.event, t.detail ? h('span', { class: 'muted' }, ' — ' + t.detail) : null))))));
  };

  const addEvent = (e, fresh) => {
    events.prepend(h('tr', { class: fresh ? 'fresh' : '', 'data-type': e.type },
      h('td', { class: 'muted' }, clock(e.time)), h('td', {}, e.type), h('td', {}, e.state ? stateBadge(e.state) : ''),
      h('td', {}, e.audit ? `${e.audit.actor} ${e.audit.action} → ${e.audit.status}${e.audit.error ? ': ' + e.audit.error : ''}` : e.message || '')));
    while (events.children.length > 100) events.lastChild.remove();
  };

  // Refreshes overlap (the timer, events, an action's end): only the
  // latest one started draws, and none after the page is left.
  let generation = 0;
  async function refresh() {
    if (closed) return;
    const mine = ++generation;
    const current = () => !closed && mine === generation;
    let got;
    try {
      got = await Promise.all([get(p), get(p + '/snapshots')]);
    } catch (e) {
      if (!current()) return;
      err.textContent = e.message;
      if (e.status === 404) replace(toolbar);
      return;
    }
    if (!current()) return;
    [vm, snaps] = got;
    err.textContent = '';
    drawDetails();
    drawActions();
    drawSnapshots();
    get(p + '/incidents').then((list) => { if (current()) drawIncidents(list); }, () => {});
  }

  const loadUsage = async () => {
    if (!vm || closed) return;
    let u;
    try { u = await get(p + '/usage'); } catch (e) { if (!closed) replace(charts, h('p', { class: 'muted' }, e.message)); return; }
    if (!closed) replace(charts, usageCharts(u, vm));
  };

  get('/v1/hosts').then((hs) => { hosts = hs; if (vm) drawActions(); }, () => {});
  // Progress events go to the action's toast, not the list.
  for (const e of ctx.log.events) if (e.vm === name && e.type !== 'vm.progress') addEvent(e, false);
  let pending = null;
  const off = ctx.log.listen((e) => {
    if (e.vm !== name) return;
    if (e.type === 'vm.progress') { progress(name, e.message); return; }
    addEvent(e, true);
    if (!pending) pending = setTimeout(() => { pending = null; refresh(); }, 100);
  });
  refresh().then(loadUsage);
  const stopConsole = consolePanel(consoleBox, name, () => vm);
  const timers = [setInterval(loadUsage, 5000), setInterval(() => { if (vm) drawDetails(); }, 1000), setInterval(refresh, 10000)];
  return () => { closed = true; off(); clearTimeout(pending); timers.forEach(clearInterval); stopConsole(); };
}

// consolePanel shows the serial console, or the screen through noVNC.
function consolePanel(box, name, vm) {
  let stop = () => {};
  const body = h('div');
  const tabs = h('div', { class: 'tabs' });
  const show = (which) => {
    stop();
    for (const b of tabs.children) b.classList.toggle('on', b.dataset.tab === which);
    stop = which === 'serial' ? serialConsole(body, name) : vncConsole(body, name);
  };
  replace(tabs,
    h('button', { 'data-tab': 'serial', onclick: () => show('serial') }, 'Serial'),
    h('button', { 'data-tab': 'vnc', onclick: () => show('vnc') }, 'Screen (VNC)'));
  replace(box, tabs, body);
  show('serial');
  return () => stop();
}
