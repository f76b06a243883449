package server

import (
	"context"
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
	"golang.org/x/time/rate"
)

// SharedRates counts rate limits across replicas (cluster.Redis does).
type SharedRates interface {
	// Allow spends one of key's perMinute requests a minute (a burst of
	// perMinute) and says whether it could, and if not, how long until it
	// may. An error says the count could not be reached.
	Allow(ctx context.Context, key string, perMinute int) (ok bool, wait time.Duration, err error)
}

// sharedRatesTimeout bounds one call to the shared count: past it (or after
// an error) the replica decides alone, and keeps deciding alone for
// sharedRatesBackoff, so that an absent Redis adds no wait to requests.
const (
	sharedRatesTimeout = 250 * time.Millisecond
	sharedRatesBackoff = 5 * time.Second
)

// limitKind names what a bucket counts.
type limitKind uint8

const (
	limitRequests limitKind = iota // every keyed request (Config.RatePerMinute)
	limitSubmits                   // POST /jobs (Config.SubmitPerMinute)
	limitKinds
)

func (k limitKind) String() string {
	if k == limitSubmits {
		return "job submissions"
	}
	return "requests"
}

// bucketIdle is how long a bucket may go unused before it is dropped. A
// bucket of N per minute refills completely within one minute, so a bucket
// idle this long is full, and dropping it (a new one starts full) changes
// nothing a client can observe.
const bucketIdle = 10 * time.Minute

type bucketKey struct {
	key  int // the API key's index in the keyring
	kind limitKind
}

type bucket struct {
	lim  *rate.Limiter
	last time.Time // last use, for eviction
}

// limiter holds one token bucket per API key and kind. A kind allows N
// requests per minute with a burst of N: a key may spend a minute's worth at
// once, then one more every 60/N seconds. Buckets unused for idle are swept
// lazily, at most once per idle, while serving; only authenticated keys get a
// bucket, so the map holds at most two buckets per configured key.
type limiter struct {
	perMinute [limitKinds]int // 0: that kind is not limited
	idle      time.Duration

	mu        sync.Mutex
	buckets   map[bucketKey]*bucket
	nextSweep time.Time
}

func newLimiter(requestsPerMinute, submitsPerMinute int, idle time.Duration) *limiter {
	l := &limiter{idle: idle, buckets: map[bucketKey]*bucket{}}
	l.perMinute[limitRequests] = requestsPerMinute
	l.perMinute[limitSubmits] = submitsPerMinute
	return l
}

// allow takes one token from the bucket of key and kind at now. When there is
// none it takes nothing and returns false with the wait until one is there.
func (l *limiter) allow(key int, kind limitKind, now time.Time) (bool, time.Duration) {
	n := l.perMinute[kind]
	if n <= 0 {
		return true, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sweep(now)
	k := bucketKey{key: key, kind: kind}
	b := l.buckets[k]
	if b == nil {
		b = &bucket{lim: rate.NewLimiter(rate.Limit(float64(n)/60), n)}
		l.buckets[k] = b
	}
	if now.After(b.last) {
		b.last = now
	}
	r := b.lim.ReserveN(now, 1)
	if !r.OK() { // cannot happen with a burst of at least 1
		return false, time.Minute
	}
	if wait := r.DelayFrom(now); wait > 0 {
		r.CancelAt(now)
		return false, wait
	}
	return true, 0
}

// sweep drops the buckets unused for l.idle, at most once per l.idle.
// l.mu is held.
func (l *limiter) sweep(now time.Time) {
	if now.Before(l.nextSweep) {
		return
	}
	l.nextSweep = now.Add(l.idle)
	for k, b := range l.buckets {
		if now.Sub(b.last) >= l.idle {
			delete(l.buckets, k)
		}
	}
}

// size is the number of buckets held.
func (l *limiter) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.buckets)
}

// limit spends one token of who's bucket of kind, or answers 429 rate_limited
// with Retry-After. The admin key is never limited. With replicas sharing a
// count (Deps.Rates) the key's budget is the farm's, not each replica's;
// while the count cannot be reached each replica keeps its own, so the API
// never waits on it nor goes unlimited.
func (s *Server) limit(c *fiber.Ctx, who principal, kind limitKind) error {
	if who.admin || s.limiter.perMinute[kind] <= 0 {
		return nil
	}
	ok, wait, shared := s.allowShared(c.UserContext(), who, kind)
	if !shared {
		ok, wait = s.limiter.allow(who.key, kind, s.cfg.NowFunc())
	}
	if ok {
		return nil
	}
	secs := int(math.Ceil(wait.Seconds()))
	if secs < 1 {
		secs = 1
	}
	c.Set(fiber.HeaderRetryAfter, strconv.Itoa(secs))
	return newAPIError(http.StatusTooManyRequests, "rate_limited",
		fmt.Sprintf("rate limit exceeded: this key may make %d %s per minute", s.limiter.perMinute[kind], kind)).
		with("retry_after_seconds", secs)
}

// allowShared asks the shared count, unless there is none or it failed
// within the last sharedRatesBackoff; shared is false when it did not answer.
func (s *Server) allowShared(ctx context.Context, who principal, kind limitKind) (ok bool, wait time.Duration, shared bool) {
	if s.deps.Rates == nil || time.Now().UnixNano() < s.ratesDownUntil.Load() {
		return false, 0, false
	}
	cctx, cancel := context.WithTimeout(ctx, sharedRatesTimeout)
	defer cancel()
	ok, wait, err := s.deps.Rates.Allow(cctx, s.keys.entries[who.key].rateKeys[kind], s.limiter.perMinute[kind])
	if err != nil {
		if ctx.Err() != nil {
			return false, 0, false // the request ended, not the count
		}
		s.ratesDownUntil.Store(time.Now().Add(sharedRatesBackoff).UnixNano())
		s.log.Warn("shared rate limits unreachable, this replica counts alone for a while", "backoff", sharedRatesBackoff, "err", err)
		return false, 0, false
	}
	return ok, wait, true
}

// limitSubmit follows authenticate on POST /jobs: the key's submit limit.
func (s *Server) limitSubmit(c *fiber.Ctx) error {
	if err := s.limit(c, principalOf(c), limitSubmits); err != nil {
		return err
	}
	return c.Next()
}
