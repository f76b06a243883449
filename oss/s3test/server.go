package s3test

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// Options configure a Server. Zero fields take the defaults shown.
type Options struct {
	Bucket          string // "test-bucket"
	AccessKeyID     string // "test-ak"
	SecretAccessKey string // "test-secret"
	Region          string // "us-east-1" (checked in the credential scope)
	// VirtualHost serves bucket.localhost:PORT/key instead of
	// 127.0.0.1:PORT/bucket/key.
	VirtualHost bool
	// PublicRead lets unsigned GET and HEAD requests through (a bucket with a
	// public-read policy, for public_base_url tests).
	PublicRead bool
	// MaxObjectSize refuses larger signed-payload PUTs (default 64 MiB).
	MaxObjectSize int64
}

// Request is one request the server saw.
type Request struct {
	Method string
	Bucket string
	Key    string // "" for bucket-level requests
	// Style is "path" or "virtual".
	Style string
	// Auth is "header", "presigned" or "anonymous".
	Auth   string
	Status int
}

// Server is a running S3 server holding one bucket.
type Server struct {
	opts    Options
	srv     *httptest.Server
	skew    atomic.Int64
	failN   atomic.Int64
	signer  *v4.Signer
	backend *s3mem.Backend

	mu   sync.Mutex
	reqs []Request
}

const (
	skewLimit     = 15 * time.Minute
	maxPresignTTL = 7 * 24 * time.Hour
	amzDate       = "20060102T150405Z"
	algorithm     = "AWS4-HMAC-SHA256"
)

// Start runs a server until the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if opts.Bucket == "" {
		opts.Bucket = "test-bucket"
	}
	if opts.AccessKeyID == "" {
		opts.AccessKeyID = "test-ak"
	}
	if opts.SecretAccessKey == "" {
		opts.SecretAccessKey = "test-secret"
	}
	if opts.Region == "" {
		opts.Region = "us-east-1"
	}
	if opts.MaxObjectSize <= 0 {
		opts.MaxObjectSize = 64 << 20
	}
	s := &Server{opts: opts, signer: v4.NewSigner(), backend: s3mem.New()}
	if err := s.backend.CreateBucket(opts.Bucket); err != nil {
		t.Fatal(err)
	}
	// The front checks the clock; gofakes3's own skew check is off.
	fake := gofakes3.New(s.backend, gofakes3.WithLogger(gofakes3.DiscardLog()), gofakes3.WithTimeSkewLimit(0))
	s.srv = httptest.NewServer(s.front(fake.Server()))
	t.Cleanup(s.srv.Close)
	return s
}

// Addr is the listening address, 127.0.0.1:PORT.
func (s *Server) Addr() string { return s.srv.Listener.Addr().String() }

func (s *Server) port() string {
	_, p, _ := net.SplitHostPort(s.Addr())
	return p
}

// Endpoint is the base URL clients are given: http://127.0.0.1:PORT, or
// http://localhost:PORT with VirtualHost.
func (s *Server) Endpoint() string {
	if s.opts.VirtualHost {
		return "http://localhost:" + s.port()
	}
	return s.srv.URL
}

// PublicBaseURL is where the bucket's objects are read without credentials
// (with PublicRead).
func (s *Server) PublicBaseURL() string {
	if s.opts.VirtualHost {
		return "http://" + s.opts.Bucket + ".localhost:" + s.port() + "/"
	}
	return s.srv.URL + "/" + s.opts.Bucket + "/"
}

func (s *Server) Bucket() string          { return s.opts.Bucket }
func (s *Server) AccessKeyID() string     { return s.opts.AccessKeyID }
func (s *Server) SecretAccessKey() string { return s.opts.SecretAccessKey }
func (s *Server) Region() string          { return s.opts.Region }

// HTTPClient is a client that reaches this server whatever host name a URL
// carries (bucket.localhost included).
func (s *Server) HTTPClient() *http.Client {
	d := &net.Dialer{}
	addr := s.Addr()
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
	}}
}

