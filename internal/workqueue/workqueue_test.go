package workqueue

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

const waitLimit = time.Second

// start runs q in the background and returns a function that stops it and
// waits for Run to return; the test's cleanup calls it too.
func start[T any](t *testing.T, q *Queue[T], workers int, fn func(context.Context, Work[T]) Result) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		q.Run(ctx, workers, fn)
		close(done)
	}()
	stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(waitLimit):
			t.Error("Run did not return after cancel")
		}
	}
	t.Cleanup(stop)
	return stop
}

// record returns a worker function that reports every call on the channel.
func record[T any](res func(Work[T]) Result) (func(context.Context, Work[T]) Result, chan Work[T]) {
	ch := make(chan Work[T], 100)
	return func(_ context.Context, w Work[T]) Result {
		ch <- w
		if res == nil {
			return Result{}
		}
		return res(w)
	}, ch
}

func recv[V any](t *testing.T, ch <-chan V) V {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(waitLimit):
		t.Fatal("timed out waiting for a call")
		panic("unreachable")
	}
}

func expectNone[V any](t *testing.T, ch <-chan V, within time.Duration) {
	t.Helper()
	select {
	case v := <-ch:
		t.Fatalf("unexpected call: %+v", v)
	case <-time.After(within):
	}
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func sameWork[T comparable](a, b Work[T]) bool {
	return a.Key == b.Key && slices.Equal(a.Items, b.Items) && a.Dropped == b.Dropped && a.Attempt == b.Attempt
}

func TestDedup(t *testing.T) {
	type add struct {
		key    string
		items  []int
		urgent bool
	}
	tests := []struct {
		name string
		adds []add
		want []Work[int]
	}{
		{
			name: "many adds of one key",
			adds: []add{{"k", []int{0}, false}, {"k", []int{1, 2}, false}, {"k", nil, false}, {"k", []int{3}, false}},
			want: []Work[int]{{Key: "k", Items: []int{0, 1, 2, 3}}},
		},
		{
			name: "add without items",
			adds: []add{{"k", nil, false}, {"k", nil, false}},
			want: []Work[int]{{Key: "k"}},
		},
		{
			name: "interleaved keys keep first-add order",
			adds: []add{{"a", []int{1}, false}, {"b", []int{2}, false}, {"a", []int{3}, false}, {"c", nil, false}, {"b", []int{4}, false}},
			want: []Work[int]{
				{Key: "a", Items: []int{1, 3}},
				{Key: "b", Items: []int{2, 4}},
				{Key: "c"},
			},
		},
		{
			name: "urgent keys go first, in their own order",
			adds: []add{{"a", []int{1}, false}, {"u", []int{2}, true}, {"b", nil, false}, {"v", nil, true}},
			want: []Work[int]{{Key: "u", Items: []int{2}}, {Key: "v"}, {Key: "a", Items: []int{1}}, {Key: "b"}},
		},
		{
			name: "an urgent add moves a queued key ahead, once, with its items",
			adds: []add{{"a", nil, false}, {"b", []int{1}, false}, {"c", nil, false}, {"b", []int{2}, true}, {"b", []int{3}, false}},
			want: []Work[int]{{Key: "b", Items: []int{1, 2, 3}}, {Key: "a"}, {Key: "c"}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := New[int](Config{})
			for _, a := range tt.adds {
				if a.urgent {
					q.AddUrgent(a.key, a.items...)
				} else {
					q.Add(a.key, a.items...)
				}
			}
			if got := q.Len(); got != len(tt.want) {
				t.Fatalf("Len before Run = %d, want %d", got, len(tt.want))
			}
			fn, calls := record[int](nil)
			start(t, q, 1, fn)
			for _, want := range tt.want {
				if got := recv(t, calls); !sameWork(got, want) {
					t.Fatalf("got %+v, want %+v", got, want)
				}
			}
			expectNone(t, calls, 20*time.Millisecond)
		})
	}
}

func TestNoConcurrentProcessingOfAKey(t *testing.T) {
	const (
		workers   = 16
		keys      = 5
		producers = 4
		perProd   = 200
		total     = producers * perProd
	)
	// Some adds are urgent, and urgent-only workers run beside the others.
	q := New[int](Config{MaxItems: total, UrgentWorkers: 4})

	var (
		inflight   [keys]atomic.Int32
		violations atomic.Int32
		received   atomic.Int32
		allIn      = make(chan struct{})

		mu      sync.Mutex
		lastSeq = map[[2]int]int{} // (key, producer) -> last sequence seen
		orderOK = true
	)
	fn := func(_ context.Context, w Work[int]) Result {
		var k int
		fmt.Sscanf(w.Key, "k%d", &k)
		if inflight[k].Add(1) > 1 {
			violations.Add(1)
		}
		time.Sleep(50 * time.Microsecond) // widen the window for overlap
		mu.Lock()
		for _, it := range w.Items {
			id := [2]int{k, it / perProd}
			if prev, ok := lastSeq[id]; ok && it%perProd <= prev {
				orderOK = false
			}
			lastSeq[id] = it % perProd
		}
		mu.Unlock()
		inflight[k].Add(-1)
		if received.Add(int32(len(w.Items))) == total {
			close(allIn)
		}
		return Result{}
	}
	start(t, q, workers, fn)

	var wg sync.WaitGroup
	for p := range producers {
		wg.Go(func() {
			for i := range perProd {
				if i%3 == 0 {
					q.AddUrgent(fmt.Sprintf("k%d", i%keys), p*perProd+i)
				} else {
					q.Add(fmt.Sprintf("k%d", i%keys), p*perProd+i)
				}
				if i%10 == 0 {
					runtime.Gosched()
				}
			}
		})
	}
	wg.Wait()
	select {
	case <-allIn:
	case <-time.After(waitLimit):
		t.Fatalf("received %d of %d items", received.Load(), total)
	}
	if v := violations.Load(); v != 0 {
		t.Errorf("%d calls overlapped another call for the same key", v)
	}
	mu.Lock()
	defer mu.Unlock()
	if !orderOK {
		t.Error("items of one producer for one key arrived out of order")
	}
}

func TestAddDuringProcessing(t *testing.T) {
	q := New[string](Config{})
	release := make(chan struct{})
	var first atomic.Bool
	first.Store(true)
	fn, calls := record(func(Work[string]) Result {
		if first.Swap(false) {
			<-release
		}
		return Result{}
	})
	start(t, q, 4, fn)

	q.Add("k", "a")
	if got := recv(t, calls); !slices.Equal(got.Items, []string{"a"}) {
		t.Fatalf("first call items = %v, want [a]", got.Items)
	}
	q.Add("k", "b")
	q.Add("k", "c")
	if got := q.Len(); got != 0 {
		t.Errorf("Len while the key is in flight = %d, want 0", got)
	}
	expectNone(t, calls, 10*time.Millisecond) // the idle workers must not take it
	close(release)
	if got := recv(t, calls); !slices.Equal(got.Items, []string{"b", "c"}) {
		t.Fatalf("second call items = %v, want [b c]", got.Items)
	}
	expectNone(t, calls, 30*time.Millisecond)
	eventually(t, "two processed", func() bool { return q.Stats().Processed == 2 })
}

func TestMaxItems(t *testing.T) {
	seq := func(from, to int) []int {
		var s []int
		for i := from; i < to; i++ {
			s = append(s, i)
		}
		return s
	}
	tests := []struct {
		name        string
		max         int
		adds        [][]int
		want        []int
		wantDropped int
	}{
		{"under the bound", 3, [][]int{{0}, {1}, {2}}, []int{0, 1, 2}, 0},
		{"oldest dropped", 3, [][]int{{0}, {1}, {2}, {3}, {4}}, []int{2, 3, 4}, 2},
		{"one big add", 2, [][]int{{0, 1, 2, 3}}, []int{2, 3}, 2},
		{"default is 64", 0, [][]int{seq(0, 70)}, seq(6, 70), 6},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := New[int](Config{MaxItems: tt.max})
			for _, a := range tt.adds {
				q.Add("k", a...)
			}
			fn, calls := record[int](nil)
			start(t, q, 1, fn)
			got := recv(t, calls)
			if !slices.Equal(got.Items, tt.want) || got.Dropped != tt.wantDropped {
				t.Fatalf("got items %v dropped %d, want %v dropped %d", got.Items, got.Dropped, tt.want, tt.wantDropped)
			}
		})
	}
}

