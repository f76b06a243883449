package osstest_test

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	alioss "github.com/aliyun/aliyun-oss-go-sdk/oss"

	"github.com/comfyfarm/comfyfarm/oss/osstest"
)

// These tests drive the fake with the real SDK: what it signs must pass, and
// anything with a wrong secret, key id, signature, expiry or clock must not.

var authVersions = []struct {
	name string
	opts func(s *osstest.Server) []alioss.ClientOption
}{
	{"v1", func(*osstest.Server) []alioss.ClientOption { return nil }},
	{"v4", func(s *osstest.Server) []alioss.ClientOption {
		return []alioss.ClientOption{alioss.AuthVersion(alioss.AuthV4), alioss.Region(s.Region())}
	}},
}

func bucket(t *testing.T, s *osstest.Server, ak, secret string, opts ...alioss.ClientOption) *alioss.Bucket {
	t.Helper()
	c, err := alioss.New(s.Endpoint(), ak, secret, opts...)
	if err != nil {
		t.Fatal(err)
	}
	b, err := c.Bucket(s.Bucket())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func serviceCode(t *testing.T, err error) string {
	t.Helper()
	var se alioss.ServiceError
	if !errors.As(err, &se) {
		t.Fatalf("want an OSS service error, got %v", err)
	}
	return se.Code
}

// get fetches a URL and returns the status and, for errors, the OSS code.
func get(t *testing.T, u string) (int, string, []byte) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	var e struct {
		Code string `xml:"Code"`
	}
	if resp.StatusCode >= 300 {
		if err := xml.Unmarshal(body, &e); err != nil {
			t.Fatalf("status %d without an OSS XML error: %q", resp.StatusCode, body)
		}
	}
	return resp.StatusCode, e.Code, body
}

func TestSDKRoundTrip(t *testing.T) {
	for _, av := range authVersions {
		t.Run(av.name, func(t *testing.T) {
			s := osstest.Start(t, osstest.Options{})
			b := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret(), av.opts(s)...)
			key := "dir/sub dir/a+b ü%.png"
			data := []byte("\x89PNG fake image bytes")

			err := b.PutObject(key, bytes.NewReader(data), alioss.ContentType("image/png"), alioss.Meta("seed", "42"))
			if err != nil {
				t.Fatal(err)
			}
			o, ok := s.Object(key)
			if !ok || !bytes.Equal(o.Data, data) || o.ContentType != "image/png" || o.Meta["seed"] != "42" {
				t.Fatalf("stored %+v, %v", o, ok)
			}

			rc, err := b.GetObject(key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(rc)
			rc.Close()
			if err != nil || !bytes.Equal(got, data) {
				t.Fatalf("get: %q, %v", got, err)
			}
			// GetObjectToFile checks the CRC-64 the fake sends.
			if err := b.GetObjectToFile(key, t.TempDir()+"/f"); err != nil {
				t.Fatal(err)
			}

			h, err := b.GetObjectDetailedMeta(key)
			if err != nil || h.Get("Content-Length") != "21" || h.Get("Content-Type") != "image/png" {
				t.Fatalf("head: %v %v", h, err)
			}
			// IsObjectExist sends HEAD ?objectMeta, a signed sub-resource.
			if ok, err := b.IsObjectExist(key); !ok || err != nil {
				t.Fatalf("exists: %v %v", ok, err)
			}
			if ok, err := b.IsObjectExist("nope"); ok || err != nil {
				t.Fatalf("missing exists: %v %v", ok, err)
			}
			// HEAD errors come through x-oss-err.
			_, err = b.GetObjectDetailedMeta("nope")
			if code := serviceCode(t, err); code != "NoSuchKey" {
				t.Fatalf("head missing: %s", code)
			}

			if err := b.DeleteObject(key); err != nil {
				t.Fatal(err)
			}
			if err := b.DeleteObject(key); err != nil {
				t.Fatalf("second delete: %v", err)
			}
			_, err = b.GetObject(key)
			if code := serviceCode(t, err); code != "NoSuchKey" {
				t.Fatalf("get deleted: %s", code)
			}

			c, err := alioss.New(s.Endpoint(), s.AccessKeyID(), s.AccessKeySecret(), av.opts(s)...)
			if err != nil {
				t.Fatal(err)
			}
			info, err := c.GetBucketInfo(s.Bucket())
			if err != nil || info.BucketInfo.Name != s.Bucket() {
				t.Fatalf("bucket info: %+v %v", info, err)
			}
			want := []string{av.name}
			for _, r := range s.Requests() {
				if r.Auth != want[0] {
					t.Fatalf("request %+v not authenticated as %s", r, av.name)
				}
			}
		})
	}
}