// SetSkew moves the server's clock by d.
func (s *Server) SetSkew(d time.Duration) { s.skew.Store(int64(d)) }

// FailNext answers the next n requests with 503 SlowDown.
func (s *Server) FailNext(n int) { s.failN.Store(int64(n)) }

// Requests returns what arrived so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.reqs...)
}

// Object returns the stored bytes of key, reading the backend directly.
func (s *Server) Object(key string) ([]byte, bool) {
	obj, err := s.backend.GetObject(s.opts.Bucket, key, nil)
	if err != nil {
		return nil, false
	}
	defer obj.Contents.Close()
	b, err := io.ReadAll(obj.Contents)
	return b, err == nil
}

func (s *Server) now() time.Time { return time.Now().Add(time.Duration(s.skew.Load())) }

// statusWriter remembers the status a handler sent.
type statusWriter struct {
	http.ResponseWriter
	status int
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(b []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	return w.ResponseWriter.Write(b)
}

// s3Error is an S3 error answer.
type s3Error struct {
	status  int
	code    string
	message string
}

func (e *s3Error) Error() string { return e.code + ": " + e.message }

func fail(status int, code, format string, args ...any) *s3Error {
	return &s3Error{status: status, code: code, message: fmt.Sprintf(format, args...)}
}

func (s *Server) front(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := &statusWriter{ResponseWriter: w}
		rec := Request{Method: r.Method, Style: "path"}
		defer func() {
			if rec.Status = sw.status; rec.Status == 0 {
				rec.Status = http.StatusOK
			}
			s.mu.Lock()
			s.reqs = append(s.reqs, rec)
			s.mu.Unlock()
		}()

		bucket, key, vhost, err := s.route(r)
		rec.Bucket, rec.Key = bucket, key
		if vhost {
			rec.Style = "virtual"
		}
		if err == nil && s.failN.Load() > 0 && s.failN.Add(-1) >= 0 {
			err = fail(http.StatusServiceUnavailable, "SlowDown", "Please reduce your request rate.")
		}
		if err == nil {
			rec.Auth, err = s.authenticate(r)
		}
		if err != nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(r.Body, s.opts.MaxObjectSize))
			writeError(sw, r, err)
			return
		}
		if vhost {
			// gofakes3 routes on the path: /bucket/key.
			r.URL.Path = "/" + bucket + r.URL.Path
			r.URL.RawPath = ""
		}
		next.ServeHTTP(sw, r)
	})
}

// route finds bucket and key, and whether the request was virtual-hosted. A
// server in one style refuses the other.
func (s *Server) route(r *http.Request) (bucket, key string, vhost bool, err *s3Error) {
	host := r.Host
	if h, _, splitErr := net.SplitHostPort(host); splitErr == nil {
		host = h
	}
	path := strings.TrimPrefix(r.URL.Path, "/")
	if b, ok := strings.CutSuffix(host, ".localhost"); ok && b != "" {
		if !s.opts.VirtualHost {
			return b, path, true, fail(http.StatusBadRequest, "InvalidRequest", "virtual-hosted request to a path-style server")
		}
		return b, path, true, nil
	}
	bucket, key, _ = strings.Cut(path, "/")
	if s.opts.VirtualHost {
		return bucket, key, false, fail(http.StatusBadRequest, "InvalidRequest", "path-style request to a virtual-hosted server")
	}
	return bucket, key, false, nil
}

func (s *Server) authenticate(r *http.Request) (string, *s3Error) {
	if h := r.Header.Get("Authorization"); h != "" {
		if err := s.checkHeader(r, h); err != nil {
			return "header", err
		}
		return "header", nil
	}
	if r.URL.Query().Has("X-Amz-Signature") || r.URL.Query().Has("X-Amz-Algorithm") {
		if err := s.checkPresigned(r); err != nil {
			return "presigned", err
		}
		return "presigned", nil
	}
	if s.opts.PublicRead && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		return "anonymous", nil
	}
	return "anonymous", fail(http.StatusForbidden, "AccessDenied", "Access Denied")
}