func TestRetryBackoff(t *testing.T) {
	const base, maxDelay = 4 * time.Millisecond, 10 * time.Millisecond
	q := New[string](Config{BaseDelay: base, MaxDelay: maxDelay})
	errBoom := errors.New("boom")
	type call struct {
		at time.Time
		w  Work[string]
	}
	calls := make(chan call, 10)
	fn := func(_ context.Context, w Work[string]) Result {
		calls <- call{time.Now(), w}
		if w.Attempt == 0 && slices.Equal(w.Items, []string{"a"}) {
			q.Add("k", "b") // newer item, must come after the put-back one
		}
		if w.Attempt < 3 && slices.Contains(w.Items, "a") {
			return Result{Err: errBoom}
		}
		return Result{}
	}
	q.Add("k", "a")
	start(t, q, 2, fn)

	want := []struct {
		items    []string
		attempt  int
		minDelay time.Duration
	}{
		{[]string{"a"}, 0, 0},
		{[]string{"a", "b"}, 1, base},
		{[]string{"a", "b"}, 2, 2 * base},
		{[]string{"a", "b"}, 3, maxDelay}, // 4*base capped
	}
	var prev time.Time
	for i, w := range want {
		c := recv(t, calls)
		if !slices.Equal(c.w.Items, w.items) || c.w.Attempt != w.attempt {
			t.Fatalf("call %d: got items %v attempt %d, want %v attempt %d", i, c.w.Items, c.w.Attempt, w.items, w.attempt)
		}
		if i > 0 {
			if gap := c.at.Sub(prev); gap < w.minDelay {
				t.Errorf("call %d came %v after the previous one, want >= %v", i, gap, w.minDelay)
			}
		}
		prev = c.at
	}

	// Success reset the failure count.
	eventually(t, "four processed", func() bool { return q.Stats().Processed == 4 })
	q.Add("k", "c")
	if c := recv(t, calls); !slices.Equal(c.w.Items, []string{"c"}) || c.w.Attempt != 0 {
		t.Fatalf("after success: got items %v attempt %d, want [c] attempt 0", c.w.Items, c.w.Attempt)
	}
	eventually(t, "five processed", func() bool { return q.Stats().Processed == 5 })
	if s := q.Stats(); s.Failed != 3 {
		t.Errorf("Failed = %d, want 3", s.Failed)
	}
}

