package server

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/oss"
)

func TestFiles(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	ctx := context.Background()
	put := func(key, ct string, data []byte) string {
		t.Helper()
		if err := b.store.Put(ctx, key, bytes.NewReader(data), int64(len(data)), ct); err != nil {
			t.Fatal(err)
		}
		raw, err := b.store.URL(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		u, err := url.Parse(raw)
		if err != nil {
			t.Fatal(err)
		}
		return u.RequestURI()
	}
	img := put("style/j1/0.png", "image/png", pngBytes())
	vid := put("style/j1/clip one.mp4", "video/mp4", []byte("not really a video"))

	r := b.do(req{method: "GET", path: img})
	expect(t, r, 200)
	if r.header.Get("Content-Type") != "image/png" || !bytes.Equal(r.body, pngBytes()) || r.header.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("image: %v %q", r.header, r.body)
	}
	r = b.do(req{method: "GET", path: vid})
	expect(t, r, 200)
	if r.header.Get("Content-Type") != "video/mp4" || string(r.body) != "not really a video" {
		t.Fatalf("video: %v %q", r.header, r.body)
	}

	u, _ := url.Parse(img)
	q := u.Query()
	sig := q.Get("signature")
	flip := func(s string) string {
		b := []byte(s)
		if b[0] == 'a' {
			b[0] = 'b'
		} else {
			b[0] = 'a'
		}
		return string(b)
	}
	cases := []struct {
		name, path string
		want       int
	}{
		{"no signature", u.Path, 403},
		{"tampered signature", u.Path + "?expires=" + q.Get("expires") + "&signature=" + flip(sig), 403},
		{"tampered expiry", u.Path + "?expires=9999999999&signature=" + sig, 403},
		{"signature of another key", "/files/style/j1/1.png?" + q.Encode(), 403},
		{"missing object, valid signature", missingURL(t, b.store, "style/j1/9.png"), 404},
		{"traversal", "/files/../secret?" + q.Encode(), 404},
		{"encoded traversal", "/files/style/%2e%2e/%2e%2e/x?" + q.Encode(), 404},
		{"hidden meta dir", "/files/.meta/style/j1/0.png?" + q.Encode(), 404},
		{"empty key", "/files/", 404},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := b.with(t).do(req{method: "GET", path: c.path})
			expect(t, r, c.want)
			if bytes.Contains(r.body, []byte("PNG")) {
				t.Fatal("object served")
			}
		})
	}

	b.clock.Advance(2 * time.Hour)
	expect(t, b.do(req{method: "GET", path: img}), 403, "invalid_signature")
}

// missingURL signs a URL for a key that holds no object.
func missingURL(t *testing.T, s *oss.Local, key string) string {
	t.Helper()
	raw, err := s.SignedURL(key, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u.RequestURI()
}

func TestFilesWithoutLocalStorage(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(_ *Config, d *Deps) { d.Files = nil })
	r := b.do(req{method: "GET", path: "/files/a.png"})
	expect(t, r, 404, "not_found")
	if !strings.Contains(string(r.body), "not served") {
		t.Fatalf("body: %s", r.body)
	}
}

