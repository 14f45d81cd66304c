// Vigil's dashboard: plain ES modules, no framework and no build step (the
// views are few and small; the one dependency, noVNC, is bundled into
// vendor/ by scripts/vendor-ui.sh). Routes live in the URL's fragment:
// #/vms, #/vms/NAME, #/hosts, #/boot, #/events. A sign-in link's fragment,
// #code=... (what 'vigil dashboard' prints), is exchanged once for a token
// of this tab's own and dropped from the address bar; the token stays in
// this tab's sessionStorage only.

import { session, get, call } from './lib/api.js';
import { EventLog } from './lib/events.js';
import { replace } from './lib/dom.js';
import { hostsView } from './views/hosts.js';
import { vmsView } from './views/vms.js';
import { vmView } from './views/vm.js';
import { eventsView } from './views/events.js';
import { bootView } from './views/boot.js';

const log = new EventLog();
let cleanup = null;

const $ = (id) => document.getElementById(id);

function route() {
  const hash = location.hash.replace(/^#\/?/, '');
  const [view, ...rest] = hash.split('/');
  let arg = rest.join('/');
  try { arg = decodeURIComponent(arg); } catch { /* a malformed %: use it as it is */ }
  return { view: view || 'vms', arg };
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
    case 'boot': cleanup = bootView(page, ctx); break;
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

// signIn starts the session with token. A token typed in is tried first
// (a refusal is shown on the form); one this tab already holds, or one a
// link just gave, is used at once: a refusal later signs out.
async function signIn(token, verify) {
  session.token = token;
  if (verify) {
    try {
      await get('/v1/hosts');
    } catch (e) {
      session.token = '';
      showSignIn(e.status === 401 || e.status === 403 ? 'That token was refused: ' + e.message : e.message);
      return;
    }
  }
  $('nav').hidden = false;
  $('signout').hidden = false;
  log.onLive = (on) => $('live').classList.toggle('on', on);
  log.start();
  render();
  get('/v1/health').then((h) => { $('who').textContent = 'manager ' + h.manager + (h.leader ? ' (leader)' : ''); }, () => {});
}

let signInForm;

window.addEventListener('DOMContentLoaded', () => {
  signInForm = $('signin');
  signInForm.addEventListener('submit', (e) => {
    e.preventDefault();
    signIn($('token').value.trim(), true);
  });
  $('signout').addEventListener('click', () => { session.token = ''; showSignIn(); });
  window.addEventListener('vigil:unauthorized', (e) => { session.token = ''; showSignIn('Signed out: ' + e.detail.message); });
  window.addEventListener('hashchange', () => {
    if (codeIn(location.hash)) return;
    if (session.token) render();
  });
  if (codeIn(location.hash)) return;
  if (session.token) signIn(session.token); else showSignIn();
});

// codeIn signs in with a sign-in link's code, if the fragment has one.
function codeIn(hash) {
  const m = hash.match(/^#code=([A-Za-z0-9_-]+)$/);
  if (!m) return false;
  history.replaceState(null, '', location.pathname + '#/vms');
  call('POST', '/v1/ui/sessions', { code: m[1] }).then(
    (t) => signIn(t.token),
    (e) => { session.token = ''; showSignIn('That sign-in link did not work (' + e.message + '): links work once, for 2 minutes; run vigil dashboard again.'); });
  return true;
}