func TestRetryKeepsItemsBounded(t *testing.T) {
	q := New[string](Config{MaxItems: 2, BaseDelay: time.Millisecond})
	fn, calls := record(func(w Work[string]) Result {
		if w.Attempt == 0 {
			q.Add("k", "d")
			return Result{Err: errors.New("boom")}
		}
		return Result{}
	})
	q.Add("k", "a", "b", "c")
	start(t, q, 1, fn)

	want := []Work[string]{
		{Key: "k", Items: []string{"b", "c"}, Dropped: 1},
		// b c d trimmed to c d; the drop reported to the failed try counts again.
		{Key: "k", Items: []string{"c", "d"}, Dropped: 2, Attempt: 1},
	}
	for _, w := range want {
		if got := recv(t, calls); !sameWork(got, w) {
			t.Fatalf("got %+v, want %+v", got, w)
		}
	}
}

func TestAddDoesNotCutBackoffShort(t *testing.T) {
	const base = 40 * time.Millisecond
	q := New[string](Config{BaseDelay: base})
	type call struct {
		at time.Time
		w  Work[string]
	}
	calls := make(chan call, 10)
	fn := func(_ context.Context, w Work[string]) Result {
		calls <- call{time.Now(), w}
		if w.Attempt == 0 {
			return Result{Err: errors.New("boom")}
		}
		return Result{}
	}
	q.Add("k", "a")
	start(t, q, 2, fn)
	first := recv(t, calls)
	eventually(t, "the failure", func() bool { return q.Stats().Failed == 1 })
	q.Add("k", "b")
	if got := q.Len(); got != 0 {
		t.Errorf("Len during backoff = %d, want 0", got)
	}
	second := recv(t, calls)
	if gap := second.at.Sub(first.at); gap < base {
		t.Errorf("retry came after %v, want >= %v", gap, base)
	}
	if !slices.Equal(second.w.Items, []string{"a", "b"}) {
		t.Errorf("retry items = %v, want [a b]", second.w.Items)
	}
}

func TestBackoff(t *testing.T) {
	tests := []struct {
		cfg  Config
		n    int
		want time.Duration
	}{
		{Config{}, 1, 20 * time.Millisecond},
		{Config{}, 2, 40 * time.Millisecond},
		{Config{}, 3, 80 * time.Millisecond},
		{Config{}, 8, 2560 * time.Millisecond},
		{Config{}, 9, 5 * time.Second},
		{Config{}, 1000, 5 * time.Second},
		{Config{BaseDelay: time.Second, MaxDelay: time.Millisecond}, 3, time.Second},
		{Config{BaseDelay: time.Hour, MaxDelay: 1<<63 - 1}, 1000, 1<<63 - 1},
	}
	for _, tt := range tests {
		q := New[int](tt.cfg)
		if got := q.backoff(tt.n); got != tt.want {
			t.Errorf("%+v backoff(%d) = %v, want %v", tt.cfg, tt.n, got, tt.want)
		}
	}
}