// TestFilesRangeAndConditional: a stored video is served by byte ranges
// (206, 416) with ETag and Last-Modified, and conditional GETs answer 304;
// the signature is still required.
func TestFilesRangeAndConditional(t *testing.T) {
	b := setup(t, dbtest.SQLite(t))
	ctx := context.Background()
	data := make([]byte, 1000)
	for i := range data {
		data[i] = byte(i * 7)
	}
	const key = "style/j2/clip.mp4"
	if err := b.store.Put(ctx, key, bytes.NewReader(data), int64(len(data)), "video/mp4"); err != nil {
		t.Fatal(err)
	}
	raw, err := b.store.URL(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(raw)
	path := u.RequestURI()

	full := b.do(req{method: "GET", path: path})
	expect(t, full, 200)
	etag, lastMod := full.header.Get("ETag"), full.header.Get("Last-Modified")
	if !strings.HasPrefix(etag, `"`) || lastMod == "" || full.header.Get("Accept-Ranges") != "bytes" || !bytes.Equal(full.body, data) {
		t.Fatalf("full: %v", full.header)
	}
	mod, err := http.ParseTime(lastMod)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name         string
		header       map[string]string
		status       int
		contentRange string
		body         []byte
	}{
		{"first bytes", map[string]string{"Range": "bytes=0-99"}, 206, "bytes 0-99/1000", data[:100]},
		{"middle", map[string]string{"Range": "bytes=500-509"}, 206, "bytes 500-509/1000", data[500:510]},
		{"open end", map[string]string{"Range": "bytes=900-"}, 206, "bytes 900-999/1000", data[900:]},
		{"suffix", map[string]string{"Range": "bytes=-10"}, 206, "bytes 990-999/1000", data[990:]},
		{"past the end clipped", map[string]string{"Range": "bytes=990-5000"}, 206, "bytes 990-999/1000", data[990:]},
		{"suffix longer than the file", map[string]string{"Range": "bytes=-5000"}, 206, "bytes 0-999/1000", data},
		{"unsatisfiable", map[string]string{"Range": "bytes=1000-"}, 416, "bytes */1000", nil},
		{"several ranges: whole file", map[string]string{"Range": "bytes=0-1,5-6"}, 200, "", data},
		{"other unit: whole file", map[string]string{"Range": "items=0-1"}, 200, "", data},
		{"bad syntax: whole file", map[string]string{"Range": "bytes=9-3"}, 200, "", data},
		{"if-none-match", map[string]string{"If-None-Match": etag}, 304, "", nil},
		{"if-none-match in a list, weak", map[string]string{"If-None-Match": `"x", W/` + etag}, 304, "", nil},
		{"if-none-match star", map[string]string{"If-None-Match": "*"}, 304, "", nil},
		{"if-none-match other", map[string]string{"If-None-Match": `"other"`}, 200, "", data},
		{"if-none-match decides over if-modified-since", map[string]string{"If-None-Match": `"other"`, "If-Modified-Since": lastMod}, 200, "", data},
		{"if-modified-since same", map[string]string{"If-Modified-Since": lastMod}, 304, "", nil},
		{"if-modified-since later", map[string]string{"If-Modified-Since": mod.Add(time.Hour).Format(http.TimeFormat)}, 304, "", nil},
		{"if-modified-since earlier", map[string]string{"If-Modified-Since": mod.Add(-time.Second).Format(http.TimeFormat)}, 200, "", data},
		{"if-range etag", map[string]string{"Range": "bytes=0-9", "If-Range": etag}, 206, "bytes 0-9/1000", data[:10]},
		{"if-range stale etag", map[string]string{"Range": "bytes=0-9", "If-Range": `"stale"`}, 200, "", data},
		{"if-range date", map[string]string{"Range": "bytes=0-9", "If-Range": lastMod}, 206, "bytes 0-9/1000", data[:10]},
		{"if-range older date", map[string]string{"Range": "bytes=0-9", "If-Range": mod.Add(-time.Hour).Format(http.TimeFormat)}, 200, "", data},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := b.with(t).do(req{method: "GET", path: path, header: c.header})
			expect(t, r, c.status)
			if got := r.header.Get("Content-Range"); got != c.contentRange {
				t.Fatalf("Content-Range %q, want %q", got, c.contentRange)
			}
			if c.status != 416 && !bytes.Equal(r.body, c.body) {
				t.Fatalf("body of %d bytes, want %d", len(r.body), len(c.body))
			}
			if c.status == 206 && r.header.Get("Content-Length") != strconv.Itoa(len(c.body)) {
				t.Fatalf("Content-Length %q", r.header.Get("Content-Length"))
			}
			if c.status == 304 && r.header.Get("ETag") != etag {
				t.Fatalf("304 without the ETag: %v", r.header)
			}
		})
	}
	// HEAD tells the size and that ranges are taken.
	r := b.do(req{method: "HEAD", path: path})
	expect(t, r, 200)
	if r.header.Get("Content-Length") != "1000" || r.header.Get("Accept-Ranges") != "bytes" {
		t.Fatalf("HEAD: %v", r.header)
	}
	// Ranges and conditions do not stand in for the signature.
	expect(t, b.do(req{method: "GET", path: u.Path, header: map[string]string{"Range": "bytes=0-9"}}), 403, "invalid_signature")
	expect(t, b.do(req{method: "GET", path: u.Path, header: map[string]string{"If-None-Match": etag}}), 403, "invalid_signature")
}

func FuzzParseRange(f *testing.F) {
	for _, s := range []string{"bytes=0-99", "bytes=-5", "bytes=7-", "bytes=0-1,4-5", "bytes=9-3", "bytes=-0", "bytes= 1-2", "bytes=99999999999999999999-"} {
		f.Add(s, int64(100))
	}
	f.Fuzz(func(t *testing.T, h string, size int64) {
		if size < 0 {
			size = -size
		}
		if size < 0 {
			return
		}
		start, n, err := parseRange(h, size)
		if err != nil {
			if !errors.Is(err, errRangeIgnored) && !errors.Is(err, errRangeUnsatisfiable) {
				t.Fatalf("%q: %v", h, err)
			}
			return
		}
		if start < 0 || n < 1 || start > size-n {
			t.Fatalf("%q of %d: start %d, length %d", h, size, start, n)
		}
	})
}
