package comfy

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"sync"
	"time"
)

// Defaults of a Client.
const (
	DefaultRequestTimeout = 30 * time.Second
	DefaultLongTimeout    = 5 * time.Minute
	DefaultPingInterval   = 20 * time.Second
	DefaultPongWait       = 20 * time.Second
	// DefaultMaxJSONBytes caps a JSON response body (/object_info of a big install is tens of MB).
	DefaultMaxJSONBytes = 256 << 20
	// WSReadLimit is the largest WebSocket message accepted (big executed outputs, progress_state
	// of huge graphs and previews are far above the 32 KiB some libraries default to).
	WSReadLimit = 64 << 20

	maxErrorBody = 4 << 20
)

// Client talks to one ComfyUI server. It is safe for concurrent use.
type Client struct {
	base        *url.URL
	baseStr     string
	hc          *http.Client
	clientID    string
	reqTimeout  time.Duration
	longTimeout time.Duration
	maxJSON     int64
	pingEvery   time.Duration
	pongWait    time.Duration
	backoff     func(attempt int) time.Duration
	userAgent   string

	featMu sync.Mutex
	feat   *Features
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the HTTP client (default: a client with no overall timeout; every call is
// bounded by its context and the request timeouts).
func WithHTTPClient(hc *http.Client) Option { return func(c *Client) { c.hc = hc } }

// WithClientID sets the WebSocket sid and the client_id sent with every prompt (default: 32
// random hex characters). Use one id per Client: ComfyUI routes events by string equality.
func WithClientID(id string) Option { return func(c *Client) { c.clientID = id } }

// WithRequestTimeout bounds short calls (queue, history, control routes, feature probes) and the
// wait for response headers of /view. Default DefaultRequestTimeout.
func WithRequestTimeout(d time.Duration) Option { return func(c *Client) { c.reqTimeout = d } }

// WithLongTimeout bounds slow calls: /object_info, POST /prompt (synchronous validation) and
// uploads. Default DefaultLongTimeout.
func WithLongTimeout(d time.Duration) Option { return func(c *Client) { c.longTimeout = d } }

// WithMaxJSONBytes caps JSON response bodies. Default DefaultMaxJSONBytes.
func WithMaxJSONBytes(n int64) Option { return func(c *Client) { c.maxJSON = n } }

// WithKeepAlive sets the WebSocket ping interval and how long to wait for any frame (a pong or a
// message) after a ping before the link is declared dead. ComfyUI sends nothing while idle, so
// without pings a half-open link would go unnoticed. Defaults DefaultPingInterval,
// DefaultPongWait.
func WithKeepAlive(interval, pongWait time.Duration) Option {
	return func(c *Client) { c.pingEvery, c.pongWait = interval, pongWait }
}

// WithReconnectBackoff replaces the delay Stream waits before reconnect attempt n (1, 2, ...).
// Default DefaultBackoff.
func WithReconnectBackoff(f func(attempt int) time.Duration) Option {
	return func(c *Client) { c.backoff = f }
}

// WithUserAgent sets the User-Agent header.
func WithUserAgent(ua string) Option { return func(c *Client) { c.userAgent = ua } }

// NewClient returns a client for the ComfyUI server at baseURL (e.g. "http://10.0.0.5:8188";
// a path prefix is kept, for servers behind a reverse proxy).
func NewClient(baseURL string, opts ...Option) (*Client, error) {
	u, err := url.Parse(strings.TrimRight(baseURL, "/"))
	if err != nil {
		return nil, fmt.Errorf("comfy: base url: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return nil, fmt.Errorf("comfy: base url %q: scheme must be http or https", baseURL)
	}
	if u.Host == "" {
		return nil, fmt.Errorf("comfy: base url %q: no host", baseURL)
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("comfy: base url %q: query and fragment not allowed", baseURL)
	}
	c := &Client{
		base:        u,
		baseStr:     u.String(),
		hc:          &http.Client{},
		reqTimeout:  DefaultRequestTimeout,
		longTimeout: DefaultLongTimeout,
		maxJSON:     DefaultMaxJSONBytes,
		pingEvery:   DefaultPingInterval,
		pongWait:    DefaultPongWait,
		backoff:     DefaultBackoff,
		userAgent:   "comfyfarm",
	}
	for _, o := range opts {
		o(c)
	}
	if c.clientID == "" {
		c.clientID = randomHex(16)
	}
	if c.hc == nil {
		c.hc = &http.Client{}
	}
	if c.backoff == nil {
		c.backoff = DefaultBackoff
	}
	if c.reqTimeout <= 0 || c.longTimeout <= 0 || c.pingEvery <= 0 || c.pongWait <= 0 || c.maxJSON <= 0 {
		return nil, errors.New("comfy: timeouts, keep-alive intervals and size caps must be positive")
	}
	return c, nil
}

// BaseURL returns the server's base URL without a trailing slash.
func (c *Client) BaseURL() string { return c.baseStr }

// ClientID returns the id used as WebSocket sid and prompt client_id.
func (c *Client) ClientID() string { return c.clientID }

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b)
}

// endpoint builds the URL of path (already escaped) with an optional query under the base URL.
func (c *Client) endpoint(path string, q url.Values) string {
	if len(q) == 0 {
		return c.baseStr + path
	}
	return c.baseStr + path + "?" + q.Encode()
}

// request describes one HTTP call.
type request struct {
	method      string
	path        string // already escaped
	query       url.Values
	body        io.Reader
	contentType string
	timeout     time.Duration
}

// send performs r and returns the response if its status is 2xx; otherwise the body is read
// and turned into an *APIError. The caller must close the body. cancel releases the request's
// timeout and must be called once the body is done.
func (c *Client) send(ctx context.Context, r request) (*http.Response, context.CancelFunc, error) {
	if r.timeout <= 0 {
		r.timeout = c.reqTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	req, err := http.NewRequestWithContext(ctx, r.method, c.endpoint(r.path, r.query), r.body)
	if err != nil {
		cancel()
		return nil, nil, fmt.Errorf("comfy: %s %s: %w", r.method, r.path, err)
	}
	if r.contentType != "" {
		req.Header.Set("Content-Type", r.contentType)
	}
	if r.method == http.MethodGet {
		req.Header.Set("Accept", "application/json")
	}
	req.Header.Set("User-Agent", c.userAgent)
	// ComfyUI's origin check rejects requests whose Origin disagrees with Host; never send one.
	req.Header.Del("Origin")
	resp, err := c.hc.Do(req)
	if err != nil {
		cancel()
		return nil, nil, fmt.Errorf("comfy: %s %s: %w", r.method, r.path, err)
	}
	if resp.StatusCode/100 != 2 {
		defer cancel()
		defer resp.Body.Close()
		return nil, nil, readAPIError(r.method, r.path, resp)
	}
	return resp, cancel, nil
}

func readAPIError(method, path string, resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	e := &APIError{Method: method, Path: path, Status: resp.StatusCode, Body: body}
	if len(bytes.TrimSpace(body)) > 0 && looksJSON(body) {
		_, _ = parseErrorBody(e, body) // best effort; the raw body stays in e.Body
	}
	return e
}

func looksJSON(b []byte) bool {
	b = bytes.TrimSpace(b)
	return len(b) > 0 && (b[0] == '{' || b[0] == '[')
}

// doJSON performs r and decodes a JSON 2xx body into out (skipped when out is nil).
func (c *Client) doJSON(ctx context.Context, r request, out any) error {
	resp, cancel, err := c.send(ctx, r)
	if err != nil {
		return err
	}
	defer cancel()
	defer resp.Body.Close()
	body, err := readCapped(resp.Body, c.maxJSON)
	if err != nil {
		return fmt.Errorf("comfy: %s %s: read body: %w", r.method, r.path, err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("comfy: %s %s: decode: %w", r.method, r.path, err)
	}
	return nil
}

// postJSON sends v as a JSON body and expects a 2xx with any (usually empty) body.
func (c *Client) postJSON(ctx context.Context, path string, v any) error {
	r := request{method: http.MethodPost, path: path, contentType: "application/json"}
	if v != nil {
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("comfy: POST %s: encode: %w", path, err)
		}
		r.body = bytes.NewReader(b)
	}
	return c.doJSON(ctx, r, nil)
}

func readCapped(r io.Reader, max int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, max+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("%w: more than %d bytes", ErrTooLarge, max)
	}
	return b, nil
}

// DefaultBackoff is exponential backoff with full jitter: a random delay in
// [d/2, d] where d = 250ms * 2^(attempt-1), capped at 30s.
func DefaultBackoff(attempt int) time.Duration {
	if attempt < 1 {
		attempt = 1
	}
	d := 250 * time.Millisecond
	for i := 1; i < attempt && d < 30*time.Second; i++ {
		d *= 2
	}
	d = min(d, 30*time.Second)
	var b [8]byte
	_, _ = rand.Read(b[:])
	var n uint64
	for _, x := range b {
		n = n<<8 | uint64(x)
	}
	half := d / 2
	return half + time.Duration(n%uint64(half+1))
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool { return naturalLess(keys[i], keys[j]) })
	return keys
}