func TestRequeueAfter(t *testing.T) {
	const after = 15 * time.Millisecond
	q := New[string](Config{BaseDelay: time.Millisecond})
	type call struct {
		at time.Time
		w  Work[string]
	}
	calls := make(chan call, 10)
	var n atomic.Int32
	fn := func(_ context.Context, w Work[string]) Result {
		calls <- call{time.Now(), w}
		switch n.Add(1) {
		case 1:
			return Result{Err: errors.New("boom")}
		case 2:
			return Result{RequeueAfter: after}
		}
		return Result{}
	}
	q.Add("k", "a")
	start(t, q, 1, fn)

	recv(t, calls)
	second := recv(t, calls)
	if second.w.Attempt != 1 {
		t.Fatalf("second call attempt = %d, want 1", second.w.Attempt)
	}
	third := recv(t, calls)
	if third.w.Attempt != 0 || len(third.w.Items) != 0 {
		t.Errorf("requeued call: attempt %d items %v, want attempt 0 and no items", third.w.Attempt, third.w.Items)
	}
	if gap := third.at.Sub(second.at); gap < after {
		t.Errorf("requeued after %v, want >= %v", gap, after)
	}
	expectNone(t, calls, 2*after)
}

func TestAddAfter(t *testing.T) {
	const after = 15 * time.Millisecond
	q := New[string](Config{})
	q.AddAfter("now", 0)
	if got := q.Len(); got != 1 {
		t.Fatalf("Len after AddAfter(0) = %d, want 1", got)
	}
	begin := time.Now()
	q.AddAfter("later", after)
	if got := q.Len(); got != 1 {
		t.Fatalf("Len after AddAfter(%v) = %d, want 1", after, got)
	}
	type call struct {
		at  time.Time
		key string
	}
	calls := make(chan call, 10)
	start(t, q, 2, func(_ context.Context, w Work[string]) Result {
		calls <- call{time.Now(), w.Key}
		return Result{}
	})
	if c := recv(t, calls); c.key != "now" {
		t.Fatalf("first key = %q, want now", c.key)
	}
	c := recv(t, calls)
	if c.key != "later" {
		t.Fatalf("second key = %q, want later", c.key)
	}
	if gap := c.at.Sub(begin); gap < after {
		t.Errorf("delayed key came after %v, want >= %v", gap, after)
	}
}

