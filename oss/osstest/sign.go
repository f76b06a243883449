package osstest

import (
	"crypto/hmac"
	"crypto/sha1"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
)

// How OSS signs requests, server side. V1: HMAC-SHA1 over
//
//	VERB \n Content-MD5 \n Content-Type \n Date-or-Expires \n x-oss-headers resource
//
// V4: HMAC-SHA256 chain over a canonical request. See the package doc.

const (
	algV4         = "OSS4-HMAC-SHA256"
	timeFormatV4  = "20060102T150405Z"
	dayFormatV4   = "20060102"
	maxSkew       = 15 * time.Minute
	unsignedV4    = "UNSIGNED-PAYLOAD"
	v4RequestTail = "/oss/aliyun_v4_request"
)

// signedSubresources are the query parameters OSS puts into a V1
// canonicalized resource (the SDK's signKeyList); others are not signed.
var signedSubresources = map[string]bool{}

func init() {
	for _, k := range strings.Fields(`acl uploads location cors logging website referer lifecycle delete append
		tagging objectMeta uploadId partNumber security-token position img style styleName replication
		replicationProgress replicationLocation cname bucketInfo comp qos live status vod startTime endTime
		symlink x-oss-process response-content-type x-oss-traffic-limit response-content-language
		response-expires response-cache-control response-content-disposition response-content-encoding udf
		udfName udfImage udfId udfImageDesc udfApplication udfApplicationLog restore callback callback-var
		qosInfo policy stat encryption versions versioning versionId requestPayment x-oss-request-payer
		sequential inventory inventoryId continuation-token asyncFetch worm wormId wormExtend withHashContext
		x-oss-enable-md5 x-oss-enable-sha1 x-oss-enable-sha256 x-oss-hash-ctx x-oss-md5-ctx
		transferAcceleration regionList cloudboxes x-oss-ac-source-ip x-oss-ac-subnet-mask x-oss-ac-vpc-id
		x-oss-ac-forward-allow metaQuery resourceGroup rtc x-oss-async-process responseHeader`) {
		signedSubresources[k] = true
	}
}

// authError is a refusal: HTTP status, OSS error code, message, and for
// signature mismatches the string the server signed.
type authError struct {
	status       int
	code         string
	msg          string
	stringToSign string
}

func (e *authError) Error() string { return e.code + ": " + e.msg }

func denied(code, format string, args ...any) *authError {
	return &authError{status: http.StatusForbidden, code: code, msg: fmt.Sprintf(format, args...)}
}

