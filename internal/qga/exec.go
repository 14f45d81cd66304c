package qga

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"
)

// ExecResult is the outcome of a process run in the guest.
type ExecResult struct {
	// ExitCode is the process's exit status, or -1 if it was killed by a
	// signal or the agent did not report a status (as with
	// os.ProcessState.ExitCode), so a killed process is never mistaken for
	// a successful one.
	ExitCode int
	// Signal is the signal that killed the process, or 0.
	Signal int
	Stdout []byte
	Stderr []byte
	// Truncated is set when Stdout or Stderr is incomplete, because it was
	// longer than maxOutput or than the agent captures (qemu-ga keeps at
	// most 16 MiB per stream).
	Truncated bool
}

// Exec runs a program in the guest and waits for it to exit.
//
// path is looked up in the guest's PATH. env, if not empty, is the
// process's whole environment ("NAME=value" entries), not an addition to
// the agent's. input, if not nil, is fed to the process's standard input,
// which is then closed. Each of Stdout and Stderr keeps at most maxOutput
// bytes (maxOutput <= 0: whatever the agent captured).
//
// The agent reports output only once the process has exited, so Exec polls
// guest-exec-status until then or until ctx ends, whichever is first; a
// ctx without a deadline lets Exec wait as long as the process runs. When
// ctx ends first the process keeps running in the guest: the agent has no
// way to kill it.
func (c *Client) Exec(ctx context.Context, path string, args, env []string, input []byte, maxOutput int) (ExecResult, error) {
	res, err := c.exec(ctx, path, args, env, input, maxOutput)
	if err != nil {
		return ExecResult{}, fmt.Errorf("qga: exec %s: %w", path, err)
	}
	return res, nil
}

func (c *Client) exec(ctx context.Context, path string, args, env []string, input []byte, maxOutput int) (ExecResult, error) {
	req := struct {
		Path          string   `json:"path"`
		Arg           []string `json:"arg,omitempty"`
		Env           []string `json:"env,omitempty"`
		InputData     *string  `json:"input-data,omitempty"`
		CaptureOutput bool     `json:"capture-output"`
	}{Path: path, Arg: args, Env: env, CaptureOutput: true}
	if input != nil {
		s := base64.StdEncoding.EncodeToString(input)
		req.InputData = &s
	}
	var started struct {
		PID int64 `json:"pid"`
	}
	if err := c.run(ctx, "guest-exec", req, &started, maxAnswer); err != nil {
		return ExecResult{}, err
	}

	var timer *time.Timer
	for {
		var raw json.RawMessage
		args := map[string]int64{"pid": started.PID}
		// Each poll has a bound of its own: an answer lost on the way (the
		// connection is then dropped, and the next poll connects and
		// synchronises afresh) costs one poll's time, not the whole of
		// ctx. The agent keeps the process's status until it is read,
		// whichever connection asks.
		pctx, cancel := context.WithTimeout(ctx, min(c.timeout, execPollTimeout))
		err := c.run(pctx, "guest-exec-status", args, &raw, maxExecAnswer)
		cancel()
		switch {
		case err != nil && ctx.Err() == nil && (errors.Is(err, ErrNoAnswer) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)):
			c.lostAnswers.Add(1) // ask again
		case err != nil:
			return ExecResult{}, fmt.Errorf("pid %d: %w", started.PID, err)
		default:
			res, exited, err := decodeExecStatus(raw, maxOutput)
			if err != nil {
				return ExecResult{}, fmt.Errorf("pid %d: guest-exec-status: %w", started.PID, err)
			}
			if exited {
				return res, nil
			}
		}
		if timer == nil {
			timer = time.NewTimer(c.poll)
			defer timer.Stop()
		} else {
			timer.Reset(c.poll)
		}
		select {
		case <-timer.C:
		case <-ctx.Done():
			return ExecResult{}, fmt.Errorf("pid %d still running in the guest: %w", started.PID, ctx.Err())
		}
	}
}

// decodeExecStatus interprets a guest-exec-status answer. exited is false
// while the process runs; the agent then sends no output yet.
func decodeExecStatus(raw json.RawMessage, maxOutput int) (res ExecResult, exited bool, err error) {
	var st struct {
		Exited       bool   `json:"exited"`
		ExitCode     *int   `json:"exitcode"`
		Signal       *int   `json:"signal"`
		OutData      string `json:"out-data"`
		ErrData      string `json:"err-data"`
		OutTruncated bool   `json:"out-truncated"`
		ErrTruncated bool   `json:"err-truncated"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return ExecResult{}, false, protocolError("decode exec status: %v", err)
	}
	if !st.Exited {
		return ExecResult{}, false, nil
	}
	res.ExitCode = -1
	if st.ExitCode != nil {
		res.ExitCode = *st.ExitCode
	}
	if st.Signal != nil {
		res.Signal = *st.Signal
	}
	var outCut, errCut bool
	if res.Stdout, outCut, err = decodeOutput(st.OutData, maxOutput); err != nil {
		return ExecResult{}, false, fmt.Errorf("stdout: %w", err)
	}
	if res.Stderr, errCut, err = decodeOutput(st.ErrData, maxOutput); err != nil {
		return ExecResult{}, false, fmt.Errorf("stderr: %w", err)
	}
	res.Truncated = outCut || errCut || st.OutTruncated || st.ErrTruncated
	return res, true, nil
}

// decodeOutput decodes base64 output, keeping at most max bytes (all if
// max <= 0). Only the part that is kept is decoded, so a cap of a few KiB
// on 16 MiB of output costs a few KiB.
func decodeOutput(s string, max int) (b []byte, cut bool, err error) {
	// Base64 text is never shorter than the bytes it encodes, so text of
	// at most max characters needs no cap.
	if max > 0 && len(s) > max {
		if n := (max + 2) / 3 * 4; len(s) > n {
			s, cut = s[:n], true
		}
	}
	b, err = base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, false, protocolError("output is not base64: %v", err)
	}
	if max > 0 && len(b) > max {
		b, cut = b[:max], true
	}
	return b, cut, nil
}
