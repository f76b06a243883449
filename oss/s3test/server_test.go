package s3test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/smithy-go"
)

// tamper changes a request after the SDK signed it.
type tamper struct {
	base http.RoundTripper
	edit func(*http.Request)
}

func (t tamper) RoundTrip(r *http.Request) (*http.Response, error) {
	if t.edit != nil {
		t.edit(r)
	}
	return t.base.RoundTrip(r)
}

func client(s *Server, secret string, edit func(*http.Request)) *s3.Client {
	return s3.New(s3.Options{
		Region: s.Region(), BaseEndpoint: aws.String(s.Endpoint()), UsePathStyle: true,
		Credentials:                credentials.NewStaticCredentialsProvider(s.AccessKeyID(), secret, ""),
		HTTPClient:                 &http.Client{Transport: tamper{base: http.DefaultTransport, edit: edit}},
		RetryMaxAttempts:           1,
		RequestChecksumCalculation: aws.RequestChecksumCalculationWhenRequired,
	})
}

func put(c *s3.Client, s *Server, key string, body []byte) error {
	_, err := c.PutObject(context.Background(), &s3.PutObjectInput{
		Bucket: aws.String(s.Bucket()), Key: aws.String(key), Body: bytes.NewReader(body),
	})
	return err
}

func code(err error) string {
	var ae smithy.APIError
	if errors.As(err, &ae) {
		return ae.ErrorCode()
	}
	return ""
}

// TestSignatureChecks: what the front refuses, and that a correct request
// passes.
func TestSignatureChecks(t *testing.T) {
	s := Start(t, Options{})
	body := []byte("the body")
	for _, tc := range []struct {
		name   string
		secret string
		edit   func(*http.Request)
		skew   time.Duration
		want   string // error code, "" for success
	}{
		{name: "good", secret: s.SecretAccessKey()},
		{name: "wrong secret", secret: "nope", want: "SignatureDoesNotMatch"},
		{name: "path changed", secret: s.SecretAccessKey(), want: "SignatureDoesNotMatch",
			edit: func(r *http.Request) { r.URL.Path += "2"; r.URL.RawPath = "" }},
		{name: "signed header changed", secret: s.SecretAccessKey(), want: "SignatureDoesNotMatch",
			edit: func(r *http.Request) { r.Header.Set("Content-Type", "text/evil") }},
		{name: "body changed", secret: s.SecretAccessKey(), want: "XAmzContentSHA256Mismatch",
			edit: func(r *http.Request) { r.Body = io.NopCloser(strings.NewReader("the BODY")) }},
		{name: "unsigned", secret: s.SecretAccessKey(), want: "AccessDenied",
			edit: func(r *http.Request) { r.Header.Del("Authorization") }},
		{name: "clock skew", secret: s.SecretAccessKey(), skew: 20 * time.Minute, want: "RequestTimeTooSkewed"},
	} {
		s.SetSkew(tc.skew)
		err := put(client(s, tc.secret, tc.edit), s, "k/"+strings.ReplaceAll(tc.name, " ", "-"), body)
		if got := code(err); got != tc.want {
			t.Errorf("%s: %v (code %q), want %q", tc.name, err, got, tc.want)
		}
		_, stored := s.Object("k/" + strings.ReplaceAll(tc.name, " ", "-"))
		if stored != (tc.want == "") {
			t.Errorf("%s: stored %v", tc.name, stored)
		}
	}
	s.SetSkew(0)
	if _, err := http.Get(s.Endpoint() + "/" + s.Bucket() + "/k/good"); err != nil {
		t.Fatal(err)
	}
	if r := s.Requests(); r[len(r)-1].Status != http.StatusForbidden || r[len(r)-1].Auth != "anonymous" {
		t.Fatalf("anonymous read of a private bucket: %+v", r[len(r)-1])
	}
}

// TestPresignedChecks: a presigned GET reads the object until it expires,
// and only that object.
func TestPresignedChecks(t *testing.T) {
	s := Start(t, Options{})
	c := client(s, s.SecretAccessKey(), nil)
	for _, k := range []string{"a b/ü.png", "other.png"} {
		if err := put(c, s, k, []byte(k)); err != nil {
			t.Fatal(err)
		}
	}
	req, err := s3.NewPresignClient(c).PresignGetObject(context.Background(),
		&s3.GetObjectInput{Bucket: aws.String(s.Bucket()), Key: aws.String("a b/ü.png")}, s3.WithPresignExpires(time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	get := func(u string) (int, string) {
		t.Helper()
		resp, err := http.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if status, b := get(req.URL); status != 200 || b != "a b/ü.png" {
		t.Fatalf("presigned: %d %q", status, b)
	}
	if status, _ := get(strings.Replace(req.URL, "a%20b/%C3%BC.png", "other.png", 1)); status != http.StatusForbidden {
		t.Fatalf("another key: %d", status)
	}
	if status, _ := get(strings.Replace(req.URL, "X-Amz-Expires=60", "X-Amz-Expires=600", 1)); status != http.StatusForbidden {
		t.Fatalf("longer expiry: %d", status)
	}
	s.SetSkew(61 * time.Second)
	if status, b := get(req.URL); status != http.StatusForbidden || !strings.Contains(b, "Request has expired") {
		t.Fatalf("expired: %d %s", status, b)
	}
}
