package qga

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"
)

// FuzzDecodeAnswer feeds arbitrary guest output through every decoder that
// sees it: the answer classifier and then the typed decoders for the
// answers that carry guest data. Nothing may panic, and every outcome is
// either a value or an error the caller can classify.
func FuzzDecodeAnswer(f *testing.F) {
	for _, seed := range []string{
		realInfo, realOSInfo, realHostName, realInterfaces,
		`{"return": {}}`,
		`{"return": 1000}`,
		`{"return": {"count": 5, "buf-b64": "ZWNhNzg=", "eof": false}}`,
		`{"return": {"exitcode": 3, "err-data": "ZXJyCg==", "out-data": "aGkK", "err-truncated": false, "out-truncated": false, "exited": true}}`,
		`{"return": {"signal": 9, "exited": true}}`,
		`{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}`,
		"\xff{\"return\": 123}\n",
		`{"return": null}`,
		`{"return": 1, "error": {}}`,
		`{"error": null}`,
		"[1]", "null", "", "\n", "{", `{"return": "\ud800"}`,
	} {
		f.Add([]byte(seed), 10)
	}
	f.Fuzz(func(t *testing.T, line []byte, limit int) {
		raw, err := decodeAnswer(line)
		if (raw == nil) == (err == nil) {
			t.Fatalf("decodeAnswer(%q) = %q, %v: want exactly one of value and error", line, raw, err)
		}
		var agentErr *Error
		if err != nil {
			if !errors.As(err, &agentErr) && !errors.Is(err, ErrProtocol) {
				t.Fatalf("decodeAnswer(%q): %v is neither an agent error nor ErrProtocol", line, err)
			}
			return
		}
		limit = max(limit%100, -1) // keep requested sizes small and sometimes "unlimited"
		if res, exited, err := decodeExecStatus(raw, limit); err != nil {
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("decodeExecStatus: %v is not ErrProtocol", err)
			}
		} else if exited && limit > 0 && (len(res.Stdout) > limit || len(res.Stderr) > limit) {
			t.Fatalf("output over the cap of %d: %d, %d bytes", limit, len(res.Stdout), len(res.Stderr))
		}
		if limit > 0 {
			if data, _, err := decodeFileRead(raw, limit); err != nil {
				if !errors.Is(err, ErrProtocol) {
					t.Fatalf("decodeFileRead: %v is not ErrProtocol", err)
				}
			} else if len(data) > limit {
				t.Fatalf("file read returned %d bytes, asked for %d", len(data), limit)
			}
		}
		var info Info
		var osInfo OSInfo
		var ifs []Interface
		for _, v := range []any{&info, &osInfo, &ifs} {
			_ = json.Unmarshal(raw, v) // errors are fine, panics are not
		}
		syncAnswerID(line)
	})
}

// FuzzSync plays an agent that answers the client's synchronisation with
// arbitrary bytes, in which "ID" stands for the id the client sent. The
// client must end with success or an error, never hang or panic, and must
// not accept a stream that holds no correct sync answer.
func FuzzSync(f *testing.F) {
	for _, seed := range []string{
		"\xff{\"return\": ID}\n",
		"{\"return\": {}}\n\xff{\"return\": 1}\n\xff{\"return\": ID}\n",
		"junk\xff\xff\xff{\"return\": ID}\n",
		"\xff{\"return\": ID",
		"\xff{\"return\": \"ID\"}\n",
		"\xff{\"error\": {\"class\": \"x\", \"desc\": \"ID\"}}\n",
		"",
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, stream []byte) {
		client, agent := net.Pipe()
		defer client.Close()
		go func() {
			defer agent.Close()
			r := bufio.NewReader(agent)
			line, err := r.ReadBytes('\n')
			if err != nil || len(line) < 2 || line[0] != sentinel {
				return
			}
			var req struct {
				Arguments struct {
					ID int64 `json:"id"`
				} `json:"arguments"`
			}
			if json.Unmarshal(line[1:], &req) != nil {
				return
			}
			out := bytes.ReplaceAll(stream, []byte("ID"), []byte(strconv.FormatInt(req.Arguments.ID, 10)))
			agent.Write(out)
		}()
		client.SetDeadline(time.Now().Add(10 * time.Second)) // only a guard against hangs
		cn := &conn{nc: client, r: bufio.NewReaderSize(client, 64<<10)}
		err := cn.sync()
		if err == nil && !bytes.Contains(stream, []byte("ID")) {
			t.Fatalf("sync accepted %q, which holds no id", stream)
		}
		if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, io.ErrClosedPipe) {
			t.Fatalf("sync: unexpected error %v", err)
		}
	})
}
