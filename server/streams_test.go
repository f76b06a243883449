package server

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// idleFeeds makes the fake JobService hand out subscriptions that carry no
// events until cancelled; it returns the number of live ones.
func idleFeeds(b *bundle) *atomic.Int64 {
	var live atomic.Int64
	b.jobs.SubscribeFunc = func(context.Context, string, int64, bool) (<-chan schema.Event, func(), error) {
		live.Add(1)
		ch := make(chan schema.Event)
		var once sync.Once
		return ch, func() { once.Do(func() { live.Add(-1); close(ch) }) }, nil
	}
	return &live
}

// rawStream opens an SSE request on its own connection and reads the
// response head. The connection stays open for a 200; otherwise it is
// closed and the error code returned.
func rawStream(b *bundle, path, key string) (net.Conn, int, string, error) {
	conn, err := net.Dial("tcp", strings.TrimPrefix(b.base, "http://"))
	if err != nil {
		return nil, 0, "", err
	}
	head := "GET " + path + " HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n"
	if key != "" {
		head += "Authorization: Bearer " + key + "\r\n"
	}
	if _, err := io.WriteString(conn, head+"\r\n"); err != nil {
		conn.Close()
		return nil, 0, "", err
	}
	res, err := http.ReadResponse(bufio.NewReaderSize(conn, 512), &http.Request{Method: "GET"})
	if err != nil {
		conn.Close()
		return nil, 0, "", err
	}
	if res.StatusCode == http.StatusOK {
		return conn, res.StatusCode, "", nil
	}
	data, _ := io.ReadAll(res.Body)
	conn.Close()
	return nil, res.StatusCode, resp{status: res.StatusCode, body: data}.errorCode(), nil
}

// memory is the heap in use after a collection and the process's RSS.
func memory(t *testing.T) (heap, rss uint64) {
	t.Helper()
	runtime.GC()
	debug.FreeOSMemory()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	data, err := os.ReadFile("/proc/self/status")
	if err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
				rss = kb << 10
			}
		}
	}
	return ms.HeapInuse, rss
}

