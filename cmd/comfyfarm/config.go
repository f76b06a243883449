package main

import (
	"bytes"
	_ "embed"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/comfyfarm/comfyfarm/oss"
	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

// defaultsYAML is the built-in configuration; every key has a default here.
//
//go:embed defaults.yaml
var defaultsYAML []byte

// Config is the whole configuration (DESIGN §5 plus the keys documented in
// README.md). yaml tags are the key names; COMFYFARM_<PATH> overrides a key,
// its path upper-cased and joined with "_".
type Config struct {
	Listen          string                    `yaml:"listen"`
	PublicURL       string                    `yaml:"public_url"`
	AdminKey        string                    `yaml:"admin_key"`
	MetricsKey      string                    `yaml:"metrics_key"`
	DataDir         string                    `yaml:"data_dir"`
	ShutdownTimeout time.Duration             `yaml:"shutdown_timeout"`
	Log             LogConfig                 `yaml:"log"`
	Database        DatabaseConfig            `yaml:"database"`
	Storage         StorageConfig             `yaml:"storage"`
	Nodes           []NodeConfig              `yaml:"nodes"`
	Frontends       map[string]FrontendConfig `yaml:"frontends"`
	Scheduler       SchedulerConfig           `yaml:"scheduler"`
	Limits          LimitsConfig              `yaml:"limits"`
	Probe           ProbeConfig               `yaml:"probe"`
	Events          EventsConfig              `yaml:"events"`
	Dashboard       DashboardConfig           `yaml:"dashboard"`
	Server          ServerConfig              `yaml:"server"`
	Webhooks        WebhooksConfig            `yaml:"webhooks"`
	Cluster         ClusterConfig             `yaml:"cluster"`

	// publicURLDerived: public_url was not set, so it follows listen (see
	// derivePublicURL).
	publicURLDerived bool
}

// ClusterConfig joins several replicas into one farm.
type ClusterConfig struct {
	// RedisURL (redis://[user:pass@]host:6379/0): events, notices and node
	// views between replicas. Empty: one process, everything in memory.
	RedisURL string `yaml:"redis_url"`
	// RedisPrefix starts every key and channel of this farm, so that farms
	// (or tests) may share one Redis.
	RedisPrefix string `yaml:"redis_prefix"`
	// Secret signs what one replica gives out and another checks (events
	// tokens, file links): the same on every replica, at least 32
	// characters. Required with RedisURL; alone, data_dir/secret is used.
	Secret string `yaml:"secret"`
}

// ServerConfig is about the HTTP server's surroundings.
type ServerConfig struct {
	// TrustedProxies: addresses or networks of the reverse proxies in front
	// of comfyfarm, whose X-Forwarded-For names the client in the logs.
	TrustedProxies []string `yaml:"trusted_proxies"`
}

// LogConfig sets up log/slog.
type LogConfig struct {
	Level  string `yaml:"level"`  // debug | info | warn | error
	Format string `yaml:"format"` // text | json
}

// DatabaseConfig says where the control and frontend databases live.
type DatabaseConfig struct {
	Driver string `yaml:"driver"` // sqlite | mysql
	Path   string `yaml:"path"`
	DSN    string `yaml:"dsn"`
	Prefix string `yaml:"prefix"`
}

// StorageConfig picks and configures the object store.
type StorageConfig struct {
	Kind  string             `yaml:"kind"` // local | oss | s3
	Local LocalStorageConfig `yaml:"local"`
	OSS   OSSConfig          `yaml:"oss"`
	S3    S3Config           `yaml:"s3"`
}

// LocalStorageConfig is the local-disk store, served under /files.
type LocalStorageConfig struct {
	Dir      string        `yaml:"dir"`
	SignURLs bool          `yaml:"sign_urls"`
	URLTTL   time.Duration `yaml:"url_ttl"`
}

// OSSConfig is the Aliyun OSS store.
type OSSConfig struct {
	Endpoint        string        `yaml:"endpoint"`
	Bucket          string        `yaml:"bucket"`
	AccessKeyID     string        `yaml:"access_key_id"`
	AccessKeySecret string        `yaml:"access_key_secret"`
	PublicBaseURL   string        `yaml:"public_base_url"`
	SignURLs        bool          `yaml:"sign_urls"`
	URLTTL          time.Duration `yaml:"url_ttl"`
	AuthVersion     string        `yaml:"auth_version"` // v1 | v4
	Region          string        `yaml:"region"`
}

// S3Config is an S3-compatible store (AWS S3, MinIO, Cloudflare R2, Aliyun
// OSS's S3 endpoint).
type S3Config struct {
	Endpoint        string        `yaml:"endpoint"`
	Region          string        `yaml:"region"`
	Bucket          string        `yaml:"bucket"`
	AccessKeyID     string        `yaml:"access_key_id"`
	SecretAccessKey string        `yaml:"secret_access_key"`
	PathStyle       bool          `yaml:"path_style"`
	PublicBaseURL   string        `yaml:"public_base_url"`
	SignURLs        bool          `yaml:"sign_urls"`
	URLTTL          time.Duration `yaml:"url_ttl"`
}

// NodeConfig is a ComfyUI server registered from the config file.
type NodeConfig struct {
	Name        string   `yaml:"name"`
	URL         string   `yaml:"url"`
	Tags        []string `yaml:"tags"`
	MaxInflight int      `yaml:"max_inflight"`
}

// FrontendConfig is one frontend app.
type FrontendConfig struct {
	APIKeys    []string          `yaml:"api_keys"`
	Controller string            `yaml:"controller"`
	Database   string            `yaml:"database"`
	Weight     int               `yaml:"weight"`
	Credits    CreditsConfig     `yaml:"credits"`
	Options    map[string]string `yaml:"options"` // controller specific, e.g. accept: "image/*"
	// KeepTempOutputs: ComfyUI's temp files (PreviewImage and the like)
	// become photos too, marked as previews; by default only outputs do.
	KeepTempOutputs bool `yaml:"keep_temp_outputs"`
	// RawWorkflows: the frontend's keys may submit raw workflows; when false,
	// templates only. Unset means true.
	RawWorkflows *bool `yaml:"raw_workflows"`
	// Webhook announces the frontend's finished jobs.
	Webhook WebhookConfig `yaml:"webhook"`
}

// WebhookConfig is one frontend's webhook: where its jobs' final states are
// POSTed, the secret that signs them (Standard Webhooks; "whsec_<base64>"
// or raw text of at least 16 bytes) and which final states are sent. A
// frontend with a secret but no url sends only to the jobs' own webhook_url.
type WebhookConfig struct {
	URL    string   `yaml:"url"`
	Secret string   `yaml:"secret"`
	Events []string `yaml:"events"` // succeeded | failed | cancelled; empty: all
}

// WebhooksConfig tunes webhook delivery for every frontend.
type WebhooksConfig struct {
	// Allow lists the hosts a job's own webhook_url may name: host names,
	// *.domain wildcards, IP addresses and networks. Empty: none.
	Allow        []string        `yaml:"allow"`
	Concurrency  int             `yaml:"concurrency"`   // requests in flight at once
	PerFrontend  int             `yaml:"per_frontend"`  // of them, at most this many for one frontend
	Timeout      time.Duration   `yaml:"timeout"`       // one request
	MaxAge       time.Duration   `yaml:"max_age"`       // retries stop this long after the event
	Backoff      []time.Duration `yaml:"backoff"`       // waits between tries; the last repeats
	PollInterval time.Duration   `yaml:"poll_interval"` // how often the outbox is read
}

// RawWorkflowsAllowed is raw_workflows with its default (true).
func (f FrontendConfig) RawWorkflowsAllowed() bool { return f.RawWorkflows == nil || *f.RawWorkflows }

// CreditsConfig: a frontend charges cost_per_job credits per job when > 0.
type CreditsConfig struct {
	Initial    int64 `yaml:"initial"`
	CostPerJob int64 `yaml:"cost_per_job"`
}

// SchedulerConfig tunes the farm.
type SchedulerConfig struct {
	ProbeInterval time.Duration `yaml:"probe_interval"`
	MaxAttempts   int           `yaml:"max_attempts"`
	StallTimeout  time.Duration `yaml:"stall_timeout"`
	JobTimeout    time.Duration `yaml:"job_timeout"`
	InstanceID    string        `yaml:"instance_id"` // lease owner; "" = the host name
	// LeaderLease: with several replicas, how long the scheduler's lease
	// lasts unrenewed; a dead leader is replaced within it.
	LeaderLease time.Duration `yaml:"leader_lease"`

	// NodeFailureLimit: jobs in a row a node fails for reasons of its own
	// (unreadable answers, lost prompts, outputs it cannot serve) before it
	// is degraded and gets no new jobs.
	NodeFailureLimit int `yaml:"node_failure_limit"`
}

// LimitsConfig bounds what clients may send.
type LimitsConfig struct {
	MaxBodyMB      int   `yaml:"max_body_mb"`
	MaxUploadMB    int   `yaml:"max_upload_mb"`
	MaxImagePixels int64 `yaml:"max_image_pixels"`
	MaxGraphNodes  int   `yaml:"max_graph_nodes"`
	// Per frontend API key (the admin key is never limited); 0: no limit.
	RatePerMinute   int `yaml:"rate_per_minute"`   // keyed requests
	SubmitPerMinute int `yaml:"submit_per_minute"` // POST /api/v1/jobs
	// Event streams (SSE and WebSocket) open at once.
	MaxStreamsPerKey int `yaml:"max_streams_per_key"` // per API key
	MaxStreams       int `yaml:"max_streams"`         // in all
}

// ProbeConfig bounds node probes; Allow lists the networks POST /probe may reach.
type ProbeConfig struct {
	Timeout time.Duration `yaml:"timeout"`
	Allow   []string      `yaml:"allow"`
	// CatalogueInterval is how often each node's /object_info (classes and
	// the choices of enum inputs: model files, input images) is read again.
	CatalogueInterval time.Duration `yaml:"catalogue_interval"`
}

// EventsConfig tunes the job event streams.
type EventsConfig struct {
	TokenTTL  time.Duration `yaml:"token_ttl"`
	KeepAlive time.Duration `yaml:"keepalive"`
}

// DashboardConfig tunes the operator dashboard.
type DashboardConfig struct {
	// SampleInterval is how often the charts' samples are taken; the last
	// 360 are kept (an hour at 10s).
	SampleInterval time.Duration `yaml:"sample_interval"`
}

// envPrefix starts every environment override.
const envPrefix = "COMFYFARM_"

// envNotConfig are COMFYFARM_ variables that are not config keys (used by
// the client commands and the tests); they draw no warning. A name ending
// in "_" is a prefix.
var envNotConfig = []string{"COMFYFARM_API_KEY", "COMFYFARM_SERVER", "COMFYFARM_TEST_", "COMFYFARM_REQUIRE_"}

// LoadConfig builds the configuration: the built-in defaults, then the file
// at path (if not empty), then the COMFYFARM_ variables of environ. Unknown
// keys and invalid values are refused, naming the key and the reason. The
// returned warnings name COMFYFARM_ variables that match no key.
func LoadConfig(path string, environ []string) (*Config, []string, error) {
	var cfg Config
	if err := decodeYAML(defaultsYAML, &cfg, "defaults"); err != nil {
		return nil, nil, fmt.Errorf("built-in defaults: %w", err)
	}
	if path != "" {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, nil, fmt.Errorf("config: %w", err)
		}
		if err := decodeYAML(data, &cfg, path); err != nil {
			return nil, nil, err
		}
	}
	warnings, err := applyEnv(&cfg, environ)
	if err != nil {
		return nil, nil, err
	}
	cfg.fill()
	if err := cfg.Validate(); err != nil {
		return nil, nil, err
	}
	return &cfg, warnings, nil
}

