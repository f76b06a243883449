// Package cluster carries what comfyfarm replicas sharing one control
// database tell each other, over Redis: every job's events (one Redis Stream
// per job, numbered atomically, so that any replica can publish and every
// replica relays them in one order and resumes them after a reconnect),
// notices (a submit or cancel taken by a follower, a node changed), and the
// leader's view of the nodes.
//
// Keys, under a prefix (default "comfyfarm:"):
//
//	ev:{job}   the job's stream: entry id "{seq}-1", field "e" = the event JSON
//	seq:{job}  the job's last sequence number
//	end:{job}  set once a terminal event was added: nothing follows it
//	nodes      the leader's node views (JSON), expiring after a few probe intervals
//	cat:{node} the node's catalogue as the leader read it (classes, choices)
//	events     pub/sub channel: every event as added
//	notices    pub/sub channel: notices
package cluster

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Notice kinds.
const (
	NoticeSubmitted = "submitted" // a job was queued on a replica: the leader schedules it
	NoticeCancel    = "cancel"    // a job was cancelled on a replica: the leader takes it off its node
	NoticeNodes     = "nodes"     // node registrations changed: every replica reads them again
	NoticeProbe     = "probe"     // an operator asked to probe Node now
	NoticeResigned  = "resigned"  // the leader stepped down: followers try the lease now
)

// Notice is a message from one replica to all (the sender included).
type Notice struct {
	Kind  string `json:"kind"`
	JobID string `json:"job_id,omitempty"`
	Node  string `json:"node,omitempty"`
	From  string `json:"from"` // the sending instance
}

// Options tune a Redis bus.
type Options struct {
	Prefix string        // key prefix; "comfyfarm:" when empty
	MaxLen int           // events kept per job stream (approximately); 256 when 0
	TTL    time.Duration // how long a job stream without a terminal event is kept after its last event; 24 h when 0
	Linger time.Duration // how long a finished job's stream is kept; 10 min when 0
	Logger *slog.Logger
}

// Redis is the bus between replicas.
type Redis struct {
	c      *redis.Client
	o      Options
	log    *slog.Logger
	script *redis.Script
	rates  *redis_rate.Limiter

	mu      sync.Mutex
	pending []outgoing    // events waiting to be added, in order
	wake    chan struct{} // the writer has work
	flushed *sync.Cond    // signalled when pending shrinks (for Flush)
	busy    int           // events taken by the writer, not yet written
	dropped int64         // droppable events dropped while too many waited
}

type outgoing struct {
	jobID string
	body  []byte // the event's JSON with seq 0
	term  bool
	store bool // false for previews: relayed live, never replayed
}

// publishScript numbers an event, adds it to its job's stream and relays it,
// in one atomic step: whichever replica publishes, every subscriber sees one
// order, and nothing is added after a terminal event.
//
// KEYS: stream, counter, end flag. ARGV: base seq, body (seq 0), terminal,
// maxlen, channel, ttl s, linger s, store.
const publishScript = `
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local seq
if ARGV[8] == '1' then
  redis.call('SETNX', KEYS[2], ARGV[1])
  seq = redis.call('INCR', KEYS[2])
else
  seq = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
end
-- Lua numbers are doubles: written out with %d, never as 1.7e+15.
local s = string.format('%d', seq)
local body = '{"seq":' .. s .. string.sub(ARGV[2], 9)
if ARGV[8] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[4], s .. '-1', 'e', body)
end
redis.call('PUBLISH', ARGV[5], body)
local ttl = ARGV[6]
if ARGV[3] == '1' then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[7])
  ttl = ARGV[7]
end
if ARGV[8] == '1' then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
end
return seq
`

// seqZeroPrefix is how every event's JSON starts before it is numbered.
const seqZeroPrefix = `{"seq":0`