// poll waits until cond holds, failing the test after wait.
func poll(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(wait)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %v", what, wait)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// gauge reads comfyfarm_event_streams{kind} from /metrics.
func gauge(t *testing.T, b *bundle, kind string) float64 {
	t.Helper()
	for _, m := range scrape(t, b)["comfyfarm_event_streams"].GetMetric() {
		if label(m, "kind") == kind {
			return m.GetGauge().GetValue()
		}
	}
	t.Fatalf("no comfyfarm_event_streams{kind=%q}", kind)
	return 0
}

// TestStreamFlood: one key opens 5,000 SSE streams on a queued job with the
// default caps. The first 2,000 (limits.max_streams_per_key) are served, the
// rest answered 429 rate_limited; another key is unaffected. Once the
// clients hang up, the open-stream count, the gauge and the subscriptions
// return to 0, and the heap to near its base.
func TestStreamFlood(t *testing.T) {
	// 5,000 tries against the default cap of 2,000; under the race detector
	// (many times slower per stream) the same ratio at a quarter of the size.
	perKey, attempts := defaultMaxStreamsPerKey, 5000
	if raceEnabled {
		perKey, attempts = defaultMaxStreamsPerKey/4, 5000/4
	}
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) {
		c.KeepAlive = 200 * time.Millisecond // notices hung-up clients soon
		c.MaxStreamsPerKey = perKey
	})
	live := idleFeeds(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	other := b.jobs.add("logo", "u2", schema.JobQueued)
	path := "/api/v1/jobs/" + job.ID + "/events"
	baseHeap, baseRSS := memory(t)

	const workers = 8
	var (
		mu      sync.Mutex
		open    []net.Conn
		refused = map[string]int{}
		wg      sync.WaitGroup
		next    atomic.Int64
	)
	t.Cleanup(func() {
		for _, c := range open {
			c.Close()
		}
	})
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(attempts) {
				conn, status, code, err := rawStream(b, path, styleKey)
				mu.Lock()
				switch {
				case err != nil:
					refused[err.Error()]++
				case status == 200:
					open = append(open, conn)
				default:
					refused[fmt.Sprintf("%d %s", status, code)]++
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(open) != perKey || refused["429 rate_limited"] != attempts-perKey || len(refused) != 1 {
		t.Fatalf("%d streams open, refused %v; want %d open and %d × 429 rate_limited",
			len(open), refused, perKey, attempts-perKey)
	}
	if n := b.srv.streams.count(); n != perKey {
		t.Fatalf("open-stream count %d", n)
	}
	// Another key is unaffected: SSE and WebSocket.
	conn, status, code, err := rawStream(b, "/api/v1/jobs/"+other.ID+"/events", logoKey)
	if err != nil || status != 200 {
		t.Fatalf("other key's stream: %v %d %s", err, status, code)
	}
	open = append(open, conn)
	ws, _, err := dialWS(t, b, "/api/v1/jobs/"+other.ID+"/events", http.Header{"Authorization": {"Bearer " + logoKey}})
	if err != nil {
		t.Fatalf("other key's websocket: %v", err)
	}
	// The flooding key's WebSocket is closed with 1008.
	sws, _, err := dialWS(t, b, path, http.Header{"Authorization": {"Bearer " + styleKey}})
	if err != nil {
		t.Fatal(err)
	}
	expectClose(t, sws, websocket.ClosePolicyViolation)
	peakHeap, peakRSS := memory(t)
	if g := gauge(t, b, "sse"); g != float64(perKey+1) {
		t.Errorf("comfyfarm_event_streams{kind=sse} = %v", g)
	}
	if g := gauge(t, b, "websocket"); g != 1 {
		t.Errorf("comfyfarm_event_streams{kind=websocket} = %v", g)
	}

	for _, c := range open {
		c.Close()
	}
	open = nil
	ws.Close()
	poll(t, "open-stream count back to 0", func() bool { return b.srv.streams.count() == 0 })
	poll(t, "subscriptions cancelled", func() bool { return live.Load() == 0 })
	if g := gauge(t, b, "sse") + gauge(t, b, "websocket"); g != 0 {
		t.Errorf("comfyfarm_event_streams after close: %v", g)
	}
	heap, rss := memory(t)
	t.Logf("heap in use: base %.1f MiB, %d streams %.1f MiB, after close %.1f MiB",
		mib(baseHeap), perKey+2, mib(peakHeap), mib(heap))
	t.Logf("RSS: base %.1f MiB, with streams %.1f MiB, after close %.1f MiB", mib(baseRSS), mib(peakRSS), mib(rss))
	if grown := int64(heap) - int64(baseHeap); grown > int64(peakHeap-baseHeap)/4 {
		t.Errorf("heap after close %.1f MiB, base %.1f MiB, with streams %.1f MiB: not back near the base",
			mib(heap), mib(baseHeap), mib(peakHeap))
	}
	// The key may open streams again.
	if _, status, code, err := rawStream(b, path, styleKey); err != nil || status != 200 {
		t.Fatalf("after close: %v %d %s", err, status, code)
	}
}

func mib(n uint64) float64 { return float64(n) / (1 << 20) }

func expectClose(t *testing.T, ws *websocket.Conn, code int) {
	t.Helper()
	_ = ws.SetReadDeadline(time.Now().Add(wait))
	for {
		_, _, err := ws.ReadMessage()
		if err == nil {
			continue
		}
		var ce *websocket.CloseError
		if !errors.As(err, &ce) || ce.Code != code {
			t.Fatalf("websocket: %v, want close %d", err, code)
		}
		return
	}
}

// TestStreamCaps: the per-key cap answers 429 (WebSocket 1008), the total
// cap 503 too_many_streams (WebSocket 1013), token streams count in the
// total, and a closed stream frees its place.
func TestStreamCaps(t *testing.T) {
	b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) {
		c.MaxStreamsPerKey = 2
		c.MaxStreams = 3
		c.KeepAlive = 100 * time.Millisecond
	})
	idleFeeds(b)
	job := b.jobs.add("style", "u1", schema.JobQueued)
	logoJob := b.jobs.add("logo", "u2", schema.JobQueued)
	path := "/api/v1/jobs/" + job.ID + "/events"
	logoPath := "/api/v1/jobs/" + logoJob.ID + "/events"
	open := func(path, key string, want int, wantCode string) net.Conn {
		t.Helper()
		conn, status, code, err := rawStream(b, path, key)
		if err != nil || status != want || code != wantCode {
			t.Fatalf("%s: %v %d %q, want %d %q", path, err, status, code, want, wantCode)
		}
		if conn != nil {
			t.Cleanup(func() { conn.Close() })
		}
		return conn
	}
	first := open(path, styleKey, 200, "")
	open(path, styleKey, 200, "")
	open(path, styleKey, 429, "rate_limited")
	ws, _, err := dialWS(t, b, path, http.Header{"Authorization": {"Bearer " + styleKey}})
	if err != nil {
		t.Fatal(err)
	}
	expectClose(t, ws, websocket.ClosePolicyViolation)
	open(logoPath, logoKey, 200, "")
	// Total reached: another key, and a token, are refused with 503.
	res := b.do(req{method: "GET", path: logoPath, key: logoKey, header: map[string]string{"Accept": "text/event-stream"}})
	expect(t, res, 503, "too_many_streams")
	if res.header.Get("Retry-After") == "" {
		t.Error("503 without Retry-After")
	}
	tokenPath := path + "?token=" + url.QueryEscape(b.srv.tokens.mint(job.ID, "style"))
	open(tokenPath, "", 503, "too_many_streams")
	ws, _, err = dialWS(t, b, logoPath, http.Header{"Authorization": {"Bearer " + logoKey}})
	if err != nil {
		t.Fatal(err)
	}
	expectClose(t, ws, websocket.CloseTryAgainLater)
	// A closed stream frees its place.
	first.Close()
	poll(t, "place freed", func() bool { return b.srv.streams.count() == 2 })
	open(tokenPath, "", 200, "")
	for _, m := range scrape(t, b)["comfyfarm_event_streams_refused_total"].GetMetric() {
		want := map[string]float64{"key": 2, "token": 0, "total": 3}[label(m, "reason")]
		if v := m.GetCounter().GetValue(); v != want {
			t.Errorf("refused{reason=%s} = %v, want %v", label(m, "reason"), v, want)
		}
	}
}

