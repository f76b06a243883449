package oss

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/oss/osstest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// suiteEnv is one backend under the conformance suite.
type suiteEnv struct {
	store Store
	// signed says URL returns expiring signed URLs.
	signed bool
	// expire moves the clock that checks URLs past their TTL; the returned
	// func moves it back.
	expire func() (restore func())
	// client fetches URLs (nil: http.DefaultClient); a virtual-hosted
	// bucket.localhost needs one that dials the test server.
	client *http.Client
}

// download fetches a URL the way a browser would.
func (e suiteEnv) download(t *testing.T, u string) (int, []byte) {
	t.Helper()
	c := e.client
	if c == nil {
		c = http.DefaultClient
	}
	resp, err := c.Get(u)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func randomBytes(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func etagOf(b []byte) string {
	s := md5.Sum(b)
	return strings.ToUpper(hex.EncodeToString(s[:]))
}

func mustPut(t *testing.T, s Store, key string, data []byte, ct string) {
	t.Helper()
	if err := s.Put(context.Background(), key, bytes.NewReader(data), int64(len(data)), ct); err != nil {
		t.Fatalf("put %q: %v", key, err)
	}
}

func mustGet(t *testing.T, s Store, key string) ([]byte, ObjectInfo) {
	t.Helper()
	rc, info, err := s.Get(context.Background(), key)
	if err != nil {
		t.Fatalf("get %q: %v", key, err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatalf("read %q: %v", key, err)
	}
	return b, info
}

// onlyReader hides every method but Read (no Seek, no Len).
type onlyReader struct{ r io.Reader }

func (o *onlyReader) Read(p []byte) (int, error) { return o.r.Read(p) }

// storeSuite is the behaviour every Store must have.
func storeSuite(t *testing.T, env func(t *testing.T) suiteEnv) {
	ctx := context.Background()

	t.Run("RoundTrip", func(t *testing.T) {
		s := env(t).store
		data := randomBytes(100_000, 1)
		mustPut(t, s, "style/2026/01/02/job/0.png", data, "image/png")
		got, info := mustGet(t, s, "style/2026/01/02/job/0.png")
		if !bytes.Equal(got, data) {
			t.Fatal("bytes differ")
		}
		want := ObjectInfo{Size: int64(len(data)), ContentType: "image/png", ETag: etagOf(data)}
		if info != want {
			t.Fatalf("info %+v, want %+v", info, want)
		}
	})

	t.Run("ContentTypeFromExtension", func(t *testing.T) {
		s := env(t).store
		for key, want := range map[string]string{"a/x.webp": "image/webp", "a/x.MP4": "video/mp4", "a/x.qqq": "application/octet-stream", "a/noext": "application/octet-stream"} {
			mustPut(t, s, key, []byte("x"), "")
			if _, info := mustGet(t, s, key); info.ContentType != want {
				t.Errorf("%s: content type %q, want %q", key, info.ContentType, want)
			}
		}
	})

	t.Run("Overwrite", func(t *testing.T) {
		s := env(t).store
		mustPut(t, s, "o/k.bin", randomBytes(5000, 2), "image/png")
		second := []byte("shorter and different")
		mustPut(t, s, "o/k.bin", second, "text/plain")
		got, info := mustGet(t, s, "o/k.bin")
		if !bytes.Equal(got, second) || info.ContentType != "text/plain" || info.Size != int64(len(second)) || info.ETag != etagOf(second) {
			t.Fatalf("after overwrite: %q %+v", got, info)
		}
	})

	t.Run("EmptyObject", func(t *testing.T) {
		s := env(t).store
		mustPut(t, s, "e/empty.txt", nil, "text/plain")
		got, info := mustGet(t, s, "e/empty.txt")
		if len(got) != 0 || info.Size != 0 {
			t.Fatalf("empty: %q %+v", got, info)
		}
	})

	t.Run("UnknownSizeNonSeekable", func(t *testing.T) {
		s := env(t).store
		data := randomBytes(70_000, 3)
		if err := s.Put(ctx, "u/stream.bin", &onlyReader{bytes.NewReader(data)}, -1, ""); err != nil {
			t.Fatal(err)
		}
		if got, _ := mustGet(t, s, "u/stream.bin"); !bytes.Equal(got, data) {
			t.Fatal("bytes differ")
		}
	})

	t.Run("SizeMismatchKeepsOldObject", func(t *testing.T) {
		s := env(t).store
		mustPut(t, s, "m/k.txt", []byte("old"), "text/plain")
		for _, r := range []io.Reader{strings.NewReader("12345"), &onlyReader{strings.NewReader("12345")}} {
			if err := s.Put(ctx, "m/k.txt", r, 10, "text/plain"); err == nil {
				t.Fatalf("short body (%T) accepted", r)
			}
			if err := s.Put(ctx, "m/k.txt", r, 2, "text/plain"); err == nil {
				t.Fatalf("long body (%T) accepted", r)
			}
		}
		if got, _ := mustGet(t, s, "m/k.txt"); string(got) != "old" {
			t.Fatalf("object now %q", got)
		}
	})

	t.Run("MissingAndDelete", func(t *testing.T) {
		s := env(t).store
		if _, _, err := s.Get(ctx, "nope/missing.png"); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("missing: %v", err)
		}
		if err := s.Delete(ctx, "nope/missing.png"); err != nil {
			t.Fatalf("delete missing: %v", err)
		}
		mustPut(t, s, "d/x.png", []byte("x"), "image/png")
		if err := s.Delete(ctx, "d/x.png"); err != nil {
			t.Fatal(err)
		}
		if _, _, err := s.Get(ctx, "d/x.png"); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("deleted: %v", err)
		}
	})

	t.Run("OddKeys", func(t *testing.T) {
		e := env(t)
		s := e.store
		for i, key := range []string{
			"odd/a b.png", "odd/a+b.png", "odd/ü日本 €.png", "odd/100%25 & more=?#.png", "odd/'quotes\"~!$()*,;@[].png",
		} {
			data := []byte("data " + key)
			mustPut(t, s, key, data, "image/png")
			if got, _ := mustGet(t, s, key); !bytes.Equal(got, data) {
				t.Fatalf("%q: got %q", key, got)
			}
			u, err := s.URL(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			if status, got := e.download(t, u); status != 200 || !bytes.Equal(got, data) {
				t.Fatalf("%d %q: download %s: %d %q", i, key, u, status, got)
			}
		}
		// "a b" and "a+b" are different objects.
		if got, _ := mustGet(t, s, "odd/a b.png"); string(got) != "data odd/a b.png" {
			t.Fatalf("space key holds %q", got)
		}
	})

	t.Run("TraversalKeysRefused", func(t *testing.T) {
		s := env(t).store
		for _, key := range badKeys {
			var ve *schema.ValidationError
			if err := s.Put(ctx, key, strings.NewReader("x"), 1, ""); !errors.As(err, &ve) {
				t.Errorf("put %q: %v", key, err)
			}
			if _, _, err := s.Get(ctx, key); !errors.As(err, &ve) {
				t.Errorf("get %q: %v", key, err)
			}
			if err := s.Delete(ctx, key); !errors.As(err, &ve) {
				t.Errorf("delete %q: %v", key, err)
			}
			if _, err := s.URL(ctx, key); !errors.As(err, &ve) {
				t.Errorf("url %q: %v", key, err)
			}
		}
	})

	t.Run("URL", func(t *testing.T) {
		e := env(t)
		s := e.store
		data := randomBytes(30_000, 4)
		mustPut(t, s, "url/pic.png", data, "image/png")
		u, err := s.URL(ctx, "url/pic.png")
		if err != nil {
			t.Fatal(err)
		}
		if status, got := e.download(t, u); status != 200 || !bytes.Equal(got, data) {
			t.Fatalf("download: %d, %d bytes", status, len(got))
		}
		if !e.signed {
			return
		}
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		// Tampered: a changed signature, or the signature moved to another key.
		q := pu.Query()
		for name := range q {
			if name == "signature" || name == "Signature" || name == "x-oss-signature" || name == "X-Amz-Signature" {
				sig := []byte(q.Get(name))
				sig[0] ^= 1
				q.Set(name, string(sig))
			}
		}
		bad := *pu
		bad.RawQuery = q.Encode()
		if status, _ := e.download(t, bad.String()); status != http.StatusForbidden {
			t.Fatalf("tampered signature: %d", status)
		}
		mustPut(t, s, "url/other.png", []byte("other"), "image/png")
		moved := strings.Replace(u, "pic.png", "other.png", 1)
		if status, got := e.download(t, moved); status != http.StatusForbidden {
			t.Fatalf("signature used for another key: %d %q", status, got)
		}
		// Expired.
		restore := e.expire()
		status, _ := e.download(t, u)
		restore()
		if status != http.StatusForbidden {
			t.Fatalf("expired: %d", status)
		}
		if status, _ := e.download(t, u); status != 200 {
			t.Fatalf("valid again: %d", status)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		if err := env(t).store.Ping(ctx); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("CanceledContext", func(t *testing.T) {
		s := env(t).store
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		if err := s.Put(cctx, "c/x.txt", strings.NewReader("x"), 1, ""); !errors.Is(err, context.Canceled) {
			t.Fatalf("put with canceled context: %v", err)
		}
		if _, _, err := s.Get(ctx, "c/x.txt"); !errors.Is(err, schema.ErrNotFound) {
			t.Fatalf("canceled put stored something: %v", err)
		}
	})
}

var badKeys = []string{
	"", "/abs/x.png", "../x.png", "a/../../x.png", "a/..", "..", ".", "./x", "a/./b", "a//b", "a/", ".hidden/x",
	"a/.meta", `a\b.png`, `..\..\x`, "a\x00b", "a\nb", "a\rb", "a\x7fb", "a\u0085b", "\xff\xfe.png",
	strings.Repeat("k", MaxKeyLen+1), "a/" + strings.Repeat("s", 256),
}

// fakeClock is a settable clock for the local store.
type fakeClock struct{ off atomic.Int64 }

func (c *fakeClock) Now() time.Time { return time.Now().Add(time.Duration(c.off.Load())) }

// filesHandler serves a Local store the way the server's /files/{key} route
// does: Verify, then Open.
func filesHandler(l *Local) http.Handler {
	return http.StripPrefix("/files/", http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.Path
		if err := l.Verify(key, r.URL.Query()); err != nil {
			if errors.Is(err, schema.ErrForbidden) {
				http.Error(w, err.Error(), http.StatusForbidden)
				return
			}
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		f, info, err := l.Open(key)
		if errors.Is(err, schema.ErrNotFound) {
			http.NotFound(w, r)
			return
		} else if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		defer f.Close()
		w.Header().Set("Content-Type", info.ContentType)
		_, _ = io.Copy(w, f)
	}))
}

func newLocalEnv(t *testing.T, signed bool) (suiteEnv, *Local) {
	t.Helper()
	clock := &fakeClock{}
	var l *Local
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		filesHandler(l).ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	l, err := NewLocal(LocalConfig{
		Dir: t.TempDir(), BaseURL: srv.URL + "/files/", SignURLs: signed,
		Secret: []byte("local-test-secret"), TTL: 5 * time.Minute, NowFunc: clock.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	return suiteEnv{store: l, signed: signed, expire: func() func() {
		clock.off.Store(int64(6 * time.Minute))
		return func() { clock.off.Store(0) }
	}}, l
}

func newAliyunEnv(t *testing.T, version string) (suiteEnv, *Aliyun, *osstest.Server) {
	t.Helper()
	s := osstest.Start(t, osstest.Options{})
	a, err := NewAliyun(AliyunConfig{
		Endpoint: s.Endpoint(), Bucket: s.Bucket(), AccessKeyID: s.AccessKeyID(), AccessKeySecret: s.AccessKeySecret(),
		SignURLs: true, URLTTL: 5 * time.Minute, AuthVersion: version, Region: s.Region(),
		MaxRetries: 5, RetryBase: time.Millisecond, HTTPTimeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	return suiteEnv{store: a, signed: true, expire: func() func() {
		s.SetSkew(6 * time.Minute)
		return func() { s.SetSkew(0) }
	}}, a, s
}

func TestLocalStore(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv { e, _ := newLocalEnv(t, true); return e })
}

func TestLocalStoreUnsigned(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv { e, _ := newLocalEnv(t, false); return e })
}

func TestAliyunStoreV1(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv { e, _, _ := newAliyunEnv(t, "v1"); return e })
}

func TestAliyunStoreV4(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv { e, _, _ := newAliyunEnv(t, "v4"); return e })
}

// TestAliyunStorePublic: without URL signing, URL is the public base plus
// the key, readable when the bucket is public-read.
func TestAliyunStorePublic(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv {
		s := osstest.Start(t, osstest.Options{PublicRead: true})
		a, err := NewAliyun(AliyunConfig{
			Endpoint: s.Endpoint(), Bucket: s.Bucket(), AccessKeyID: s.AccessKeyID(), AccessKeySecret: s.AccessKeySecret(),
			PublicBaseURL: s.PublicBaseURL(), RetryBase: time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		return suiteEnv{store: a}
	})
}
