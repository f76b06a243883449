// Package redistest gives tests the Redis to run cluster cases on.
//
// The address comes from COMFYFARM_TEST_REDIS_URL (default
// "redis://127.0.0.1:6379/0"). When it cannot be reached the test is skipped
// with a message, unless COMFYFARM_REQUIRE_REDIS=1, which fails it instead.
// Every test gets its own key prefix, whose keys are deleted when it ends.
package redistest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Environment variables read by this package.
const (
	EnvRedisURL     = "COMFYFARM_TEST_REDIS_URL"
	EnvRequireRedis = "COMFYFARM_REQUIRE_REDIS"
	DefaultRedisURL = "redis://127.0.0.1:6379/0"
)

// URL returns the Redis URL and a fresh key prefix for t, or skips t (fails
// it when Redis is required) when Redis does not answer.
func URL(t testing.TB) (url, prefix string) {
	t.Helper()
	url = os.Getenv(EnvRedisURL)
	if url == "" {
		url = DefaultRedisURL
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatalf("%s: %v", EnvRedisURL, err)
	}
	c := redis.NewClient(opt)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	if err := c.Ping(ctx).Err(); err != nil {
		c.Close()
		if os.Getenv(EnvRequireRedis) == "1" {
			t.Fatalf("Redis at %s is required (%s=1) but does not answer: %v", url, EnvRequireRedis, err)
		}
		t.Skipf("Redis at %s does not answer (%v); set %s to one", url, err, EnvRedisURL)
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	prefix = "cftest:" + hex.EncodeToString(b[:]) + ":"
	t.Cleanup(func() {
		defer c.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		iter := c.Scan(ctx, 0, prefix+"*", 1000).Iterator()
		var keys []string
		for iter.Next(ctx) {
			keys = append(keys, iter.Val())
		}
		if len(keys) > 0 {
			c.Del(ctx, keys...)
		}
	})
	return url, prefix
}
