package guestproto

import (
	"bytes"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestRoundTrip(t *testing.T) {
	sent := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	tests := []struct {
		name string
		msg  Message
	}{
		{"ping", Message{Type: TypePing, ID: "a1"}},
		{"pong", Message{V: Version, Type: TypePong, ID: "a1"}},
		{"heartbeat", Message{Type: TypeHeartbeat, Heartbeat: &Heartbeat{
			BootID: "b", Seq: 7, UptimeSeconds: 1.5, Load1: 0.25,
			MemUsedBytes: 10, MemTotalBytes: 20, SentAt: sent,
		}}},
		{"id with newline is escaped", Message{Type: TypePing, ID: "x\ny"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var buf bytes.Buffer
			if err := NewEncoder(&buf).Encode(tc.msg); err != nil {
				t.Fatal(err)
			}
			if n := strings.Count(buf.String(), "\n"); n != 1 || !strings.HasSuffix(buf.String(), "\n") {
				t.Fatalf("want exactly one terminated line, got %q", buf.String())
			}
			got, err := NewDecoder(&buf).Decode()
			if err != nil {
				t.Fatal(err)
			}
			want := tc.msg
			want.V = Version
			if got.V != want.V || got.Type != want.Type || got.ID != want.ID {
				t.Fatalf("got %+v, want %+v", got, want)
			}
			if (got.Heartbeat == nil) != (want.Heartbeat == nil) {
				t.Fatalf("heartbeat presence mismatch: %+v", got)
			}
			if want.Heartbeat != nil {
				g, w := *got.Heartbeat, *want.Heartbeat
				if !g.SentAt.Equal(w.SentAt) {
					t.Fatalf("sent_at %v, want %v", g.SentAt, w.SentAt)
				}
				g.SentAt, w.SentAt = time.Time{}, time.Time{}
				if g != w {
					t.Fatalf("heartbeat %+v, want %+v", g, w)
				}
			}
		})
	}
}

func TestEncodeRejects(t *testing.T) {
	tests := []struct {
		name string
		msg  Message
		want error
	}{
		{"wrong version", Message{V: 2, Type: TypePing}, ErrVersion},
		{"no type", Message{}, ErrMalformed},
		{"heartbeat without body", Message{Type: TypeHeartbeat}, ErrMalformed},
		{"too long", Message{Type: TypePing, ID: strings.Repeat("x", MaxLineBytes)}, ErrLineTooLong},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := NewEncoder(io.Discard).Encode(tc.msg)
			if !errors.Is(err, tc.want) {
				t.Fatalf("got %v, want %v", err, tc.want)
			}
		})
	}
}

// result is one Decode outcome: either a message type/id or an error class.
type result struct {
	typ, id string
	err     error
}

