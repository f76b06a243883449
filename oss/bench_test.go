package oss

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/oss/osstest"
	"github.com/comfyfarm/comfyfarm/oss/s3test"
)

const benchSize = 1 << 20

// BenchmarkLocalPut writes 1 MiB objects (temp file, fsync, rename, sidecar,
// directory fsync).
func BenchmarkLocalPut(b *testing.B) {
	l, err := NewLocal(LocalConfig{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	data := randomBytes(benchSize, 1)
	ctx := context.Background()
	b.SetBytes(benchSize)
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := l.Put(ctx, fmt.Sprintf("bench/%d/%d.png", i%64, i), bytes.NewReader(data), benchSize, "image/png"); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkLocalGet reads a 1 MiB object back.
func BenchmarkLocalGet(b *testing.B) {
	l, err := NewLocal(LocalConfig{Dir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	ctx := context.Background()
	data := randomBytes(benchSize, 2)
	if err := l.Put(ctx, "bench/get.png", bytes.NewReader(data), benchSize, "image/png"); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	b.SetBytes(benchSize)
	b.ReportAllocs()
	for b.Loop() {
		rc, _, err := l.Get(ctx, "bench/get.png")
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.CopyBuffer(io.Discard, rc, buf)
		rc.Close()
		if err != nil || n != benchSize {
			b.Fatal(n, err)
		}
	}
}

// BenchmarkAliyunPut uploads 1 MiB through the SDK to the fake on loopback:
// the client-side cost (signing, CRC-64, HTTP) plus the fake's.
func BenchmarkAliyunPut(b *testing.B) {
	s := osstest.New(osstest.Options{})
	defer s.Close()
	a, err := NewAliyun(AliyunConfig{
		Endpoint: s.Endpoint(), Bucket: s.Bucket(), AccessKeyID: s.AccessKeyID(), AccessKeySecret: s.AccessKeySecret(),
		SignURLs: true, AuthVersion: "v4", Region: s.Region(), RetryBase: time.Millisecond,
	})
	if err != nil {
		b.Fatal(err)
	}
	data := randomBytes(benchSize, 3)
	ctx := context.Background()
	b.SetBytes(benchSize)
	b.ReportAllocs()
	for b.Loop() {
		if err := a.Put(ctx, "bench/put.png", bytes.NewReader(data), benchSize, "image/png"); err != nil {
			b.Fatal(err)
		}
	}
}

// benchS3 is an S3 store on the in-process server (gofakes3 behind the SigV4
// checks), path style.
func benchS3(b *testing.B) *S3 {
	srv := s3test.Start(b, s3test.Options{})
	s, err := NewS3(S3Config{
		Endpoint: srv.Endpoint(), Bucket: srv.Bucket(), AccessKeyID: srv.AccessKeyID(), SecretAccessKey: srv.SecretAccessKey(),
		PathStyle: true, SignURLs: true, RetryBase: time.Millisecond,
	})
	if err != nil {
		b.Fatal(err)
	}
	return s
}

const s3BenchSize = 4 << 20

// BenchmarkS3Put uploads 4 MiB through the AWS SDK on loopback: the client's
// cost (SHA-256 of the payload over plain HTTP, SigV4, HTTP) plus the
// server's (its own SHA-256 check, gofakes3's MD5 and in-memory copy).
func BenchmarkS3Put(b *testing.B) {
	s := benchS3(b)
	data := randomBytes(s3BenchSize, 5)
	ctx := context.Background()
	b.SetBytes(s3BenchSize)
	b.ReportAllocs()
	for b.Loop() {
		if err := s.Put(ctx, "bench/put.png", bytes.NewReader(data), s3BenchSize, "image/png"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkS3Get reads a 4 MiB object back through the SDK.
func BenchmarkS3Get(b *testing.B) {
	s := benchS3(b)
	ctx := context.Background()
	data := randomBytes(s3BenchSize, 6)
	if err := s.Put(ctx, "bench/get.png", bytes.NewReader(data), s3BenchSize, "image/png"); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	b.SetBytes(s3BenchSize)
	b.ReportAllocs()
	for b.Loop() {
		rc, _, err := s.Get(ctx, "bench/get.png")
		if err != nil {
			b.Fatal(err)
		}
		n, err := io.CopyBuffer(io.Discard, rc, buf)
		rc.Close()
		if err != nil || n != s3BenchSize {
			b.Fatal(n, err)
		}
	}
}
