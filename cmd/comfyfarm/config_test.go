package main

import (
	"context"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, text string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "comfyfarm.yaml")
	if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigDefaults(t *testing.T) {
	cfg, warnings, err := LoadConfig("", nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) != 0 {
		t.Fatalf("warnings: %v", warnings)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"listen", cfg.Listen, ":8080"},
		{"public_url", cfg.PublicURL, "http://localhost:8080"},
		{"admin_key", cfg.AdminKey, ""},
		{"database.driver", cfg.Database.Driver, "sqlite"},
		{"database.path", cfg.Database.Path, "./data"},
		{"storage.kind", cfg.Storage.Kind, "local"},
		{"storage.local.dir", cfg.Storage.Local.Dir, "./data/files"},
		{"storage.oss.sign_urls", cfg.Storage.OSS.SignURLs, true},
		{"storage.oss.url_ttl", cfg.Storage.OSS.URLTTL, time.Hour},
		{"nodes", len(cfg.Nodes), 1},
		{"nodes[0].url", cfg.Nodes[0].URL, "http://127.0.0.1:8188"},
		{"frontends.style.api_keys", cfg.Frontends["style"].APIKeys, []string{"style-key"}},
		{"frontends.style.credits", cfg.Frontends["style"].Credits, CreditsConfig{Initial: 3, CostPerJob: 1}},
		{"frontends.logo.controller", cfg.Frontends["logo"].Controller, "logo"},
		{"scheduler.probe_interval", cfg.Scheduler.ProbeInterval, 5 * time.Second},
		{"scheduler.max_attempts", cfg.Scheduler.MaxAttempts, 3},
		{"scheduler.node_failure_limit", cfg.Scheduler.NodeFailureLimit, 3},
		{"scheduler.stall_timeout", cfg.Scheduler.StallTimeout, 120 * time.Second},
		{"scheduler.job_timeout", cfg.Scheduler.JobTimeout, 30 * time.Minute},
		{"limits", cfg.Limits, LimitsConfig{MaxBodyMB: 32, MaxUploadMB: 20, MaxImagePixels: 50_000_000, MaxGraphNodes: 1000,
			RatePerMinute: 600, SubmitPerMinute: 120, MaxStreamsPerKey: 2000, MaxStreams: 20000}},
		{"probe.timeout", cfg.Probe.Timeout, 3 * time.Second},
		{"probe.catalogue_interval", cfg.Probe.CatalogueInterval, 5 * time.Minute},
		{"events.keepalive", cfg.Events.KeepAlive, 15 * time.Second},
		{"events.token_ttl", cfg.Events.TokenTTL, time.Hour},
		{"log", cfg.Log, LogConfig{Level: "info", Format: "text"}},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestConfigFile(t *testing.T) {
	p := writeConfig(t, `
listen: "127.0.0.1:9000"
scheduler: {probe_interval: 2s}
frontends:
  shop:
    api_keys: ["shop-key-123"]
nodes:
  - {name: a, url: "http://10.0.0.1:8188"}
  - {name: b, url: "http://10.0.0.2:8188", max_inflight: 2, tags: [sdxl]}
`)
	cfg, _, err := LoadConfig(p, nil)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Listen != "127.0.0.1:9000" || cfg.Scheduler.ProbeInterval != 2*time.Second || cfg.Scheduler.MaxAttempts != 3 {
		t.Fatalf("merge: %+v", cfg)
	}
	// A file's frontends and nodes replace the defaults entirely.
	if len(cfg.Frontends) != 1 || cfg.Frontends["shop"].Weight != 1 || cfg.Frontends["shop"].Controller != "" {
		t.Fatalf("frontends: %+v", cfg.Frontends)
	}
	if len(cfg.Nodes) != 2 || cfg.Nodes[0].MaxInflight != 1 || cfg.Nodes[1].MaxInflight != 2 {
		t.Fatalf("nodes: %+v", cfg.Nodes)
	}
	// An empty file is the defaults.
	cfg, _, err = LoadConfig(writeConfig(t, "# nothing\n"), nil)
	if err != nil || cfg.Listen != ":8080" {
		t.Fatalf("empty file: %v %v", cfg, err)
	}
}

func TestConfigEnv(t *testing.T) {
	env := []string{
		"COMFYFARM_ADMIN_KEY=an-admin-key-0123456789",
		"COMFYFARM_DATABASE_DSN=root@tcp(db:3306)/",
		"COMFYFARM_DATABASE_DRIVER=mysql",
		"COMFYFARM_LISTEN=127.0.0.1:0",
		"COMFYFARM_STORAGE_KIND=oss",
		"COMFYFARM_OSS_ENDPOINT=http://127.0.0.1:9000",
		"COMFYFARM_OSS_BUCKET=alias-bucket",
		"COMFYFARM_STORAGE_OSS_BUCKET=canonical-bucket",
		"COMFYFARM_OSS_ACCESS_KEY_ID=id",
		"COMFYFARM_OSS_ACCESS_KEY_SECRET=secret",
		"COMFYFARM_SCHEDULER_PROBE_INTERVAL=750ms",
		"COMFYFARM_SCHEDULER_INSTANCE_ID=farm-b.2",
		"COMFYFARM_LIMITS_MAX_BODY_MB=64",
		"COMFYFARM_LIMITS_RATE_PER_MINUTE=0",
		"COMFYFARM_LIMITS_SUBMIT_PER_MINUTE=30",
		"COMFYFARM_STORAGE_LOCAL_SIGN_URLS=false",
		"COMFYFARM_PROBE_ALLOW=10.0.0.0/8, 192.168.1.0/24",
		"COMFYFARM_FRONTENDS_STYLE_API_KEYS=k-one-1234,k-two-1234",
		"COMFYFARM_FRONTENDS_STYLE_CREDITS_INITIAL=9",
		"COMFYFARM_TEST_MYSQL_DSN=ignored",
		"COMFYFARM_LISTN=typo",
		"PATH=/bin",
	}
	cfg, warnings, err := LoadConfig("", env)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"admin_key", cfg.AdminKey, "an-admin-key-0123456789"},
		{"database.dsn", cfg.Database.DSN, "root@tcp(db:3306)/"},
		{"database.driver", cfg.Database.Driver, "mysql"},
		{"listen", cfg.Listen, "127.0.0.1:0"},
		{"storage.oss.endpoint", cfg.Storage.OSS.Endpoint, "http://127.0.0.1:9000"},
		{"storage.oss.bucket", cfg.Storage.OSS.Bucket, "canonical-bucket"},
		{"storage.oss.access_key_secret", cfg.Storage.OSS.AccessKeySecret, "secret"},
		{"scheduler.probe_interval", cfg.Scheduler.ProbeInterval, 750 * time.Millisecond},
		{"scheduler.instance_id", cfg.Scheduler.InstanceID, "farm-b.2"},
		{"limits.max_body_mb", cfg.Limits.MaxBodyMB, 64},
		{"limits.rate_per_minute", cfg.Limits.RatePerMinute, 0},
		{"limits.submit_per_minute", cfg.Limits.SubmitPerMinute, 30},
		{"storage.local.sign_urls", cfg.Storage.Local.SignURLs, false},
		{"probe.allow", cfg.Probe.Allow, []string{"10.0.0.0/8", "192.168.1.0/24"}},
		{"frontends.style.api_keys", cfg.Frontends["style"].APIKeys, []string{"k-one-1234", "k-two-1234"}},
		{"frontends.style.credits.initial", cfg.Frontends["style"].Credits.Initial, int64(9)},
		{"frontends.style.controller", cfg.Frontends["style"].Controller, "style"},
		{"frontends.logo.api_keys", cfg.Frontends["logo"].APIKeys, []string{"logo-key"}},
	}
	for _, c := range checks {
		if !reflect.DeepEqual(c.got, c.want) {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	if len(warnings) != 1 || !strings.Contains(warnings[0], "COMFYFARM_LISTN") {
		t.Fatalf("warnings: %v", warnings)
	}
	// The file is overridden by the environment.
	cfg, _, err = LoadConfig(writeConfig(t, "listen: \":7000\"\n"), []string{"COMFYFARM_LISTEN=:7001"})
	if err != nil || cfg.Listen != ":7001" {
		t.Fatalf("env over file: %v %v", cfg.Listen, err)
	}
}

func TestConfigRefused(t *testing.T) {
	cases := []struct {
		name, file string
		env        []string
		want       []string // all must appear in the error
	}{
		{"unknown top-level key", "listne: \":1\"\n", nil, []string{"listne", "unknown key"}},
		{"unknown nested key", "scheduler:\n  probe_intervall: 5s\n", nil, []string{"scheduler.probe_intervall", "unknown key", "line 2"}},
		{"unknown key in a frontend", "frontends:\n  style: {api_keys: [abcdefgh], colour: red}\n", nil, []string{"frontends.style.colour", "unknown key"}},
		{"invalid duration", "scheduler:\n  stall_timeout: soon\n", nil, []string{"scheduler.stall_timeout", "soon", "duration"}},
		{"invalid int", "limits: {max_body_mb: lots}\n", nil, []string{"limits.max_body_mb", "integer"}},
		{"negative duration", "events: {keepalive: -1s}\n", nil, []string{"events.keepalive", "positive"}},
		{"bad driver", "database: {driver: postgres}\n", nil, []string{"database.driver", "postgres"}},
		{"mysql without dsn", "database: {driver: mysql}\n", nil, []string{"database.dsn", "required"}},
		{"oss without bucket", "storage: {kind: oss, oss: {endpoint: x, access_key_id: a, access_key_secret: b}}\n", nil, []string{"storage.oss.bucket", "required"}},
		{"v4 without region", "storage: {kind: oss, oss: {endpoint: x, bucket: b, access_key_id: a, access_key_secret: b, auth_version: v4}}\n", nil, []string{"storage.oss.region"}},
		{"bad log level", "log: {level: loud}\n", nil, []string{"log.level", "loud"}},
		{"bad listen", "listen: \"8080\"\n", nil, []string{"listen"}},
		{"negative rate limit", "limits: {rate_per_minute: -1}\n", nil, []string{"limits.rate_per_minute", "negative"}},
		{"negative submit limit", "limits: {submit_per_minute: -5}\n", nil, []string{"limits.submit_per_minute", "negative"}},
		{"env negative submit limit", "", []string{"COMFYFARM_LIMITS_SUBMIT_PER_MINUTE=-1"}, []string{"limits.submit_per_minute", "negative"}},
		{"no streams", "limits: {max_streams: 0}\n", nil, []string{"limits.max_streams", "positive"}},
		{"key streams above the total", "limits: {max_streams: 10, max_streams_per_key: 11}\n", nil, []string{"limits.max_streams_per_key", "1 to limits.max_streams (10)"}},
		{"env key streams", "", []string{"COMFYFARM_LIMITS_MAX_STREAMS_PER_KEY=0"}, []string{"limits.max_streams_per_key"}},
		{"env invalid rate limit", "", []string{"COMFYFARM_LIMITS_RATE_PER_MINUTE=fast"}, []string{"COMFYFARM_LIMITS_RATE_PER_MINUTE", "integer"}},
		{"upload over body", "limits: {max_body_mb: 4, max_upload_mb: 8}\n", nil, []string{"limits.max_upload_mb"}},
		{"bad frontend name", "frontends:\n  Style: {api_keys: [abcdefgh]}\n", nil, []string{"frontends.Style"}},
		{"shared key", "frontends:\n  a: {api_keys: [samesame1]}\n  b: {api_keys: [samesame1]}\n", nil, []string{"frontends.b.api_keys", "also used"}},
		{"short key", "frontends:\n  a: {api_keys: [short]}\n", nil, []string{"frontends.a.api_keys", "shorter"}},
		{"duplicate node", "nodes:\n  - {name: a, url: \"http://h:1\"}\n  - {name: a, url: \"http://h:2\"}\n", nil, []string{"nodes[1].name", "twice"}},
		{"bad node url", "nodes:\n  - {name: a, url: \"h:1\"}\n", nil, []string{"nodes[0].url"}},
		{"bad cidr", "probe: {allow: [\"10.0.0.0/33\"]}\n", nil, []string{"probe.allow[0]"}},
		{"not a mapping", "- a\n- b\n", nil, []string{"mapping"}},
		{"env invalid duration", "", []string{"COMFYFARM_SCHEDULER_JOB_TIMEOUT=forever"}, []string{"COMFYFARM_SCHEDULER_JOB_TIMEOUT", "scheduler.job_timeout", "duration"}},
		{"env invalid bool", "", []string{"COMFYFARM_STORAGE_OSS_SIGN_URLS=maybe"}, []string{"COMFYFARM_STORAGE_OSS_SIGN_URLS", "true or false"}},
		{"env invalid int", "", []string{"COMFYFARM_OSS_URL_TTL=1h", "COMFYFARM_LIMITS_MAX_UPLOAD_MB=x"}, []string{"COMFYFARM_LIMITS_MAX_UPLOAD_MB", "integer"}},
		{"short admin key", "admin_key: abc\n", nil, []string{"admin_key"}},
		{"bad instance id", "scheduler: {instance_id: \"a b\"}\n", nil, []string{"scheduler.instance_id"}},
		{"leader lease too short", "scheduler: {leader_lease: 100ms}\n", nil, []string{"scheduler.leader_lease"}},
		{"replicas on sqlite", "cluster: {redis_url: \"redis://127.0.0.1:6379/0\", secret: 0123456789abcdef0123456789abcdef}\nadmin_key: admin-key-0123456789\n", nil, []string{"cluster.redis_url", "mysql"}},
		{"replicas without a shared secret", "database: {driver: mysql, dsn: \"u@tcp(127.0.0.1:3306)/\"}\ncluster: {redis_url: \"redis://127.0.0.1:6379/0\"}\nadmin_key: admin-key-0123456789\n", nil, []string{"cluster.secret"}},
		{"replicas without an admin key", "database: {driver: mysql, dsn: \"u@tcp(127.0.0.1:3306)/\"}\ncluster: {redis_url: \"redis://127.0.0.1:6379/0\", secret: 0123456789abcdef0123456789abcdef}\n", nil, []string{"admin_key", "every replica"}},
		{"not a redis url", "database: {driver: mysql, dsn: \"u@tcp(127.0.0.1:3306)/\"}\ncluster: {redis_url: \"http://x\", secret: 0123456789abcdef0123456789abcdef}\nadmin_key: admin-key-0123456789\n", nil, []string{"cluster.redis_url"}},
		{"short metrics key", "metrics_key: abc\n", nil, []string{"metrics_key", "shorter"}},
		{"metrics key is an api key", "metrics_key: shared-key-0123456789\nfrontends:\n  a: {api_keys: [shared-key-0123456789]}\n", nil, []string{"metrics_key", "frontends.a"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := ""
			if c.file != "" {
				path = writeConfig(t, c.file)
			}
			_, _, err := LoadConfig(path, c.env)
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("error %q lacks %q", err, w)
				}
			}
		})
	}
	if _, _, err := LoadConfig(filepath.Join(t.TempDir(), "missing.yaml"), nil); err == nil {
		t.Fatal("a missing file was accepted")
	}
}

