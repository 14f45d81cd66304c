package qga

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
)

// readChunk is how much ReadFile asks for per guest-file-read: enough for
// /proc and configuration files in one round trip, and small enough that
// the base64 answer stays far below maxAnswer.
const readChunk = 1 << 20

// ReadFile reads a whole file in the guest, for example
// /proc/sys/kernel/random/boot_id to tell whether the guest rebooted. A
// file longer than max bytes is an error rather than silently cut short.
// Files in /proc report size 0, so the length is only known by reading.
func (c *Client) ReadFile(ctx context.Context, path string, max int) ([]byte, error) {
	data, err := c.readFile(ctx, path, max)
	if err != nil {
		return nil, fmt.Errorf("qga: read %s: %w", path, err)
	}
	return data, nil
}

func (c *Client) readFile(ctx context.Context, path string, max int) (data []byte, err error) {
	if max < 0 {
		return nil, fmt.Errorf("negative size limit %d", max)
	}
	var handle int64
	open := struct {
		Path string `json:"path"`
		Mode string `json:"mode"`
	}{path, "r"}
	if err := c.run(ctx, "guest-file-open", open, &handle, maxAnswer); err != nil {
		return nil, err
	}
	defer func() {
		// An open handle holds a file descriptor in the agent until the
		// agent restarts, so close it even when reading failed; but not
		// when the agent stopped answering, as that would only wait out a
		// second deadline.
		if err != nil && (errors.Is(err, ErrNoAnswer) || ctx.Err() != nil) {
			return
		}
		cerr := c.run(ctx, "guest-file-close", map[string]int64{"handle": handle}, nil, maxAnswer)
		if err == nil && cerr != nil {
			data, err = nil, cerr
		}
	}()

	// Ask for one byte more than max, to notice a longer file.
	for len(data) <= max {
		want := min(max+1-len(data), readChunk)
		var raw json.RawMessage
		args := map[string]int64{"handle": handle, "count": int64(want)}
		if err := c.run(ctx, "guest-file-read", args, &raw, maxAnswer); err != nil {
			return nil, err
		}
		chunk, eof, err := decodeFileRead(raw, want)
		if err != nil {
			return nil, fmt.Errorf("guest-file-read: %w", err)
		}
		data = append(data, chunk...)
		if eof || len(chunk) == 0 {
			break
		}
	}
	if len(data) > max {
		return nil, fmt.Errorf("file is longer than %d bytes", max)
	}
	return data, nil
}

// decodeFileRead checks a guest-file-read answer against the request: the
// guest must not send more than was asked for, and its count must match
// the data.
func decodeFileRead(raw json.RawMessage, requested int) (data []byte, eof bool, err error) {
	var fr struct {
		Count int    `json:"count"`
		Buf   string `json:"buf-b64"`
		EOF   bool   `json:"eof"`
	}
	if err := json.Unmarshal(raw, &fr); err != nil {
		return nil, false, protocolError("decode file read: %v", err)
	}
	if fr.Count < 0 || fr.Count > requested || len(fr.Buf) > base64.StdEncoding.EncodedLen(requested) {
		return nil, false, protocolError("file read returned more than the %d bytes asked for", requested)
	}
	data, err = base64.StdEncoding.DecodeString(fr.Buf)
	if err != nil {
		return nil, false, protocolError("file read data: %v", err)
	}
	if len(data) != fr.Count {
		return nil, false, protocolError("file read count %d does not match %d bytes of data", fr.Count, len(data))
	}
	return data, fr.EOF, nil
}
