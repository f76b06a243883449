package oss

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/oss/osstest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// checkPuts verifies the fake saw exactly n PUTs of key, each carrying the
// whole body with a Content-Length (not chunked), and stored data.
func checkPuts(t *testing.T, s *osstest.Server, key string, n int, data []byte) {
	t.Helper()
	var puts []osstest.Request
	for _, r := range s.Requests() {
		if r.Method == http.MethodPut && r.Key == key {
			puts = append(puts, r)
		}
	}
	if len(puts) != n {
		t.Fatalf("%d PUTs of %s, want %d: %+v", len(puts), key, n, puts)
	}
	for i, p := range puts {
		if p.BodyBytes != int64(len(data)) || p.Chunked {
			t.Fatalf("attempt %d sent %d bytes (chunked %v), want %d with a length", i, p.BodyBytes, p.Chunked, len(data))
		}
	}
	o, ok := s.Object(key)
	if !ok || !bytes.Equal(o.Data, data) {
		t.Fatalf("fake holds %d bytes (present %v), want the %d sent", len(o.Data), ok, len(data))
	}
}

func TestAliyunRetries503Storm(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	data := randomBytes(1<<20, 10)
	s.FailNext(5, http.StatusServiceUnavailable)
	if err := a.Put(context.Background(), "storm/a.png", bytes.NewReader(data), int64(len(data)), "image/png"); err != nil {
		t.Fatal(err)
	}
	checkPuts(t, s, "storm/a.png", 6, data)
	if o, _ := s.Object("storm/a.png"); o.ContentType != "image/png" {
		t.Fatalf("content type %q", o.ContentType)
	}
}

func TestAliyunRetriesNonSeekable(t *testing.T) {
	for _, tc := range []struct {
		name  string
		size  int
		known bool
		spool int64
	}{
		{"memory/known", 200_000, true, spoolThreshold},
		{"memory/unknown", 200_000, false, spoolThreshold},
		{"spooled/known", 300_000, true, 64 << 10},
		{"spooled/unknown", 300_000, false, 64 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, a, s := newAliyunEnv(t, "v4")
			a.spoolMax = tc.spool
			a.tmpDir = t.TempDir()
			data := randomBytes(tc.size, 11)
			size := int64(-1)
			if tc.known {
				size = int64(len(data))
			}
			s.FailNext(3, http.StatusInternalServerError)
			if err := a.Put(context.Background(), "ns/x.bin", &onlyReader{bytes.NewReader(data)}, size, ""); err != nil {
				t.Fatal(err)
			}
			checkPuts(t, s, "ns/x.bin", 4, data)
		})
	}
}

