package server

import (
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
)

func TestClientIP(t *testing.T) {
	ps, err := parseProxies([]string{"10.0.0.0/8", "192.168.1.7", "::1"})
	if err != nil {
		t.Fatal(err)
	}
	addr := netip.MustParseAddr
	for _, tc := range []struct {
		name   string
		remote string
		xff    []string
		want   string
	}{
		{"direct client", "203.0.113.9", []string{"1.2.3.4"}, "203.0.113.9"}, // not from a proxy: the header is ignored
		{"one proxy", "10.0.0.5", []string{"198.51.100.7"}, "198.51.100.7"},
		{"spoofed left entry", "10.0.0.5", []string{"6.6.6.6, 198.51.100.7"}, "198.51.100.7"},
		{"two proxies", "10.0.0.5", []string{"198.51.100.7, 192.168.1.7"}, "198.51.100.7"},
		{"several headers", "10.0.0.5", []string{"6.6.6.6", "198.51.100.7, 10.1.2.3"}, "198.51.100.7"},
		{"only proxies", "10.0.0.5", []string{"10.9.9.9"}, "10.9.9.9"},
		{"no header", "10.0.0.5", nil, "10.0.0.5"},
		{"malformed hop", "10.0.0.5", []string{"198.51.100.7, junk"}, "10.0.0.5"},
		{"ipv6 loopback proxy", "::1", []string{"2001:db8::1"}, "2001:db8::1"},
		{"mapped ipv4", "::ffff:10.0.0.5", []string{"198.51.100.7"}, "198.51.100.7"},
	} {
		if got := ps.clientIP(addr(tc.remote), tc.xff); got.String() != tc.want {
			t.Errorf("%s: %s, want %s", tc.name, got, tc.want)
		}
	}
	var none proxySet
	if got := none.clientIP(addr("10.0.0.5"), []string{"1.2.3.4"}); got.String() != "10.0.0.5" {
		t.Errorf("no trusted proxies: %s", got)
	}
	if _, err := parseProxies([]string{"10.0.0.0/33"}); err == nil {
		t.Error("bad network accepted")
	}
	if _, err := parseProxies([]string{"proxy.local"}); err == nil {
		t.Error("host name accepted")
	}
}

// The access log names the client behind a trusted proxy, and ignores the
// header from anyone else.
func TestAccessLogClientIP(t *testing.T) {
	for _, tc := range []struct {
		proxies []string
		want    string
	}{
		{[]string{"127.0.0.1"}, "ip=198.51.100.7"},
		{nil, "ip=127.0.0.1"},
	} {
		var logs syncWriter
		b := setup(t, dbtest.SQLite(t), func(c *Config, d *Deps) {
			c.TrustedProxies = tc.proxies
			d.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
		})
		r := b.do(req{method: "GET", path: "/healthz", header: map[string]string{"X-Forwarded-For": "6.6.6.6, 198.51.100.7"}})
		expect(t, r, 200)
		got := logs.String()
		if !strings.Contains(got, tc.want) || strings.Contains(got, "6.6.6.6") {
			t.Fatalf("proxies %q: log %q, want %s", tc.proxies, got, tc.want)
		}
	}
}

// syncWriter is a log sink safe to read while the server writes.
type syncWriter struct {
	mu sync.Mutex
	b  strings.Builder
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func (w *syncWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.String()
}