// decodeYAML lays a YAML document over cfg. A document that sets nodes or
// frontends replaces the whole list or map. Errors name the key.
func decodeYAML(data []byte, cfg *Config, source string) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return fmt.Errorf("%s: %w", source, err)
	}
	if len(doc.Content) == 0 {
		return nil // empty document: nothing to override
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return fmt.Errorf("%s: the configuration must be a mapping of keys", source)
	}
	for i := 0; i+1 < len(root.Content); i += 2 {
		switch root.Content[i].Value {
		case "nodes":
			cfg.Nodes = nil
		case "frontends":
			cfg.Frontends = nil
		}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && !errors.Is(err, io.EOF) {
		return explainYAMLError(source, &doc, err)
	}
	return nil
}

// keyAt is a key of the document: where it is, its dotted path, its value.
type keyAt struct {
	line  int
	name  string
	path  string
	value string
}

func collectKeys(n *yaml.Node, path string, out *[]keyAt) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			collectKeys(c, path, out)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			*out = append(*out, keyAt{line: k.Line, name: k.Value, path: p, value: v.Value})
			if v.Line != k.Line && v.Kind == yaml.ScalarNode {
				*out = append(*out, keyAt{line: v.Line, name: k.Value, path: p, value: v.Value})
			}
			collectKeys(v, p, out)
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			if c.Kind == yaml.ScalarNode {
				*out = append(*out, keyAt{line: c.Line, path: p, value: c.Value})
			}
			collectKeys(c, p, out)
		}
	}
}

