package server

import (
	"context"
	"net/http"
	"sync"
	"time"

	"github.com/gofiber/fiber/v2"
)

// RoleReporter is a scheduler that says whether it leads the farm
// ("leader" or "follower") and which instance does.
type RoleReporter interface {
	Role() (role, leader string)
}

// readyTimeout bounds all of /readyz's checks together.
const readyTimeout = 5 * time.Second

// healthz says the process is alive; it checks nothing else.
func (s *Server) healthz(c *fiber.Ctx) error {
	c.Set(fiber.HeaderCacheControl, "no-store")
	return c.JSON(fiber.Map{"status": "ok", "version": s.cfg.Version})
}

// readyz checks, in parallel, the control database, every frontend database,
// storage and the scheduler (started): 200 when all answer, 503 not_ready
// naming the failing ones.
func (s *Server) readyz(c *fiber.Ctx) error {
	ctx, cancel := context.WithTimeout(c.UserContext(), readyTimeout)
	defer cancel()
	checks := map[string]Pinger{"frontends": s.deps.Frontends}
	if s.deps.Control != nil {
		checks["control_db"] = s.deps.Control
	}
	if s.deps.Store != nil {
		checks["storage"] = s.deps.Store
	}
	if s.deps.Scheduler != nil {
		checks["scheduler"] = s.deps.Scheduler
	}
	var (
		mu      sync.Mutex
		wg      sync.WaitGroup
		results = map[string]string{}
		failed  = false
	)
	for name, p := range checks {
		wg.Go(func() {
			res := "ok"
			if err := p.Ping(ctx); err != nil {
				res = "failed" // the reason is logged, not shown to anyone who asks
				s.log.Warn("readiness check failed", "check", name, "err", err)
			}
			mu.Lock()
			defer mu.Unlock()
			results[name] = res
			failed = failed || res != "ok"
		})
	}
	wg.Wait()
	c.Set(fiber.HeaderCacheControl, "no-store")
	if failed {
		details := make(map[string]any, len(results))
		for k, v := range results {
			details[k] = v
		}
		return &apiError{Status: http.StatusServiceUnavailable, Code: "not_ready", Message: "not ready", Details: details}
	}
	body := fiber.Map{"status": "ok", "checks": results}
	if r, ok := s.deps.Scheduler.(RoleReporter); ok {
		// With several replicas: whether this one schedules, and which does.
		role, leader := r.Role()
		body["role"], body["leader"] = role, leader
	}
	return c.JSON(body)
}