// Open connects to the Redis at url (redis://[user:pass@]host:port/db).
func Open(ctx context.Context, url string, o Options) (*Redis, error) {
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("cluster.redis_url: %w", err)
	}
	// Redis is near the replicas and its calls are short: an unreachable
	// Redis is found out in a second or two, not in go-redis's defaults of
	// 5 s per dial and three retries (an API call waiting on a notice or a
	// stream read would wait that long). The URL's own settings win.
	if opt.DialTimeout == 0 {
		opt.DialTimeout = 2 * time.Second
	}
	if opt.ReadTimeout == 0 {
		opt.ReadTimeout = 2 * time.Second
	}
	if opt.WriteTimeout == 0 {
		opt.WriteTimeout = 2 * time.Second
	}
	if opt.MaxRetries == 0 {
		opt.MaxRetries = 1
	}
	return New(ctx, redis.NewClient(opt), o)
}

// New wraps a Redis client.
func New(ctx context.Context, c *redis.Client, o Options) (*Redis, error) {
	if o.Prefix == "" {
		o.Prefix = "comfyfarm:"
	}
	if o.MaxLen <= 0 {
		o.MaxLen = 256
	}
	if o.TTL <= 0 {
		o.TTL = 24 * time.Hour
	}
	if o.Linger <= 0 {
		o.Linger = 10 * time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	r := &Redis{c: c, o: o, log: o.Logger.With("component", "cluster"), script: redis.NewScript(publishScript), wake: make(chan struct{}, 1),
		rates: redis_rate.NewLimiter(c)}
	r.flushed = sync.NewCond(&r.mu)
	if err := c.Ping(ctx).Err(); err != nil {
		c.Close()
		return nil, fmt.Errorf("redis: %w", err)
	}
	if err := r.script.Load(ctx, c).Err(); err != nil {
		c.Close()
		return nil, fmt.Errorf("redis: load script: %w", err)
	}
	return r, nil
}

// Close closes the connection.
func (r *Redis) Close() error { return r.c.Close() }

// Ping checks that Redis answers.
func (r *Redis) Ping(ctx context.Context) error { return r.c.Ping(ctx).Err() }

func (r *Redis) key(kind, id string) string { return r.o.Prefix + kind + ":" + id }

// PublishEvent queues ev of jobID for the stream. It never blocks: events are
// written in the order of the calls by one writer (Run), retried while Redis
// is away. Delivery, to this replica too, comes back through Run's onEvent.
func (r *Redis) PublishEvent(jobID string, ev schema.Event) {
	ev.Seq, ev.JobID = 0, jobID
	body, err := json.Marshal(ev)
	if err != nil || !strings.HasPrefix(string(body), seqZeroPrefix) {
		r.log.Error("encode event", "job_id", jobID, "type", ev.Type, "err", err)
		return
	}
	r.mu.Lock()
	if len(r.pending) >= maxPending && ev.Type.Droppable() {
		// Redis has been away a while: progress and previews go, state
		// changes wait (a handful per job).
		r.dropped++
		r.mu.Unlock()
		return
	}
	r.pending = append(r.pending, outgoing{jobID: jobID, body: body, term: ev.Type.Terminal(), store: ev.Type != schema.EventPreview})
	r.mu.Unlock()
	select {
	case r.wake <- struct{}{}:
	default:
	}
}

// Flush waits until every event queued so far is written (or ctx ends).
func (r *Redis) Flush(ctx context.Context) error {
	stop := context.AfterFunc(ctx, func() {
		r.mu.Lock()
		r.flushed.Broadcast()
		r.mu.Unlock()
	})
	defer stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for len(r.pending) > 0 || r.busy > 0 {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r.flushed.Wait()
	}
	return nil
}

// maxBatch bounds the events written in one pipeline.
const maxBatch = 512

// maxPending is how many events may wait for Redis before droppable ones
// (progress, previews) are dropped.
const maxPending = 10000

// writeLoop writes queued events until ctx ends.
func (r *Redis) writeLoop(ctx context.Context) {
	wait := 50 * time.Millisecond
	for {
		r.mu.Lock()
		n := min(len(r.pending), maxBatch)
		batch := r.pending[:n:n]
		r.busy = n
		r.mu.Unlock()
		if n == 0 {
			select {
			case <-ctx.Done():
				return
			case <-r.wake:
				continue
			}
		}
		err := r.write(ctx, batch)
		r.mu.Lock()
		if err == nil {
			r.pending = r.pending[n:]
			if len(r.pending) == 0 {
				r.pending = nil
			}
		}
		r.busy = 0
		r.flushed.Broadcast()
		r.mu.Unlock()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			r.mu.Lock()
			dropped := r.dropped
			r.mu.Unlock()
			r.log.Warn("publish events, retrying", "events", n, "progress_dropped", dropped, "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
			wait = min(2*wait, 2*time.Second)
			continue
		}
		wait = 50 * time.Millisecond
	}
}

// write runs one batch in a pipeline, in order. A batch retried after its
// answer was lost may add some of its events twice, under new numbers: a
// repeated state event restates, it never contradicts, and a repeated
// terminal event is refused by the end flag.
func (r *Redis) write(ctx context.Context, batch []outgoing) error {
	now := strconv.FormatInt(time.Now().UnixMilli()*1000, 10)
	ttl := strconv.Itoa(int(r.o.TTL / time.Second))
	linger := strconv.Itoa(int(r.o.Linger / time.Second))
	maxLen := strconv.Itoa(r.o.MaxLen)
	channel := r.o.Prefix + "events"
	run := func() ([]redis.Cmder, error) {
		return r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, o := range batch {
				term, store := "0", "0"
				if o.term {
					term = "1"
				}
				if o.store {
					store = "1"
				}
				r.script.EvalSha(ctx, p,
					[]string{r.key("ev", o.jobID), r.key("seq", o.jobID), r.key("end", o.jobID)},
					now, string(o.body), term, maxLen, channel, ttl, linger, store)
			}
			return nil
		})
	}
	cmds, err := run()
	if err != nil && isNoScript(cmds) {
		// Redis restarted and forgot the script: nothing of the batch ran.
		if lerr := r.script.Load(ctx, r.c).Err(); lerr != nil {
			return lerr
		}
		_, err = run()
	}
	return err
}