// TestStreamSlowReaderDropped: a client that stops reading is dropped once a
// write to it has waited Config.StreamWriteTimeout, on SSE and on WebSocket;
// its subscription is cancelled and its place freed.
func TestStreamSlowReaderDropped(t *testing.T) {
	for _, kind := range []string{"sse", "websocket"} {
		t.Run(kind, func(t *testing.T) {
			b := setup(t, dbtest.SQLite(t), func(c *Config, _ *Deps) {
				c.StreamWriteTimeout = 300 * time.Millisecond
			})
			events := make(chan schema.Event, 4)
			cancelled := make(chan struct{})
			subscribed := make(chan struct{})
			b.jobs.SubscribeFunc = func(context.Context, string, int64, bool) (<-chan schema.Event, func(), error) {
				close(subscribed)
				var once sync.Once
				return events, func() { once.Do(func() { close(cancelled) }) }, nil
			}
			job := b.jobs.add("style", "u1", schema.JobRunning)
			path := "/api/v1/jobs/" + job.ID + "/events?previews=1"
			if kind == "sse" {
				conn, status, _, err := rawStream(b, path, styleKey)
				if err != nil || status != 200 {
					t.Fatalf("%v %d", err, status)
				}
				defer conn.Close()
				_ = conn.(*net.TCPConn).SetReadBuffer(4096)
			} else {
				ws, _, err := dialWS(t, b, path, http.Header{"Authorization": {"Bearer " + styleKey}})
				if err != nil {
					t.Fatal(err)
				}
				_ = ws.NetConn().(*net.TCPConn).SetReadBuffer(4096)
			}
			select {
			case <-subscribed:
			case <-time.After(wait):
				t.Fatal("no subscription")
			}
			// The client reads nothing more; previews of 256 KiB are sent
			// until the server gives the stream up.
			img := strings.Repeat("A", 256<<10)
			sent := 0
			deadline := time.After(wait)
		loop:
			for seq := int64(1); ; seq++ {
				select {
				case events <- schema.Event{Seq: seq, Type: schema.EventPreview, JobID: job.ID, NodeID: "3", Image: img, Format: "image/png"}:
					sent++
				case <-cancelled:
					break loop
				case <-deadline:
					t.Fatalf("a client that reads nothing still held its stream after %d previews (%d MiB)", sent, sent/4)
				}
			}
			poll(t, "place freed", func() bool { return b.srv.streams.count() == 0 })
			t.Logf("dropped after %d previews of 256 KiB", sent)
		})
	}
}
