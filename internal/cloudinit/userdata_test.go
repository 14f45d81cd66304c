package cloudinit

import (
	"bytes"
	"compress/gzip"
	"errors"
	"strings"
	"testing"
)

func gz(t testing.TB, b []byte) []byte {
	t.Helper()
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// mimePart is one part of a multipart message built by multipartMsg.
type mimePart struct{ header, body string }

// multipartMsg builds the kind of message cloud-init's make-mime writes.
func multipartMsg(parts ...mimePart) []byte {
	var b strings.Builder
	b.WriteString("Content-Type: multipart/mixed; boundary=\"==BOUNDARY==\"\nMIME-Version: 1.0\n\n")
	for _, p := range parts {
		b.WriteString("--==BOUNDARY==\n" + p.header + "\n\n" + p.body + "\n")
	}
	b.WriteString("--==BOUNDARY==--\n")
	return []byte(b.String())
}

var (
	cloudConfigPart = mimePart{"Content-Type: text/cloud-config; charset=\"us-ascii\"", "#cloud-config\npackages: [htop]"}
	scriptPart      = mimePart{"Content-Type: text/x-shellscript", "#!/bin/sh\necho hi"}
)

func TestValidateUserDataAccepts(t *testing.T) {
	tests := []struct {
		name string
		data []byte
	}{
		{"minimal cloud-config", []byte("#cloud-config\n")},
		{"cloud-config", []byte("#cloud-config\npackages: [htop]\nruncmd:\n  - echo hi\n")},
		{"header in another case", []byte("#Cloud-Config\nhostname: a\n")},
		{"leading white space", []byte("\n  #cloud-config\nhostname: a\n")},
		{"CRLF", []byte("#cloud-config\r\nhostname: a\r\n")},
		{"script", []byte("#!/bin/sh\necho hi\n")},
		{"include", []byte("#include\nhttps://example.com/a.yaml\n")},
		{"include once", []byte("#include-once\nhttps://example.com/a.yaml\n")},
		{"gzip cloud-config", gz(t, []byte("#cloud-config\nhostname: a\n"))},
		{"multipart", multipartMsg(cloudConfigPart, scriptPart)},
		{"multipart with base64 part", multipartMsg(mimePart{
			"Content-Type: text/cloud-config\nContent-Transfer-Encoding: base64",
			"I2Nsb3VkLWNvbmZpZwpob3N0bmFtZTogYQo=", // "#cloud-config\nhostname: a\n"
		})},
		{"gzip multipart", gz(t, multipartMsg(scriptPart))},
		{"largest", append([]byte("#cloud-config\n#"), bytes.Repeat([]byte("x"), MaxUserDataSize-15)...)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := ValidateUserData(tt.data); err != nil {
				t.Fatalf("refused: %v", err)
			}
		})
	}
}