func TestSDKRefusals(t *testing.T) {
	for _, av := range authVersions {
		t.Run(av.name, func(t *testing.T) {
			s := osstest.Start(t, osstest.Options{})
			s.PutObject("k.txt", []byte("hello"), "text/plain")

			bad := bucket(t, s, s.AccessKeyID(), "wrong-secret", av.opts(s)...)
			_, err := bad.GetObject("k.txt")
			if code := serviceCode(t, err); code != "SignatureDoesNotMatch" {
				t.Fatalf("bad secret: %s", code)
			}
			err = bad.PutObject("new.txt", strings.NewReader("x"))
			if code := serviceCode(t, err); code != "SignatureDoesNotMatch" {
				t.Fatalf("bad secret put: %s", code)
			}
			if _, ok := s.Object("new.txt"); ok {
				t.Fatal("a refused put was stored")
			}

			unknown := bucket(t, s, "other-ak", s.AccessKeySecret(), av.opts(s)...)
			_, err = unknown.GetObject("k.txt")
			if code := serviceCode(t, err); code != "InvalidAccessKeyId" {
				t.Fatalf("unknown key id: %s", code)
			}

			good := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret(), av.opts(s)...)
			s.SetSkew(20 * time.Minute)
			_, err = good.GetObject("k.txt")
			if code := serviceCode(t, err); code != "RequestTimeTooSkewed" {
				t.Fatalf("skewed: %s", code)
			}
			s.SetSkew(-20 * time.Minute)
			_, err = good.GetObject("k.txt")
			if code := serviceCode(t, err); code != "RequestTimeTooSkewed" {
				t.Fatalf("skewed back: %s", code)
			}
			s.SetSkew(10 * time.Minute) // within tolerance
			if _, err := good.GetObject("k.txt"); err != nil {
				t.Fatalf("10 minutes off: %v", err)
			}
			s.SetSkew(0)

			// A signature over other content is refused: Content-MD5 is signed.
			err = good.PutObject("md5.txt", strings.NewReader("body"), alioss.ContentMD5("XUFAKrxLKna5cZ2REBfFkg=="))
			if code := serviceCode(t, err); code != "InvalidDigest" {
				t.Fatalf("wrong md5: %s", code)
			}

			// Wrong bucket.
			other, err := good.Client.Bucket("no-such-bucket")
			if err != nil {
				t.Fatal(err)
			}
			_, err = other.GetObject("k.txt")
			if code := serviceCode(t, err); code != "NoSuchBucket" {
				t.Fatalf("other bucket: %s", code)
			}
		})
	}
}

