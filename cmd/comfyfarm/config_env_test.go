package main

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// Every key may come from a file named by <VAR>_FILE (Docker secrets).
func TestConfigEnvFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	env := []string{
		"COMFYFARM_ADMIN_KEY_FILE=" + write("admin", "admin-key-from-a-file-0123\n"),
		"COMFYFARM_DATABASE_DRIVER=mysql",
		"COMFYFARM_DATABASE_DSN_FILE=" + write("dsn", "comfyfarm:s3cret@tcp(db:3306)/\r\n"),
		"COMFYFARM_OSS_ACCESS_KEY_SECRET_FILE=" + write("oss", "oss-secret"),
		"COMFYFARM_FRONTENDS_STYLE_API_KEYS_FILE=" + write("keys", "style-one-1234,style-two-1234\n"),
		"COMFYFARM_METRICS_KEY_FILE=" + write("metrics", "metrics-key-0123456789\n"),
	}
	cfg, warnings, err := LoadConfig("", env)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Errorf("warnings %q", warnings)
	}
	for _, c := range []struct{ name, got, want string }{
		{"admin_key", cfg.AdminKey, "admin-key-from-a-file-0123"},
		{"database.dsn", cfg.Database.DSN, "comfyfarm:s3cret@tcp(db:3306)/"},
		{"storage.oss.access_key_secret", cfg.Storage.OSS.AccessKeySecret, "oss-secret"},
		{"metrics_key", cfg.MetricsKey, "metrics-key-0123456789"},
		{"frontends.style.api_keys", strings.Join(cfg.Frontends["style"].APIKeys, "|"), "style-one-1234|style-two-1234"},
	} {
		if c.got != c.want {
			t.Errorf("%s = %q, want %q", c.name, c.got, c.want)
		}
	}

	for _, tc := range []struct {
		env  []string
		want string
	}{
		{[]string{"COMFYFARM_ADMIN_KEY=x-0123456789abcdef", "COMFYFARM_ADMIN_KEY_FILE=" + write("a2", "y")}, "both COMFYFARM_ADMIN_KEY and COMFYFARM_ADMIN_KEY_FILE are set"},
		{[]string{"COMFYFARM_ADMIN_KEY_FILE=" + filepath.Join(dir, "missing")}, "COMFYFARM_ADMIN_KEY_FILE: open"},
		{[]string{"COMFYFARM_SCHEDULER_PROBE_INTERVAL_FILE=" + write("pi", "soon")}, `scheduler.probe_interval): invalid value "soon"`},
	} {
		if _, _, err := LoadConfig("", tc.env); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: err %v, want %q", tc.env, err, tc.want)
		}
	}
}

func TestConfigEnvNodes(t *testing.T) {
	cfg, warnings, err := LoadConfig("", []string{"COMFYFARM_NODES=gpu-a=http://10.0.0.5:8188, gpu-b=http://10.0.0.6:8188"})
	if err != nil || len(warnings) != 0 {
		t.Fatalf("%v %q", err, warnings)
	}
	if len(cfg.Nodes) != 2 || cfg.Nodes[0].Name != "gpu-a" || cfg.Nodes[1].URL != "http://10.0.0.6:8188" || cfg.Nodes[1].MaxInflight != 1 {
		t.Fatalf("nodes %+v", cfg.Nodes)
	}
	// Empty is unset: the file's (or the defaults') nodes stay.
	if cfg, _, err := LoadConfig("", []string{"COMFYFARM_NODES= "}); err != nil || len(cfg.Nodes) != 1 || cfg.Nodes[0].Name != "gpu-1" {
		t.Fatalf("empty: %v %+v", err, cfg)
	}
	for _, bad := range []string{"gpu-a", "=http://x:1", "gpu a=http://10.0.0.5:8188", "gpu-a=ftp://x"} {
		if _, _, err := LoadConfig("", []string{"COMFYFARM_NODES=" + bad}); err == nil || !strings.Contains(err.Error(), "nodes") {
			t.Errorf("%q: err %v", bad, err)
		}
	}
}

func TestPublicURLFollowsListen(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		want string
	}{
		{nil, "http://localhost:8080"},
		{[]string{"COMFYFARM_LISTEN=:9090"}, "http://localhost:9090"},
		{[]string{"COMFYFARM_LISTEN=0.0.0.0:9091"}, "http://localhost:9091"},
		{[]string{"COMFYFARM_LISTEN=[::1]:9092"}, "http://localhost:9092"},
		{[]string{"COMFYFARM_LISTEN=farm.example:9093"}, "http://farm.example:9093"},
		{[]string{"COMFYFARM_LISTEN=:9090", "COMFYFARM_PUBLIC_URL=https://farm.example"}, "https://farm.example"},
	} {
		cfg, _, err := LoadConfig("", tc.env)
		if err != nil {
			t.Fatal(err)
		}
		if cfg.PublicURL != tc.want {
			t.Errorf("%q: public_url %q, want %q", tc.env, cfg.PublicURL, tc.want)
		}
	}
	cfg, _, _ := LoadConfig("", nil)
	if err := cfg.setListen("127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	cfg.listening(&net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 40123})
	if cfg.PublicURL != "http://localhost:40123" {
		t.Errorf("after listening: %q", cfg.PublicURL)
	}
	if err := cfg.setListen("nonsense"); err == nil {
		t.Error("--listen nonsense accepted")
	}
}

// serve --listen overrides listen, and the links it gives follow it.
func TestServeListenFlag(t *testing.T) {
	t.Chdir(t.TempDir())
	e, _, errb := testEnv("COMFYFARM_LOG_LEVEL=warn", "COMFYFARM_LISTEN=127.0.0.1:1")
	addrc := make(chan net.Addr, 1)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e.ready = func(a net.Addr) { addrc <- a; cancel() }
	if err := run(ctx, e, []string{"serve", "--listen", "127.0.0.1:0"}); err != nil {
		t.Fatalf("%v\n%s", err, errb.String())
	}
	a := <-addrc
	if _, port, _ := net.SplitHostPort(a.String()); port == "0" || port == "1" {
		t.Fatalf("listened on %s", a)
	}
}
