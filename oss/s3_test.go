package oss

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/oss/s3test"
	"github.com/comfyfarm/comfyfarm/schema"
)

// newS3Env runs the store against an s3test server: signed URLs, path style
// unless opts.VirtualHost.
func newS3Env(t *testing.T, opts s3test.Options) (suiteEnv, *S3, *s3test.Server) {
	t.Helper()
	srv := s3test.Start(t, opts)
	cfg := S3Config{
		Endpoint: srv.Endpoint(), Region: srv.Region(), Bucket: srv.Bucket(),
		AccessKeyID: srv.AccessKeyID(), SecretAccessKey: srv.SecretAccessKey(),
		PathStyle: !opts.VirtualHost, SignURLs: true, URLTTL: 5 * time.Minute,
		MaxRetries: 5, RetryBase: time.Millisecond, HTTPTimeout: 30 * time.Second,
	}
	env := suiteEnv{signed: true, expire: func() func() {
		srv.SetSkew(6 * time.Minute)
		return func() { srv.SetSkew(0) }
	}}
	if opts.VirtualHost {
		cfg.HTTPClient = srv.HTTPClient()
		env.client = srv.HTTPClient()
	}
	s, err := NewS3(cfg)
	if err != nil {
		t.Fatal(err)
	}
	env.store = s
	return env, s, srv
}

func TestS3Store(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv { e, _, _ := newS3Env(t, s3test.Options{}); return e })
}

// TestS3StoreVirtualHost: path_style false addresses bucket.localhost:PORT,
// which a server in virtual-host mode alone accepts.
func TestS3StoreVirtualHost(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv {
		e, _, _ := newS3Env(t, s3test.Options{VirtualHost: true})
		return e
	})
}