// naturalLess orders node ids numerically where they are numbers ("2" < "10") and by text
// otherwise; digit runs compare by value, other runs by bytes ("12:3" < "12:10").
func naturalLess(a, b string) bool {
	for a != "" && b != "" {
		da, db := isDigit(a[0]), isDigit(b[0])
		switch {
		case da && db:
			na, ra := splitRun(a, true)
			nb, rb := splitRun(b, true)
			ta, tb := strings.TrimLeft(na, "0"), strings.TrimLeft(nb, "0")
			if len(ta) != len(tb) {
				return len(ta) < len(tb)
			}
			if ta != tb {
				return ta < tb
			}
			if len(na) != len(nb) { // same value, fewer leading zeros first
				return len(na) < len(nb)
			}
			a, b = ra, rb
		case da != db:
			return da // numbers before text
		default:
			ta, ra := splitRun(a, false)
			tb, rb := splitRun(b, false)
			if ta != tb {
				// Compare only the common prefix run-wise: "a" < "ab".
				return ta < tb
			}
			a, b = ra, rb
		}
	}
	return len(a) < len(b)
}

func isDigit(c byte) bool { return c >= '0' && c <= '9' }

func splitRun(s string, digits bool) (run, rest string) {
	i := 0
	for i < len(s) && isDigit(s[i]) == digits {
		i++
	}
	return s[:i], s[i:]
}

// errorsAsAPI returns the *APIError in err's chain, if any.
func errorsAsAPI(err error) (*APIError, bool) {
	var ae *APIError
	ok := errors.As(err, &ae)
	return ae, ok
}
