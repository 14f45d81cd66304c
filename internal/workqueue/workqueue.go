// Package workqueue is a keyed work queue in the spirit of client-go's
// workqueue. Work is coalesced per key: however many times a key is added
// before a worker gets to it, the worker sees it once, together with every
// item added for it. A key is never handled by two workers at once, and a
// key whose handler fails is retried after a per-key exponential backoff.
//
// Typical use is reconciliation: events name the object that changed (the
// key) and carry details (the items); the worker brings the object in line
// with the world and reports whether it must be retried.
//
// Keys added with AddUrgent go ahead of the others, and may have workers of
// their own (Config.UrgentWorkers): a burst of urgent work (a dead host's
// VMs) does not wait behind routine work, nor share its few workers.
package workqueue

import (
	"context"
	"slices"
	"sync"
	"time"
)

const (
	defaultMaxItems  = 64
	defaultBaseDelay = 20 * time.Millisecond
	defaultMaxDelay  = 5 * time.Second
)

// Config tunes a Queue. The zero value is usable.
type Config struct {
	// MaxItems bounds the items kept per key (oldest dropped first, and the
	// number dropped is reported to the worker); default 64.
	MaxItems int
	// BaseDelay, MaxDelay: per-key exponential backoff for failed keys
	// (defaults 20ms, 5s).
	BaseDelay, MaxDelay time.Duration
	// UrgentWorkers are workers, beyond those Run is given, that take only
	// urgent keys: urgent work gets more hands than routine work is allowed.
	UrgentWorkers int
}

// Work is what a worker is handed for one key.
type Work[T any] struct {
	Key string
	// Items are those added for Key since it was last handed out, oldest
	// first. After a failure the same slice is handed out again, so fn
	// should treat it as read-only.
	Items []T
	// Dropped counts items lost to MaxItems, so a worker that relies on
	// seeing every item knows to fall back to a full resync.
	Dropped int
	// Attempt is the number of consecutive failures before this try.
	Attempt int
}

// Result tells the queue what to do with a key after a worker handled it.
type Result struct {
	// Err != nil: retried after the key's backoff (BaseDelay doubling per
	// consecutive failure up to MaxDelay); the items of the failed try are
	// put back in front of any newer ones (still bounded by MaxItems).
	Err error
	// RequeueAfter > 0 (and Err nil): process the key again after this long;
	// resets the backoff.
	RequeueAfter time.Duration
}

// Stats are cumulative counters meant to be exported as metrics.
type Stats struct {
	// Started counts keys handed to a worker; QueueLatencySum/Started is
	// the mean queue latency.
	Started uint64
	// Processed counts calls of the worker function that have returned.
	Processed uint64
	// Failed counts the calls among Processed that returned an error.
	Failed uint64
	// QueueLatencySum and QueueLatencyMax measure the time from the first
	// Add of a pending key to a worker picking it up. Backoff after a
	// failure is deliberate, so a retried key is timed from the end of its
	// backoff instead.
	QueueLatencySum time.Duration
	QueueLatencyMax time.Duration
}

// pending is what waits for a key that is not being processed.
type pending[T any] struct {
	items   []T
	dropped int
	since   time.Time
	// held marks a key sitting out its backoff. It is kept out of the FIFO
	// so that new Adds cannot defeat the backoff; its timer releases it.
	held bool
	// urgent: the key waits in the urgent FIFO (until it is handed out).
	urgent bool
}

// Queue is a keyed work queue; see the package documentation. Create it
// with New. All methods are safe for concurrent use.
//
// Invariant: a key is in one of the two FIFOs (the urgent one when its
// pending entry is urgent) exactly when it has a pending entry that is
// neither held nor being processed. That is what keeps a key queued at most
// once and out of the hands of two workers at once.
type Queue[T any] struct {
	cfg Config

	mu    sync.Mutex
	cond  *sync.Cond // any worker: signalled when a FIFO grows or the queue stops
	ucond *sync.Cond // urgent-only workers: when the urgent FIFO grows or the queue stops

	ctx     context.Context // Run's context; nil before Run
	stopped bool

	fifo, urgent []string
	dirty        map[string]*pending[T]
	processing   map[string]bool // key → handed out as urgent
	failures     map[string]int  // consecutive failures, absent when zero

	// Delayed adds are AfterFunc timers rather than goroutines, so a pending
	// one costs nothing; timerWG lets Run wait out callbacks that already
	// started when it stops the rest.
	timers    map[uint64]*time.Timer
	nextTimer uint64
	timerWG   sync.WaitGroup

	stats Stats
}

