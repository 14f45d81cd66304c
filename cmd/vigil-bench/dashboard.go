package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/headless"
)

// drawnProbe, run in every page before its own scripts, notes when the VM
// list first shows a VM (performance.now(), from the navigation's start).
const drawnProbe = `new MutationObserver((_, obs) => {
  if (document.querySelector('#vms tr[data-vm]')) { window.__vigilDrawn = performance.now(); obs.disconnect(); }
}).observe(document, { childList: true, subtree: true });`

// pageBytes is what the last navigation moved over the wire: the page,
// its files and its API calls (compressed sizes, headers included).
const pageBytes = `(() => {
  let n = performance.getEntriesByType('navigation')[0].transferSize;
  for (const r of performance.getEntriesByType('resource')) n += r.transferSize;
  return n;
})()`

// dashboard measures the web dashboard in headless Chromium: its first
// load (cache off) until the VM list is drawn, against the same browser
// fetching GET /v1/vms alone; and the time from a click on Pause or Resume
// to its event on the VM's page, against the API call and the event
// stream read by a Go client.
func (b *bench) dashboard(ctx context.Context) ([]row, error) {
	if _, err := headless.Path(); err != nil {
		return nil, err
	}
	cfg, err := client.LoadConfig(filepath.Join(b.dataDir, "client.yaml"))
	if err != nil {
		return nil, err
	}
	if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: "dash", MemoryBytes: 128 << 20, CPUs: 1, DiskBytes: 256 << 20, Start: true}); err != nil {
		return nil, err
	}
	defer b.c.DeleteVM(context.WithoutCancel(ctx), "dash", true)
	if _, err := b.c.WaitGuest(ctx, "dash"); err != nil {
		return nil, err
	}
	prof, err := os.MkdirTemp(b.tmp, "chromium")
	if err != nil {
		return nil, err
	}
	bctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	br, err := headless.Open(bctx, cfg.URL, cfg.CACert, prof)
	if err != nil {
		return nil, err
	}
	defer br.Close()
	do := func(as ...chromedp.Action[chromedp.Void]) error { return chromedp.Do(br.Ctx, as...) }
	if _, err := chromedp.Call(br.Ctx, page.AddScriptToEvaluateOnNewDocument, page.AddScriptToEvaluateOnNewDocumentParams{Source: drawnProbe}); err != nil {
		return nil, err
	}
	if _, err := chromedp.Call(br.Ctx, network.Enable, network.EnableParams{}); err != nil {
		return nil, err
	}
	if _, err := chromedp.Call(br.Ctx, network.SetCacheDisabled, network.SetCacheDisabledParams{CacheDisabled: true}); err != nil {
		return nil, err
	}
	// Signed in once, with a link (the token stays in the tab's sessionStorage).
	link, err := b.c.SignInLink(ctx)
	if err != nil {
		return nil, err
	}
	if err := do(chromedp.Navigate(cfg.URL+"/ui/#code="+link.Code),
		chromedp.WaitVisible(chromedp.CSS(`#vms tr[data-vm="dash"]`))); err != nil {
		return nil, fmt.Errorf("sign in: %w", err)
	}

	firstLoad := func(vms int) (row, error) {
		var load, fetchAlone []time.Duration
		var bytes int
		for i := 0; i < b.runs; i++ {
			if err := do(chromedp.Navigate("about:blank"), chromedp.Navigate(cfg.URL+"/ui/#/vms")); err != nil {
				return row{}, err
			}
			drawn, err := chromedp.Run(br.Ctx, chromedp.Poll[float64](`window.__vigilDrawn`, chromedp.WithPollingTimeout(30*time.Second)))
			if err != nil {
				return row{}, fmt.Errorf("first load: the vm list was not drawn: %w (page errors %v)", err, br.Errors())
			}
			load = append(load, time.Duration(drawn*float64(time.Millisecond)))
			if bytes, err = chromedp.Run(br.Ctx, chromedp.Evaluate[int](pageBytes)); err != nil {
				return row{}, err
			}
			rows, err := chromedp.Run(br.Ctx, chromedp.Evaluate[int](`document.querySelectorAll('#vms tr[data-vm]').length`))
			if err == nil && rows != vms {
				err = fmt.Errorf("the page lists %d vms, want %d", rows, vms)
			}
			if err != nil {
				return row{}, err
			}
			alone, err := chromedp.Run(br.Ctx, chromedp.Evaluate[float64](`(async () => {
				const t0 = performance.now();
				const r = await fetch('/v1/vms', { headers: { Authorization: 'Bearer ' + sessionStorage.getItem('vigil.token') }, cache: 'no-store' });
				await r.json();
				return performance.now() - t0;
			})()`, chromedp.EvalAwaitPromise))
			if err != nil {
				return row{}, err
			}
			fetchAlone = append(fetchAlone, time.Duration(alone*float64(time.Millisecond)))
		}
		return versus(fmt.Sprintf("Dashboard first load, cache off: navigation → VM list drawn (%d VM(s) defined; %d runs)", vms, b.runs), load, fetchAlone, ms1,
			"the same browser fetching GET /v1/vms alone", fmt.Sprintf("%.1f KB over the wire (gzip), API calls included", float64(bytes)/1000)), nil
	}
	var out []row
	r1, err := firstLoad(1)
	if err != nil {
		return nil, err
	}
	out = append(out, r1)
	// 199 more, stopped (as the list section does), then gone again.
	const many = 200
	defer func() {
		for i := 1; i < many; i++ {
			b.c.DeleteVM(context.WithoutCancel(ctx), fmt.Sprintf("dash%03d", i), true)
		}
	}()
	for i := 1; i < many; i++ {
		if _, err := b.c.CreateVM(ctx, api.VMCreateRequest{Name: fmt.Sprintf("dash%03d", i), MemoryBytes: 64 << 20, CPUs: 1, DiskBytes: 64 << 20}); err != nil {
			return out, err
		}
	}
	r200, err := firstLoad(many)
	if err != nil {
		return out, err
	}
	out = append(out, r200)

	// Action → event on the page, alternating with the same action through
	// the API and a Go client's event stream.
	if err := do(chromedp.Navigate(cfg.URL+"/ui/#/vms/dash"), chromedp.WaitVisible(chromedp.CSS(`#actions button[data-action=pause]`))); err != nil {
		return nil, err
	}
	clickToEvent := func(action, state string) (time.Duration, error) {
		ms, err := chromedp.Run(br.Ctx, chromedp.Evaluate[float64](`new Promise((resolve, reject) => {
			const tbody = document.querySelector('#vm-events tbody');
			const btn = document.querySelector('#actions button[data-action=`+action+`]');
			if (!tbody || !btn || btn.disabled) { reject(new Error('no enabled `+action+` button')); return; }
			const obs = new MutationObserver((records) => {
				for (const rec of records) for (const n of rec.addedNodes) {
					if (n.dataset && n.dataset.type === 'vm.state' && n.textContent.includes('`+state+`')) { obs.disconnect(); resolve(performance.now() - t0); }
				}
			});
			obs.observe(tbody, { childList: true });
			const t0 = performance.now();
			btn.click();
		})`, chromedp.EvalAwaitPromise))
		if err != nil {
			return 0, err
		}
		// The button comes back once the action's answer arrived.
		if err := do(chromedp.WaitEnabled(chromedp.CSS(`#actions button[data-action=` + map[string]string{"pause": "resume", "resume": "pause"}[action] + `]`))); err != nil {
			return 0, err
		}
		return time.Duration(ms * float64(time.Millisecond)), nil
	}
	viaAPI := func(action api.Action, state api.VMState) (time.Duration, error) {
		sctx, stop := context.WithCancel(ctx)
		defer stop()
		es, err := b.c.Events(sctx, ^uint64(0)>>1, "dash", true)
		if err != nil {
			return 0, err
		}
		got := make(chan time.Time, 1)
		go func() {
			for {
				e, err := es.Next()
				if err != nil {
					return
				}
				if e.Type == "vm.state" && e.State == state {
					got <- time.Now()
					return
				}
			}
		}()
		t0 := time.Now()
		if _, err := b.c.ChangeState(ctx, "dash", api.VMStateRequest{Action: action}); err != nil {
			return 0, err
		}
		select {
		case t := <-got:
			return t.Sub(t0), nil
		case <-time.After(10 * time.Second):
			return 0, errors.New("no vm.state event on the api's stream within 10 s")
		}
	}
	var pageEv, apiEv []time.Duration
	for i := 0; i < b.runs; i++ {
		for _, s := range []struct {
			action api.Action
			state  api.VMState
		}{{api.ActionPause, api.StatePaused}, {api.ActionResume, api.StateRunning}} {
			d, err := clickToEvent(string(s.action), string(s.state))
			if err != nil {
				return out, fmt.Errorf("%s from the page: %w (page errors %v)", s.action, err, br.Errors())
			}
			pageEv = append(pageEv, d)
			// The page's own refresh settles before the API's turn.
			time.Sleep(200 * time.Millisecond)
		}
		for _, s := range []struct {
			action api.Action
			state  api.VMState
		}{{api.ActionPause, api.StatePaused}, {api.ActionResume, api.StateRunning}} {
			d, err := viaAPI(s.action, s.state)
			if err != nil {
				return out, err
			}
			apiEv = append(apiEv, d)
		}
		time.Sleep(200 * time.Millisecond)
	}
	return append(out, versus(fmt.Sprintf("Dashboard: click on Pause or Resume → its vm.state event on the VM's page (%d actions)", len(pageEv)), pageEv, apiEv, ms1,
		"the same action through the API, until a Go client's event stream has the event", "")), nil
}
