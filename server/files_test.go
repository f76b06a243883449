package server

import (
	"bytes"
	"context"
	"net/url"
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
