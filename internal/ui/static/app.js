// Vigil's dashboard: plain ES modules, no framework and no build step (the
// views are few and small; the one dependency, noVNC, is bundled into
// vendor/ by scripts/vendor-ui.sh). Routes live in the URL's fragment:
// #/vms, #/vms/NAME, #/hosts, #/events. A link whose fragment is
// #token=... (what 'vigil dashboard' prints) signs in and drops the token
// from the address bar; the token stays in this tab's sessionStorage only.

import { session, get } from './lib/api.js';
import { EventLog } from './lib/events.js';
import { replace } from './lib/dom.js';
import { hostsView } from './views/hosts.js';
import { vmsView } from './views/vms.js';
import { vmView } from './views/vm.js';
import { eventsView } from './views/events.js';

const log = new EventLog();
let cleanup = null;

const $ = (id) => document.getElementById(id);

function route() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [view, ...rest] = hash.split('/');
  return { view: view || 'vms', arg: rest.length ? decodeURIComponent(rest.join('/')) : '' };
}

function render() {
  if (cleanup) { cleanup(); cleanup = null; }
  const main = $('main');
  if (!session.token) { showSignIn(); return; }
  const { view, arg } = route();
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.view === view);
  const page = document.createElement('div');
  page.id = 'page';
  replace(main, page);
  const ctx = { log, go: (to) => { location.hash = to; } };
  switch (view) {
    case 'hosts': cleanup = hostsView(page, ctx); break;
    case 'events': cleanup = eventsView(page, ctx); break;
    case 'vms': cleanup = arg ? vmView(page, ctx, arg) : vmsView(page, ctx); break;
    default: location.hash = '#/vms';
  }
}

function showSignIn(message) {
  if (cleanup) { cleanup(); cleanup = null; }
  log.stop();
  $('live').classList.remove('on');
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('who').textContent = '';
  const form = signInForm;
  replace($('main'), form);
  form.hidden = false;
  $('token').value = '';
  $('signin-error').textContent = message || '';
  $('token').focus();
}

async function signIn(token) {
  session.token = token;
  try {
    await get('/v1/vms');
  } catch (e) {
    session.token = '';
    showSignIn(e.status === 401 || e.status === 403 ? 'That token was refused: ' + e.message : e.message);
    return;
  }
  $('nav').hidden = false;
  $('signout').hidden = false;
  try {
    const h = await get('/v1/health');
    $('who').textContent = 'manager ' + h.manager + (h.leader ? ' (leader)' : '');
  } catch { /* shown by the views */ }
  log.onLive = (on) => $('live').classList.toggle('on', on);
  log.start();
  render();
}

let signInForm;

window.addEventListener('DOMContentLoaded', () => {
  signInForm = $('signin');
  signInForm.addEventListener('submit', (e) => {
    e.preventDefault();
    signIn($('token').value.trim());
  });
  $('signout').addEventListener('click', () => { session.token = ''; showSignIn(); });
  window.addEventListener('vigil:unauthorized', (e) => { session.token = ''; showSignIn('Signed out: ' + e.detail.message); });
  window.addEventListener('hashchange', () => {
    const m = location.hash.match(/^#token=(.+)$/);
    if (m) { adoptFragmentToken(m[1]); return; }
    if (session.token) render();
  });
  const m = location.hash.match(/^#token=(.+)$/);
  if (m) { adoptFragmentToken(m[1]); return; }
  if (session.token) signIn(session.token); else showSignIn();
});

function adoptFragmentToken(t) {
  history.replaceState(null, '', location.pathname + '#/vms');
  signIn(decodeURIComponent(t));
}
