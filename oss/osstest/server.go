package osstest

import (
	"bytes"
	"crypto/md5"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/xml"
	"fmt"
	"hash/crc64"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Options configure a Server. Zero fields take the defaults shown.
type Options struct {
	Bucket          string // "test-bucket"
	AccessKeyID     string // "test-ak"
	AccessKeySecret string // "test-secret"
	Region          string // "cn-hangzhou" (checked in V4 credentials)
	// PublicRead lets unsigned GET and HEAD requests read objects (a bucket
	// with a public-read ACL, for PublicBaseURL tests).
	PublicRead bool
	// MaxObjectSize refuses larger PUTs with EntityTooLarge (default 64 MiB).
	MaxObjectSize int64
}

// Object is one stored object.
type Object struct {
	Data         []byte
	ContentType  string
	ETag         string // upper-case hex MD5, unquoted
	Meta         map[string]string
	LastModified time.Time
}

// Request is one request the server saw.
type Request struct {
	Method string
	Key    string // "" for bucket-level requests
	Query  string
	// Auth is how it was authenticated: "v1", "v4", "v1-url", "v4-url" or
	// "anonymous".
	Auth string
	// BodyBytes is how many body bytes arrived; Chunked tells whether they
	// came with Transfer-Encoding: chunked.
	BodyBytes int64
	Chunked   bool
	Status    int
	Code      string // OSS error code, "" on success
}

// Server is a fake Aliyun OSS endpoint on 127.0.0.1 holding one bucket in
// memory. The real SDK talks to it unchanged, over path-style URLs.
type Server struct {
	opts Options
	srv  *httptest.Server

	mu       sync.Mutex
	objects  map[string]Object
	log      []Request
	skew     time.Duration
	faults   []fault
	drops    int
	corrupts int
}

type fault struct {
	status int
	code   string
}

var crcTable = crc64.MakeTable(crc64.ECMA)

// New starts a server; Close it when done.
func New(opts Options) *Server {
	if opts.Bucket == "" {
		opts.Bucket = "test-bucket"
	}
	if opts.AccessKeyID == "" {
		opts.AccessKeyID = "test-ak"
	}
	if opts.AccessKeySecret == "" {
		opts.AccessKeySecret = "test-secret"
	}
	if opts.Region == "" {
		opts.Region = "cn-hangzhou"
	}
	if opts.MaxObjectSize <= 0 {
		opts.MaxObjectSize = 64 << 20
	}
	s := &Server{opts: opts, objects: map[string]Object{}}
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	return s
}

// Start starts a server that is closed when tb's test ends.
func Start(tb testing.TB, opts Options) *Server {
	tb.Helper()
	s := New(opts)
	tb.Cleanup(s.Close)
	return s
}

// Close stops the server.
func (s *Server) Close() { s.srv.Close() }

// Endpoint is the address to give the SDK, "http://127.0.0.1:PORT"; an IP
// endpoint makes the SDK use path-style URLs.
func (s *Server) Endpoint() string { return s.srv.URL }

// PublicBaseURL is the unsigned address of the bucket's objects
// (Endpoint/bucket/), readable when Options.PublicRead is set.
func (s *Server) PublicBaseURL() string { return s.srv.URL + "/" + s.opts.Bucket + "/" }

// Bucket, AccessKeyID, AccessKeySecret and Region return the server's
// settings.
func (s *Server) Bucket() string          { return s.opts.Bucket }
func (s *Server) AccessKeyID() string     { return s.opts.AccessKeyID }
func (s *Server) AccessKeySecret() string { return s.opts.AccessKeySecret }
func (s *Server) Region() string          { return s.opts.Region }

// Now is the server's clock: the real time plus the skew.
func (s *Server) Now() time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return time.Now().Add(s.skew)
}

// SetSkew moves the server's clock by d (positive: the server is ahead).
// Requests more than 15 minutes off get RequestTimeTooSkewed, and signed URLs
// expire by this clock.
func (s *Server) SetSkew(d time.Duration) {
	s.mu.Lock()
	s.skew = d
	s.mu.Unlock()
}