// New returns an empty queue. Keys may be added before Run is called; they
// wait for it.
func New[T any](cfg Config) *Queue[T] {
	if cfg.MaxItems <= 0 {
		cfg.MaxItems = defaultMaxItems
	}
	if cfg.BaseDelay <= 0 {
		cfg.BaseDelay = defaultBaseDelay
	}
	if cfg.MaxDelay <= 0 {
		cfg.MaxDelay = defaultMaxDelay
	}
	if cfg.MaxDelay < cfg.BaseDelay {
		cfg.MaxDelay = cfg.BaseDelay
	}
	q := &Queue[T]{
		cfg:        cfg,
		dirty:      make(map[string]*pending[T]),
		processing: make(map[string]bool),
		failures:   make(map[string]int),
		timers:     make(map[uint64]*time.Timer),
	}
	q.cond = sync.NewCond(&q.mu)
	q.ucond = sync.NewCond(&q.mu)
	return q
}

// Add marks key dirty and appends items to what waits for it. A key is in
// the queue at most once (deduplicated); if it is being processed now, it is
// processed again after that (never by two workers at once). A key sitting
// out its backoff keeps waiting; the items join those of the retry.
func (q *Queue[T]) Add(key string, items ...T) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closedLocked() {
		return
	}
	q.addLocked(key, items, false)
}

// AddUrgent is Add for work that must not wait behind the rest: the key
// goes to the urgent FIFO, ahead of every key added with Add, and stays
// urgent until a worker takes it (also if it is queued already, being
// processed, or sitting out a backoff).
func (q *Queue[T]) AddUrgent(key string, items ...T) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closedLocked() {
		return
	}
	if p := q.dirty[key]; p != nil && !p.urgent {
		p.urgent = true
		if i := slices.Index(q.fifo, key); i >= 0 {
			q.fifo = slices.Delete(q.fifo, i, i+1)
			q.pushLocked(key, p)
		}
	}
	q.addLocked(key, items, true)
}

// AddAfter adds key (no items) after d, unless the queue stops first.
func (q *Queue[T]) AddAfter(key string, d time.Duration) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.closedLocked() {
		return
	}
	if d <= 0 {
		q.addLocked(key, nil, false)
		return
	}
	q.afterLocked(d, func() { q.addLocked(key, nil, false) })
}

// Len is the number of keys waiting (not counting those in flight). Keys
// that were added while in flight, or that sit out a backoff, are not ready
// to be picked up and are not counted either.
func (q *Queue[T]) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.fifo) + len(q.urgent)
}

// Stats returns a snapshot of the cumulative counters.
func (q *Queue[T]) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.stats
}

// Run starts workers goroutines calling fn for each key with the items
// gathered for it, until ctx ends; it returns only when every worker
// and every AddAfter timer goroutine it owns has stopped (no goroutine leaks).
//
// fn receives ctx and should return soon after it ends. Once ctx has ended
// no key is handed out any more and Adds are ignored, so the queue cannot be
// restarted: Run is meant to be called once. workers < 1 means 1; the
// Config's UrgentWorkers run beside them.
func (q *Queue[T]) Run(ctx context.Context, workers int, fn func(ctx context.Context, w Work[T]) Result) {
	if workers < 1 {
		workers = 1
	}
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.ctx = ctx
	q.mu.Unlock()

	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() { q.work(ctx, false, fn) })
	}
	for range q.cfg.UrgentWorkers {
		wg.Go(func() { q.work(ctx, true, fn) })
	}

	<-ctx.Done()

	q.mu.Lock()
	q.stopped = true
	for id, t := range q.timers {
		// A false Stop means the callback has started; it finds its id gone,
		// does nothing and calls Done itself.
		if t.Stop() {
			q.timerWG.Done()
		}
		delete(q.timers, id)
	}
	q.cond.Broadcast()
	q.ucond.Broadcast()
	q.mu.Unlock()

	wg.Wait()
	// No Add to timerWG can follow: afterLocked refuses once stopped is set.
	q.timerWG.Wait()
}

// work hands keys to fn until the queue stops: urgent keys first, and
// only those if urgentOnly.
func (q *Queue[T]) work(ctx context.Context, urgentOnly bool, fn func(ctx context.Context, w Work[T]) Result) {
	cond := q.cond
	if urgentOnly {
		cond = q.ucond
	}
	for {
		q.mu.Lock()
		for len(q.urgent) == 0 && (urgentOnly || len(q.fifo) == 0) && !q.closedLocked() {
			cond.Wait()
		}
		// Checking ctx here, not only stopped, keeps workers from picking up
		// more keys in the moment between ctx ending and Run noticing.
		if q.closedLocked() {
			q.mu.Unlock()
			return
		}
		w := q.pickLocked()
		q.mu.Unlock()

		res := fn(ctx, w)

		q.mu.Lock()
		q.doneLocked(w, res)
		q.mu.Unlock()
	}
}

