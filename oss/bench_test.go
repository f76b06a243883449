package oss

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/comfyfarm/comfyfarm/oss/osstest"
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
