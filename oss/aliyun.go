package oss

// This file is the only one that knows the Aliyun OSS SDK (v1,
// github.com/aliyun/aliyun-oss-go-sdk). Moving to another SDK touches it alone.

import (
	"context"
	"errors"
	"fmt"
	"hash"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	alioss "github.com/aliyun/aliyun-oss-go-sdk/oss"
	"github.com/sethvargo/go-retry"

	"github.com/comfyfarm/comfyfarm/schema"
)

// AliyunConfig configures an Aliyun store.
type AliyunConfig struct {
	// Endpoint is e.g. "https://oss-cn-hangzhou.aliyuncs.com" (virtual-hosted:
	// bucket.endpoint) or an IP endpoint such as "http://127.0.0.1:9000"
	// (path style: endpoint/bucket/key). Without a scheme, https is used.
	Endpoint        string
	Bucket          string
	AccessKeyID     string
	AccessKeySecret string
	// PublicBaseURL (a CDN or public bucket domain) is what URL returns keys
	// under when SignURLs is off.
	PublicBaseURL string
	// SignURLs makes URL return signed GET URLs valid for URLTTL (default 1h).
	SignURLs bool
	URLTTL   time.Duration
	// AuthVersion is "v1" (default) or "v4"; v4 needs Region (e.g. "cn-hangzhou").
	AuthVersion string
	Region      string
	// MaxRetries is how many times a failed request is retried (default 5;
	// negative: never). RetryBase is the first back-off (default 200ms); it
	// doubles each retry, with ±50% jitter, up to 64 × RetryBase.
	MaxRetries int
	RetryBase  time.Duration
	// HTTPTimeout bounds connecting, waiting for response headers, and each
	// read or write on the connection (default 60s). The whole of a long
	// transfer is bounded by the caller's context only.
	HTTPTimeout time.Duration
}

// Aliyun is a Store on an Aliyun OSS bucket. It retries 5xx answers,
// RequestTimeTooSkewed and connection failures itself (the v1 SDK never
// retries), replaying the upload body from the start each time.
type Aliyun struct {
	bucket   *alioss.Bucket
	cfg      AliyunConfig
	spoolMax int64  // non-seekable bodies above this many bytes are spooled to disk
	tmpDir   string // where spooled bodies go ("" = os.TempDir)
}

const (
	defaultRetries   = 5
	defaultRetryBase = 200 * time.Millisecond
	defaultTimeout   = 60 * time.Second
	spoolThreshold   = 4 << 20
	// pingKey is a key Ping reads; NoSuchKey proves endpoint, bucket,
	// credentials and clock are right, with read permission only.
	pingKey = ".comfyfarm-ping"
)

// NewAliyun builds an Aliyun store. It sends no request; use Ping to check
// the bucket.
func NewAliyun(cfg AliyunConfig) (*Aliyun, error) {
	switch {
	case cfg.Endpoint == "":
		return nil, errors.New("aliyun oss: endpoint is empty")
	case cfg.Bucket == "":
		return nil, errors.New("aliyun oss: bucket is empty")
	case cfg.AccessKeyID == "" || cfg.AccessKeySecret == "":
		return nil, errors.New("aliyun oss: access key id and secret are required")
	case !cfg.SignURLs && cfg.PublicBaseURL == "":
		return nil, errors.New("aliyun oss: public_base_url is required when sign_urls is off")
	}
	if !strings.Contains(cfg.Endpoint, "://") {
		cfg.Endpoint = "https://" + cfg.Endpoint
	}
	if cfg.URLTTL <= 0 {
		cfg.URLTTL = time.Hour
	}
	if cfg.MaxRetries == 0 {
		cfg.MaxRetries = defaultRetries
	}
	if cfg.RetryBase <= 0 {
		cfg.RetryBase = defaultRetryBase
	}
	if cfg.HTTPTimeout <= 0 {
		cfg.HTTPTimeout = defaultTimeout
	}
	opts := []alioss.ClientOption{alioss.HTTPClient(newHTTPClient(cfg.HTTPTimeout))}
	switch strings.ToLower(cfg.AuthVersion) {
	case "", "v1":
		opts = append(opts, alioss.AuthVersion(alioss.AuthV1))
	case "v4":
		if cfg.Region == "" {
			return nil, errors.New("aliyun oss: auth version v4 needs a region")
		}
		opts = append(opts, alioss.AuthVersion(alioss.AuthV4), alioss.Region(cfg.Region))
	default:
		return nil, fmt.Errorf("aliyun oss: unknown auth version %q (want v1 or v4)", cfg.AuthVersion)
	}
	client, err := alioss.New(cfg.Endpoint, cfg.AccessKeyID, cfg.AccessKeySecret, opts...)
	if err != nil {
		return nil, fmt.Errorf("aliyun oss: %w", err)
	}
	bucket, err := client.Bucket(cfg.Bucket)
	if err != nil {
		return nil, fmt.Errorf("aliyun oss: %w", err)
	}
	return &Aliyun{bucket: bucket, cfg: cfg, spoolMax: spoolThreshold}, nil
}

