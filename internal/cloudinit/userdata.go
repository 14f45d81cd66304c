package cloudinit

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"strings"
	"unicode"
	"unicode/utf8"

	"sigs.k8s.io/yaml"
)

// MaxUserDataSize caps user data at 16 KiB. cloud-init's documentation
// gives about 16384 bytes as the usual limit on user data (it is EC2's,
// and other clouds copy it) and offers gzip as the way to fit more.
// NoCloud has no limit of its own; keeping to this one means user data
// that works here also works where the limit is enforced.
const MaxUserDataSize = 16 << 10

// maxDecompressedUserData bounds gzip-compressed user data once expanded,
// so that a few kilobytes of crafted gzip cannot make the check allocate
// without limit.
const maxDecompressedUserData = 1 << 20

// mimeSniffLen is how far cloud-init looks for "mime-version:" to decide
// that user data is a MIME message (cloudinit/user_data.py).
const mimeSniffLen = 4096

const acceptedUserData = `cloud-init accepts user data that starts with "#cloud-config" ` +
	`followed by a YAML mapping, "#!" (a script), "#include" (URLs, one a line), ` +
	`or is a MIME multipart message (with "MIME-Version:" and "Content-Type: multipart/..." headers), ` +
	`or is gzip-compressed data holding one of these`

// ValidateUserData checks user data the way cloud-init will read it, and
// refuses what it would ignore or fail on, saying what it accepts:
//
//   - "#cloud-config": the whole document must parse as YAML and be a
//     mapping (cloud-init ignores any other YAML value);
//   - "#!": a script, run as it is;
//   - "#include" or "#include-once": a list of URLs;
//   - a MIME multipart message, which cloud-init recognises by
//     "mime-version:" in its first 4096 bytes; parts of type
//     text/cloud-config are checked like "#cloud-config";
//   - gzip-compressed data holding one of the above (cloud-init
//     decompresses once, so gzip inside gzip is refused).
//
// As in cloud-init, the "#" headers match without regard to case and after
// leading white space, and text must be UTF-8. cloud-init's other kinds
// ("#cloud-boothook", "#part-handler", "#cloud-config-archive",
// "#cloud-config-jsonp", "## template: jinja", "#upstart-job") are refused
// too: they are rarely wanted and easy to get subtly wrong. Data larger
// than MaxUserDataSize is refused.
func ValidateUserData(data []byte) error {
	if len(data) > MaxUserDataSize {
		return fmt.Errorf("%w: %d bytes, limit %d (the usual cloud user-data limit; gzip it to fit more)", ErrInvalidUserData, len(data), MaxUserDataSize)
	}
	if err := validateUserData(data, true); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalidUserData, err)
	}
	return nil
}

func validateUserData(data []byte, gzipAllowed bool) error {
	if len(data) == 0 {
		return fmt.Errorf("empty; %s", acceptedUserData)
	}
	if bytes.HasPrefix(data, []byte{0x1f, 0x8b}) {
		if !gzipAllowed {
			return fmt.Errorf("gzip inside gzip: cloud-init decompresses only once")
		}
		inner, err := gunzip(data)
		if err != nil {
			return err
		}
		if err := validateUserData(inner, false); err != nil {
			return fmt.Errorf("in gzip-compressed data: %w", err)
		}
		return nil
	}
	if !utf8.Valid(data) {
		// cloud-init decodes user data as UTF-8 before looking at it.
		return fmt.Errorf("not UTF-8 text or gzip; %s", acceptedUserData)
	}
	if bytes.Contains(bytes.ToLower(data[:min(len(data), mimeSniffLen)]), []byte("mime-version:")) {
		return validateMIME(data)
	}
	switch kind := kindOf(string(data)); kind {
	case "#cloud-config":
		return validateCloudConfig(data)
	case "#!":
		// cloud-init matches after leading white space but then runs the
		// file as it is, and the kernel only honours "#!" at byte 0.
		if !bytes.HasPrefix(data, []byte("#!")) {
			return fmt.Errorf(`script has text before "#!", so it would not run`)
		}
		return nil
	case "#include", "#include-once":
		return nil
	case "":
		if looksLikeBareCloudConfig(data) {
			return fmt.Errorf(`looks like cloud-config YAML without the "#cloud-config" first line, which cloud-init would ignore; %s`, acceptedUserData)
		}
		return fmt.Errorf("unrecognised start %q; %s", firstLine(data), acceptedUserData)
	default:
		return fmt.Errorf("%q user data is not accepted here; %s", kind, acceptedUserData)
	}
}