// A seekable reader not at its start: only the rest is the body, every time.
func TestAliyunRetriesSeekerMidway(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	data := randomBytes(50_000, 12)
	r := bytes.NewReader(data)
	if _, err := r.Seek(1000, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	s.FailNext(2, http.StatusServiceUnavailable)
	if err := a.Put(context.Background(), "mid/x.bin", r, int64(len(data)-1000), ""); err != nil {
		t.Fatal(err)
	}
	checkPuts(t, s, "mid/x.bin", 3, data[1000:])
}

func TestAliyunPermanentErrorsNotRetried(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	s.FailNextCode(1, http.StatusForbidden, "AccessDenied")
	err := a.Put(context.Background(), "p/x.txt", strings.NewReader("x"), 1, "")
	if err == nil || !strings.Contains(err.Error(), "AccessDenied") {
		t.Fatalf("want AccessDenied, got %v", err)
	}
	if n := s.RequestCount(""); n != 1 {
		t.Fatalf("%d requests for a permanent 403", n)
	}

	// A wrong secret: refused by signature, once.
	s.ResetLog()
	bad, err := NewAliyun(AliyunConfig{
		Endpoint: s.Endpoint(), Bucket: s.Bucket(), AccessKeyID: s.AccessKeyID(), AccessKeySecret: "wrong",
		SignURLs: true, RetryBase: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	err = bad.Put(context.Background(), "p/y.txt", strings.NewReader("y"), 1, "")
	if err == nil || !strings.Contains(err.Error(), "SignatureDoesNotMatch") {
		t.Fatalf("want SignatureDoesNotMatch, got %v", err)
	}
	if _, _, err := bad.Get(context.Background(), "p/x.txt"); err == nil || errors.Is(err, schema.ErrNotFound) {
		t.Fatalf("get with wrong secret: %v", err)
	}
	if err := bad.Ping(context.Background()); err == nil {
		t.Fatal("ping with wrong secret passed")
	}
	if n := s.RequestCount(""); n != 3 {
		t.Fatalf("%d requests, want one each for put, get and ping", n)
	}
	if _, ok := s.Object("p/y.txt"); ok {
		t.Fatal("refused put stored")
	}
}

func TestAliyunRetryLimit(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	a.cfg.MaxRetries = 2
	s.FailNext(10, http.StatusServiceUnavailable)
	err := a.Put(context.Background(), "l/x.txt", strings.NewReader("x"), 1, "")
	if err == nil || !strings.Contains(err.Error(), "3 attempts") || !strings.Contains(err.Error(), "ServiceUnavailable") {
		t.Fatalf("got %v", err)
	}
	if n := s.RequestCount(http.MethodPut); n != 3 {
		t.Fatalf("%d PUTs, want 3", n)
	}
	a.cfg.MaxRetries = -1
	s.ResetLog()
	if err := a.Put(context.Background(), "l/x.txt", strings.NewReader("x"), 1, ""); err == nil {
		t.Fatal("want an error")
	}
	if n := s.RequestCount(http.MethodPut); n != 1 {
		t.Fatalf("%d PUTs with retries off", n)
	}
}

func TestAliyunRetriesSkewAndDrops(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v4")
	s.FailNextCode(2, http.StatusForbidden, "RequestTimeTooSkewed")
	data := []byte("skewed then fine")
	if err := a.Put(context.Background(), "k/s.txt", bytes.NewReader(data), int64(len(data)), ""); err != nil {
		t.Fatal(err)
	}
	checkPuts(t, s, "k/s.txt", 3, data)

	s.ResetLog()
	s.DropNext(2)
	if err := a.Put(context.Background(), "k/d.txt", bytes.NewReader(data), int64(len(data)), ""); err != nil {
		t.Fatal(err)
	}
	checkPuts(t, s, "k/d.txt", 3, data)
}

// A 5xx without an OSS XML body (a proxy's HTML page) is retried too.
func TestAliyunRetriesNonXML5xx(t *testing.T) {
	s := osstest.Start(t, osstest.Options{})
	target, err := url.Parse(s.Endpoint())
	if err != nil {
		t.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	var n atomic.Int32
	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) <= 2 {
			_, _ = io.Copy(io.Discard, r.Body)
			w.Header().Set("Content-Type", "text/html")
			w.WriteHeader(http.StatusBadGateway)
			_, _ = io.WriteString(w, "<html><body>502 Bad Gateway</body></html>")
			return
		}
		proxy.ServeHTTP(w, r)
	}))
	t.Cleanup(front.Close)
	a, err := NewAliyun(AliyunConfig{
		Endpoint: front.URL, Bucket: s.Bucket(), AccessKeyID: s.AccessKeyID(), AccessKeySecret: s.AccessKeySecret(),
		SignURLs: true, RetryBase: time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Put(context.Background(), "x/y.txt", strings.NewReader("via proxy"), 9, ""); err != nil {
		t.Fatal(err)
	}
	if n.Load() != 3 {
		t.Fatalf("%d requests, want 3", n.Load())
	}
	if o, ok := s.Object("x/y.txt"); !ok || string(o.Data) != "via proxy" {
		t.Fatal("not stored")
	}
}

func TestAliyunGetRetriesAndCRC(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	data := randomBytes(20_000, 13)
	s.PutObject("g/x.bin", data, "application/octet-stream")
	s.FailNext(2, http.StatusInternalServerError)
	got, info := mustGet(t, a, "g/x.bin")
	if !bytes.Equal(got, data) || info.Size != int64(len(data)) {
		t.Fatalf("get after 500s: %d bytes, %+v", len(got), info)
	}
	if n := s.RequestCount(http.MethodGet); n != 3 {
		t.Fatalf("%d GETs, want 3", n)
	}

	s.CorruptNextGet(1)
	rc, _, err := a.Get(context.Background(), "g/x.bin")
	if err != nil {
		t.Fatal(err)
	}
	_, err = io.ReadAll(rc)
	rc.Close()
	if err == nil || !strings.Contains(err.Error(), "CRC") {
		t.Fatalf("corrupt body read without error: %v", err)
	}
}

func TestAliyunContextEndsBackoff(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v1")
	a.cfg.RetryBase = time.Hour
	s.FailNext(100, http.StatusServiceUnavailable)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	err := a.Put(ctx, "c/x.txt", strings.NewReader("x"), 1, "")
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("got %v", err)
	}
	if n := s.RequestCount(http.MethodPut); n != 1 {
		t.Fatalf("%d PUTs", n)
	}
}

func TestAliyunPing(t *testing.T) {
	_, a, s := newAliyunEnv(t, "v4")
	if err := a.Ping(context.Background()); err != nil {
		t.Fatal(err)
	}
	wrongBucket, err := NewAliyun(AliyunConfig{
		Endpoint: s.Endpoint(), Bucket: "other-bucket", AccessKeyID: s.AccessKeyID(), AccessKeySecret: s.AccessKeySecret(),
		SignURLs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := wrongBucket.Ping(context.Background()); err == nil || !strings.Contains(err.Error(), "NoSuchBucket") {
		t.Fatalf("wrong bucket: %v", err)
	}
	s.SetSkew(time.Hour)
	if err := a.Ping(context.Background()); err == nil || !strings.Contains(err.Error(), "RequestTimeTooSkewed") {
		t.Fatalf("skewed clock: %v", err)
	}
}

func TestNewAliyunConfig(t *testing.T) {
	base := AliyunConfig{Endpoint: "oss-cn-hangzhou.aliyuncs.com", Bucket: "bkt", AccessKeyID: "ak", AccessKeySecret: "sk", SignURLs: true}
	for name, mod := range map[string]func(c *AliyunConfig){
		"no endpoint":     func(c *AliyunConfig) { c.Endpoint = "" },
		"no bucket":       func(c *AliyunConfig) { c.Bucket = "" },
		"no secret":       func(c *AliyunConfig) { c.AccessKeySecret = "" },
		"v4 no region":    func(c *AliyunConfig) { c.AuthVersion = "v4" },
		"bad version":     func(c *AliyunConfig) { c.AuthVersion = "v3" },
		"unsigned no url": func(c *AliyunConfig) { c.SignURLs = false },
	} {
		c := base
		mod(&c)
		if _, err := NewAliyun(c); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	// A real endpoint: https by default, virtual-hosted URLs.
	a, err := NewAliyun(base)
	if err != nil {
		t.Fatal(err)
	}
	u, err := a.URL(context.Background(), "dir/a b.png")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(u, "https://bkt.oss-cn-hangzhou.aliyuncs.com/dir%2Fa%20b.png?") || !strings.Contains(u, "Signature=") {
		t.Fatalf("url %s", u)
	}
}
