import { toast } from '../lib/dom.js';

// The actions running now, by the VM they act on: the VM's progress events
// (memory saved, state verified...) show in their toasts.
const running = new Set();

// act runs one user action: a toast shows it in progress, then how it
// ended, with the API's error in words when it failed; then refresh.
export async function act(label, fn, refresh, success, vm) {
  const t = toast(label + '…', '', true);
  const entry = { vm, label, t };
  running.add(entry);
  try {
    const res = await fn();
    t.done(success ? success(res) : label + ': done', 'ok');
    return res;
  } catch (e) {
    t.done(label + ' failed: ' + e.message, 'error');
    return undefined;
  } finally {
    running.delete(entry);
    if (refresh) refresh();
  }
}

// progress shows a VM's progress event in the toasts of its actions.
export function progress(vm, message) {
  for (const r of running) if (r.vm === vm) r.t.update(`${r.label}: ${message}`);
}
