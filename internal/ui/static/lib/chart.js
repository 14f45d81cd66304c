// Small line charts of a VM's usage, drawn as SVG from its usage history
// (cumulative counters sampled by its host every few seconds).

import { h, s, bytes } from './dom.js';

// rates turns cumulative samples into per-second rates of field; a counter
// that went down (a new QEMU) starts again rather than going negative.
export function rates(samples, field) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const a = samples[i - 1], b = samples[i];
    const dt = (Date.parse(b.time) - Date.parse(a.time)) / 1000;
    const dv = (b[field] || 0) - (a[field] || 0);
    if (dt <= 0 || dv < 0) continue;
    out.push({ t: Date.parse(b.time), v: dv / dt });
  }
  return out;
}

export function levels(samples, field) {
  return samples.filter((x) => x[field] !== undefined).map((x) => ({ t: Date.parse(x.time), v: x[field] }));
}

// chart draws one or two series over the same time axis, scaled to the
// larger of their maximum and floor.
export function chart(title, series, format, floor = 0, empty = 'collecting samples (every 5 s)…') {
  const W = 300, H = 60;
  const all = series.flat();
  const t0 = Math.min(...all.map((p) => p.t)), t1 = Math.max(...all.map((p) => p.t));
  const max = Math.max(floor, ...all.map((p) => p.v)) || 1;
  const line = (pts, cls) => s('polyline', {
    class: cls,
    points: pts.map((p) => [((p.t - t0) / Math.max(1, t1 - t0)) * W, H - 2 - (p.v / max) * (H - 4)].map((n) => n.toFixed(1)).join(',')).join(' '),
  });
  const latest = series.map((pts) => (pts.length ? format(pts[pts.length - 1].v) : '–')).join(' / ');
  return h('figure', { class: 'chart', 'data-chart': title },
    h('figcaption', {}, h('span', {}, title), h('span', {}, latest)),
    all.length < 2
      ? s('svg', { viewBox: `0 0 ${W} ${H}` }, s('text', { x: 8, y: 34, fill: '#687386', 'font-size': 12 }, empty))
      : s('svg', { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: 'none', role: 'img', 'aria-label': title },
        series.map((pts, i) => line(pts, i ? 'second' : ''))));
}

export function usageCharts(usage, vm) {
  const smp = usage.samples || [];
  const cpu = rates(smp, 'cpu_seconds').map((p) => ({ t: p.t, v: (p.v * 100) / Math.max(1, vm.cpus) }));
  const pct = (v) => v.toFixed(1) + ' %';
  const rate = (v) => bytes(v) + '/s';
  return [
    chart('CPU (of ' + vm.cpus + ' vCPU' + (vm.cpus > 1 ? 's' : '') + ')', [cpu], pct, 5),
    chart('Memory used (of ' + bytes(vm.memory_bytes) + ')', [levels(smp, 'mem_used_bytes')], bytes, 0,
      smp.length > 1 ? 'not reported: the guest has no agent answering' : undefined),
    chart('Disk read / write', [rates(smp, 'disk_read_bytes'), rates(smp, 'disk_write_bytes')], rate, 1024),
    chart('Network in / out', [rates(smp, 'net_rx_bytes'), rates(smp, 'net_tx_bytes')], rate, 1024),
  ];
}