// Put uploads the object with an explicit Content-Type and Content-Length.
// A body that is not an io.ReadSeeker is first copied (to memory up to 4 MiB,
// else to a temporary file) so a retry can send it again.
func (a *Aliyun) Put(ctx context.Context, key string, r io.Reader, size int64, contentType string) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	contentType = contentTypeFor(key, contentType)
	body, err := newReplayBody(r, size, a.spoolMax, a.tmpDir)
	if err != nil {
		return fmt.Errorf("oss put %s: %w", key, err)
	}
	defer body.Close()
	return a.do(ctx, "put", key, func(ctx context.Context) error {
		rd, err := body.attempt()
		if err != nil {
			return err
		}
		defer body.stop()
		return a.bucket.PutObject(key, rd,
			alioss.ContentType(contentType), alioss.ContentLength(body.size), alioss.WithContext(ctx))
	})
}

// Get downloads the object. Opening is retried; the body is not. A body whose
// CRC-64 disagrees with the one OSS reports fails at its end.
func (a *Aliyun) Get(ctx context.Context, key string) (io.ReadCloser, ObjectInfo, error) {
	if err := ValidKey(key); err != nil {
		return nil, ObjectInfo{}, err
	}
	var res *alioss.GetObjectResult
	err := a.do(ctx, "get", key, func(ctx context.Context) error {
		var err error
		res, err = a.bucket.DoGetObject(&alioss.GetObjectRequest{ObjectKey: key}, []alioss.Option{alioss.WithContext(ctx)})
		return err
	})
	if err != nil {
		return nil, ObjectInfo{}, err
	}
	h := res.Response.Headers
	size, err := strconv.ParseInt(h.Get("Content-Length"), 10, 64)
	if err != nil {
		size = -1
	}
	info := ObjectInfo{Size: size, ContentType: h.Get("Content-Type"), ETag: strings.Trim(h.Get("ETag"), `"`)}
	return &crcBody{rc: res.Response.Body, crc: res.ClientCRC, want: res.ServerCRC, key: key}, info, nil
}

// Delete removes the object; OSS answers 204 for a missing key too.
func (a *Aliyun) Delete(ctx context.Context, key string) error {
	if err := ValidKey(key); err != nil {
		return err
	}
	err := a.do(ctx, "delete", key, func(ctx context.Context) error {
		return a.bucket.DeleteObject(key, alioss.WithContext(ctx))
	})
	if errors.Is(err, schema.ErrNotFound) {
		return nil
	}
	return err
}

// URL returns a signed GET URL when SignURLs is set, else PublicBaseURL + key.
func (a *Aliyun) URL(_ context.Context, key string) (string, error) {
	if err := ValidKey(key); err != nil {
		return "", err
	}
	if !a.cfg.SignURLs {
		return joinURL(a.cfg.PublicBaseURL, key), nil
	}
	u, err := a.bucket.SignURL(key, alioss.HTTPGet, int64(math.Ceil(a.cfg.URLTTL.Seconds())))
	if err != nil {
		return "", fmt.Errorf("oss sign %s: %w", key, err)
	}
	return u, nil
}

// Ping reads a key that is never written, in one attempt: NoSuchKey means
// the endpoint, bucket, credentials and clock are all right.
func (a *Aliyun) Ping(ctx context.Context) error {
	rc, err := a.bucket.GetObject(pingKey, alioss.WithContext(ctx))
	if err == nil {
		return rc.Close()
	}
	var se alioss.ServiceError
	if errors.As(err, &se) && se.Code == "NoSuchKey" {
		return nil
	}
	return fmt.Errorf("oss ping %s: %w", a.cfg.Bucket, err)
}