func TestRunStopsCleanly(t *testing.T) {
	before := runtime.NumGoroutine()

	q := New[int](Config{})
	q.AddAfter("pending-before-run", time.Hour)
	var inflight, calls atomic.Int32
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		q.Run(ctx, 8, func(ctx context.Context, w Work[int]) Result {
			inflight.Add(1)
			defer inflight.Add(-1)
			calls.Add(1)
			if w.Key == "block" {
				<-ctx.Done() // Run must wait for this worker
			}
			return Result{RequeueAfter: time.Hour}
		})
		close(done)
	}()
	q.Add("block")
	for i := range 40 {
		q.Add(fmt.Sprint("k", i))
		// Spread over the cancel below, so some timers fire during shutdown.
		q.AddAfter(fmt.Sprint("t", i), time.Duration(i)*100*time.Microsecond)
	}
	eventually(t, "some calls", func() bool { return calls.Load() > 10 })
	time.Sleep(2 * time.Millisecond)
	cancel()
	select {
	case <-done:
	case <-time.After(waitLimit):
		t.Fatal("Run did not return after cancel")
	}
	if n := inflight.Load(); n != 0 {
		t.Errorf("%d worker calls still running after Run returned", n)
	}

	// A stopped queue ignores adds, and no timer adds anything any more.
	n := q.Len()
	q.Add("late")
	q.AddAfter("later", time.Millisecond)
	time.Sleep(10 * time.Millisecond)
	if got := q.Len(); got != n {
		t.Errorf("Len went from %d to %d after Run returned", n, got)
	}

	var now int
	for range 200 {
		if now = runtime.NumGoroutine(); now <= before {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if now > before {
		t.Errorf("goroutines: %d before, %d after Run returned", before, now)
	}
}

func TestRunWithEndedContext(t *testing.T) {
	q := New[int](Config{})
	q.Add("k", 1)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var calls atomic.Int32
	q.Run(ctx, 4, func(context.Context, Work[int]) Result {
		calls.Add(1)
		return Result{}
	})
	if n := calls.Load(); n != 0 {
		t.Errorf("fn called %d times with an ended context", n)
	}
}

func TestLenAndStats(t *testing.T) {
	const wait = 10 * time.Millisecond
	q := New[string](Config{BaseDelay: time.Millisecond})
	q.Add("a")
	q.Add("b")
	q.Add("a")
	if got := q.Len(); got != 2 {
		t.Fatalf("Len = %d, want 2", got)
	}
	if s := q.Stats(); s != (Stats{}) {
		t.Fatalf("Stats before Run = %+v, want zero", s)
	}
	time.Sleep(wait)

	var failedB atomic.Bool
	fn, calls := record(func(w Work[string]) Result {
		if w.Key == "b" && !failedB.Swap(true) {
			return Result{Err: errors.New("boom")}
		}
		return Result{}
	})
	start(t, q, 1, fn)
	for range 3 {
		recv(t, calls)
	}
	eventually(t, "three processed", func() bool { return q.Stats().Processed == 3 })

	s := q.Stats()
	if s.Started != 3 || s.Failed != 1 {
		t.Errorf("Started %d Failed %d, want 3 and 1", s.Started, s.Failed)
	}
	if s.QueueLatencyMax < wait || s.QueueLatencySum < 2*wait || s.QueueLatencySum < s.QueueLatencyMax {
		t.Errorf("latency sum %v max %v, want max >= %v and sum >= %v", s.QueueLatencySum, s.QueueLatencyMax, wait, 2*wait)
	}
	if got := q.Len(); got != 0 {
		t.Errorf("Len after processing = %d, want 0", got)
	}
}

// Urgent-only workers take urgent keys while every ordinary worker is
// busy, and never take an ordinary key.
func TestUrgentWorkers(t *testing.T) {
	q := New[int](Config{UrgentWorkers: 2})
	block := make(chan struct{})
	calls := make(chan string, 10)
	start(t, q, 1, func(_ context.Context, w Work[int]) Result {
		calls <- w.Key
		if w.Key == "slow" {
			<-block
		}
		return Result{}
	})
	q.Add("slow")
	if got := recv(t, calls); got != "slow" {
		t.Fatalf("first call %q, want slow", got)
	}
	q.Add("n")
	expectNone(t, calls, 30*time.Millisecond) // the ordinary worker is busy
	q.AddUrgent("u1")
	q.AddUrgent("u2")
	got := []string{recv(t, calls), recv(t, calls)}
	slices.Sort(got)
	if !slices.Equal(got, []string{"u1", "u2"}) {
		t.Fatalf("urgent calls %v, want u1 and u2", got)
	}
	expectNone(t, calls, 30*time.Millisecond) // n waits for the ordinary worker
	close(block)
	if got := recv(t, calls); got != "n" {
		t.Fatalf("after slow: %q, want n", got)
	}
}

// A key stays urgent through its backoff: once released it goes ahead of
// ordinary keys that were queued meanwhile.
func TestUrgentThroughBackoff(t *testing.T) {
	q := New[int](Config{BaseDelay: 20 * time.Millisecond})
	block := make(chan struct{})
	calls := make(chan Work[int], 10)
	start(t, q, 1, func(_ context.Context, w Work[int]) Result {
		calls <- w
		switch {
		case w.Key == "u" && w.Attempt == 0:
			return Result{Err: errors.New("not yet")}
		case w.Key == "a":
			<-block
		}
		return Result{}
	})
	q.AddUrgent("u")
	if w := recv(t, calls); w.Key != "u" {
		t.Fatalf("first call %+v, want u", w)
	}
	q.Add("a")
	if w := recv(t, calls); w.Key != "a" {
		t.Fatalf("second call %+v, want a (u sits out its backoff)", w)
	}
	q.Add("b")
	eventually(t, "u back from its backoff", func() bool { return q.Len() == 2 })
	close(block)
	if w := recv(t, calls); w.Key != "u" || w.Attempt != 1 {
		t.Fatalf("after a: %+v, want u's retry", w)
	}
	if w := recv(t, calls); w.Key != "b" {
		t.Fatalf("then %+v, want b", w)
	}
}