var (
	yamlLineRE    = regexp.MustCompile(`^line (\d+): (.*)$`)
	yamlUnknownRE = regexp.MustCompile(`^field (\S+) not found in type`)
	yamlTypeRE    = regexp.MustCompile("^cannot unmarshal !!\\w+ `(.*)` into (\\S+)$")
)

// explainYAMLError rewrites yaml.v3's "line N: field x not found in type
// main.T" and "cannot unmarshal !!str `x` into time.Duration" into messages
// that name the key's full path.
func explainYAMLError(source string, doc *yaml.Node, err error) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		return fmt.Errorf("%s: %w", source, err)
	}
	var keys []keyAt
	collectKeys(doc, "", &keys)
	msgs := make([]string, 0, len(te.Errors))
	for _, e := range te.Errors {
		m := yamlLineRE.FindStringSubmatch(e)
		if m == nil {
			msgs = append(msgs, e)
			continue
		}
		line, _ := strconv.Atoi(m[1])
		rest := m[2]
		if u := yamlUnknownRE.FindStringSubmatch(rest); u != nil {
			path := u[1]
			for _, k := range keys {
				if k.line == line && k.name == u[1] {
					path = k.path
					break
				}
			}
			msgs = append(msgs, fmt.Sprintf("%s: unknown key (line %d)", path, line))
			continue
		}
		if t := yamlTypeRE.FindStringSubmatch(rest); t != nil {
			path := ""
			for _, k := range keys {
				if k.line == line && k.value == t[1] {
					path = k.path
					break
				}
			}
			if path == "" {
				path = "line " + m[1]
			}
			msgs = append(msgs, fmt.Sprintf("%s: invalid value %q: want %s (line %d)", path, t[1], typeWord(t[2]), line))
			continue
		}
		msgs = append(msgs, e)
	}
	return fmt.Errorf("%s: %s", source, strings.Join(msgs, "; "))
}