func TestSignedURLs(t *testing.T) {
	for _, av := range authVersions {
		t.Run(av.name, func(t *testing.T) {
			s := osstest.Start(t, osstest.Options{})
			key := "a dir/ü+x.png"
			s.PutObject(key, []byte("pixels"), "image/png")
			b := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret(), av.opts(s)...)

			u, err := b.SignURL(key, alioss.HTTPGet, 600)
			if err != nil {
				t.Fatal(err)
			}
			if status, code, body := get(t, u); status != 200 || string(body) != "pixels" {
				t.Fatalf("signed GET: %d %s %q", status, code, body)
			}
			// A signed response-content-type override is honoured.
			u2, err := b.SignURL(key, alioss.HTTPGet, 600, alioss.ResponseContentType("application/x-test"))
			if err != nil {
				t.Fatal(err)
			}
			resp, err := http.Get(u2)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-test" {
				t.Fatalf("override: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
			}

			pu, err := url.Parse(u)
			if err != nil {
				t.Fatal(err)
			}
			sigParam, expParam := "Signature", "Expires"
			if av.name == "v4" {
				sigParam, expParam = "x-oss-signature", "x-oss-expires"
			}
			tamper := func(f func(q url.Values, u *url.URL)) string {
				c := *pu
				q := c.Query()
				f(q, &c)
				c.RawQuery = q.Encode()
				return c.String()
			}
			cases := map[string]string{
				"signature": tamper(func(q url.Values, _ *url.URL) {
					sig := []byte(q.Get(sigParam))
					sig[len(sig)/2] ^= 1
					q.Set(sigParam, string(sig))
				}),
				"expiry":  tamper(func(q url.Values, _ *url.URL) { q.Set(expParam, q.Get(expParam)+"0") }),
				"key":     tamper(func(_ url.Values, u *url.URL) { u.Path += "x"; u.RawPath = "" }),
				"added":   tamper(func(q url.Values, _ *url.URL) { q.Set("response-content-type", "text/html") }),
				"no-sig":  tamper(func(q url.Values, _ *url.URL) { q.Del(sigParam); q.Set("Signature", "") }),
				"wrongak": tamper(func(q url.Values, _ *url.URL) { q.Set("OSSAccessKeyId", "x") }),
			}
			if av.name == "v4" {
				cases["wrongak"] = tamper(func(q url.Values, _ *url.URL) {
					q.Set("x-oss-credential", "x"+q.Get("x-oss-credential"))
				})
			}
			for name, tu := range cases {
				if status, code, _ := get(t, tu); status != 403 && status != 400 {
					t.Errorf("tampered %s: %d %s, want refusal (%s)", name, status, code, tu)
				}
			}

			// Expired: the server's clock is past the expiry.
			s.SetSkew(11 * time.Minute)
			short, err := b.SignURL(key, alioss.HTTPGet, 60)
			if err != nil {
				t.Fatal(err)
			}
			if status, code, _ := get(t, short); status != 403 || code != "AccessDenied" {
				t.Fatalf("expired: %d %s", status, code)
			}
			s.SetSkew(0)
			if status, _, _ := get(t, short); status != 200 {
				t.Fatalf("fresh again: %d", status)
			}

			// Unsigned access is refused unless the bucket is public-read.
			if status, code, _ := get(t, s.PublicBaseURL()+url.PathEscape("x")); status != 403 || code != "AccessDenied" {
				t.Fatalf("anonymous: %d %s", status, code)
			}
		})
	}
}

// TestV4WithOSSDate signs with an x-oss-date header (what newer SDKs send):
// the timestamp then comes from it rather than from Date.
func TestV4WithOSSDate(t *testing.T) {
	s := osstest.Start(t, osstest.Options{})
	b := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret(), alioss.AuthVersion(alioss.AuthV4), alioss.Region(s.Region()))
	now := time.Now().UTC().Format("20060102T150405Z")
	if err := b.PutObject("d.txt", strings.NewReader("d"), alioss.SetHeader("x-oss-date", now)); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-time.Hour).UTC().Format("20060102T150405Z")
	err := b.PutObject("d.txt", strings.NewReader("d"), alioss.SetHeader("x-oss-date", old))
	if code := serviceCode(t, err); code != "RequestTimeTooSkewed" && code != "SignatureDoesNotMatch" {
		t.Fatalf("old x-oss-date: %s", code)
	}
	// A region the server does not serve is refused.
	wrong := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret(), alioss.AuthVersion(alioss.AuthV4), alioss.Region("us-west-1"))
	if _, err := wrong.GetObject("d.txt"); err == nil {
		t.Fatal("wrong region accepted")
	}
}

func TestFaults(t *testing.T) {
	s := osstest.Start(t, osstest.Options{})
	b := bucket(t, s, s.AccessKeyID(), s.AccessKeySecret())
	s.FailNext(2, http.StatusServiceUnavailable)
	for range 2 {
		err := b.PutObject("f.txt", strings.NewReader("f"))
		var se alioss.ServiceError
		if !errors.As(err, &se) || se.StatusCode != 503 || se.Code != "ServiceUnavailable" {
			t.Fatalf("injected: %v", err)
		}
	}
	if err := b.PutObject("f.txt", strings.NewReader("f")); err != nil {
		t.Fatal(err)
	}
	if n := s.RequestCount(http.MethodPut); n != 3 {
		t.Fatalf("puts seen: %d", n)
	}

	s.DropNext(1)
	if err := b.PutObject("g.txt", strings.NewReader("g")); err == nil {
		t.Fatal("dropped connection gave no error")
	}

	s.PutObject("c.bin", []byte("0123456789"), "")
	s.CorruptNextGet(1)
	err := b.GetObjectToFile("c.bin", t.TempDir()+"/c")
	var crc alioss.CRCCheckError
	if !errors.As(err, &crc) {
		t.Fatalf("corrupt body: %v", err)
	}
}
