package manager

import (
	"bufio"
	"io"
	"math"
	"strconv"
	"strings"
	"unicode/utf8"
)

// The cluster's series are written in Prometheus' text format (version
// 0.0.4) directly, not through client_golang's const metrics: at 20,000
// VMs (about 200,000 series) building, checking and sorting one metric
// object per series took most of a scrape's 0.7 s on an idle machine and
// 5.5 s on a busy one, and Prometheus' scrape timeout is 10 s.

// family is a metric family of the cluster: its name, type (gauge or
// counter), help and label names.
type family struct {
	name, typ, help string
	labels          []string
}

// exposition collects samples by family, in the order families were
// first used, each family's samples together as the format requires.
type exposition struct {
	order []*family
	lines map[*family][]byte
}

// add records one sample of f with the label values (one per label name).
func (e *exposition) add(f *family, v float64, values ...string) {
	if e.lines == nil {
		e.lines = map[*family][]byte{}
	}
	b, ok := e.lines[f]
	if !ok {
		e.order = append(e.order, f)
	}
	b = append(b, f.name...)
	if len(f.labels) > 0 {
		b = append(b, '{')
		for i, name := range f.labels {
			if i > 0 {
				b = append(b, ',')
			}
			b = append(b, name...)
			b = append(b, '=', '"')
			if i < len(values) {
				b = appendLabelValue(b, values[i])
			}
			b = append(b, '"')
		}
		b = append(b, '}')
	}
	b = append(b, ' ')
	b = appendValue(b, v)
	e.lines[f] = append(b, '\n')
}

// WriteTo writes every family that has samples: HELP, TYPE, samples.
func (e *exposition) WriteTo(w io.Writer) (int64, error) {
	bw := bufio.NewWriterSize(w, 64<<10)
	var n int64
	for _, f := range e.order {
		k, _ := bw.WriteString("# HELP " + f.name + " " + helpEscaper.Replace(f.help) + "\n# TYPE " + f.name + " " + f.typ + "\n")
		n += int64(k)
		k, _ = bw.Write(e.lines[f])
		n += int64(k)
	}
	return n, bw.Flush()
}

var helpEscaper = strings.NewReplacer(`\`, `\\`, "\n", `\n`)

// appendLabelValue escapes a label value: backslash, double quote and
// line feed. Bytes that are not UTF-8 (which Prometheus refuses, with the
// whole scrape) become U+FFFD.
func appendLabelValue(b []byte, s string) []byte {
	if !utf8.ValidString(s) {
		s = strings.ToValidUTF8(s, "\uFFFD")
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\':
			b = append(b, '\\', '\\')
		case '"':
			b = append(b, '\\', '"')
		case '\n':
			b = append(b, '\\', 'n')
		default:
			b = append(b, c)
		}
	}
	return b
}

// appendValue writes a sample value as Prometheus reads it.
func appendValue(b []byte, v float64) []byte {
	switch {
	case math.IsInf(v, 1):
		return append(b, "+Inf"...)
	case math.IsInf(v, -1):
		return append(b, "-Inf"...)
	case math.IsNaN(v):
		return append(b, "NaN"...)
	}
	return strconv.AppendFloat(b, v, 'g', -1, 64)
}