// do runs one SDK call with retries and turns NoSuchKey into
// schema.ErrNotFound.
func (a *Aliyun) do(ctx context.Context, op, key string, call func(context.Context) error) error {
	attempts := 0
	err := retry.Do(ctx, a.backoff(), func(ctx context.Context) error {
		attempts++
		var status atomic.Int32
		err := call(context.WithValue(ctx, statusKey{}, &status))
		if err == nil {
			return nil
		}
		if isNotFound(err) {
			return fmt.Errorf("%w: %s", schema.ErrNotFound, key)
		}
		if ctx.Err() == nil && retryable(err, int(status.Load())) {
			return retry.RetryableError(err)
		}
		return err
	})
	if err == nil || errors.Is(err, schema.ErrNotFound) {
		return err
	}
	if attempts > 1 {
		return fmt.Errorf("oss %s %s (%d attempts): %w", op, key, attempts, err)
	}
	return fmt.Errorf("oss %s %s: %w", op, key, err)
}

func (a *Aliyun) backoff() retry.Backoff {
	b := retry.NewExponential(a.cfg.RetryBase)
	b = retry.WithCappedDuration(64*a.cfg.RetryBase, b)
	b = retry.WithJitterPercent(50, b)
	return retry.WithMaxRetries(uint64(max(a.cfg.MaxRetries, 0)), b)
}

func isNotFound(err error) bool {
	var se alioss.ServiceError
	return errors.As(err, &se) && (se.Code == "NoSuchKey" || (se.Code == "" && se.StatusCode == http.StatusNotFound))
}

// retryable says whether a failed attempt may succeed if tried again: a 5xx
// (with or without an OSS error body), RequestTimeTooSkewed (the clocks may
// agree again), a CRC mismatch, or a failure below HTTP (refused, reset or
// timed-out connections, truncated bodies). status is the HTTP status the
// attempt got, 0 if none.
func retryable(err error, status int) bool {
	var se alioss.ServiceError
	if errors.As(err, &se) {
		return se.StatusCode >= 500 || se.Code == "RequestTimeTooSkewed"
	}
	if status >= 500 {
		return true
	}
	if status >= 300 {
		return false
	}
	var crc alioss.CRCCheckError
	var ue *url.Error
	var ne net.Error
	return errors.As(err, &crc) || errors.As(err, &ue) || errors.As(err, &ne) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) ||
		errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

// statusKey carries an *atomic.Int32 through a request's context; the
// transport stores the response status there.
type statusKey struct{}

type statusTransport struct{ base http.RoundTripper }

func (t statusTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.base.RoundTrip(req)
	if resp != nil {
		if s, ok := req.Context().Value(statusKey{}).(*atomic.Int32); ok {
			s.Store(int32(resp.StatusCode))
		}
	}
	return resp, err
}

// newHTTPClient is the SDK's client: timeout bounds connecting, waiting for
// headers and every single read or write (an idle deadline, as the SDK's own
// transport does); redirects are not followed.
func newHTTPClient(timeout time.Duration) *http.Client {
	dialer := &net.Dialer{Timeout: min(timeout, 10*time.Second), KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return &idleTimeoutConn{Conn: c, timeout: timeout}, nil
		},
		TLSHandshakeTimeout:   min(timeout, 10*time.Second),
		ResponseHeaderTimeout: timeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       50 * time.Second,
		MaxIdleConns:          100,
		MaxIdleConnsPerHost:   100,
	}
	return &http.Client{
		Transport:     statusTransport{base: tr},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// idleTimeoutConn fails a connection on which nothing moves for timeout. A
// write also pushes the read deadline on: the transport waits for the
// response while a long upload is still being written.
type idleTimeoutConn struct {
	net.Conn
	timeout time.Duration
}

func (c *idleTimeoutConn) Read(b []byte) (int, error) {
	_ = c.SetReadDeadline(time.Now().Add(c.timeout))
	return c.Conn.Read(b)
}

func (c *idleTimeoutConn) Write(b []byte) (int, error) {
	_ = c.SetWriteDeadline(time.Now().Add(c.timeout))
	n, err := c.Conn.Write(b)
	_ = c.SetReadDeadline(time.Now().Add(c.timeout))
	return n, err
}

// crcBody checks, at the end of a download, the CRC-64 the SDK computed while
// reading against the x-oss-hash-crc64ecma OSS sent.
type crcBody struct {
	rc   io.ReadCloser
	crc  hash.Hash64
	want uint64
	key  string
}

func (b *crcBody) Read(p []byte) (int, error) {
	n, err := b.rc.Read(p)
	if err == io.EOF && b.crc != nil && b.want != 0 && b.crc.Sum64() != b.want {
		return n, fmt.Errorf("oss get %s: CRC-64 mismatch (got %d, server %d)", b.key, b.crc.Sum64(), b.want)
	}
	return n, err
}

func (b *crcBody) Close() error { return b.rc.Close() }
