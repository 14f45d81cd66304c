package store

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"
)

// TestSoleMemberReadsAlone: the Store of a one-member embedded etcd reads
// without a round of consensus; that of a member of three does not, so
// with its two peers gone it cannot read (a serializable read would
// answer from its own, maybe stale, copy).
func TestSoleMemberReadsAlone(t *testing.T) {
	ctx := context.Background()
	t.Run("one member", func(t *testing.T) {
		e, err := StartEmbedded(ctx, t.TempDir(), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer e.Close()
		st := e.Store("/t/")
		if !st.sole() {
			t.Fatal("a one-member cluster's store does not read alone")
		}
		if err := st.Put(ctx, "k", "v"); err != nil {
			t.Fatal(err)
		}
		var v string
		if _, err := st.Get(ctx, "k", &v); err != nil || v != "v" {
			t.Fatalf("read back %q, %v", v, err)
		}
	})
	t.Run("three members", func(t *testing.T) {
		if testing.Short() {
			t.Skip("starts a cluster of three and waits for it to lose its leader")
		}
		peers := map[string]string{}
		for i := 0; i < 3; i++ {
			p, err := freePort()
			if err != nil {
				t.Fatal(err)
			}
			peers[fmt.Sprintf("m%d", i)] = fmt.Sprintf("http://127.0.0.1:%d", p)
		}
		members := make([]*Embedded, 3)
		errs := make([]error, 3)
		var wg sync.WaitGroup
		for i := range members {
			wg.Add(1)
			go func() {
				defer wg.Done()
				members[i], errs[i] = StartEmbeddedMember(ctx, t.TempDir(), ClusterConfig{Name: fmt.Sprintf("m%d", i), Peers: peers}, nil)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("member %d: %v", i, err)
			}
			defer members[i].Close()
		}
		st := members[0].Store("/t/")
		if st.sole() {
			t.Fatal("a member of three reads alone")
		}
		if err := st.Put(ctx, "k", "v"); err != nil {
			t.Fatal(err)
		}
		members[1].Close()
		members[2].Close()
		rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		var v string
		_, err := st.Get(rctx, "k", &v)
		if err == nil {
			t.Fatal("a member cut off from its cluster answered a read alone")
		}
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Logf("read refused: %v", err)
		}
	})
}
