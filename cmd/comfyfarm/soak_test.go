//go:build soak

package main

// The chaos soak (make soak): the real binary, as separate processes, under
// abrupt deaths. Three fake nodes (`comfyfarm sim`) are killed with SIGKILL
// and restarted on the same port 2 s later, `comfyfarm serve` itself is
// killed with SIGKILL and restarted, and, on MariaDB (COMFYFARM_SOAK_MYSQL=1),
// the database goes away for a few seconds behind a TCP proxy that resets
// every connection (the shared MariaDB itself is never touched). Jobs are
// submitted throughout, with an Idempotency-Key each, retried while the farm
// is down. At the end every job must have succeeded, with exactly one photo
// row for its one output and the user's credits exact.
//
//	COMFYFARM_SOAK_JOBS   jobs per run (default 500, about a minute)
//	COMFYFARM_SOAK_MYSQL  1: run on MariaDB (COMFYFARM_TEST_MYSQL_DSN) instead of SQLite

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-sql-driver/mysql"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

const (
	soakKey   = "soak-style-key-0123456789"
	soakUser  = "soak-user"
	soakTopUp = 100000
)

const soakWorkflow = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "soak", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": 3, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "soak", "images": ["8", 0]}}
}`

// proc is one subprocess that can be killed and started again.
type proc struct {
	t    *testing.T
	name string
	args []string
	env  []string
	log  *os.File

	mu  sync.Mutex
	cmd *exec.Cmd
}

func (p *proc) start() {
	p.t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	cmd := exec.Command(p.args[0], p.args[1:]...)
	cmd.Env = append(os.Environ(), p.env...)
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		p.t.Fatalf("start %s: %v", p.name, err)
	}
	p.cmd = cmd
}

// kill sends SIGKILL and reaps the process.
func (p *proc) kill() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	_ = p.cmd.Process.Kill()
	_ = p.cmd.Wait()
	p.cmd = nil
}

func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// tcpFault forwards connections to target until cut: then every open
// connection is reset and new ones are closed at once.
type tcpFault struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	down   bool
	conns  map[net.Conn]bool
}

func startTCPFault(t *testing.T, target string) *tcpFault {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &tcpFault{ln: ln, target: target, conns: map[net.Conn]bool{}}
	t.Cleanup(func() { ln.Close(); f.set(true) })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go f.pipe(c)
		}
	}()
	return f
}

func (f *tcpFault) pipe(c net.Conn) {
	up, err := net.DialTimeout("tcp", f.target, 5*time.Second)
	f.mu.Lock()
	if err != nil || f.down {
		f.mu.Unlock()
		c.Close()
		if up != nil {
			up.Close()
		}
		return
	}
	f.conns[c], f.conns[up] = true, true
	f.mu.Unlock()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(up, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, up); done <- struct{}{} }()
	<-done
	c.Close()
	up.Close()
	f.mu.Lock()
	delete(f.conns, c)
	delete(f.conns, up)
	f.mu.Unlock()
}

func (f *tcpFault) set(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.down = down
	if down {
		for c := range f.conns {
			if tc, ok := c.(*net.TCPConn); ok {
				_ = tc.SetLinger(0) // a reset, as from a killed server
			}
			c.Close()
		}
	}
}

type soakClient struct {
	t    *testing.T
	base string
	hc   *http.Client
}

// call sends one request; err is a transport error (the farm is down).
func (c *soakClient) call(method, path string, body any, idem string) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		c.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+soakKey)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if idem != "" {
		req.Header.Set("Idempotency-Key", idem)
	}
	res, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, err
	}
	defer res.Body.Close()
	b, err := io.ReadAll(res.Body)
	return res.StatusCode, b, err
}

// must retries a call through farm restarts and database outages (5xx)
// until it answers want, for up to two minutes.
func (c *soakClient) must(method, path string, body any, idem string, want int, out any) {
	c.t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		status, b, err := c.call(method, path, body, idem)
		if err == nil && status == want {
			if out != nil {
				if err := json.Unmarshal(b, out); err != nil {
					c.t.Fatalf("%s %s: %v", method, path, err)
				}
			}
			return
		}
		if err == nil && status < 500 && status != http.StatusTooManyRequests {
			c.t.Fatalf("%s %s: %d %s", method, path, status, b)
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s %s: no answer %d within 2 minutes (last: %d %v %s)", method, path, want, status, err, b)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestSoak(t *testing.T) {
	jobs := 500
	if v := os.Getenv("COMFYFARM_SOAK_JOBS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("COMFYFARM_SOAK_JOBS=%q", v)
		}
		jobs = n
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "comfyfarm")
	build := exec.Command("go", "build", "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	logf, err := os.Create(filepath.Join(dir, "processes.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()

	// Three fake nodes as processes.
	var nodes []*proc
	var conf strings.Builder
	conf.WriteString("nodes:\n")
	for i := range 3 {
		port := freePort(t)
		p := &proc{t: t, name: fmt.Sprintf("sim-%d", i+1), log: logf, args: []string{bin, "sim",
			"--port", strconv.Itoa(port), "--class-time", "25ms", "--log-level", "error"}}
		p.start()
		t.Cleanup(p.kill)
		nodes = append(nodes, p)
		fmt.Fprintf(&conf, "  - {name: gpu-%d, url: \"http://127.0.0.1:%d\", max_inflight: 2}\n", i+1, port)
	}
	conf.WriteString("scheduler: {probe_interval: 250ms, max_attempts: 10, stall_timeout: 5s}\n")
	confPath := filepath.Join(dir, "comfyfarm.yaml")
	if err := os.WriteFile(confPath, []byte(conf.String()), 0o600); err != nil {
		t.Fatal(err)
	}

	port := freePort(t)
	env := []string{
		"COMFYFARM_LISTEN=127.0.0.1:" + strconv.Itoa(port),
		"COMFYFARM_PUBLIC_URL=http://127.0.0.1:" + strconv.Itoa(port),
		"COMFYFARM_ADMIN_KEY=soak-admin-key-0123456789",
		"COMFYFARM_FRONTENDS_STYLE_API_KEYS=" + soakKey,
		"COMFYFARM_LIMITS_RATE_PER_MINUTE=0",
		"COMFYFARM_LIMITS_SUBMIT_PER_MINUTE=0",
		"COMFYFARM_LOG_LEVEL=warn",
		"COMFYFARM_STORAGE_LOCAL_DIR=" + filepath.Join(dir, "files"),
	}
	var dbFault *tcpFault
	if os.Getenv("COMFYFARM_SOAK_MYSQL") == "1" {
		db := dbtest.MySQL(t)
		mc, err := mysql.ParseDSN(db.DSN)
		if err != nil {
			t.Fatal(err)
		}
		dbFault = startTCPFault(t, mc.Addr)
		mc.Addr = dbFault.ln.Addr().String()
		mc.Timeout = 2 * time.Second
		env = append(env, "COMFYFARM_DATABASE_DRIVER=mysql", "COMFYFARM_DATABASE_DSN="+mc.FormatDSN(),
			"COMFYFARM_DATABASE_PREFIX="+db.Prefix)
	} else {
		env = append(env, "COMFYFARM_DATABASE_PATH="+filepath.Join(dir, "data"))
	}
	farm := &proc{t: t, name: "serve", log: logf, env: env, args: []string{bin, "serve", "--config", confPath}}
	farm.start()
	t.Cleanup(farm.kill)
	c := &soakClient{t: t, base: "http://127.0.0.1:" + strconv.Itoa(port), hc: &http.Client{Timeout: 20 * time.Second}}
	c.must("PUT", "/api/v1/users/"+soakUser+"?frontend=style", map[string]any{"nickname": "soak"}, "", http.StatusOK, nil)
	c.must("POST", "/api/v1/users/"+soakUser+"/credits?frontend=style", map[string]any{"delta": soakTopUp, "reason": "soak"},
		"soak-top-up", http.StatusOK, nil)
	var before schema.User
	c.must("GET", "/api/v1/users/"+soakUser+"?frontend=style", nil, "", http.StatusOK, &before)

	// Submit throughout the chaos, from four clients.
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	ids := make([]string, jobs)
	var submitters sync.WaitGroup
	next := make(chan int)
	for range 4 {
		submitters.Add(1)
		go func() {
			defer submitters.Done()
			for i := range next {
				var view struct {
					ID string `json:"id"`
				}
				body := map[string]any{"frontend": "style", "user_id": soakUser,
					"workflow": json.RawMessage(fmt.Sprintf(soakWorkflow, i))}
				c.must("POST", "/api/v1/jobs?frontend=style", body, fmt.Sprintf("soak-job-%d", i), http.StatusAccepted, &view)
				ids[i] = view.ID
			}
		}()
	}
	submitted := make(chan struct{})
	go func() {
		defer close(submitted)
		for i := range jobs {
			select {
			case next <- i:
			case <-ctx.Done():
			}
			time.Sleep(90 * time.Millisecond)
		}
		close(next)
	}()

	// The chaos: until every job is submitted, a node is killed every
	// second or so and started again 2 s later; the farm is killed once a
	// third of the way and once two thirds of the way; the database (MariaDB
	// only) goes away once, for 3 s.
	rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 9))
	start := time.Now()
	total := time.Duration(jobs) * 90 * time.Millisecond
	var chaos sync.WaitGroup
	kills, farmKills, dbCuts := 0, 0, 0
	down := map[int]bool{}
	var downMu sync.Mutex
loop:
	for {
		select {
		case <-submitted:
			break loop
		case <-time.After(time.Duration(700+rng.IntN(700)) * time.Millisecond):
		}
		el := time.Since(start)
		switch {
		case farmKills < 2 && el > time.Duration(farmKills+1)*total/3:
			farm.kill()
			farmKills++
			time.Sleep(time.Duration(200+rng.IntN(1500)) * time.Millisecond)
			farm.start()
		case dbFault != nil && dbCuts == 0 && el > total/2:
			dbCuts++
			dbFault.set(true)
			time.Sleep(3 * time.Second)
			dbFault.set(false)
		default:
			i := rng.IntN(len(nodes))
			downMu.Lock()
			if down[i] {
				downMu.Unlock()
				continue
			}
			down[i] = true
			downMu.Unlock()
			nodes[i].kill()
			kills++
			chaos.Add(1)
			go func() {
				defer chaos.Done()
				time.Sleep(2 * time.Second)
				nodes[i].start()
				downMu.Lock()
				delete(down, i)
				downMu.Unlock()
			}()
		}
	}
	submitters.Wait()
	chaos.Wait()
	t.Logf("chaos over after %s: %d node kills, %d farm kills, %d database outages", time.Since(start).Round(time.Second), kills, farmKills, dbCuts)

	// Every job ends.
	type jobView struct {
		ID       string           `json:"id"`
		State    schema.JobState  `json:"state"`
		Attempts int              `json:"attempts"`
		Error    *schema.JobError `json:"error"`
		Outputs  []schema.Output  `json:"outputs"`
	}
	final := make([]jobView, jobs)
	deadline := time.Now().Add(3 * time.Minute)
	for i, id := range ids {
		for {
			var v jobView
			c.must("GET", "/api/v1/jobs/"+id+"?frontend=style", nil, "", http.StatusOK, &v)
			if v.State.Terminal() {
				final[i] = v
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("job %s still %s 3 minutes after the chaos", id, v.State)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	byOutcome := map[string]int{}
	attempts := map[int]int{}
	outputs := 0
	for _, v := range final {
		key := string(v.State)
		if v.Error != nil {
			key += " " + v.Error.Code
		}
		byOutcome[key]++
		attempts[v.Attempts]++
		outputs += len(v.Outputs)
	}
	var lines []string
	for k, n := range byOutcome {
		lines = append(lines, fmt.Sprintf("%s: %d", k, n))
	}
	sort.Strings(lines)
	var att []string
	for a := 0; a <= 10; a++ {
		if attempts[a] > 0 {
			att = append(att, fmt.Sprintf("%d:%d", a, attempts[a]))
		}
	}
	fmt.Printf("soak: %d jobs; by final state: %s; by attempts: %s; %d node kills, %d farm kills, %d database outages\n",
		jobs, strings.Join(lines, ", "), strings.Join(att, " "), kills, farmKills, dbCuts)
	for _, v := range final {
		if v.State != schema.JobSucceeded {
			t.Errorf("job %s ended %s after %d attempts: %+v", v.ID, v.State, v.Attempts, v.Error)
		} else if len(v.Outputs) != 1 {
			t.Errorf("job %s has %d outputs, want 1", v.ID, len(v.Outputs))
		}
	}

	// One photo row per output, none twice.
	seen := map[string]bool{}
	photos := 0
	for page := 1; ; page++ {
		var list struct {
			Photos []schema.Photo `json:"photos"`
			Total  int            `json:"total"`
		}
		c.must("GET", fmt.Sprintf("/api/v1/photos?frontend=style&user_id=%s&page=%d&limit=100", soakUser, page), nil, "", http.StatusOK, &list)
		for _, p := range list.Photos {
			k := fmt.Sprintf("%s/%d", p.JobID, p.OutputIndex)
			if seen[k] {
				t.Errorf("photo of job %s output %d recorded twice", p.JobID, p.OutputIndex)
			}
			seen[k] = true
		}
		photos = list.Total
		if len(list.Photos) == 0 || page*100 >= list.Total {
			break
		}
	}
	if photos != outputs || len(seen) != outputs {
		t.Errorf("%d photo rows (%d distinct) for %d outputs", photos, len(seen), outputs)
	}

	// Credits: one per succeeded job, refunds for the others.
	var after schema.User
	c.must("GET", "/api/v1/users/"+soakUser+"?frontend=style", nil, "", http.StatusOK, &after)
	succeeded := byOutcome[string(schema.JobSucceeded)]
	if want := before.Credits - int64(succeeded); after.Credits != want {
		t.Errorf("credits %d after %d succeeded jobs, want %d (before %d)", after.Credits, succeeded, want, before.Credits)
	}
	if t.Failed() {
		b, _ := os.ReadFile(logf.Name())
		if len(b) > 20000 {
			b = b[len(b)-20000:]
		}
		t.Logf("end of the processes' log:\n%s", b)
	}
}
