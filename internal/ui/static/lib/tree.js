// The snapshot tree, drawn left to right: each snapshot under the one it
// was taken from, with the space only it holds, and a "now" node where the
// VM's present state hangs (under the current snapshot).

import { s, bytes, ago } from './dom.js';

const W = 178, H = 46, GX = 34, GY = 12;

// layout gives every node a column (its depth) and a row; a parent sits
// level with the middle of its children.
export function layout(snaps) {
  const byName = new Map(snaps.map((x) => [x.name, { snap: x, kids: [] }]));
  const roots = [];
  for (const n of byName.values()) {
    const p = n.snap.parent && byName.get(n.snap.parent);
    if (p) p.kids.push(n); else roots.push(n);
  }
  const now = { snap: { name: 'now', now: true }, kids: [] };
  const cur = snaps.find((x) => x.current);
  if (cur) byName.get(cur.name).kids.push(now); else roots.push(now);
  const byTime = (a, b) => (a.snap.now ? 1 : b.snap.now ? -1 : Date.parse(a.snap.created) - Date.parse(b.snap.created));
  let row = 0;
  const place = (n, depth) => {
    n.depth = depth;
    n.kids.sort(byTime);
    if (!n.kids.length) { n.row = row++; return; }
    n.kids.forEach((k) => place(k, depth + 1));
    n.row = (n.kids[0].row + n.kids[n.kids.length - 1].row) / 2;
  };
  roots.sort(byTime).forEach((r) => place(r, 0));
  const nodes = [];
  const walk = (n) => { nodes.push(n); n.kids.forEach(walk); };
  roots.forEach(walk);
  return { nodes, rows: row, cols: Math.max(0, ...nodes.map((n) => n.depth)) + 1 };
}

export function drawTree(snaps, selected, onSelect) {
  const { nodes, rows, cols } = layout(snaps);
  const x = (n) => n.depth * (W + GX) + 1, y = (n) => n.row * (H + GY) + 1;
  const edges = [];
  for (const n of nodes) {
    for (const k of n.kids) {
      const x1 = x(n) + W, y1 = y(n) + H / 2, x2 = x(k), y2 = y(k) + H / 2, mx = (x1 + x2) / 2;
      edges.push(s('path', { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
    }
  }
  const boxes = nodes.map((n) => {
    const sn = n.snap;
    const cls = ['node', sn.now ? 'now' : '', sn.current ? 'current' : '', sn.name === selected ? 'selected' : ''].join(' ');
    const sub = sn.now ? 'the running state' : `${bytes(sn.size_bytes)} · ${sn.includes_memory ? 'memory' : sn.consistency || 'disk'} · ${ago(sn.created)}`;
    return s('g', { class: cls, transform: `translate(${x(n)},${y(n)})`, 'data-snapshot': sn.now ? undefined : sn.name, 'data-now': sn.now ? 'true' : undefined,
      onclick: () => { if (!sn.now) onSelect(sn.name); } },
    s('title', {}, sn.now ? 'now' : `${sn.name}: holds ${bytes(sn.size_bytes)}; taken ${sn.created}`),
    s('rect', { width: W, height: H, rx: 5 }),
    s('text', { x: 10, y: 19 }, sn.now ? '▶ now' : sn.name),
    s('text', { x: 10, y: 36, class: 'sub' }, sub));
  });
  const width = cols * (W + GX) - GX + 2, height = Math.max(1, rows) * (H + GY) - GY + 2;
  return s('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'snapshot tree' }, edges, boxes);
}
