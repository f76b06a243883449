package cluster

import (
	"context"
	"time"

	"github.com/go-redis/redis_rate/v10"
)

// Allow spends one request of a rate limit shared by every replica on this
// Redis: key may make perMinute requests a minute, up to perMinute at once,
// then one every 60/perMinute seconds — the token bucket each replica keeps
// alone, counted once for the farm (GCRA on Redis's clock, by
// go-redis/redis_rate, in one script call). When the request may not be
// made, wait says how long until one may. An error says Redis did not
// answer: the caller decides alone.
func (r *Redis) Allow(ctx context.Context, key string, perMinute int) (ok bool, wait time.Duration, err error) {
	if perMinute <= 0 {
		return true, 0, nil
	}
	res, err := r.rates.Allow(ctx, r.o.Prefix+key, redis_rate.PerMinute(perMinute))
	if err != nil {
		return false, 0, err
	}
	if res.Allowed > 0 {
		return true, 0, nil
	}
	return false, max(res.RetryAfter, time.Millisecond), nil
}
