package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	composecli "github.com/compose-spec/compose-go/v2/cli"
)

// TestComposeFileValid loads docker/compose.yaml the way `docker compose
// config` does (the Compose specification's schema and interpolation), with
// each profile.
func TestComposeFileValid(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join("..", "..", "docker")
	for _, name := range []string{"compose.yaml", "comfyfarm.yaml"} {
		data, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// The secrets the file's header tells the operator to make.
	if err := os.MkdirAll(filepath.Join(dir, "secrets"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"db_root_password", "db_password", "comfyfarm_dsn", "admin_key"} {
		if err := os.WriteFile(filepath.Join(dir, "secrets", s), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, tc := range []struct {
		profiles []string
		want     []string
	}{
		{nil, []string{"comfyfarm", "db"}},
		{[]string{"sim"}, []string{"comfyfarm", "db", "sim-1", "sim-2"}},
	} {
		opts, err := composecli.NewProjectOptions([]string{filepath.Join(dir, "compose.yaml")},
			composecli.WithWorkingDirectory(dir), composecli.WithProfiles(tc.profiles),
			composecli.WithEnv([]string{"COMFYFARM_NODES=sim-1=http://sim-1:8188"}))
		if err != nil {
			t.Fatal(err)
		}
		p, err := opts.LoadProject(context.Background())
		if err != nil {
			t.Fatalf("profiles %q: %v", tc.profiles, err)
		}
		got := p.ServiceNames()
		slices.Sort(got)
		if !slices.Equal(got, tc.want) {
			t.Fatalf("profiles %q: services %q, want %q", tc.profiles, got, tc.want)
		}
		farm, err := p.GetService("comfyfarm")
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"COMFYFARM_DATABASE_DSN_FILE", "COMFYFARM_ADMIN_KEY_FILE"} {
			if v := farm.Environment[k]; v == nil || !strings.HasPrefix(*v, "/run/secrets/") {
				t.Errorf("%s = %v: want a Docker secret", k, v)
			}
		}
		db, _ := p.GetService("db")
		if u := db.Environment["MARIADB_USER"]; u == nil || *u == "root" {
			t.Errorf("the database user is %v: want a dedicated one", u)
		}
	}
}

// TestComposeReplicasValid loads docker/compose.replicas.yaml: two replicas
// on one database and one Redis, each its own host name and data, storage
// shared, the cluster settings given.
func TestComposeReplicasValid(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join("..", "..", "docker")
	for _, name := range []string{"compose.replicas.yaml", "comfyfarm.yaml"} {
		data, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(filepath.Join(dir, "secrets"), 0o700); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"db_root_password", "db_password", "comfyfarm_dsn", "admin_key", "cluster_secret"} {
		if err := os.WriteFile(filepath.Join(dir, "secrets", s), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	opts, err := composecli.NewProjectOptions([]string{filepath.Join(dir, "compose.replicas.yaml")},
		composecli.WithWorkingDirectory(dir), composecli.WithProfiles([]string{"sim"}))
	if err != nil {
		t.Fatal(err)
	}
	p, err := opts.LoadProject(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	got := p.ServiceNames()
	slices.Sort(got)
	if want := []string{"comfyfarm-1", "comfyfarm-2", "db", "lb", "redis", "sim-1", "sim-2"}; !slices.Equal(got, want) {
		t.Fatalf("services %q, want %q", got, want)
	}
	hosts := map[string]bool{}
	for _, name := range []string{"comfyfarm-1", "comfyfarm-2"} {
		r, err := p.GetService(name)
		if err != nil {
			t.Fatal(err)
		}
		hosts[r.Hostname] = true
		if v := r.Environment["COMFYFARM_CLUSTER_REDIS_URL"]; v == nil || !strings.HasPrefix(*v, "redis://redis:") {
			t.Errorf("%s: cluster.redis_url %v", name, v)
		}
		for _, k := range []string{"COMFYFARM_DATABASE_DSN_FILE", "COMFYFARM_ADMIN_KEY_FILE", "COMFYFARM_CLUSTER_SECRET_FILE"} {
			if v := r.Environment[k]; v == nil || !strings.HasPrefix(*v, "/run/secrets/") {
				t.Errorf("%s: %s = %v: want a Docker secret", name, k, v)
			}
		}
		shared := false
		for _, v := range r.Volumes {
			shared = shared || (v.Source == "files" && v.Target == "/files")
		}
		if !shared || *r.Environment["COMFYFARM_STORAGE_LOCAL_DIR"] != "/files" {
			t.Errorf("%s: outputs not on the shared volume", name)
		}
	}
	if len(hosts) != 2 {
		t.Errorf("the replicas share a host name (their instance id): %v", hosts)
	}
}

// dockerfileLines reads docker/Dockerfile with its continued lines joined.
func dockerfileLines(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "docker", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.ReplaceAll(string(b), "\\\n", " ")
}

// dockerfileHealthcheck is the image's HEALTHCHECK command.
func dockerfileHealthcheck(t *testing.T) []string {
	t.Helper()
	m := regexp.MustCompile(`HEALTHCHECK [^\n]*CMD (\[[^\n]*\])`).FindStringSubmatch(dockerfileLines(t))
	if m == nil {
		t.Fatal("the Dockerfile has no HEALTHCHECK CMD [...]")
	}
	var cmd []string
	if err := json.Unmarshal([]byte(m[1]), &cmd); err != nil {
		t.Fatalf("HEALTHCHECK CMD %s: %v", m[1], err)
	}
	return cmd
}

var (
	binaryOnce sync.Once
	binaryPath string
	binaryErr  error
)

// dockerfileBinary builds the binary once per test run, with the go build
// line of the Dockerfile (static, no cgo), and returns its path.
func dockerfileBinary(t *testing.T) string {
	t.Helper()
	m := regexp.MustCompile(`RUN (CGO_ENABLED=0 go build [^&\n]*)`).FindStringSubmatch(dockerfileLines(t))
	if m == nil {
		t.Fatal("the Dockerfile has no static go build line")
	}
	binaryOnce.Do(func() {
		dir, err := os.MkdirTemp("", "comfyfarm-bin-")
		if err != nil {
			binaryErr = err
			return
		}
		binaryPath = filepath.Join(dir, "comfyfarm")
		line := strings.ReplaceAll(m[1], "/out/comfyfarm", binaryPath)
		line = strings.ReplaceAll(line, "${VERSION}", "test")
		cmd := exec.Command("sh", "-c", line)
		cmd.Dir = filepath.Join("..", "..") // the Dockerfile builds from the repository root
		if out, err := cmd.CombinedOutput(); err != nil {
			binaryErr = fmt.Errorf("%s: %w\n%s", line, err, out)
		}
	})
	if binaryErr != nil {
		t.Fatal(binaryErr)
	}
	return binaryPath
}

// TestDockerfileBinaryHealth builds the binary the Dockerfile's way (its go
// build line, static, no cgo), runs it with the image's configuration, and
// runs the image's HEALTHCHECK command against it: healthy while serving,
// unhealthy once it is gone.
func TestDockerfileBinaryHealth(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	bin := dockerfileBinary(t)
	healthCmd := dockerfileHealthcheck(t)

	// The image's config, on SQLite in a temporary data folder.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	data := t.TempDir()
	srv := exec.Command(bin, "serve", "--config", filepath.Join("..", "..", "docker", "comfyfarm.yaml"), "--listen", addr)
	srv.Env = append(os.Environ(), "COMFYFARM_DATA_DIR="+data, "COMFYFARM_DATABASE_DRIVER=sqlite",
		"COMFYFARM_DATABASE_PATH="+data, "COMFYFARM_STORAGE_LOCAL_DIR="+filepath.Join(data, "files"),
		"COMFYFARM_ADMIN_KEY=cf-admin-docker-test-0123456789", "COMFYFARM_LOG_LEVEL=warn")
	var logs syncBuffer
	srv.Stdout, srv.Stderr = &logs, &logs
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- srv.Wait() }()
	defer func() {
		_ = srv.Process.Kill()
		<-exited
	}()

	runHealth := func() (int, string) {
		args := slices.Clone(healthCmd[1:])
		if i := slices.Index(args, "--url"); i >= 0 && i+1 < len(args) {
			args[i+1] = "http://" + addr // the container's port, here
		}
		c := exec.Command(bin, args...)
		b, err := c.CombinedOutput()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(b)
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0, string(b)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		code, msg := runHealth()
		if code == 0 {
			break
		}
		select {
		case err := <-exited:
			t.Fatalf("serve exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("never healthy: %d %s\n%s", code, msg, logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	_ = srv.Process.Kill()
	<-exited
	exited <- nil // for the deferred wait
	if code, msg := runHealth(); code != 1 || !strings.Contains(msg, "not ready") {
		t.Fatalf("after the server died: exit %d %s", code, msg)
	}
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binaryPath != "" {
		os.RemoveAll(filepath.Dir(binaryPath))
	}
	os.Exit(code)
}

// TestPrometheusRules checks docker/prometheus-rules.yaml with promtool: the
// rules parse, and its unit tests (prometheus-rules.test.yaml) fire each
// alert on the series meant to trigger it and not on the others. CI installs
// promtool (Debian's prometheus package); elsewhere a missing promtool skips.
func TestPrometheusRules(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("promtool not found (.ci/run installs Debian's prometheus package)")
		}
		t.Skip("promtool not installed (apt-get install prometheus)")
	}
	dir := filepath.Join("..", "..", "docker")
	for _, args := range [][]string{
		{"check", "rules", "prometheus-rules.yaml"},
		{"test", "rules", "prometheus-rules.test.yaml"},
	} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// TestMonitoringNamesExist: every comfyfarm_* series the alert rules and the
// Grafana dashboard query is one the code defines (a renamed metric would
// otherwise leave an alert that can never fire, or an empty panel).
func TestMonitoringNamesExist(t *testing.T) {
	root := filepath.Join("..", "..")
	defined := map[string]bool{}
	nameRE := regexp.MustCompile(`"(comfyfarm_[a-z_]+)"`)
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range nameRE.FindAllStringSubmatch(string(b), -1) {
			defined[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	usedRE := regexp.MustCompile(`comfyfarm_[a-z_]+`)
	for _, f := range []string{"prometheus-rules.yaml", "grafana-dashboard.json"} {
		b, err := os.ReadFile(filepath.Join(root, "docker", f))
		if err != nil {
			t.Fatal(err)
		}
		used := usedRE.FindAllString(string(b), -1)
		if len(used) < 5 {
			t.Fatalf("%s names only %q", f, used)
		}
		for _, name := range used {
			base := name
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if b, ok := strings.CutSuffix(name, suffix); ok && defined[b] {
					base = b
				}
			}
			if !defined[base] {
				t.Errorf("%s queries %s, which no code defines", f, name)
			}
		}
	}
}