func TestValidateUserDataRefuses(t *testing.T) {
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"empty", nil, "empty"},
		{"too large", append([]byte("#cloud-config\n#"), bytes.Repeat([]byte("x"), MaxUserDataSize)...), "limit 16384"},
		{"YAML without header", []byte("hostname: a\npackages: [htop]\n"), `without the "#cloud-config" first line`},
		{"plain text", []byte("hello world\n"), `unrecognised start "hello world"`},
		{"bad YAML", []byte("#cloud-config\npackages: [htop\n"), "not valid YAML"},
		{"YAML list", []byte("#cloud-config\n- a\n- b\n"), "must be a YAML mapping"},
		{"YAML string", []byte("#cloud-config\njust words\n"), "must be a YAML mapping"},
		{"text before shebang", []byte("  #!/bin/sh\necho hi\n"), `text before "#!"`},
		{"boothook", []byte("#cloud-boothook\necho hi\n"), `"#cloud-boothook" user data is not accepted`},
		{"archive", []byte("#cloud-config-archive\n- type: text/cloud-config\n"), `"#cloud-config-archive" user data is not accepted`},
		{"jinja", []byte("## template: jinja\n#cloud-config\n"), `"## template: jinja" user data is not accepted`},
		{"part handler", []byte("#part-handler\ndef list_types(): pass\n"), "not accepted"},
		{"not UTF-8", []byte("#!/bin/sh\n\xff\xfe\n"), "not UTF-8"},
		{"gzip in gzip", gz(t, gz(t, []byte("#cloud-config\n"))), "gzip inside gzip"},
		{"broken gzip", []byte("\x1f\x8bnot really gzip"), "does not decompress"},
		{"gzip of plain text", gz(t, []byte("hello\n")), "in gzip-compressed data: unrecognised start"},
		{"gzip bomb", gz(t, append([]byte("#cloud-config\n#"), make([]byte, 2<<20)...)), "decompresses to more than"},
		{"mention of mime-version", []byte("#cloud-config\n# see mime-version: 1.0\n"), "so cloud-init reads it as MIME"},
		{"MIME without MIME-Version header", []byte("Content-Type: multipart/mixed; boundary=b\nX-Note: mime-version: 1.0\n\n--b--\n"), "headers lack MIME-Version"},
		{"MIME not multipart", []byte("MIME-Version: 1.0\nContent-Type: text/cloud-config\n\n#cloud-config\n"), `Content-Type is "text/cloud-config", want multipart`},
		{"multipart without boundary", []byte("MIME-Version: 1.0\nContent-Type: multipart/mixed\n\n"), "with a boundary"},
		{"multipart without parts", []byte("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b--\n"), "no parts"},
		{"multipart cut short", []byte("MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/x-shellscript\n\n#!/bin/sh\n"), "MIME part"},
		{"multipart with bad cloud-config", multipartMsg(scriptPart, mimePart{"Content-Type: text/cloud-config", "#cloud-config\n- a"}), "MIME part 2: cloud-config must be a YAML mapping"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateUserData(tt.data)
			if !errors.Is(err, ErrInvalidUserData) {
				t.Fatalf("got %v, want ErrInvalidUserData", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %q does not mention %q", err, tt.want)
			}
		})
	}
}

// TestValidateUserDataSaysWhatIsAccepted checks that a refusal for the
// wrong kind of content tells the user what to give instead.
func TestValidateUserDataSaysWhatIsAccepted(t *testing.T) {
	err := ValidateUserData([]byte("hello"))
	for _, want := range []string{"#cloud-config", "#!", "#include", "MIME multipart", "gzip"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
}

// FuzzValidateUserData checks that the validator never panics, refuses
// only with ErrInvalidUserData, and that whatever it accepts makes a seed.
func FuzzValidateUserData(f *testing.F) {
	for _, s := range []string{
		"#cloud-config\nhostname: a\n", "#!/bin/sh\n", "#include\nhttp://x\n", "hostname: a\n",
		"#cloud-config\n- a\n", "#cloud-config\n{a: [b, {c: *d}]}\n", "#cloud-config\na: &x [1]\nb: *x\n",
		"  #!/bin/sh", "#cloud-boothook\n", "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n--b--\n",
		string(multipartMsg(cloudConfigPart, scriptPart)), "\x1f\x8b\x08", "\xff",
	} {
		f.Add([]byte(s))
	}
	f.Add(gz(f, []byte("#cloud-config\nhostname: a\n")))
	f.Add(gz(f, multipartMsg(scriptPart)))
	f.Fuzz(func(t *testing.T, data []byte) {
		err := ValidateUserData(data)
		if err != nil {
			if !errors.Is(err, ErrInvalidUserData) {
				t.Fatalf("error does not wrap ErrInvalidUserData: %v", err)
			}
			return
		}
		if len(data) > MaxUserDataSize {
			t.Fatalf("accepted %d bytes", len(data))
		}
		if _, err := Seed(Meta{InstanceID: "i-1"}, data, nil); err != nil {
			t.Fatalf("accepted user data makes no seed: %v", err)
		}
	})
}