func isNoScript(cmds []redis.Cmder) bool {
	for _, c := range cmds {
		if err := c.Err(); err != nil && strings.HasPrefix(err.Error(), "NOSCRIPT") {
			return true
		}
	}
	return false
}

// EventsAfter returns the events of jobID's stream numbered after seq, in
// order (previews are never kept).
func (r *Redis) EventsAfter(ctx context.Context, jobID string, after int64) ([]schema.Event, error) {
	msgs, err := r.c.XRange(ctx, r.key("ev", jobID), strconv.FormatInt(after+1, 10), "+").Result()
	if err != nil {
		return nil, err
	}
	return decodeStream(msgs), nil
}

// EventsOf returns each job's kept events, in order, in one round trip.
func (r *Redis) EventsOf(ctx context.Context, jobIDs []string) ([][]schema.Event, error) {
	cmds := make([]*redis.XMessageSliceCmd, len(jobIDs))
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for i, id := range jobIDs {
			cmds[i] = p.XRange(ctx, r.key("ev", id), "-", "+")
		}
		return nil
	})
	if err != nil && !errors.Is(err, redis.Nil) {
		return nil, err
	}
	out := make([][]schema.Event, len(jobIDs))
	for i, c := range cmds {
		out[i] = decodeStream(c.Val())
	}
	return out, nil
}

// decodeStream reads the events of a job's stream entries.
func decodeStream(msgs []redis.XMessage) []schema.Event {
	out := make([]schema.Event, 0, len(msgs))
	for _, m := range msgs {
		s, _ := m.Values["e"].(string)
		var ev schema.Event
		if err := json.Unmarshal([]byte(s), &ev); err != nil {
			continue
		}
		out = append(out, ev)
	}
	return out
}

// Notify sends n to every replica.
func (r *Redis) Notify(ctx context.Context, n Notice) error {
	b, err := json.Marshal(n)
	if err != nil {
		return err
	}
	return r.c.Publish(ctx, r.o.Prefix+"notices", b).Err()
}

