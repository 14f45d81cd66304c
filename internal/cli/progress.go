package cli

import (
	"context"
	"fmt"
	"os"
	"time"

	"golang.org/x/term"
)

// withProgress runs op while printing the VM's progress events to stderr:
// one rewritten line on a terminal, a plain line at most every second
// otherwise (logs stay readable). Quiet or machine output prints nothing.
func (g *globals) withProgress(ctx context.Context, vm string, op func() error) error {
	if g.quiet || g.output != "table" {
		return op()
	}
	c := g.client()
	pctx, cancel := context.WithCancel(ctx)
	s, err := c.Events(pctx, ^uint64(0)>>1, vm, true)
	if err != nil {
		cancel()
		return op()
	}
	tty := false
	if f, ok := g.errOut.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		var last time.Time
		printed := false
		for {
			e, err := s.Next()
			if err != nil {
				if printed && tty {
					fmt.Fprintln(g.errOut)
				}
				return
			}
			if e.Type != "vm.progress" {
				continue
			}
			switch {
			case tty:
				fmt.Fprintf(g.errOut, "\r\033[K%s: %s", vm, e.Message)
				printed = true
			case time.Since(last) >= time.Second:
				fmt.Fprintf(g.errOut, "%s: %s\n", vm, e.Message)
				last = time.Now()
			}
		}
	}()
	err = op()
	cancel()
	s.Close()
	<-done
	return err
}