func TestDecodeStream(t *testing.T) {
	long := strings.Repeat("z", MaxLineBytes+10)
	exact := `{"v":1,"type":"ping","id":"` + strings.Repeat("e", MaxLineBytes-len(`{"v":1,"type":"ping","id":""}`)) + `"}`
	if len(exact) != MaxLineBytes {
		t.Fatalf("bad fixture length %d", len(exact))
	}
	tests := []struct {
		name  string
		input string
		want  []result
	}{
		{"empty", "", nil},
		{"blank lines skipped", "\n\r\n  \n" + `{"v":1,"type":"ping","id":"1"}` + "\n", []result{{typ: "ping", id: "1"}}},
		{"crlf", `{"v":1,"type":"pong","id":"2"}` + "\r\n", []result{{typ: "pong", id: "2"}}},
		{"no trailing newline", `{"v":1,"type":"ping","id":"3"}`, []result{{typ: "ping", id: "3"}}},
		{"boot noise then message", "\x00\x1b[0mgarbage\n" + `{"v":1,"type":"ping","id":"4"}` + "\n",
			[]result{{err: ErrMalformed}, {typ: "ping", id: "4"}}},
		{"future version then current", `{"v":2,"type":"ping"}` + "\n" + `{"v":1,"type":"ping","id":"5"}` + "\n",
			[]result{{err: ErrVersion}, {typ: "ping", id: "5"}}},
		{"missing version", `{"type":"ping"}` + "\n", []result{{err: ErrVersion}}},
		{"missing type", `{"v":1}` + "\n", []result{{err: ErrMalformed}}},
		{"heartbeat without body", `{"v":1,"type":"heartbeat"}` + "\n", []result{{err: ErrMalformed}}},
		{"unknown type tolerated", `{"v":1,"type":"future","extra":true}` + "\n", []result{{typ: "future"}}},
		{"too long then message", long + "\n" + `{"v":1,"type":"ping","id":"6"}` + "\n",
			[]result{{err: ErrLineTooLong}, {typ: "ping", id: "6"}}},
		{"too long at eof", long, []result{{err: ErrLineTooLong}}},
		{"exactly max", exact + "\n", []result{{typ: "ping", id: strings.Repeat("e", len(exact)-len(`{"v":1,"type":"ping","id":""}`))}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// A one-byte reader exercises the partial-read paths.
			d := NewDecoder(&oneByteReader{r: strings.NewReader(tc.input)})
			for i, w := range tc.want {
				m, err := d.Decode()
				if w.err != nil {
					if !errors.Is(err, w.err) {
						t.Fatalf("#%d: got (%+v, %v), want error %v", i, m, err, w.err)
					}
					continue
				}
				if err != nil || m.Type != w.typ || m.ID != w.id {
					t.Fatalf("#%d: got (%+v, %v), want %s/%s", i, m, err, w.typ, w.id)
				}
			}
			if _, err := d.Decode(); err != io.EOF {
				t.Fatalf("want io.EOF at end, got %v", err)
			}
		})
	}
}

type oneByteReader struct{ r io.Reader }

func (o *oneByteReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return o.r.Read(p)
}

// lineCheckWriter records each Write call so the test can check that
// concurrent Encodes never interleave within a line.
type lineCheckWriter struct {
	mu     sync.Mutex
	writes []string
}

func (w *lineCheckWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.writes = append(w.writes, string(p))
	return len(p), nil
}

func TestEncoderConcurrent(t *testing.T) {
	w := &lineCheckWriter{}
	enc := NewEncoder(w)
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for range 50 {
				if err := enc.Encode(Message{Type: TypePing, ID: strings.Repeat(string(rune('a'+i)), 100)}); err != nil {
					t.Error(err)
				}
			}
		})
	}
	wg.Wait()
	if len(w.writes) != 400 {
		t.Fatalf("got %d writes, want 400", len(w.writes))
	}
	d := NewDecoder(strings.NewReader(strings.Join(w.writes, "")))
	for range 400 {
		if _, err := d.Decode(); err != nil {
			t.Fatal(err)
		}
	}
}

func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"v":1,"type":"ping","id":"1"}` + "\n"))
	f.Add([]byte(`{"v":1,"type":"heartbeat","heartbeat":{"boot_id":"x","seq":1,"sent_at":"2026-01-01T00:00:00Z"}}`))
	f.Add([]byte("noise\n\n{\"v\":2}\n{"))
	f.Add([]byte{0xff, 0xfe, '\n', '{', '}'})
	f.Fuzz(func(t *testing.T, data []byte) {
		d := NewDecoder(bytes.NewReader(data))
		// Every Decode call consumes at least one byte or ends the stream,
		// so this loop terminates; bound it anyway as a safety net.
		for i := 0; i <= len(data)+1; i++ {
			m, err := d.Decode()
			if err == io.EOF {
				return
			}
			if err == nil {
				if m.V != Version || m.Type == "" {
					t.Fatalf("decoder accepted invalid message %+v", m)
				}
				// Anything accepted must re-encode.
				if err := NewEncoder(io.Discard).Encode(m); err != nil && !errors.Is(err, ErrLineTooLong) {
					t.Fatalf("re-encode %+v: %v", m, err)
				}
				continue
			}
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("unexpected error class: %v", err)
			}
		}
		t.Fatalf("decoder did not reach EOF")
	})
}
