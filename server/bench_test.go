package server

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"testing"

	"github.com/gofiber/fiber/v2"
	"github.com/valyala/fasthttp"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// BenchmarkKeyLookup: authenticating one request against 1 admin and 200
// frontend keys (every key is compared, in constant time).
func BenchmarkKeyLookup(b *testing.B) {
	keys := map[string][]string{}
	for i := range 200 {
		keys[fmt.Sprintf("fe%d", i)] = []string{fmt.Sprintf("frontend-key-%04d", i)}
	}
	k, err := newKeyring("admin-key-0123456789", keys)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, ok := k.lookup("frontend-key-0199"); !ok {
			b.Fatal("not found")
		}
	}
}

// BenchmarkJobGetHTTP: the server's overhead for one authenticated GET
// /jobs/{id} over loopback HTTP (keep-alive), with an in-memory JobService.
func BenchmarkJobGetHTTP(b *testing.B) {
	bb := setup(b, dbtest.SQLite(b))
	j := bb.jobs.add("style", "u1", schema.JobRunning)
	req, _ := http.NewRequest("GET", bb.base+"/api/v1/jobs/"+j.ID, nil)
	req.Header.Set("Authorization", "Bearer "+styleKey)
	b.ReportAllocs()
	for b.Loop() {
		res, err := httpClient.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, res.Body)
		res.Body.Close()
		if res.StatusCode != 200 {
			b.Fatalf("status %d", res.StatusCode)
		}
	}
}

// BenchmarkSSEEvents: events relayed per second through one SSE stream
// (encode, write, flush, parse on the client).
func BenchmarkSSEEvents(b *testing.B) {
	bb := setup(b, dbtest.SQLite(b))
	j := bb.jobs.add("style", "u1", schema.JobRunning)
	ch := make(chan schema.Event, 1024)
	bb.jobs.SubscribeFunc = func(context.Context, string, int64, bool) (<-chan schema.Event, func(), error) {
		return ch, func() {}, nil
	}
	req, _ := http.NewRequest("GET", bb.base+"/api/v1/jobs/"+j.ID+"/events", nil)
	req.Header.Set("Authorization", "Bearer "+styleKey)
	req.Header.Set("Accept", "text/event-stream")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		b.Fatal(err)
	}
	defer res.Body.Close()
	r := bufio.NewReader(res.Body)
	go func() {
		for i := 1; i <= b.N; i++ {
			v := float64(i % 100)
			ch <- schema.Event{Seq: int64(i), Type: schema.EventProgress, JobID: j.ID, NodeID: "3", Value: &v, Max: fptr(100), Percent: &v}
		}
		ch <- schema.Event{Seq: int64(b.N + 1), Type: schema.EventSucceeded, JobID: j.ID}
		close(ch)
	}()
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for {
		m, err := readSSE(r)
		if err != nil {
			b.Fatal(err)
		}
		if m.event == "succeeded" {
			break
		}
		if m.event == "progress" {
			n++
		}
	}
	if n != b.N {
		b.Fatalf("%d events, want %d", n, b.N)
	}
}

// BenchmarkHandlerJobGet: the server's own cost for one authenticated GET
// /jobs/{id}, run in-process on a fasthttp.RequestCtx (no network), with
// Fiber's Immutable mode on (as served) and off (for comparison).
func BenchmarkHandlerJobGet(b *testing.B) {
	for _, mode := range []struct {
		name    string
		mutable bool
	}{{"immutable", false}, {"mutable", true}} {
		b.Run(mode.name, func(b *testing.B) {
			bb := setup(b, dbtest.SQLite(b), func(c *Config, d *Deps) {
				c.mutableCtx = mode.mutable
				d.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
			})
			j := bb.jobs.add("style", "u1", schema.JobRunning)
			h := bb.srv.App().Handler()
			var ctx fasthttp.RequestCtx
			ctx.Init(&fasthttp.Request{}, &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 5000}, nil)
			uri := "/api/v1/jobs/" + j.ID + "?frontend=style"
			b.ReportAllocs()
			for b.Loop() {
				ctx.Request.Reset()
				ctx.Response.Reset()
				ctx.Request.Header.SetMethod(fiber.MethodGet)
				ctx.Request.SetRequestURI(uri)
				ctx.Request.Header.Set(fiber.HeaderAuthorization, "Bearer "+styleKey)
				ctx.Request.Header.Set(fiber.HeaderXRequestID, "bench-request-0001")
				h(&ctx)
				if ctx.Response.StatusCode() != 200 {
					b.Fatalf("status %d: %s", ctx.Response.StatusCode(), ctx.Response.Body())
				}
			}
		})
	}
}