// userDataKinds are the start strings cloud-init knows
// (INCLUSION_TYPES_MAP), longest first as cloud-init tries them, so that
// "#cloud-config-archive" is not taken for "#cloud-config".
func userDataKinds() []string {
	return []string{
		"#cloud-config-archive",
		"#cloud-config-jsonp",
		"## template: jinja",
		"#cloud-boothook",
		"#include-once",
		"#part-handler",
		"#cloud-config",
		"#upstart-job",
		"#include",
		"#!",
	}
}

// kindOf returns the start string cloud-init would match, or "".
func kindOf(s string) string {
	s = strings.TrimLeftFunc(s, unicode.IsSpace)
	head := strings.ToLower(s[:min(len(s), 32)])
	for _, k := range userDataKinds() {
		if strings.HasPrefix(head, k) {
			return k
		}
	}
	return ""
}

func validateCloudConfig(data []byte) error {
	j, err := yaml.YAMLToJSON(data)
	if err != nil {
		return fmt.Errorf("cloud-config is not valid YAML: %w", err)
	}
	j = bytes.TrimSpace(j)
	if !bytes.HasPrefix(j, []byte("{")) && !bytes.Equal(j, []byte("null")) {
		return fmt.Errorf("cloud-config must be a YAML mapping (key: value lines); cloud-init ignores anything else")
	}
	return nil
}

// looksLikeBareCloudConfig spots the most common mistake: a cloud-config
// document that forgot its first line.
func looksLikeBareCloudConfig(data []byte) bool {
	j, err := yaml.YAMLToJSON(data)
	return err == nil && bytes.HasPrefix(bytes.TrimSpace(j), []byte("{"))
}

func validateMIME(data []byte) error {
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf(`has "MIME-Version:" in its first %d bytes, so cloud-init reads it as MIME, but its headers do not parse: %w`, mimeSniffLen, err)
	}
	if msg.Header.Get("MIME-Version") == "" {
		return fmt.Errorf(`has "MIME-Version:" in its first %d bytes, so cloud-init reads it as MIME, but the headers lack MIME-Version`, mimeSniffLen)
	}
	mediaType, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		return fmt.Errorf("MIME Content-Type: %w", err)
	}
	if !strings.HasPrefix(mediaType, "multipart/") || params["boundary"] == "" {
		return fmt.Errorf("MIME Content-Type is %q, want multipart/... with a boundary; %s", mediaType, acceptedUserData)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	n := 0
	for ; ; n++ {
		part, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil && n == 0 {
			return fmt.Errorf("MIME multipart message has no parts that follow its boundary %q: %w", params["boundary"], err)
		}
		if err != nil {
			return fmt.Errorf("MIME part %d: %w", n+1, err)
		}
		if err := validatePart(part); err != nil {
			return fmt.Errorf("MIME part %d: %w", n+1, err)
		}
	}
	if n == 0 {
		return fmt.Errorf("MIME multipart message has no parts")
	}
	return nil
}

func validatePart(part *multipart.Part) error {
	var body io.Reader = part
	if strings.EqualFold(part.Header.Get("Content-Transfer-Encoding"), "base64") {
		body = base64.NewDecoder(base64.StdEncoding, part)
	}
	content, err := io.ReadAll(io.LimitReader(body, maxDecompressedUserData+1))
	if err != nil {
		return err
	}
	if len(content) > maxDecompressedUserData {
		return fmt.Errorf("larger than %d bytes", maxDecompressedUserData)
	}
	ct := part.Header.Get("Content-Type")
	if ct == "" {
		return nil
	}
	mediaType, _, err := mime.ParseMediaType(ct)
	if err != nil {
		return fmt.Errorf("Content-Type: %w", err)
	}
	if mediaType == "text/cloud-config" {
		return validateCloudConfig(content)
	}
	return nil
}

func gunzip(data []byte) ([]byte, error) {
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		return nil, fmt.Errorf("starts like gzip but does not decompress: %w", err)
	}
	inner, err := io.ReadAll(io.LimitReader(zr, maxDecompressedUserData+1))
	if err != nil {
		return nil, fmt.Errorf("starts like gzip but does not decompress: %w", err)
	}
	if len(inner) > maxDecompressedUserData {
		return nil, fmt.Errorf("decompresses to more than %d bytes", maxDecompressedUserData)
	}
	return inner, nil
}

func firstLine(data []byte) string {
	line, _, _ := bytes.Cut(data, []byte("\n"))
	if len(line) > 40 {
		line = append(line[:40:40], "..."...)
	}
	return string(line)
}