// TestS3StorePublic: without URL signing, URL is the public base plus the
// key, readable when the bucket is public-read.
func TestS3StorePublic(t *testing.T) {
	storeSuite(t, func(t *testing.T) suiteEnv {
		srv := s3test.Start(t, s3test.Options{PublicRead: true, Region: "auto"})
		s, err := NewS3(S3Config{
			Endpoint: srv.Endpoint(), Region: srv.Region(), Bucket: srv.Bucket(), PathStyle: true,
			AccessKeyID: srv.AccessKeyID(), SecretAccessKey: srv.SecretAccessKey(),
			PublicBaseURL: srv.PublicBaseURL(), RetryBase: time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		return suiteEnv{store: s}
	})
}

// TestS3AddressingStyle: path_style decides how every request is addressed.
func TestS3AddressingStyle(t *testing.T) {
	ctx := context.Background()
	for _, vhost := range []bool{false, true} {
		e, s, srv := newS3Env(t, s3test.Options{VirtualHost: vhost})
		mustPut(t, s, "style/x.png", []byte("x"), "")
		mustGet(t, s, "style/x.png")
		if err := s.Ping(ctx); err != nil {
			t.Fatal(err)
		}
		u, err := s.URL(ctx, "style/x.png")
		if err != nil {
			t.Fatal(err)
		}
		want, host := "path", "127.0.0.1:"
		if vhost {
			want, host = "virtual", srv.Bucket()+".localhost:"
		}
		if !strings.HasPrefix(u, "http://"+host) {
			t.Errorf("vhost %v: URL %s", vhost, u)
		}
		if status, _ := e.download(t, u); status != 200 {
			t.Errorf("vhost %v: download %d", vhost, status)
		}
		reqs := srv.Requests()
		for _, r := range reqs {
			if r.Style != want || r.Bucket != srv.Bucket() || r.Status >= 300 {
				t.Errorf("vhost %v: request %+v", vhost, r)
			}
		}
		if len(reqs) != 4 {
			t.Errorf("vhost %v: %d requests, want 4", vhost, len(reqs))
		}
	}
}

// TestS3WrongCredentialsRefused: the test server checks signatures, so a
// wrong secret or key id gets 403 for every operation, and Ping says so.
func TestS3WrongCredentialsRefused(t *testing.T) {
	ctx := context.Background()
	srv := s3test.Start(t, s3test.Options{})
	for _, tc := range []struct{ id, secret, code string }{
		{srv.AccessKeyID(), "wrong-secret", "SignatureDoesNotMatch"},
		{"wrong-ak", srv.SecretAccessKey(), "InvalidAccessKeyId"},
	} {
		s, err := NewS3(S3Config{
			Endpoint: srv.Endpoint(), Bucket: srv.Bucket(), PathStyle: true, AccessKeyID: tc.id, SecretAccessKey: tc.secret,
			SignURLs: true, RetryBase: time.Millisecond,
		})
		if err != nil {
			t.Fatal(err)
		}
		err = s.Put(ctx, "k/x.png", strings.NewReader("x"), 1, "")
		if httpStatus(err) != http.StatusForbidden || !strings.Contains(err.Error(), tc.code) {
			t.Errorf("%s: put: %v", tc.code, err)
		}
		if _, ok := srv.Object("k/x.png"); ok {
			t.Fatalf("%s: object stored", tc.code)
		}
		if _, _, err := s.Get(ctx, "k/x.png"); httpStatus(err) != http.StatusForbidden || errors.Is(err, schema.ErrNotFound) {
			t.Errorf("%s: get: %v", tc.code, err)
		}
		if err := s.Delete(ctx, "k/x.png"); httpStatus(err) != http.StatusForbidden {
			t.Errorf("%s: delete: %v", tc.code, err)
		}
		if err := s.Ping(ctx); err == nil || !strings.Contains(err.Error(), "denied") {
			t.Errorf("%s: ping: %v", tc.code, err)
		}
		// A URL signed with the wrong secret does not download either.
		u, err := s.URL(ctx, "k/x.png")
		if err != nil {
			t.Fatal(err)
		}
		if status, _ := (suiteEnv{}).download(t, u); status != http.StatusForbidden {
			t.Errorf("%s: presigned download: %d", tc.code, status)
		}
	}
	for _, r := range srv.Requests() {
		if r.Status != http.StatusForbidden {
			t.Errorf("request %+v", r)
		}
	}
}

// TestS3PingMissingBucket: a bucket that does not exist is named as such.
func TestS3PingMissingBucket(t *testing.T) {
	srv := s3test.Start(t, s3test.Options{})
	s, err := NewS3(S3Config{
		Endpoint: srv.Endpoint(), Bucket: "no-such-bucket", PathStyle: true,
		AccessKeyID: srv.AccessKeyID(), SecretAccessKey: srv.SecretAccessKey(), SignURLs: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	err = s.Ping(context.Background())
	if err == nil || !strings.Contains(err.Error(), `bucket "no-such-bucket" does not exist`) {
		t.Fatalf("ping: %v", err)
	}
	if n := len(srv.Requests()); n != 1 {
		t.Fatalf("ping sent %d requests, want 1", n)
	}
}

// TestS3Retries: transient 503s are retried, re-sending the whole body each
// time; past MaxRetries the error is returned.
func TestS3Retries(t *testing.T) {
	ctx := context.Background()
	_, s, srv := newS3Env(t, s3test.Options{})
	data := randomBytes(200_000, 7)
	for _, r := range []io.Reader{bytes.NewReader(data), &onlyReader{bytes.NewReader(data)}} {
		srv.FailNext(3)
		if err := s.Put(ctx, "r/x.bin", r, int64(len(data)), ""); err != nil {
			t.Fatalf("%T: %v", r, err)
		}
		if got, _ := srv.Object("r/x.bin"); !bytes.Equal(got, data) {
			t.Fatalf("%T: stored %d bytes", r, len(got))
		}
	}
	srv.FailNext(2)
	if got, _ := mustGet(t, s, "r/x.bin"); !bytes.Equal(got, data) {
		t.Fatal("get after 503s: bytes differ")
	}
	srv.FailNext(100)
	before := len(srv.Requests())
	err := s.Put(ctx, "r/y.bin", bytes.NewReader(data), int64(len(data)), "")
	if httpStatus(err) != http.StatusServiceUnavailable {
		t.Fatalf("storm: %v", err)
	}
	if n := len(srv.Requests()) - before; n != 6 {
		t.Fatalf("storm: %d attempts, want 6 (1 + MaxRetries 5)", n)
	}
	srv.FailNext(0)
	var s503 int
	for _, r := range srv.Requests() {
		if r.Status == http.StatusServiceUnavailable {
			s503++
		}
	}
	if s503 != 3+3+2+6 {
		t.Fatalf("%d answers were 503", s503)
	}
}

// TestS3PutFromOffset: a seekable body is uploaded from its current position,
// and left where the upload ended.
func TestS3PutFromOffset(t *testing.T) {
	_, s, _ := newS3Env(t, s3test.Options{})
	r := bytes.NewReader([]byte("skip-this|the object"))
	if _, err := r.Seek(10, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	if err := s.Put(context.Background(), "o/x.txt", r, 10, "text/plain"); err != nil {
		t.Fatal(err)
	}
	if got, _ := mustGet(t, s, "o/x.txt"); string(got) != "the object" {
		t.Fatalf("stored %q", got)
	}
}

func TestNewS3Refuses(t *testing.T) {
	ok := S3Config{Endpoint: "https://s3.example.com", Bucket: "b", AccessKeyID: "a", SecretAccessKey: "s", SignURLs: true}
	for name, tc := range map[string]struct {
		edit func(*S3Config)
		want string
	}{
		"no endpoint":   {func(c *S3Config) { c.Endpoint = "" }, "endpoint is empty"},
		"not a URL":     {func(c *S3Config) { c.Endpoint = "s3.example.com" }, "not an http(s) URL"},
		"ftp":           {func(c *S3Config) { c.Endpoint = "ftp://s3.example.com" }, "not an http(s) URL"},
		"no bucket":     {func(c *S3Config) { c.Bucket = "" }, "bucket is empty"},
		"no secret":     {func(c *S3Config) { c.SecretAccessKey = "" }, "secret access key"},
		"neither url":   {func(c *S3Config) { c.SignURLs = false }, "public_base_url is required"},
		"ttl too long":  {func(c *S3Config) { c.URLTTL = 8 * 24 * time.Hour }, "longer than"},
		"public is ok":  {func(c *S3Config) { c.SignURLs, c.PublicBaseURL = false, "https://cdn.example.com/" }, ""},
		"default is ok": {func(*S3Config) {}, ""},
	} {
		cfg := ok
		tc.edit(&cfg)
		s, err := NewS3(cfg)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", name, err)
		case tc.want == "" && s.cfg.Region != "us-east-1":
			t.Errorf("%s: region %q", name, s.cfg.Region)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: %v, want %q", name, err, tc.want)
		}
	}
}

// TestS3PutSpooled: a body that cannot seek and is larger than the memory
// limit goes through a temporary file, which every retry reads again.
func TestS3PutSpooled(t *testing.T) {
	_, s, srv := newS3Env(t, s3test.Options{})
	s.spoolMax, s.tmpDir = 1<<10, t.TempDir()
	data := randomBytes(100_000, 8)
	for _, size := range []int64{int64(len(data)), -1} {
		srv.FailNext(2)
		if err := s.Put(context.Background(), "sp/x.bin", &onlyReader{bytes.NewReader(data)}, size, ""); err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if got, _ := srv.Object("sp/x.bin"); !bytes.Equal(got, data) {
			t.Fatalf("size %d: stored %d bytes", size, len(got))
		}
	}
}
