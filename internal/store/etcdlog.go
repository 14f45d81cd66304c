package store

import (
	"context"
	"log/slog"
	"sort"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// etcdLogEvery bounds etcd's repeated warnings: the first of each message in
// this long is logged, the rest dropped. A store under load warns about
// every slow request ("apply request took too long"); one line in ten
// seconds says as much.
const etcdLogEvery = 10 * time.Second

// etcdLogger is the zap logger an embedded member logs through: its
// warnings and errors go to log as "etcd: ..." (slow disks, slow applies,
// lost leaders are what explain a stalled store), sampled, until quiet is
// set. Its info lines are dropped, and so is everything but a panic or a
// fatal error once quiet (set while the member shuts down, when etcd
// reports routine steps as errors).
func etcdLogger(log *slog.Logger, quiet *atomic.Bool) *zap.Logger {
	core := &slogCore{log: log, quiet: quiet}
	return zap.New(zapcore.NewSamplerWithOptions(core, etcdLogEvery, 1, 0))
}

// slogCore is a zapcore.Core writing to slog.
type slogCore struct {
	log    *slog.Logger
	quiet  *atomic.Bool
	fields []zapcore.Field
}

func (c *slogCore) Enabled(l zapcore.Level) bool {
	return l >= zapcore.DPanicLevel || l >= zapcore.WarnLevel && !c.quiet.Load()
}

func (c *slogCore) With(fs []zapcore.Field) zapcore.Core {
	return &slogCore{log: c.log, quiet: c.quiet, fields: append(append([]zapcore.Field(nil), c.fields...), fs...)}
}

// etcdNoise are warnings every embedded member gives at start that do not
// apply to Vigil's: its client URL is a unix socket of mode 0700, not a
// port, and etcd's own authentication (with its simple tokens) is off.
var etcdNoise = map[string]bool{
	"Running http and grpc server on single port. This is not recommended for production.": true,
	"simple token is not cryptographically signed":                                         true,
}

func (c *slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) && !etcdNoise[e.Message] {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range c.fields {
		f.AddTo(enc)
	}
	for _, f := range fs {
		f.AddTo(enc)
	}
	keys := make([]string, 0, len(enc.Fields))
	for k := range enc.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	attrs := make([]slog.Attr, 0, len(keys))
	for _, k := range keys {
		attrs = append(attrs, slog.Any(k, enc.Fields[k]))
	}
	level := slog.LevelWarn
	if e.Level >= zapcore.ErrorLevel {
		level = slog.LevelError
	}
	c.log.LogAttrs(context.Background(), level, "etcd: "+e.Message, attrs...)
	return nil
}

func (c *slogCore) Sync() error { return nil }