// FailNext answers the next n requests with status and an OSS error body
// (code InternalError, ServiceUnavailable, AccessDenied... after the status),
// before looking at them. The request body is read first.
func (s *Server) FailNext(n, status int) { s.FailNextCode(n, status, defaultCode(status)) }

// FailNextCode is FailNext with a chosen OSS error code.
func (s *Server) FailNextCode(n, status int, code string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for range n {
		s.faults = append(s.faults, fault{status, code})
	}
}

// DropNext closes the connection of the next n requests without answering
// them (the client sees a connection error).
func (s *Server) DropNext(n int) {
	s.mu.Lock()
	s.drops += n
	s.mu.Unlock()
}

// CorruptNextGet flips one byte of the body of the next n successful object
// GETs, keeping the headers (and the CRC-64 they carry) of the true object.
func (s *Server) CorruptNextGet(n int) {
	s.mu.Lock()
	s.corrupts += n
	s.mu.Unlock()
}

// Requests returns every request seen so far, oldest first.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Request(nil), s.log...)
}

// RequestCount counts the requests seen with the given method ("" for all).
func (s *Server) RequestCount(method string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.log {
		if method == "" || r.Method == method {
			n++
		}
	}
	return n
}

// ResetLog forgets the requests seen so far.
func (s *Server) ResetLog() {
	s.mu.Lock()
	s.log = nil
	s.mu.Unlock()
}

// Object returns a stored object.
func (s *Server) Object(key string) (Object, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	o, ok := s.objects[key]
	if ok {
		o.Data = bytes.Clone(o.Data)
		o.Meta = maps.Clone(o.Meta)
	}
	return o, ok
}

// PutObject stores an object directly, without a request.
func (s *Server) PutObject(key string, data []byte, contentType string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.objects[key] = newObject(bytes.Clone(data), contentType, nil, time.Now().Add(s.skew))
}

// Keys returns the stored keys.
func (s *Server) Keys() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var keys []string
	for k := range s.objects {
		keys = append(keys, k)
	}
	return keys
}

func newObject(data []byte, contentType string, meta map[string]string, now time.Time) Object {
	sum := md5.Sum(data)
	return Object{
		Data:         data,
		ContentType:  contentType,
		ETag:         strings.ToUpper(hex.EncodeToString(sum[:])),
		Meta:         meta,
		LastModified: now.UTC().Truncate(time.Second),
	}
}

func defaultCode(status int) string {
	switch status {
	case http.StatusBadRequest:
		return "InvalidArgument"
	case http.StatusForbidden:
		return "AccessDenied"
	case http.StatusNotFound:
		return "NoSuchKey"
	case http.StatusConflict:
		return "Conflict"
	case http.StatusServiceUnavailable:
		return "ServiceUnavailable"
	case http.StatusBadGateway:
		return "BadGateway"
	}
	return "InternalError"
}

// recorder captures the status and error code written, and logs the request
// as its response starts: a client that has its answer finds the request in
// Requests and RequestCount.
type recorder struct {
	http.ResponseWriter
	s      *Server
	req    *Request
	logged bool
}

func (w *recorder) WriteHeader(status int) {
	w.req.Status = status
	w.log()
	w.ResponseWriter.WriteHeader(status)
}