// TestReadmeDocumentsEveryKey keeps the README's configuration reference in
// step with the keys: each environment name must appear there.
func TestReadmeDocumentsEveryKey(t *testing.T) {
	readme, err := os.ReadFile(filepath.Join("..", "..", "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	cfg, _, err := LoadConfig("", nil)
	if err != nil {
		t.Fatal(err)
	}
	var keys []envKey
	var entries []mapEntry
	collectEnvKeys(reflect.ValueOf(cfg).Elem(), "", "", &keys, &entries)
	if len(keys) < 40 {
		t.Fatalf("only %d keys found", len(keys))
	}
	var missing []string
	for _, k := range keys {
		if strings.HasPrefix(k.path, "frontends.") {
			continue // documented once, with <NAME>
		}
		if !strings.Contains(string(readme), k.name) {
			missing = append(missing, k.name)
		}
	}
	for _, generic := range []string{"COMFYFARM_FRONTENDS_<NAME>_API_KEYS", "COMFYFARM_OSS_ACCESS_KEY_SECRET"} {
		if !strings.Contains(string(readme), generic) {
			missing = append(missing, generic)
		}
	}
	slices.Sort(missing)
	if len(missing) > 0 {
		t.Fatalf("README.md does not document: %s", strings.Join(missing, ", "))
	}
}

func FuzzLoadConfig(f *testing.F) {
	f.Add([]byte(defaultsYAML))
	f.Add([]byte("listen: \":1\"\nscheduler: {probe_interval: x}\n"))
	f.Add([]byte("frontends:\n  a: {api_keys: [abcdefgh], bogus: 1}\n"))
	f.Add([]byte("nodes: [{name: a, url: 'http://h:1'}, 3]\n"))
	f.Add([]byte("{"))
	f.Add([]byte("&a [*a]"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(dir, "c.yaml")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, _, err := LoadConfig(p, nil)
		if err != nil {
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("loaded config fails validation: %v", err)
		}
	})
}

// TestServeAppliesRateLimits checks that buildApp hands limits.* to the
// server: with rate_per_minute 1 a frontend key's second request is 429, while
// the admin key goes on.
func TestServeAppliesRateLimits(t *testing.T) {
	t.Chdir(t.TempDir())
	e, _, errb := testEnv("COMFYFARM_LISTEN=127.0.0.1:0", "COMFYFARM_LIMITS_RATE_PER_MINUTE=1",
		"COMFYFARM_ADMIN_KEY=an-admin-key-0123456789")
	addrc := make(chan net.Addr, 1)
	e.ready = func(a net.Addr) { addrc <- a }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- run(ctx, e, []string{"serve"}) }()
	var base string
	select {
	case a := <-addrc:
		base = "http://" + a.String()
	case err := <-done:
		t.Fatalf("serve stopped: %v\n%s", err, errb.String())
	case <-time.After(60 * time.Second):
		t.Fatalf("serve did not start\n%s", errb.String())
	}
	client := &http.Client{Timeout: 30 * time.Second}
	get := func(key string) *http.Response {
		t.Helper()
		req, _ := http.NewRequest("GET", base+"/api/v1/photos?frontend=style", nil)
		req.Header.Set("Authorization", "Bearer "+key)
		res, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		res.Body.Close()
		return res
	}
	// The server runs on the wall clock: the next token comes 60 s after the
	// first request, so Retry-After is at most 60 however slow the machine.
	for i, want := range []int{200, 429} {
		res := get("style-key")
		if res.StatusCode != want {
			t.Fatalf("request %d: %d, want %d", i+1, res.StatusCode, want)
		}
		if n, err := strconv.Atoi(res.Header.Get("Retry-After")); want == 429 && (err != nil || n < 1 || n > 60) {
			t.Fatalf("Retry-After %q", res.Header.Get("Retry-After"))
		}
	}
	for range 3 {
		if res := get("an-admin-key-0123456789"); res.StatusCode != 200 {
			t.Fatalf("admin key: %d", res.StatusCode)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("serve: %v\n%s", err, errb.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("serve did not stop")
	}
}

// TestDockerConfig loads the Docker image's example configuration with the
// environment compose.yaml gives it, plus every COMFYFARM_ variable the two
// files mention: all must be keys comfyfarm knows, and the result valid.
func TestDockerConfig(t *testing.T) {
	dir := filepath.Join("..", "..", "docker")
	var mentioned []string
	for _, name := range []string{"comfyfarm.yaml", "compose.yaml"} {
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		for _, name := range regexp.MustCompile(`COMFYFARM_[A-Z0-9_<>]*[A-Z0-9>]`).FindAllString(string(b), -1) {
			if !strings.Contains(name, "<") { // a pattern such as COMFYFARM_FRONTENDS_<NAME>_API_KEYS
				mentioned = append(mentioned, name)
			}
		}
	}
	if len(mentioned) < 5 {
		t.Fatalf("only %v mentioned", mentioned)
	}
	values := map[string]string{
		"COMFYFARM_ADMIN_KEY":    "an-admin-key-0123456789",
		"COMFYFARM_DATABASE_DSN": "root:pw@tcp(db:3306)/",
		"COMFYFARM_PUBLIC_URL":   "https://farm.example.com",
		"COMFYFARM_NODES":        "sim-1=http://sim-1:8188",
	}
	env := []string{}
	seen := map[string]bool{}
	for _, name := range mentioned {
		key := strings.TrimSuffix(name, "_FILE")
		if seen[key] {
			continue // both forms of a key are mentioned (in a comment and a setting)
		}
		seen[key] = true
		v, ok := values[key]
		if !ok {
			v = "value-" + strings.ToLower(key[len("COMFYFARM_"):]) // strings and comma lists alike
		}
		if key != name { // a Docker secret: the value is in the file it names
			p := filepath.Join(t.TempDir(), "secret")
			if err := os.WriteFile(p, []byte(v+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			v = p
		}
		env = append(env, name+"="+v)
	}
	cfg, warnings, err := LoadConfig(filepath.Join(dir, "comfyfarm.yaml"), env)
	if err != nil {
		t.Fatalf("docker config refused: %v", err)
	}
	if len(warnings) != 0 {
		t.Fatalf("variables the docker files mention but comfyfarm ignores: %v", warnings)
	}
	if cfg.Database.Driver != "mysql" || cfg.Database.DSN != "root:pw@tcp(db:3306)/" || cfg.DataDir != "/data" ||
		cfg.Storage.Local.Dir != "/data/files" || cfg.Log.Format != "json" {
		t.Fatalf("docker config: %+v", cfg)
	}
}