func typeWord(goType string) string {
	switch goType {
	case "time.Duration":
		return "a duration such as 5s, 2m or 1h"
	case "int", "int64":
		return "an integer"
	case "bool":
		return "true or false"
	case "string":
		return "a string"
	case "[]string":
		return "a list of strings"
	}
	if strings.HasPrefix(goType, "[]") {
		return "a list"
	}
	if strings.HasPrefix(goType, "map[") || strings.HasPrefix(goType, "main.") {
		return "a mapping"
	}
	return goType
}

// fill gives per-frontend and per-node keys their defaults, and public_url,
// when not set, the address of listen.
func (c *Config) fill() {
	if c.PublicURL == "" || c.publicURLDerived {
		c.publicURLDerived = true
		c.PublicURL = derivePublicURL(c.Listen, "")
	}
	for name, f := range c.Frontends {
		if f.Weight == 0 {
			f.Weight = 1
		}
		c.Frontends[name] = f
	}
	for i := range c.Nodes {
		if c.Nodes[i].MaxInflight == 0 {
			c.Nodes[i].MaxInflight = 1
		}
		if c.Nodes[i].Tags == nil {
			c.Nodes[i].Tags = []string{}
		}
	}
}

// derivePublicURL is the address a browser on this machine reaches a server
// listening on listen ("" keeps the port of listen; port fills in the real
// one of a ":0" listener): http://localhost:PORT for a wildcard or loopback
// host, else http://HOST:PORT.
func derivePublicURL(listen, port string) string {
	host, p, err := net.SplitHostPort(listen)
	if err != nil {
		return "" // Validate names listen
	}
	if port != "" {
		p = port
	}
	switch ip := net.ParseIP(host); {
	case host == "", host == "localhost", ip != nil && (ip.IsUnspecified() || ip.IsLoopback()):
		host = "localhost"
	}
	return "http://" + net.JoinHostPort(host, p)
}

// explicitPublicURL is public_url when it was set, and "" when it only
// follows listen: a URL derived from a listen address such as ":8080" names
// this machine, and a path relative to the request serves every client.
func (c *Config) explicitPublicURL() string {
	if c.publicURLDerived {
		return ""
	}
	return c.PublicURL
}

// setListen sets listen (serve --listen) and, when public_url follows it, public_url.
func (c *Config) setListen(addr string) error {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return fmt.Errorf("--listen %q: want host:port or :port", addr)
	}
	c.Listen = addr
	if c.publicURLDerived {
		c.PublicURL = derivePublicURL(addr, "")
	}
	return nil
}

// listening tells the configuration the address it really listens on: a
// derived public_url takes the port a ":0" listener was given.
func (c *Config) listening(addr net.Addr) {
	if !c.publicURLDerived {
		return
	}
	if _, port, err := net.SplitHostPort(addr.String()); err == nil {
		c.PublicURL = derivePublicURL(c.Listen, port)
	}
}

