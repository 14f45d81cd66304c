// Package headless drives Debian's Chromium, headless, for the dashboard's
// browser tests and benchmarks: a real browser, trusting the manager's
// certificate only after Go verified it against the cluster CA.
package headless

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"sync"

	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// Path finds the browser: $VIGIL_CHROMIUM, else chromium on PATH.
func Path() (string, error) {
	if p := os.Getenv("VIGIL_CHROMIUM"); p != "" {
		return p, nil
	}
	for _, n := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(n); err == nil {
			return p, nil
		}
	}
	return "", errors.New("no chromium: install Debian's chromium package (make test does) or set VIGIL_CHROMIUM")
}

// Browser is one headless browser with its own empty profile.
type Browser struct {
	Ctx    context.Context // a tab: pass it to chromedp.Run
	cancel func()
	mu     sync.Mutex
	errs   []string // exceptions and console errors of the page
}

// Open starts a browser for the manager at apiURL, whose certificate must
// verify against caPEM: the browser is told to accept that certificate's
// key and nothing else it could not verify.
func Open(ctx context.Context, apiURL, caPEM, profileDir string) (*Browser, error) {
	exe, err := Path()
	if err != nil {
		return nil, err
	}
	spki, err := serverKeyPin(apiURL, caPEM)
	if err != nil {
		return nil, err
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(exe),
		chromedp.NoSandbox, // root in CI; the page is our own
		chromedp.UserDataDir(profileDir),
		chromedp.WindowSize(1400, 1000),
		chromedp.Flag("ignore-certificate-errors-spki-list", spki),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-component-update", true),
	)
	actx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	b := &Browser{}
	tctx, cancelTab := chromedp.NewContext(actx, chromedp.WithListener(func(ev any) {
		switch e := ev.(type) {
		case *runtime.EventExceptionThrown:
			d := e.ExceptionDetails
			msg := d.Text
			if d.Exception != nil {
				msg += " " + d.Exception.Description
			}
			b.note(fmt.Sprintf("exception at %s:%d: %s", d.URL, d.LineNumber+1, msg))
		case *runtime.EventConsoleAPICalled:
			if e.Type == runtime.ConsoleAPICalledTypeError {
				var parts []string
				for _, a := range e.Args {
					parts = append(parts, strings.Trim(string(a.Value), `"`)+a.Description)
				}
				b.note("console.error: " + strings.Join(parts, " "))
			}
		}
	}))
	b.Ctx, b.cancel = tctx, func() { cancelTab(); cancelAlloc() }
	if err := chromedp.Do(tctx, chromedp.Navigate("about:blank")); err != nil {
		b.Close()
		return nil, fmt.Errorf("start %s: %w", exe, err)
	}
	return b, nil
}

func (b *Browser) note(s string) {
	b.mu.Lock()
	b.errs = append(b.errs, s)
	b.mu.Unlock()
}

// Errors are the page's uncaught exceptions and console errors so far.
func (b *Browser) Errors() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.errs...)
}

// Close ends the browser.
func (b *Browser) Close() { b.cancel() }

// serverKeyPin connects to the API, verifies its certificate against the
// CA, and returns its public key's SHA-256 in base64 (Chromium's SPKI pin).
func serverKeyPin(apiURL, caPEM string) (string, error) {
	u, err := url.Parse(apiURL)
	if err != nil {
		return "", fmt.Errorf("api url: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(caPEM)) {
		return "", errors.New("no CA certificate in the PEM given")
	}
	conn, err := tls.Dial("tcp", u.Host, &tls.Config{RootCAs: pool, ServerName: u.Hostname(), MinVersion: tls.VersionTLS12})
	if err != nil {
		return "", fmt.Errorf("verify the manager's certificate: %w", err)
	}
	defer conn.Close()
	sum := sha256.Sum256(conn.ConnectionState().PeerCertificates[0].RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:]), nil
}

// Dialogs answers the page's alert, confirm and prompt dialogs: it accepts
// each, typing the answer set last into a prompt.
type Dialogs struct {
	mu     sync.Mutex
	answer string
}

// Answer sets what the next prompts are answered.
func (d *Dialogs) Answer(s string) {
	d.mu.Lock()
	d.answer = s
	d.mu.Unlock()
}

// AnswerDialogs starts answering the dialogs of the tab ctx until it ends.
func AnswerDialogs(ctx context.Context) *Dialogs {
	d := &Dialogs{}
	opening := chromedp.Events(ctx, page.JavascriptDialogOpening)
	go func() {
		for _, err := range opening {
			if err != nil {
				return
			}
			d.mu.Lock()
			p := page.HandleJavaScriptDialogParams{Accept: true, PromptText: d.answer}
			d.mu.Unlock()
			chromedp.Call(ctx, page.HandleJavaScriptDialog, p)
		}
	}()
	return d
}
