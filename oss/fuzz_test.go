package oss

import (
	"bytes"
	"errors"
	"net/url"
	"path"
	"path/filepath"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

func FuzzSniff(f *testing.F) {
	for _, s := range [][]byte{
		encodePNG(f, 3, 3), encodeJPEG(f, 3, 3), encodeGIF(f, 3, 3), readTestdata(f, "lossy-37x23.webp"),
		[]byte("RIFF\x00\x00\x00\x00WAVE"), []byte("\x00\x00\x00\x18ftypmp42"), []byte("\x1a\x45\xdf\xa3webm"),
		[]byte("ID3"), []byte("\xff\xfb\x90"), []byte("fLaC"), []byte("OggS\x00"), []byte("glTF\x02\x00\x00\x00"),
		nil, []byte("text"),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, head []byte) {
		ct, ext := Sniff(head)
		if ct == "" || SafeExt(ext) != ext {
			t.Fatalf("Sniff gave %q, %q", ct, ext)
		}
		if typeByExt[ext] != ct {
			t.Fatalf("extension %q maps to %q, Sniff said %q", ext, typeByExt[ext], ct)
		}
		// Only the first SniffLen bytes matter.
		if len(head) > SniffLen {
			if ct2, ext2 := Sniff(head[:SniffLen]); ct2 != ct || ext2 != ext {
				t.Fatalf("prefix sniffs as %s, whole as %s", ct2, ct)
			}
		}
	})
}

func FuzzImageInfo(f *testing.F) {
	for _, s := range [][]byte{
		encodePNG(f, 3, 5), encodeJPEG(f, 7, 2), encodeGIF(f, 4, 4), pngHeader(20000, 20000), pngHeader(0, 1),
		readTestdata(f, "lossy-37x23.webp"), readTestdata(f, "lossless-41x19.webp"), readTestdata(f, "alpha-29x31.webp"),
		[]byte("not an image"),
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		meta, err := ImageInfo(bytes.NewReader(data))
		if err != nil {
			if !errors.Is(err, schema.ErrUnsupportedMedia) {
				t.Fatalf("error not ErrUnsupportedMedia: %v", err)
			}
			return
		}
		if meta.Width <= 0 || meta.Height <= 0 {
			t.Fatalf("accepted %dx%d", meta.Width, meta.Height)
		}
		if ct, _ := Sniff(data); ct != meta.ContentType {
			t.Fatalf("ImageInfo says %s, Sniff %s", meta.ContentType, ct)
		}
		m2, err := CheckInputImage(bytes.NewReader(data), int64(len(data)), 1<<62)
		if err == nil && m2 != meta {
			t.Fatalf("CheckInputImage disagrees: %+v vs %+v", m2, meta)
		}
	})
}

// FuzzValidKey: a key ValidKey accepts never leaves the store's directory,
// is already clean, and survives URL escaping.
func FuzzValidKey(f *testing.F) {
	for _, s := range append([]string{"a/b.png", "style/2026/01/02/j/0.png", "a b+c/ü.png", "x..y/z", "%2e%2e/x"}, badKeys...) {
		f.Add(s)
	}
	dir := filepath.FromSlash("/srv/comfyfarm/files")
	l := &Local{dir: dir}
	f.Fuzz(func(t *testing.T, key string) {
		if ValidKey(key) != nil {
			return
		}
		p := filepath.Join(dir, filepath.FromSlash(key))
		if !strings.HasPrefix(p, dir+string(filepath.Separator)) {
			t.Fatalf("%q escapes to %s", key, p)
		}
		if rel, err := filepath.Rel(dir, p); err != nil || filepath.ToSlash(rel) != key {
			t.Fatalf("%q resolves to %q", key, rel)
		}
		if path.Clean(key) != key || path.IsAbs(key) {
			t.Fatalf("%q is not clean", key)
		}
		if lp, err := l.path(key); err != nil || lp != p {
			t.Fatalf("Local.path(%q) = %q, %v", key, lp, err)
		}
		for seg := range strings.SplitSeq(key, "/") {
			if seg == "" || seg == "." || seg == ".." || strings.HasPrefix(seg, localTmpDir) || strings.HasPrefix(seg, localMetaDir) {
				t.Fatalf("%q has segment %q", key, seg)
			}
		}
		if k, err := url.PathUnescape(escapeKey(key)); err != nil || k != key {
			t.Fatalf("escape round trip of %q gave %q, %v", key, k, err)
		}
		u, err := url.Parse("http://127.0.0.1/files/" + escapeKey(key))
		if err != nil || u.Path != "/files/"+key || u.RawQuery != "" || u.Fragment != "" {
			t.Fatalf("URL of %q parses as path %q query %q: %v", key, u.Path, u.RawQuery, err)
		}
	})
}