// PutNodes stores the leader's node views for ttl.
func (r *Redis) PutNodes(ctx context.Context, views []byte, ttl time.Duration) error {
	return r.c.Set(ctx, r.o.Prefix+"nodes", views, ttl).Err()
}

// PutCatalogue stores what the leader read of a node's /object_info (its
// catalogue, encoded by the caller), for replicas that check submits.
func (r *Redis) PutCatalogue(ctx context.Context, node string, b []byte) error {
	sum := sha256.Sum256(b)
	_, err := r.c.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.Set(ctx, r.key("cat", node), b, r.o.TTL)
		p.Set(ctx, r.key("catsum", node), sum[:], r.o.TTL)
		return nil
	})
	return err
}

// CatalogueSums reads the SHA-256 of each node's catalogue, as PutCatalogue
// wrote it with the catalogue: a replica reads a catalogue again only when
// its sum changed. A node without one has nil.
func (r *Redis) CatalogueSums(ctx context.Context, nodes []string) ([][]byte, error) {
	if len(nodes) == 0 {
		return nil, nil
	}
	keys := make([]string, len(nodes))
	for i, n := range nodes {
		keys[i] = r.key("catsum", n)
	}
	vals, err := r.c.MGet(ctx, keys...).Result()
	if err != nil {
		return nil, err
	}
	out := make([][]byte, len(nodes))
	for i, v := range vals {
		if s, ok := v.(string); ok {
			out[i] = []byte(s)
		}
	}
	return out, nil
}

// Catalogue reads a node's catalogue; nil when none is there.
func (r *Redis) Catalogue(ctx context.Context, node string) ([]byte, error) {
	b, err := r.c.Get(ctx, r.key("cat", node)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

// Nodes reads the leader's node views; nil when none are there.
func (r *Redis) Nodes(ctx context.Context) ([]byte, error) {
	b, err := r.c.Get(ctx, r.o.Prefix+"nodes").Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	return b, err
}

// Handlers receive what Run reads. They run on Run's goroutine, in order.
type Handlers struct {
	Event  func(schema.Event)
	Notice func(Notice)
	// Resync is called after the subscription was (re)established: messages
	// sent while it was down are lost, and whatever depends on them must be
	// read again (streams from EventsAfter, notices from the database).
	Resync func()
}

// Run writes queued events and delivers events and notices to h until ctx
// ends. Ready is closed once the subscription is established.
func (r *Redis) Run(ctx context.Context, h Handlers, ready chan<- struct{}) error {
	ps := r.c.Subscribe(ctx, r.o.Prefix+"events", r.o.Prefix+"notices")
	defer ps.Close()
	// A blocked read does not watch ctx: closing the subscription ends it.
	stopClose := context.AfterFunc(ctx, func() { ps.Close() })
	defer stopClose()
	wctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	wg.Go(func() { r.writeLoop(wctx) })
	defer func() {
		// Events queued before the end are written, within reason.
		fctx, fcancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = r.Flush(fctx)
		fcancel()
		cancel()
		wg.Wait()
	}()
	events, notices := r.o.Prefix+"events", r.o.Prefix+"notices"
	subscribed := 0
	for {
		msg, err := ps.Receive(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			// go-redis reconnects and subscribes again by itself.
			r.log.Warn("redis subscription", "err", err)
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind != "subscribe" {
				continue
			}
			subscribed++
			if subscribed == 2 && ready != nil {
				close(ready)
				ready = nil
			} else if subscribed > 2 && h.Resync != nil {
				h.Resync()
			}
		case *redis.Message:
			switch m.Channel {
			case events:
				var ev schema.Event
				if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil {
					r.log.Warn("unreadable event on the bus", "err", err)
					continue
				}
				if h.Event != nil {
					h.Event(ev)
				}
			case notices:
				var n Notice
				if err := json.Unmarshal([]byte(m.Payload), &n); err != nil {
					r.log.Warn("unreadable notice on the bus", "err", err)
					continue
				}
				if h.Notice != nil {
					h.Notice(n)
				}
			}
		}
	}
}