// checkCredential checks a credential, AK/yyyymmdd/region/s3/aws4_request,
// against the server and the signing time.
func (s *Server) checkCredential(cred string, signedAt time.Time) *s3Error {
	parts := strings.Split(cred, "/")
	if len(parts) != 5 || parts[4] != "aws4_request" {
		return fail(http.StatusBadRequest, "AuthorizationHeaderMalformed", "malformed credential %q", cred)
	}
	if parts[0] != s.opts.AccessKeyID {
		return fail(http.StatusForbidden, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
	}
	if parts[1] != signedAt.Format("20060102") {
		return fail(http.StatusBadRequest, "AuthorizationHeaderMalformed", "credential date %s does not match %s", parts[1], signedAt.Format(amzDate))
	}
	if parts[2] != s.opts.Region {
		return fail(http.StatusBadRequest, "AuthorizationHeaderMalformed", "the region %q is wrong; expecting %q", parts[2], s.opts.Region)
	}
	if parts[3] != "s3" {
		return fail(http.StatusBadRequest, "AuthorizationHeaderMalformed", "service %q is wrong; expecting s3", parts[3])
	}
	return nil
}

// checkHeader verifies an Authorization header signature.
func (s *Server) checkHeader(r *http.Request, h string) *s3Error {
	fields, ok := strings.CutPrefix(h, algorithm+" ")
	if !ok {
		return fail(http.StatusBadRequest, "InvalidArgument", "unsupported authorization type")
	}
	var cred, signed, sig string
	for f := range strings.SplitSeq(fields, ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		switch k {
		case "Credential":
			cred = v
		case "SignedHeaders":
			signed = v
		case "Signature":
			sig = v
		}
	}
	if cred == "" || signed == "" || sig == "" {
		return fail(http.StatusBadRequest, "AuthorizationHeaderMalformed", "incomplete authorization header")
	}
	signedAt, err := time.Parse(amzDate, r.Header.Get("X-Amz-Date"))
	if err != nil {
		return fail(http.StatusForbidden, "AccessDenied", "AWS authentication requires a valid Date or x-amz-date header")
	}
	if e := s.checkCredential(cred, signedAt); e != nil {
		return e
	}
	if d := s.now().Sub(signedAt); d > skewLimit || d < -skewLimit {
		return fail(http.StatusForbidden, "RequestTimeTooSkewed", "The difference between the request time and the current time is too large.")
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	switch {
	case payload == "UNSIGNED-PAYLOAD":
	case strings.HasPrefix(payload, "STREAMING-"):
		return fail(http.StatusNotImplemented, "NotImplemented", "streaming payloads are not served here")
	case len(payload) == 64:
		body, err := io.ReadAll(io.LimitReader(r.Body, s.opts.MaxObjectSize+1))
		if err != nil {
			return fail(http.StatusBadRequest, "IncompleteBody", "%v", err)
		}
		if int64(len(body)) > s.opts.MaxObjectSize {
			return fail(http.StatusBadRequest, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
		}
		if sum := sha256.Sum256(body); hex.EncodeToString(sum[:]) != payload {
			return fail(http.StatusBadRequest, "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match what was computed.")
		}
		r.Body = io.NopCloser(bytes.NewReader(body))
	default:
		return fail(http.StatusBadRequest, "InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD or a SHA-256 hex digest")
	}

	re := s.rebuild(r, r.URL.RawQuery, strings.Split(signed, ";"))
	err = s.signer.SignHTTP(r.Context(), s.creds(), re, payload, "s3", s.opts.Region, signedAt, noEscape)
	if err != nil {
		return fail(http.StatusInternalServerError, "InternalError", "%v", err)
	}
	want := ""
	for f := range strings.SplitSeq(re.Header.Get("Authorization"), ",") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(f), "Signature="); ok {
			want = v
		}
	}
	if !hmac.Equal([]byte(want), []byte(sig)) {
		return fail(http.StatusForbidden, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided. Check your key and signing method.")
	}
	return nil
}

// checkPresigned verifies a presigned URL: signature and expiry.
func (s *Server) checkPresigned(r *http.Request) *s3Error {
	q := r.URL.Query()
	if q.Get("X-Amz-Algorithm") != algorithm {
		return fail(http.StatusBadRequest, "AuthorizationQueryParametersError", "X-Amz-Algorithm only supports %q", algorithm)
	}
	signedAt, err := time.Parse(amzDate, q.Get("X-Amz-Date"))
	if err != nil {
		return fail(http.StatusBadRequest, "AuthorizationQueryParametersError", "X-Amz-Date must be in the ISO8601 Long Format")
	}
	if e := s.checkCredential(q.Get("X-Amz-Credential"), signedAt); e != nil {
		return e
	}
	secs, err := strconv.Atoi(q.Get("X-Amz-Expires"))
	if err != nil || secs < 1 || time.Duration(secs)*time.Second > maxPresignTTL {
		return fail(http.StatusBadRequest, "AuthorizationQueryParametersError", "X-Amz-Expires must be between 1 and 604800 seconds")
	}
	sig := q.Get("X-Amz-Signature")
	q.Del("X-Amz-Signature")
	re := s.rebuild(r, q.Encode(), strings.Split(q.Get("X-Amz-SignedHeaders"), ";"))
	signedURL, _, err := s.signer.PresignHTTP(r.Context(), s.creds(), re, "UNSIGNED-PAYLOAD", "s3", s.opts.Region, signedAt, noEscape)
	if err != nil {
		return fail(http.StatusInternalServerError, "InternalError", "%v", err)
	}
	u, err := url.Parse(signedURL)
	if err != nil {
		return fail(http.StatusInternalServerError, "InternalError", "%v", err)
	}
	if !hmac.Equal([]byte(u.Query().Get("X-Amz-Signature")), []byte(sig)) {
		return fail(http.StatusForbidden, "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided. Check your key and signing method.")
	}
	now := s.now()
	if now.After(signedAt.Add(time.Duration(secs) * time.Second)) {
		return fail(http.StatusForbidden, "AccessDenied", "Request has expired")
	}
	if signedAt.Sub(now) > skewLimit {
		return fail(http.StatusForbidden, "AccessDenied", "Request is not valid yet")
	}
	return nil
}

func (s *Server) creds() aws.Credentials {
	return aws.Credentials{AccessKeyID: s.opts.AccessKeyID, SecretAccessKey: s.opts.SecretAccessKey}
}

// noEscape signs the path as it arrived: S3 escapes each segment once, which
// the client has already done.
func noEscape(o *v4.SignerOptions) { o.DisableURIPathEscaping = true }

// rebuild copies the parts of r a signature covers (method, escaped path as
// sent, query, the signed headers) into a new request for the signer.
func (s *Server) rebuild(r *http.Request, rawQuery string, signed []string) *http.Request {
	rawPath, _, _ := strings.Cut(r.RequestURI, "?")
	re := &http.Request{
		Method: r.Method,
		URL:    &url.URL{Scheme: "http", Host: r.Host, Opaque: "//" + r.Host + rawPath, RawQuery: rawQuery},
		Host:   r.Host,
		Header: http.Header{},
	}
	for _, name := range signed {
		switch name = strings.ToLower(name); name {
		case "host", "":
		case "content-length":
			re.ContentLength = r.ContentLength
		default:
			if v, ok := r.Header[http.CanonicalHeaderKey(name)]; ok {
				re.Header[http.CanonicalHeaderKey(name)] = v
			}
		}
	}
	return re
}

func writeError(w http.ResponseWriter, r *http.Request, e *s3Error) {
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(e.status)
	if r.Method == http.MethodHead {
		return
	}
	body := struct {
		XMLName   xml.Name `xml:"Error"`
		Code      string
		Message   string
		Resource  string
		RequestID string `xml:"RequestId"`
	}{Code: e.code, Message: e.message, Resource: r.URL.Path, RequestID: "s3test"}
	_, _ = io.WriteString(w, xml.Header)
	_ = xml.NewEncoder(w).Encode(body)
}