var (
	nodeNameRE   = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)
	dbPrefixRE   = regexp.MustCompile(`^[a-z][a-z0-9_]{0,40}$`)
	dbNameRE     = regexp.MustCompile(`^[a-z][a-z0-9_]{0,63}$`)
	controllerRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,31}$`)
	instanceIDRE = regexp.MustCompile(`^[A-Za-z0-9._-]{1,64}$`)
)

// Validate checks every key; the error names each bad key and why.
func (c *Config) Validate() error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	positive := func(key string, d time.Duration) {
		if d <= 0 {
			bad(key, "must be a positive duration")
		}
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		bad("listen", "want host:port or :port (%v)", err)
	}
	if u, err := url.Parse(c.PublicURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		bad("public_url", "want an absolute http or https URL")
	}
	if c.DataDir == "" {
		bad("data_dir", "must not be empty")
	}
	positive("shutdown_timeout", c.ShutdownTimeout)
	if !slices.Contains([]string{"debug", "info", "warn", "error"}, c.Log.Level) {
		bad("log.level", "want debug, info, warn or error, not %q", c.Log.Level)
	}
	if c.Log.Format != "text" && c.Log.Format != "json" {
		bad("log.format", "want text or json, not %q", c.Log.Format)
	}

	switch c.Database.Driver {
	case "sqlite":
		if c.Database.Path == "" {
			bad("database.path", "must not be empty with the sqlite driver")
		}
	case "mysql":
		if c.Database.DSN == "" {
			bad("database.dsn", "required with the mysql driver (user:pass@tcp(host:3306)/)")
		}
	default:
		bad("database.driver", "want sqlite or mysql, not %q", c.Database.Driver)
	}
	if !dbPrefixRE.MatchString(c.Database.Prefix) {
		bad("database.prefix", "want a lower-case database name (^[a-z][a-z0-9_]{0,40}$)")
	}

	switch c.Storage.Kind {
	case "local":
		if c.Storage.Local.Dir == "" {
			bad("storage.local.dir", "must not be empty")
		}
		positive("storage.local.url_ttl", c.Storage.Local.URLTTL)
	case "oss":
		o := c.Storage.OSS
		for key, v := range map[string]string{
			"storage.oss.endpoint": o.Endpoint, "storage.oss.bucket": o.Bucket,
			"storage.oss.access_key_id": o.AccessKeyID, "storage.oss.access_key_secret": o.AccessKeySecret,
		} {
			if v == "" {
				bad(key, "required with storage.kind oss")
			}
		}
		if !o.SignURLs && o.PublicBaseURL == "" {
			bad("storage.oss.public_base_url", "required when sign_urls is false")
		}
		positive("storage.oss.url_ttl", o.URLTTL)
		switch o.AuthVersion {
		case "", "v1":
		case "v4":
			if o.Region == "" {
				bad("storage.oss.region", "required with auth_version v4")
			}
		default:
			bad("storage.oss.auth_version", "want v1 or v4, not %q", o.AuthVersion)
		}
	case "s3":
		o := c.Storage.S3
		if u, err := url.Parse(o.Endpoint); o.Endpoint == "" {
			bad("storage.s3.endpoint", "required with storage.kind s3")
		} else if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			bad("storage.s3.endpoint", "want an http(s) URL such as https://s3.us-east-1.amazonaws.com, not %q", o.Endpoint)
		}
		for _, kv := range [][2]string{
			{"storage.s3.bucket", o.Bucket}, {"storage.s3.access_key_id", o.AccessKeyID},
			{"storage.s3.secret_access_key", o.SecretAccessKey},
		} {
			if kv[1] == "" {
				bad(kv[0], "required with storage.kind s3")
			}
		}
		if !o.SignURLs && o.PublicBaseURL == "" {
			bad("storage.s3.public_base_url", "required when sign_urls is false")
		}
		positive("storage.s3.url_ttl", o.URLTTL)
		if o.URLTTL > oss.MaxPresignTTL {
			bad("storage.s3.url_ttl", "at most 168h (the SigV4 limit for presigned URLs), not %s", o.URLTTL)
		}
	default:
		bad("storage.kind", "want local, oss or s3, not %q", c.Storage.Kind)
	}

	seenNode := map[string]bool{}
	for i, n := range c.Nodes {
		key := fmt.Sprintf("nodes[%d]", i)
		if !nodeNameRE.MatchString(n.Name) {
			bad(key+".name", "want letters, digits, '.', '_' or '-' (at most 64), not %q", n.Name)
		} else if seenNode[n.Name] {
			bad(key+".name", "%q is registered twice", n.Name)
		}
		seenNode[n.Name] = true
		if u, err := url.Parse(n.URL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" {
			bad(key+".url", "want http(s)://host:port, not %q", n.URL)
		}
		if n.MaxInflight < 1 || n.MaxInflight > 64 {
			bad(key+".max_inflight", "want 1 to 64")
		}
	}

	if len(c.Frontends) == 0 {
		bad("frontends", "at least one frontend is needed")
	}
	keyOwner := map[string]string{}
	if c.AdminKey != "" {
		keyOwner[c.AdminKey] = "admin_key"
	}
	for _, name := range slices.Sorted(maps.Keys(c.Frontends)) {
		f := c.Frontends[name]
		key := "frontends." + name
		if !schema.ValidFrontendName(name) {
			bad(key, "frontend names must match ^[a-z][a-z0-9_]{0,31}$")
			continue
		}
		if len(f.APIKeys) == 0 {
			bad(key+".api_keys", "at least one key is needed")
		}
		for _, k := range f.APIKeys {
			if len(k) < 8 {
				bad(key+".api_keys", "a key is shorter than 8 characters")
			}
			if owner, ok := keyOwner[k]; ok {
				bad(key+".api_keys", "a key is also used by %s", owner)
			}
			keyOwner[k] = key
		}
		if f.Controller != "" && !controllerRE.MatchString(f.Controller) {
			bad(key+".controller", "want a controller name, not %q", f.Controller)
		}
		if f.Database != "" && !dbNameRE.MatchString(f.Database) {
			bad(key+".database", "want a lower-case database name, not %q", f.Database)
		}
		if f.Weight < 1 || f.Weight > 1000 {
			bad(key+".weight", "want 1 to 1000")
		}
		if f.Credits.Initial < 0 {
			bad(key+".credits.initial", "must not be negative")
		}
		if f.Credits.CostPerJob < 0 {
			bad(key+".credits.cost_per_job", "must not be negative")
		}
		c.validateWebhook(key+".webhook", f.Webhook, bad)
	}
	if c.AdminKey != "" && len(c.AdminKey) < 16 {
		bad("admin_key", "shorter than 16 characters (leave it empty to get a random one)")
	}
	if c.MetricsKey != "" {
		if len(c.MetricsKey) < 16 {
			bad("metrics_key", "shorter than 16 characters")
		}
		if owner, ok := keyOwner[c.MetricsKey]; ok {
			bad("metrics_key", "the key is also used by %s", owner)
		}
	}

	positive("scheduler.probe_interval", c.Scheduler.ProbeInterval)
	if c.Scheduler.LeaderLease < time.Second || c.Scheduler.LeaderLease > 10*time.Minute {
		bad("scheduler.leader_lease", "want 1s to 10m, not %s", c.Scheduler.LeaderLease)
	}
	if u := c.Cluster.RedisURL; u != "" {
		if !strings.HasPrefix(u, "redis://") && !strings.HasPrefix(u, "rediss://") {
			bad("cluster.redis_url", "want redis://host:6379/0 or rediss://...")
		}
		if c.Database.Driver != "mysql" {
			bad("cluster.redis_url", "replicas share one control database: it needs database.driver mysql")
		}
		if p := c.Cluster.RedisPrefix; p == "" || len(p) > 64 || strings.ContainsAny(p, " \t\r\n*?[]") {
			bad("cluster.redis_prefix", "want 1 to 64 characters without spaces or glob characters")
		}
		if len(c.Cluster.Secret) < 32 {
			bad("cluster.secret", "required with cluster.redis_url, the same on every replica: at least 32 characters")
		}
		if c.AdminKey == "" {
			bad("admin_key", "required with cluster.redis_url, the same on every replica (alone, one is made in data_dir)")
		}
	}
	positive("scheduler.stall_timeout", c.Scheduler.StallTimeout)
	positive("scheduler.job_timeout", c.Scheduler.JobTimeout)
	if id := c.Scheduler.InstanceID; id != "" && !instanceIDRE.MatchString(id) {
		bad("scheduler.instance_id", "want 1 to 64 letters, digits, '.', '_' or '-', not %q", id)
	}
	if c.Scheduler.MaxAttempts < 1 || c.Scheduler.MaxAttempts > 100 {
		bad("scheduler.max_attempts", "want 1 to 100")
	}
	if c.Scheduler.NodeFailureLimit < 1 || c.Scheduler.NodeFailureLimit > 1000 {
		bad("scheduler.node_failure_limit", "want 1 to 1000")
	}

	if c.Limits.MaxBodyMB < 1 || c.Limits.MaxBodyMB > 2047 {
		bad("limits.max_body_mb", "want 1 to 2047")
	}
	if c.Limits.MaxUploadMB < 1 || c.Limits.MaxUploadMB > c.Limits.MaxBodyMB {
		bad("limits.max_upload_mb", "want 1 to limits.max_body_mb (%d)", c.Limits.MaxBodyMB)
	}
	if c.Limits.MaxImagePixels < 1 {
		bad("limits.max_image_pixels", "must be positive")
	}
	if c.Limits.MaxGraphNodes < 1 {
		bad("limits.max_graph_nodes", "must be positive")
	}
	if c.Limits.RatePerMinute < 0 {
		bad("limits.rate_per_minute", "must not be negative (0 turns the limit off)")
	}
	if c.Limits.SubmitPerMinute < 0 {
		bad("limits.submit_per_minute", "must not be negative (0 turns the limit off)")
	}
	if c.Limits.MaxStreams < 1 {
		bad("limits.max_streams", "must be positive")
	}
	if c.Limits.MaxStreamsPerKey < 1 || c.Limits.MaxStreamsPerKey > c.Limits.MaxStreams {
		bad("limits.max_streams_per_key", "want 1 to limits.max_streams (%d)", c.Limits.MaxStreams)
	}

	positive("probe.timeout", c.Probe.Timeout)
	positive("probe.catalogue_interval", c.Probe.CatalogueInterval)
	for i, p := range c.Server.TrustedProxies {
		if _, err := netip.ParsePrefix(p); err != nil {
			if _, err := netip.ParseAddr(p); err != nil {
				bad(fmt.Sprintf("server.trusted_proxies[%d]", i), "want an address or a network such as 10.0.0.0/8, not %q", p)
			}
		}
	}
	for i, a := range c.Probe.Allow {
		if _, err := netip.ParsePrefix(a); err != nil {
			bad(fmt.Sprintf("probe.allow[%d]", i), "want a network such as 10.0.0.0/8, not %q", a)
		}
	}
	if _, err := webhook.ParseAllowList(c.Webhooks.Allow); err != nil {
		bad("webhooks.allow", "%v", err)
	}
	if c.Webhooks.Concurrency < 1 || c.Webhooks.Concurrency > 1024 {
		bad("webhooks.concurrency", "want 1 to 1024")
	}
	if c.Webhooks.PerFrontend < 1 || c.Webhooks.PerFrontend > c.Webhooks.Concurrency {
		bad("webhooks.per_frontend", "want 1 to webhooks.concurrency (%d)", c.Webhooks.Concurrency)
	}
	positive("webhooks.timeout", c.Webhooks.Timeout)
	positive("webhooks.max_age", c.Webhooks.MaxAge)
	positive("webhooks.poll_interval", c.Webhooks.PollInterval)
	if len(c.Webhooks.Backoff) == 0 {
		bad("webhooks.backoff", "at least one wait is needed")
	}
	for i, b := range c.Webhooks.Backoff {
		positive(fmt.Sprintf("webhooks.backoff[%d]", i), b)
	}
	positive("events.token_ttl", c.Events.TokenTTL)
	positive("events.keepalive", c.Events.KeepAlive)
	positive("dashboard.sample_interval", c.Dashboard.SampleInterval)
	return errors.Join(errs...)
}

// ---- environment overrides ----

// envKey is one key that an environment variable can set.
type envKey struct {
	name  string // COMFYFARM_<PATH>
	path  string // dotted config path, for messages
	field reflect.Value
}

// collectEnvKeys lists every key under v that the environment can set:
// strings, numbers, booleans, durations and string lists, including those of
// existing map entries (frontends.<name>.*). Map values are not addressable,
// so each entry is copied into entries and written back by the caller. Node
// list entries are not reachable from the environment.
func collectEnvKeys(v reflect.Value, path, env string, out *[]envKey, entries *[]mapEntry) {
	t := v.Type()
	if t == reflect.TypeFor[time.Duration]() {
		*out = append(*out, envKey{name: env, path: path, field: v})
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		for i := range t.NumField() {
			tag := strings.Split(t.Field(i).Tag.Get("yaml"), ",")[0]
			if tag == "" || tag == "-" {
				continue
			}
			p, e := tag, envPrefix+strings.ToUpper(tag)
			if path != "" {
				p, e = path+"."+tag, env+"_"+strings.ToUpper(tag)
			}
			collectEnvKeys(v.Field(i), p, e, out, entries)
		}
	case reflect.Map:
		if t.Key().Kind() != reflect.String || t.Elem().Kind() != reflect.Struct {
			return
		}
		for _, k := range v.MapKeys() {
			entry := reflect.New(t.Elem()).Elem()
			entry.Set(v.MapIndex(k))
			*entries = append(*entries, mapEntry{m: v, key: k, value: entry})
			collectEnvKeys(entry, path+"."+k.String(), env+"_"+strings.ToUpper(k.String()), out, entries)
		}
	case reflect.String, reflect.Bool, reflect.Int, reflect.Int64:
		*out = append(*out, envKey{name: env, path: path, field: v})
	case reflect.Pointer:
		if t.Elem().Kind() == reflect.Bool { // an optional boolean
			*out = append(*out, envKey{name: env, path: path, field: v})
		}
	case reflect.Slice:
		if t.Elem().Kind() == reflect.String {
			*out = append(*out, envKey{name: env, path: path, field: v})
		}
	}
}

// mapEntry is an addressable copy of a map value.
type mapEntry struct {
	m, key, value reflect.Value
}

// envAliases returns the names that set one key, aliases first: storage.oss.*
// also answers to COMFYFARM_OSS_*, and the longer name wins when both are set.
func envAliases(name string) []string {
	if rest, ok := strings.CutPrefix(name, envPrefix+"STORAGE_OSS_"); ok {
		return []string{envPrefix + "OSS_" + rest, name}
	}
	return []string{name}
}

// applyEnv sets keys from COMFYFARM_<PATH> variables in environ ("K=V").
// It returns warnings naming COMFYFARM_ variables that set no key.
func applyEnv(cfg *Config, environ []string) ([]string, error) {
	env := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok && strings.HasPrefix(k, envPrefix) {
			env[k] = v
		}
	}
	var keys []envKey
	var entries []mapEntry
	collectEnvKeys(reflect.ValueOf(cfg).Elem(), "", "", &keys, &entries)
	used := map[string]bool{}
	var errs []error
	for _, k := range keys {
		for _, name := range envAliases(k.name) {
			raw, ok, err := envValue(env, name, used)
			if err != nil {
				errs = append(errs, fmt.Errorf("%s (%s): %w", name, k.path, err))
				continue
			}
			if !ok {
				continue
			}
			if err := setFromEnv(k.field, raw); err != nil {
				errs = append(errs, fmt.Errorf("%s (%s): %w", name, k.path, err))
			}
		}
	}
	if raw, ok, err := envValue(env, envPrefix+"NODES", used); err != nil {
		errs = append(errs, fmt.Errorf("%sNODES (nodes): %w", envPrefix, err))
	} else if ok && strings.TrimSpace(raw) != "" { // empty: unset (a compose file's ${COMFYFARM_NODES:-})
		nodes, err := parseEnvNodes(raw)
		if err != nil {
			errs = append(errs, fmt.Errorf("%sNODES (nodes): %w", envPrefix, err))
		}
		cfg.Nodes = nodes
	}
	for _, e := range entries {
		e.m.SetMapIndex(e.key, e.value)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	var warnings []string
	for _, name := range slices.Sorted(maps.Keys(env)) {
		if used[name] || slices.ContainsFunc(envNotConfig, func(p string) bool {
			return name == p || strings.HasSuffix(p, "_") && strings.HasPrefix(name, p)
		}) {
			continue
		}
		warnings = append(warnings, fmt.Sprintf("environment variable %s matches no configuration key; ignored", name))
	}
	return warnings, nil
}

// envValue is the value of the variable name, or of name_FILE: the contents
// of the file it names, without the trailing newline (Docker and systemd
// secrets). Setting both is an error. It marks what it read as used.
func envValue(env map[string]string, name string, used map[string]bool) (string, bool, error) {
	raw, direct := env[name]
	path, fromFile := env[name+"_FILE"]
	if direct {
		used[name] = true
	}
	if !fromFile {
		return raw, direct, nil
	}
	used[name+"_FILE"] = true
	if direct {
		return "", false, fmt.Errorf("both %s and %s_FILE are set; keep one", name, name)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", false, fmt.Errorf("%s_FILE: %w", name, err)
	}
	return strings.TrimRight(string(data), "\r\n"), true, nil
}

// parseEnvNodes reads COMFYFARM_NODES: "name=url[,name=url...]", each node
// with one job at a time and no tags (a config file says more).
func parseEnvNodes(raw string) ([]NodeConfig, error) {
	nodes := []NodeConfig{}
	for _, item := range strings.Split(raw, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		name, u, ok := strings.Cut(item, "=")
		if !ok || strings.TrimSpace(name) == "" || strings.TrimSpace(u) == "" {
			return nil, fmt.Errorf("invalid value %q: want name=url[,name=url...]", item)
		}
		nodes = append(nodes, NodeConfig{Name: strings.TrimSpace(name), URL: strings.TrimSpace(u), MaxInflight: 1, Tags: []string{}})
	}
	return nodes, nil
}

func setFromEnv(f reflect.Value, raw string) error {
	if f.Type() == reflect.TypeFor[time.Duration]() {
		d, err := time.ParseDuration(strings.TrimSpace(raw))
		if err != nil {
			return fmt.Errorf("invalid value %q: want a duration such as 5s, 2m or 1h", raw)
		}
		f.SetInt(int64(d))
		return nil
	}
	switch f.Kind() {
	case reflect.String:
		f.SetString(raw)
	case reflect.Bool:
		b, err := strconv.ParseBool(strings.TrimSpace(raw))
		if err != nil {
			return fmt.Errorf("invalid value %q: want true or false", raw)
		}
		f.SetBool(b)
	case reflect.Pointer:
		b, err := strconv.ParseBool(strings.TrimSpace(raw))
		if err != nil || f.Type().Elem().Kind() != reflect.Bool {
			return fmt.Errorf("invalid value %q: want true or false", raw)
		}
		f.Set(reflect.ValueOf(&b))
	case reflect.Int, reflect.Int64:
		n, err := strconv.ParseInt(strings.TrimSpace(raw), 10, 64)
		if err != nil {
			return fmt.Errorf("invalid value %q: want an integer", raw)
		}
		f.SetInt(n)
	case reflect.Slice:
		var list []string
		for _, s := range strings.Split(raw, ",") {
			if s = strings.TrimSpace(s); s != "" {
				list = append(list, s)
			}
		}
		f.Set(reflect.ValueOf(list))
	default:
		return fmt.Errorf("cannot be set from the environment")
	}
	return nil
}

// validateWebhook checks one frontend's webhook keys.
func (c *Config) validateWebhook(key string, w WebhookConfig, bad func(key, format string, args ...any)) {
	if w.Secret == "" {
		if w.URL != "" {
			bad(key+".secret", "required when webhook.url is set")
		}
		return
	}
	if _, err := webhook.DecodeSecret(w.Secret); err != nil {
		bad(key+".secret", "%v", err)
	}
	if w.URL != "" {
		if _, err := webhook.ParseURL(w.URL); err != nil {
			bad(key+".url", "want an absolute http or https URL, not %q", w.URL)
		}
	}
	for i, ev := range w.Events {
		if !slices.Contains(schema.WebhookEvents, schema.JobState(ev)) {
			bad(fmt.Sprintf("%s.events[%d]", key, i), "want succeeded, failed or cancelled, not %q", ev)
		}
	}
}
