package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/vigil-project/vigil/api"
	"github.com/vigil-project/vigil/client"
	"github.com/vigil-project/vigil/internal/headless"
)

// TestDashboard drives the web dashboard in a real headless Chromium against
// a dev agent with real guests: sign in, see the running VM, pause and
// resume it from its page and see the events arrive, take snapshots and
// revert (the tree shows the branch), read the serial console and the
// usage charts, see a VM's screen through noVNC, and a viewer's token
// refused an action with the reason in words, sign-in links that work
// once, and a VM deleted with its snapshots. With VIGIL_SCREENSHOTS=DIR
// it saves the main views there (docs/img holds the ones in the README).
func TestDashboard(t *testing.T) {
	needIntegration(t)
	if _, err := headless.Path(); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal(err)
		}
		t.Skip(err)
	}
	a := newDevAgent(t)
	a.mustVigil("vm", "create", "web1", "--memory", "128M", "--start", "--wait")
	viewer := strings.TrimSpace(a.mustVigil("token", "create", "watcher", "--role", "viewer", "-q"))
	// A VM with a display: a blank disk, on which SeaBIOS says it found
	// nothing to boot, on its VGA screen.
	blank := filepath.Join(a.dataDir, "blank.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", blank, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v: %s", err, out)
	}
	a.mustVigil("image", "import", "blank", blank)
	a.mustVigil("vm", "create", "screen", "--image", "blank", "--memory", "64M", "--start")

	cfg, err := client.LoadConfig(a.configPath())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	b, err := headless.Open(ctx, cfg.URL, cfg.CACert, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	d := &dashboard{t: t, b: b, base: cfg.URL}
	defer func() {
		if errs := b.Errors(); len(errs) > 0 {
			t.Errorf("the page reported errors:\n%s", strings.Join(errs, "\n"))
		}
	}()
	dialogs := headless.AnswerDialogs(b.Ctx)

	// A wrong token is refused at the sign-in form, with the reason.
	d.do(chromedp.Navigate(cfg.URL + "/ui/"))
	d.do(chromedp.WaitVisible(chromedp.CSS("#signin")))
	d.shot("signin")
	d.do(chromedp.SendKeys(chromedp.CSS("#token"), "vt1.0000000000000000.nope"))
	d.do(chromedp.Click(chromedp.CSS(`#signin button[type=submit]`)))
	d.waitJS(`document.querySelector('#signin-error')?.textContent.includes('refused')`, "a bad token refused")

	// Sign in with the link 'vigil dashboard' prints: the page trades its
	// code for a token of its own and drops the code from the address bar.
	link := strings.TrimSpace(a.mustVigil("dashboard", "-q"))
	if !strings.HasPrefix(link, cfg.URL+"/ui/#code=") {
		t.Fatalf("vigil dashboard printed %q", link)
	}
	d.do(chromedp.Navigate(link))
	d.waitJS(`document.querySelector('#vms tr[data-vm="web1"] .state')?.textContent === 'running'`, "web1 listed as running")
	d.waitJS(`document.querySelector('#live.on') !== null`, "the live event stream connected")
	if href, err := chromedp.Run(b.Ctx, chromedp.Evaluate[string](`location.href`)); err != nil || strings.Contains(href, "code=") {
		t.Fatalf("the address bar after sign-in: %q %v", href, err)
	}
	toks, err := a.client().Tokens(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var session string
	for _, tk := range toks {
		if strings.HasPrefix(tk.Name, "ui-") {
			session = tk.Name
			if tk.Role != "admin" || tk.Expires == nil || time.Until(*tk.Expires) > 12*time.Hour+time.Minute {
				t.Fatalf("the browser's token: %+v", tk)
			}
		}
	}
	if session == "" {
		t.Fatalf("no token was made for the browser: %+v", toks)
	}
	d.shot("vms")

	// The VM's page: pause, then resume; each event shows up on the page.
	d.do(chromedp.Click(chromedp.CSS(`#vms tr[data-vm="web1"] a`)))
	d.waitJS(`document.querySelector('#details dd') !== null`, "web1's details")
	d.waitJS(`document.querySelector('#serial')?.textContent.includes('boot complete')`, "the serial console shows the boot")
	d.click(`#actions button[data-action=pause]`)
	d.waitJS(`[...document.querySelectorAll('#vm-events tr[data-type="vm.state"]')].some(r => r.textContent.includes('paused'))`, "the paused event on the page")
	d.waitJS(`document.querySelector('h1 .state')?.textContent === 'paused'`, "the page says paused")
	if vm := d.vm(a, "web1"); vm.State != api.StatePaused {
		t.Fatalf("after Pause in the page, the API says %s", vm.State)
	}
	d.click(`#actions button[data-action=resume]`)
	d.waitJS(`document.querySelector('h1 .state')?.textContent === 'running'`, "the page says running again")
	if vm := d.vm(a, "web1"); vm.State != api.StateRunning {
		t.Fatalf("after Resume in the page, the API says %s", vm.State)
	}

	// Two snapshots, a revert to the first (confirmed), and a third: the
	// tree branches at the first and "now" hangs under the third.
	for _, name := range []string{"first", "second"} {
		dialogs.Answer(name)
		d.click(`#actions button[data-action=snapshot]`)
		d.waitJS(`document.querySelector('#tree g[data-snapshot="`+name+`"]') !== null`, "snapshot "+name+" in the tree")
		d.waitJS(`document.querySelector('#actions button[data-action=snapshot]') && !document.querySelector('.toast .spinner')`, "the snapshot's action done")
	}
	d.click(`#tree g[data-snapshot="first"]`)
	d.click(`#snapshot button[data-action=revert]`)
	d.waitJS(`document.querySelector('#tree g.current[data-snapshot="first"]') !== null`, "first is current after the revert")
	dialogs.Answer("third")
	d.click(`#actions button[data-action=snapshot]`)
	d.waitJS(`document.querySelector('#tree g.current[data-snapshot="third"]') !== null`, "third in the tree, current")
	snaps, err := a.client().Snapshots(ctx, "web1")
	if err != nil {
		t.Fatal(err)
	}
	parents := map[string]string{}
	for _, s := range snaps.Snapshots {
		parents[s.Name] = s.Parent
	}
	if parents["second"] != "first" || parents["third"] != "first" {
		t.Fatalf("the snapshots the page made: parents %v, want second and third under first", parents)
	}
	// The tree draws what the API says: every snapshot with its size.
	d.waitJS(`document.querySelectorAll('#tree g[data-snapshot]').length === 3 && [...document.querySelectorAll('#tree g[data-snapshot] text.sub')].every(t => /B ·/.test(t.textContent))`, "three snapshots drawn with their sizes")
	d.waitJS(`document.querySelector('#charts figure[data-chart^="CPU"] polyline') !== null`, "the CPU chart drawn")
	d.shot("vm")

	// The screen of a VM with a display, through noVNC: connected, and
	// something drawn on the canvas.
	d.do(chromedp.Navigate(cfg.URL + "/ui/#/vms/screen"))
	d.waitJS(`document.querySelector('#details dd') !== null`, "screen's details")
	d.click(`button[data-tab=vnc]`)
	d.waitJS(`document.querySelector('#vnc-status')?.textContent.startsWith('Connected')`, "noVNC connected")
	d.waitJS(`(() => { const c = document.querySelector('#vnc canvas'); if (!c || !c.width) return false;
		const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
		for (let i = 0; i < px.length; i += 4) if (px[i] > 128) return true; return false; })()`, "the VM's screen drawn")
	d.shot("screen")

	d.do(chromedp.Navigate(cfg.URL + "/ui/#/hosts"))
	d.waitJS(`document.querySelector('#hosts tr[data-host] .state')?.textContent === 'up'`, "the host listed up")
	d.shot("hosts")
	d.do(chromedp.Navigate(cfg.URL + "/ui/#/boot"))
	d.waitJS(`document.querySelector('#machines tbody tr') !== null`, "the network boot view")
	d.do(chromedp.Navigate(cfg.URL + "/ui/#/events"))
	d.waitJS(`document.querySelectorAll('#events tr[data-type="vm.state"]').length > 3`, "the event log")
	d.shot("events")

	// A viewer sees everything and changes nothing: the refusal is shown
	// in words and the VM is untouched.
	d.click(`#signout`)
	d.do(chromedp.WaitVisible(chromedp.CSS("#signin")))
	d.do(chromedp.SendKeys(chromedp.CSS("#token"), viewer))
	d.do(chromedp.Click(chromedp.CSS(`#signin button[type=submit]`)))
	d.do(chromedp.Navigate(cfg.URL + "/ui/#/vms/web1"))
	d.waitJS(`document.querySelector('h1 .state')?.textContent === 'running'`, "web1's page for the viewer")
	d.click(`#actions button[data-action=pause]`)
	d.waitJS(`[...document.querySelectorAll('.toast.error')].some(e => e.textContent.includes('needs operator'))`, "the refusal, in words")
	if vm := d.vm(a, "web1"); vm.State != api.StateRunning {
		t.Fatalf("a viewer's pause changed the VM: %s", vm.State)
	}
	// A used link does not sign in again.
	d.click(`#signout`)
	d.do(chromedp.Navigate(link))
	d.waitJS(`document.querySelector('#signin-error')?.textContent.includes('did not work')`, "a used link refused")

	// Deleting a VM from its page takes its snapshots with it (the dialog
	// said so, and was confirmed).
	d.do(chromedp.Navigate(strings.TrimSpace(a.mustVigil("dashboard", "-q"))))
	d.waitJS(`document.querySelector('#vms tr[data-vm="web1"]') !== null`, "signed in again")
	d.do(chromedp.Navigate(cfg.URL + "/ui/#/vms/web1"))
	d.click(`#actions button[data-action=delete]`)
	d.waitJS(`location.hash === '#/vms' && document.querySelector('#vms tr[data-vm="screen"]') !== null && document.querySelector('#vms tr[data-vm="web1"]') === null`, "web1 gone from the list")
	if _, err := a.client().VM(ctx, "web1"); err == nil {
		t.Fatal("web1 still exists after Delete in the page")
	}
}

// dashboard is the browser on the dashboard, failing the test on any step
// that does not happen.
type dashboard struct {
	t    *testing.T
	b    *headless.Browser
	base string
}

func (d *dashboard) do(a chromedp.Action[chromedp.Void]) {
	d.t.Helper()
	if err := chromedp.Do(d.b.Ctx, a); err != nil {
		d.t.Fatalf("browser: %v (page errors: %v)", err, d.b.Errors())
	}
}

// click clicks the element once it is there and enabled. The page redraws
// a view when an event arrives, so the node found may be replaced before
// the click lands ("Could not find node with given id"): then it finds the
// new one and clicks again, a few times at most.
func (d *dashboard) click(sel string) {
	d.t.Helper()
	for try := 1; ; try++ {
		d.waitJS(`(() => { const b = document.querySelector('`+sel+`'); return b !== null && !b.disabled; })()`, sel+" enabled")
		err := chromedp.Do(d.b.Ctx, chromedp.Click(chromedp.CSS(sel)))
		if err == nil {
			return
		}
		if try == 3 || !strings.Contains(err.Error(), "Could not find node") {
			d.t.Fatalf("browser: clicking %s: %v (page errors: %v)", sel, err, d.b.Errors())
		}
	}
}

// waitJS waits until the expression is true in the page.
func (d *dashboard) waitJS(expr, what string) {
	d.t.Helper()
	if _, err := chromedp.Run(d.b.Ctx, chromedp.Poll[chromedp.Void](expr, chromedp.WithPollingTimeout(60*time.Second))); err != nil {
		d.shotTo(filepath.Join(os.TempDir(), "vigil-dashboard-failed.png"))
		d.t.Fatalf("waiting for %s: %v (page errors: %v; screenshot in %s)", what, err, d.b.Errors(),
			filepath.Join(os.TempDir(), "vigil-dashboard-failed.png"))
	}
}

func (d *dashboard) vm(a *devAgent, name string) api.VM {
	d.t.Helper()
	vm, err := a.client().VM(context.Background(), name)
	if err != nil {
		d.t.Fatal(err)
	}
	return vm
}

// shot saves the page as DIR/dashboard-NAME.png when VIGIL_SCREENSHOTS is set.
func (d *dashboard) shot(name string) {
	if dir := os.Getenv("VIGIL_SCREENSHOTS"); dir != "" {
		time.Sleep(300 * time.Millisecond) // let the last redraw land
		d.shotTo(filepath.Join(dir, "dashboard-"+name+".png"))
	}
}

func (d *dashboard) shotTo(path string) {
	if buf, err := chromedp.Run(d.b.Ctx, chromedp.FullScreenshot(100)); err == nil {
		os.WriteFile(path, buf, 0o644)
	}
}