// v1Resource is the V1 canonicalized resource: /bucket/key (raw) plus the
// signed sub-resources, sorted, values unescaped.
func v1Resource(bucket, key string, q url.Values) string {
	var keys []string
	for k := range q {
		if signedSubresources[k] {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var sb strings.Builder
	sb.WriteString("/" + bucket + "/" + key)
	for i, k := range keys {
		if i == 0 {
			sb.WriteByte('?')
		} else {
			sb.WriteByte('&')
		}
		sb.WriteString(k)
		if v := q.Get(k); v != "" {
			sb.WriteString("=" + v)
		}
	}
	return sb.String()
}

// v1OSSHeaders is the canonicalized x-oss-* headers: lower-case names,
// sorted, "name:value\n" each.
func v1OSSHeaders(h http.Header) string {
	m := map[string]string{}
	for k, v := range h {
		lk := strings.ToLower(k)
		if strings.HasPrefix(lk, "x-oss-") {
			m[lk] = v[0]
		}
	}
	return joinHeaders(m)
}

func joinHeaders(m map[string]string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var sb strings.Builder
	for _, k := range keys {
		sb.WriteString(k + ":" + m[k] + "\n")
	}
	return sb.String()
}

func v1Sign(secret, stringToSign string) string {
	m := hmac.New(sha1.New, []byte(secret))
	m.Write([]byte(stringToSign))
	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

func v1StringToSign(r *http.Request, date, resource string) string {
	return r.Method + "\n" + r.Header.Get("Content-MD5") + "\n" + r.Header.Get("Content-Type") + "\n" +
		date + "\n" + v1OSSHeaders(r.Header) + resource
}

// checkV1Header verifies "Authorization: OSS ak:signature".
func (s *Server) checkV1Header(r *http.Request, bucket, key, auth string) *authError {
	ak, sig, ok := strings.Cut(strings.TrimPrefix(auth, "OSS "), ":")
	if !ok {
		return &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Authorization header is invalid."}
	}
	if ak != s.opts.AccessKeyID {
		return denied("InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
	}
	date := r.Header.Get("Date")
	t, err := http.ParseTime(date)
	if err != nil {
		return denied("AccessDenied", "OSS authentication requires a valid Date.")
	}
	if e := s.checkSkew(t); e != nil {
		return e
	}
	sts := v1StringToSign(r, date, v1Resource(bucket, key, r.URL.Query()))
	if !hmac.Equal([]byte(sig), []byte(v1Sign(s.opts.AccessKeySecret, sts))) {
		return mismatch(sts)
	}
	return nil
}

// checkV1Query verifies ?OSSAccessKeyId=&Expires=&Signature= (a V1 signed URL).
func (s *Server) checkV1Query(r *http.Request, bucket, key string, q url.Values) *authError {
	if q.Get("OSSAccessKeyId") != s.opts.AccessKeyID {
		return denied("InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
	}
	expires := q.Get("Expires")
	exp, err := strconv.ParseInt(expires, 10, 64)
	if err != nil {
		return denied("AccessDenied", "Invalid Expires.")
	}
	sts := v1StringToSign(r, expires, v1Resource(bucket, key, q))
	if !hmac.Equal([]byte(q.Get("Signature")), []byte(v1Sign(s.opts.AccessKeySecret, sts))) {
		return mismatch(sts)
	}
	if s.Now().Unix() > exp {
		return denied("AccessDenied", "Request has expired.")
	}
	return nil
}

func mismatch(sts string) *authError {
	e := denied("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided. Check your key and signing method.")
	e.stringToSign = sts
	return e
}

func (s *Server) checkSkew(t time.Time) *authError {
	if d := s.Now().Sub(t); d > maxSkew || d < -maxSkew {
		return denied("RequestTimeTooSkewed", "The difference between the request time and the current time is too large.")
	}
	return nil
}

// v4Escape escapes the way the SDK does for V4: query-escaping with spaces
// as %20.
func v4Escape(s string) string {
	return strings.ReplaceAll(url.QueryEscape(s), "+", "%20")
}

// v4URI is the canonical URI: /bucket/key, the key escaped but keeping "/".
func v4URI(bucket, key string) string {
	return "/" + bucket + "/" + strings.ReplaceAll(v4Escape(key), "%2F", "/")
}

// v4Query is the canonical query: every parameter but skip, escaped, sorted
// by escaped name, "k" or "k=v", joined by "&".
func v4Query(q url.Values, skip string) string {
	type kv struct{ k, v string }
	var kvs []kv
	for k, vs := range q {
		if k == skip {
			continue
		}
		kvs = append(kvs, kv{url.QueryEscape(k), v4Escape(vs[0])})
	}
	slices.SortFunc(kvs, func(a, b kv) int { return strings.Compare(a.k, b.k) })
	parts := make([]string, len(kvs))
	for i, p := range kvs {
		parts[i] = p.k
		if p.v != "" {
			parts[i] += "=" + p.v
		}
	}
	return strings.Join(parts, "&")
}

// v4Headers is the canonical headers (content-type, content-md5, x-oss-* and
// the additional ones) and the additional-header list.
func v4Headers(h http.Header, additional []string) (string, *authError) {
	m := map[string]string{}
	for k, v := range h {
		lk := strings.ToLower(k)
		if lk == "content-type" || lk == "content-md5" || strings.HasPrefix(lk, "x-oss-") {
			m[lk] = strings.TrimSpace(v[0])
		}
	}
	for _, a := range additional {
		v := h.Values(a)
		if len(v) == 0 {
			return "", &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Additional header " + a + " is missing."}
		}
		m[a] = strings.TrimSpace(v[0])
	}
	return joinHeaders(m), nil
}

func v4Signature(secret, day, region, stringToSign string) string {
	mac := func(key []byte, data string) []byte {
		m := hmac.New(sha256.New, key)
		m.Write([]byte(data))
		return m.Sum(nil)
	}
	k := mac([]byte("aliyun_v4"+secret), day)
	k = mac(k, region)
	k = mac(k, "oss")
	k = mac(k, "aliyun_v4_request")
	return hex.EncodeToString(mac(k, stringToSign))
}

// v4StringToSign hashes the canonical request into the string to sign.
func v4StringToSign(method, uri, query, headers, additional, payload, timestamp, scope string) string {
	canonical := method + "\n" + uri + "\n" + query + "\n" + headers + "\n" + additional + "\n" + payload
	sum := sha256.Sum256([]byte(canonical))
	return algV4 + "\n" + timestamp + "\n" + scope + "\n" + hex.EncodeToString(sum[:])
}

// parseCredential splits "ak/day/region/oss/aliyun_v4_request".
func (s *Server) parseCredential(cred string) (day, region string, e *authError) {
	parts := strings.Split(cred, "/")
	if len(parts) != 5 || parts[3] != "oss" || parts[4] != "aliyun_v4_request" {
		return "", "", &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Invalid credential: " + cred}
	}
	if parts[0] != s.opts.AccessKeyID {
		return "", "", denied("InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.")
	}
	if parts[2] != s.opts.Region {
		return "", "", &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Invalid signing region in credential: " + parts[2]}
	}
	return parts[1], parts[2], nil
}

// checkV4Header verifies "Authorization: OSS4-HMAC-SHA256 Credential=...,
// [AdditionalHeaders=...,] Signature=...". The timestamp is x-oss-date
// (ISO 8601) when sent, else the RFC 1123 Date (what the v1 SDK signs).
func (s *Server) checkV4Header(r *http.Request, bucket, key, auth string) *authError {
	fields := map[string]string{}
	for f := range strings.SplitSeq(strings.TrimPrefix(auth, algV4+" "), ",") {
		k, v, _ := strings.Cut(strings.TrimSpace(f), "=")
		fields[k] = v
	}
	if fields["Credential"] == "" || fields["Signature"] == "" {
		return &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Authorization header is invalid."}
	}
	day, region, e := s.parseCredential(fields["Credential"])
	if e != nil {
		return e
	}
	timestamp := r.Header.Get("x-oss-date")
	var t time.Time
	var err error
	if timestamp != "" {
		t, err = time.Parse(timeFormatV4, timestamp)
	} else {
		timestamp = r.Header.Get("Date")
		t, err = http.ParseTime(timestamp)
	}
	if err != nil {
		return denied("AccessDenied", "OSS V4 authentication requires a valid x-oss-date or Date.")
	}
	if t.UTC().Format(dayFormatV4) != day {
		return denied("SignatureDoesNotMatch", "The date in Credential does not match the request date.")
	}
	if e := s.checkSkew(t); e != nil {
		return e
	}
	var additional []string
	if a := fields["AdditionalHeaders"]; a != "" {
		additional = strings.Split(strings.ToLower(a), ";")
	}
	headers, e := v4Headers(r.Header, additional)
	if e != nil {
		return e
	}
	payload := r.Header.Get("x-oss-content-sha256")
	if payload == "" {
		payload = unsignedV4
	}
	sts := v4StringToSign(r.Method, v4URI(bucket, key), v4Query(r.URL.Query(), ""), headers,
		strings.Join(additional, ";"), payload, timestamp, day+"/"+region+v4RequestTail)
	if !hmac.Equal([]byte(fields["Signature"]), []byte(v4Signature(s.opts.AccessKeySecret, day, region, sts))) {
		return mismatch(sts)
	}
	return nil
}

// checkV4Query verifies a V4 signed URL (x-oss-signature-version,
// x-oss-credential, x-oss-date, x-oss-expires, x-oss-signature).
func (s *Server) checkV4Query(r *http.Request, bucket, key string, q url.Values) *authError {
	if q.Get("x-oss-signature-version") != algV4 {
		return &authError{status: http.StatusBadRequest, code: "InvalidArgument", msg: "Unsupported x-oss-signature-version."}
	}
	day, region, e := s.parseCredential(q.Get("x-oss-credential"))
	if e != nil {
		return e
	}
	timestamp := q.Get("x-oss-date")
	t, err := time.Parse(timeFormatV4, timestamp)
	if err != nil || t.Format(dayFormatV4) != day {
		return denied("AccessDenied", "Invalid x-oss-date.")
	}
	expires, err := strconv.ParseInt(q.Get("x-oss-expires"), 10, 64)
	if err != nil || expires <= 0 || expires > 7*24*3600 {
		return denied("AccessDenied", "Invalid x-oss-expires.")
	}
	var additional []string
	if a := q.Get("x-oss-additional-headers"); a != "" {
		additional = strings.Split(strings.ToLower(a), ";")
	}
	headers, e := v4Headers(r.Header, additional)
	if e != nil {
		return e
	}
	sts := v4StringToSign(r.Method, v4URI(bucket, key), v4Query(q, "x-oss-signature"), headers,
		strings.Join(additional, ";"), unsignedV4, timestamp, day+"/"+region+v4RequestTail)
	if !hmac.Equal([]byte(q.Get("x-oss-signature")), []byte(v4Signature(s.opts.AccessKeySecret, day, region, sts))) {
		return mismatch(sts)
	}
	now := s.Now()
	if now.After(t.Add(time.Duration(expires) * time.Second)) {
		return denied("AccessDenied", "Request has expired.")
	}
	if t.Sub(now) > maxSkew {
		return denied("RequestTimeTooSkewed", "The difference between the request time and the current time is too large.")
	}
	return nil
}