func (w *recorder) Write(b []byte) (int, error) {
	if !w.logged {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(b)
}

// log appends the request to the server's log, once.
func (w *recorder) log() {
	if w.logged {
		return
	}
	w.logged = true
	if w.req.Status == 0 {
		w.req.Status = http.StatusOK
	}
	w.s.mu.Lock()
	w.s.log = append(w.s.log, *w.req)
	w.s.mu.Unlock()
}

func (s *Server) serve(rw http.ResponseWriter, r *http.Request) {
	entry := &Request{Method: r.Method, Query: r.URL.RawQuery, Chunked: len(r.TransferEncoding) > 0}
	w := &recorder{ResponseWriter: rw, s: s, req: entry}
	body, readErr := io.ReadAll(io.LimitReader(r.Body, s.opts.MaxObjectSize+1))
	entry.BodyBytes = int64(len(body))
	defer w.log() // a dropped connection or an empty answer

	// Path style: /bucket/key; r.URL.Path is already unescaped, so the SDK's
	// %2F comes back as "/".
	bucket, key, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
	entry.Key = key

	s.mu.Lock()
	drop := s.drops > 0
	if drop {
		s.drops--
	}
	var f *fault
	if !drop && len(s.faults) > 0 {
		f = &s.faults[0]
		s.faults = s.faults[1:]
	}
	s.mu.Unlock()
	if drop {
		entry.Status = -1
		w.log() // before the client sees the connection close
		if hj, ok := rw.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				_ = c.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	}
	if f != nil {
		s.fail(w, r, entry, f.status, f.code, "Injected fault.", "")
		return
	}
	if readErr != nil {
		s.fail(w, r, entry, http.StatusBadRequest, "InvalidArgument", "Error reading body: "+readErr.Error(), "")
		return
	}
	if bucket != s.opts.Bucket {
		s.fail(w, r, entry, http.StatusNotFound, "NoSuchBucket", "The specified bucket does not exist.", "")
		return
	}
	if e := s.authenticate(r, entry, bucket, key); e != nil {
		s.fail(w, r, entry, e.status, e.code, e.msg, e.stringToSign)
		return
	}
	if key == "" {
		s.serveBucket(w, r, entry)
		return
	}
	switch r.Method {
	case http.MethodPut:
		s.putObject(w, r, entry, key, body)
	case http.MethodGet, http.MethodHead:
		s.getObject(w, r, entry, key)
	case http.MethodDelete:
		s.mu.Lock()
		delete(s.objects, key)
		s.mu.Unlock()
		s.headers(w)
		w.WriteHeader(http.StatusNoContent)
	default:
		s.fail(w, r, entry, http.StatusMethodNotAllowed, "MethodNotAllowed", "The specified method is not allowed against this resource.", "")
	}
}

// authenticate checks the request's signature, in its header or its query.
func (s *Server) authenticate(r *http.Request, entry *Request, bucket, key string) *authError {
	auth := r.Header.Get("Authorization")
	q := r.URL.Query()
	switch {
	case strings.HasPrefix(auth, algV4+" "):
		entry.Auth = "v4"
		return s.checkV4Header(r, bucket, key, auth)
	case strings.HasPrefix(auth, "OSS "):
		entry.Auth = "v1"
		return s.checkV1Header(r, bucket, key, auth)
	case auth != "":
		return &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Unsupported Authorization header."}
	case q.Has("x-oss-signature"):
		entry.Auth = "v4-url"
		return s.checkV4Query(r, bucket, key, q)
	case q.Has("Signature"):
		entry.Auth = "v1-url"
		return s.checkV1Query(r, bucket, key, q)
	}
	entry.Auth = "anonymous"
	if s.opts.PublicRead && key != "" && (r.Method == http.MethodGet || r.Method == http.MethodHead) {
		return nil
	}
	return denied("AccessDenied", "You have no right to access this object because of bucket acl.")
}

func (s *Server) putObject(w http.ResponseWriter, r *http.Request, entry *Request, key string, body []byte) {
	if int64(len(body)) > s.opts.MaxObjectSize {
		s.fail(w, r, entry, http.StatusBadRequest, "EntityTooLarge", "Your proposed upload exceeds the maximum allowed size.", "")
		return
	}
	if m := r.Header.Get("Content-MD5"); m != "" {
		sum := md5.Sum(body)
		if m != base64.StdEncoding.EncodeToString(sum[:]) {
			s.fail(w, r, entry, http.StatusBadRequest, "InvalidDigest", "The Content-MD5 you specified is not valid.", "")
			return
		}
	}
	ct := r.Header.Get("Content-Type")
	if ct == "" {
		ct = "application/octet-stream"
	}
	meta := map[string]string{}
	for k, v := range r.Header {
		if lk := strings.ToLower(k); strings.HasPrefix(lk, "x-oss-meta-") {
			meta[strings.TrimPrefix(lk, "x-oss-meta-")] = v[0]
		}
	}
	s.mu.Lock()
	if _, exists := s.objects[key]; exists && strings.EqualFold(r.Header.Get("x-oss-forbid-overwrite"), "true") {
		s.mu.Unlock()
		s.fail(w, r, entry, http.StatusConflict, "FileAlreadyExists", "The object you specified already exists and can not be overwritten.", "")
		return
	}
	o := newObject(body, ct, meta, time.Now().Add(s.skew))
	s.objects[key] = o
	s.mu.Unlock()
	s.headers(w)
	w.Header().Set("ETag", `"`+o.ETag+`"`)
	w.Header().Set("x-oss-hash-crc64ecma", strconv.FormatUint(crc64.Checksum(body, crcTable), 10))
	w.WriteHeader(http.StatusOK)
}

func (s *Server) getObject(w http.ResponseWriter, r *http.Request, entry *Request, key string) {
	s.mu.Lock()
	o, ok := s.objects[key]
	corrupt := ok && r.Method == http.MethodGet && s.corrupts > 0 && len(o.Data) > 0
	if corrupt {
		s.corrupts--
	}
	s.mu.Unlock()
	if !ok {
		s.fail(w, r, entry, http.StatusNotFound, "NoSuchKey", "The specified key does not exist.", "")
		return
	}
	data := o.Data
	if corrupt {
		data = bytes.Clone(data)
		data[len(data)/2] ^= 0xFF
	}
	s.headers(w)
	h := w.Header()
	h.Set("Content-Type", o.ContentType)
	if ct := r.URL.Query().Get("response-content-type"); ct != "" && entry.Auth != "anonymous" {
		h.Set("Content-Type", ct)
	}
	h.Set("ETag", `"`+o.ETag+`"`)
	h.Set("x-oss-object-type", "Normal")
	for k, v := range o.Meta {
		h.Set("x-oss-meta-"+k, v)
	}
	if r.Header.Get("Range") == "" {
		h.Set("x-oss-hash-crc64ecma", strconv.FormatUint(crc64.Checksum(o.Data, crcTable), 10))
	}
	http.ServeContent(w, r, "", o.LastModified, bytes.NewReader(data))
}

func (s *Server) serveBucket(w http.ResponseWriter, r *http.Request, entry *Request) {
	if r.Method != http.MethodGet || !r.URL.Query().Has("bucketInfo") {
		s.fail(w, r, entry, http.StatusNotImplemented, "NotImplemented", "This fake serves only GetBucketInfo at bucket level.", "")
		return
	}
	s.headers(w)
	w.Header().Set("Content-Type", "application/xml")
	w.WriteHeader(http.StatusOK)
	fmt.Fprintf(w, `<?xml version="1.0" encoding="UTF-8"?>
<BucketInfo><Bucket><Name>%s</Name><Location>oss-%s</Location><StorageClass>Standard</StorageClass><AccessControlList><Grant>private</Grant></AccessControlList></Bucket></BucketInfo>`,
		s.opts.Bucket, s.opts.Region)
}

func (s *Server) headers(w http.ResponseWriter) {
	w.Header().Set("x-oss-request-id", requestID())
	w.Header().Set("Server", "AliyunOSS")
	w.Header().Set("Date", time.Now().UTC().Format(http.TimeFormat))
}

type errorBody struct {
	XMLName      xml.Name `xml:"Error"`
	Code         string   `xml:"Code"`
	Message      string   `xml:"Message"`
	RequestID    string   `xml:"RequestId"`
	HostID       string   `xml:"HostId"`
	StringToSign string   `xml:"StringToSign,omitempty"`
}

// fail answers with an OSS XML error: in the body, or for HEAD (which has
// none) base64-encoded in the x-oss-err header.
func (s *Server) fail(w http.ResponseWriter, r *http.Request, entry *Request, status int, code, msg, stringToSign string) {
	entry.Code = code
	id := requestID()
	b, _ := xml.Marshal(errorBody{Code: code, Message: msg, RequestID: id, HostID: r.Host, StringToSign: stringToSign})
	b = append([]byte(xml.Header), b...)
	w.Header().Set("x-oss-request-id", id)
	w.Header().Set("Content-Type", "application/xml")
	if r.Method == http.MethodHead {
		w.Header().Set("x-oss-err", base64.StdEncoding.EncodeToString(b))
		w.WriteHeader(status)
		return
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

func requestID() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return strings.ToUpper(hex.EncodeToString(b[:]))
}