func (q *Queue[T]) closedLocked() bool {
	return q.stopped || (q.ctx != nil && q.ctx.Err() != nil)
}

func (q *Queue[T]) addLocked(key string, items []T, urgent bool) {
	p := q.dirty[key]
	if p == nil {
		p = &pending[T]{since: time.Now(), urgent: urgent}
		q.dirty[key] = p
		if _, busy := q.processing[key]; !busy {
			q.pushLocked(key, p)
		}
	}
	p.items = append(p.items, items...)
	q.trimLocked(p)
}

// pushLocked queues key, whose pending entry is p, in the FIFO p says.
func (q *Queue[T]) pushLocked(key string, p *pending[T]) {
	if p.urgent {
		q.urgent = append(q.urgent, key)
		q.ucond.Signal()
	} else {
		q.fifo = append(q.fifo, key)
	}
	q.cond.Signal()
}

func (q *Queue[T]) trimLocked(p *pending[T]) {
	n := len(p.items) - q.cfg.MaxItems
	if n <= 0 {
		return
	}
	// Zero the dropped elements so that what they point to can be collected
	// while the backing array lives on.
	clear(p.items[:n])
	p.items = p.items[n:]
	p.dropped += n
}

func (q *Queue[T]) pickLocked() Work[T] {
	from := &q.fifo
	if len(q.urgent) > 0 {
		from = &q.urgent
	}
	key := (*from)[0]
	(*from)[0] = ""
	*from = (*from)[1:]
	p := q.dirty[key]
	delete(q.dirty, key)
	q.processing[key] = p.urgent

	lat := time.Since(p.since)
	q.stats.Started++
	q.stats.QueueLatencySum += lat
	q.stats.QueueLatencyMax = max(q.stats.QueueLatencyMax, lat)

	return Work[T]{Key: key, Items: p.items, Dropped: p.dropped, Attempt: q.failures[key]}
}

func (q *Queue[T]) doneLocked(w Work[T], res Result) {
	key := w.Key
	urgent := q.processing[key]
	delete(q.processing, key)
	q.stats.Processed++
	p := q.dirty[key]

	if res.Err != nil {
		q.stats.Failed++
		n := q.failures[key] + 1
		q.failures[key] = n
		if p == nil {
			p = &pending[T]{}
			q.dirty[key] = p
		}
		p.urgent = p.urgent || urgent // a retry is as urgent as the try
		items := make([]T, 0, len(w.Items)+len(p.items))
		items = append(items, w.Items...)
		p.items = append(items, p.items...)
		// The failed try never completed, so its losses are still news to
		// the retry.
		p.dropped += w.Dropped
		q.trimLocked(p)
		p.held = true
		q.afterLocked(q.backoff(n), func() { q.releaseLocked(key) })
		return
	}

	delete(q.failures, key)
	if p != nil {
		q.pushLocked(key, p)
	}
	if res.RequeueAfter > 0 {
		q.afterLocked(res.RequeueAfter, func() { q.addLocked(key, nil, false) })
	}
}

// releaseLocked ends key's backoff.
func (q *Queue[T]) releaseLocked(key string) {
	p := q.dirty[key]
	if p == nil || !p.held {
		return
	}
	p.held = false
	p.since = time.Now()
	q.pushLocked(key, p)
}

// backoff is the delay before retrying after n consecutive failures.
func (q *Queue[T]) backoff(n int) time.Duration {
	d := q.cfg.BaseDelay
	for i := 1; i < n && d < q.cfg.MaxDelay; i++ {
		if d > q.cfg.MaxDelay/2 { // doubling could overflow
			return q.cfg.MaxDelay
		}
		d *= 2
	}
	return min(d, q.cfg.MaxDelay)
}

// afterLocked runs f with q.mu held after d, unless the queue stops first.
func (q *Queue[T]) afterLocked(d time.Duration, f func()) {
	if q.closedLocked() {
		return
	}
	id := q.nextTimer
	q.nextTimer++
	q.timerWG.Add(1)
	// The callback cannot read q.timers before the assignment below: it
	// needs q.mu, which the caller holds.
	q.timers[id] = time.AfterFunc(d, func() {
		defer q.timerWG.Done()
		q.mu.Lock()
		defer q.mu.Unlock()
		if _, ok := q.timers[id]; !ok {
			return // Run stopped the queue while this callback was starting
		}
		delete(q.timers, id)
		if !q.closedLocked() {
			f()
		}
	})
}
