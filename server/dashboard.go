package server

import (
	_ "embed"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// dashboardHTML is the operator page: it holds no data itself. It asks for
// the admin key, keeps it in sessionStorage, and polls /api/v1/dashboard.
//
//go:embed dashboard.html
var dashboardHTML []byte

// dashboardScanLimit is how many jobs per frontend and state are counted when
// the JobService cannot count them itself.
const dashboardScanLimit = 500

func (s *Server) dashboard(c *fiber.Ctx) error {
	c.Set(fiber.HeaderContentType, fiber.MIMETextHTMLCharsetUTF8)
	c.Set(fiber.HeaderCacheControl, "no-store")
	c.Set(fiber.HeaderXFrameOptions, "DENY")
	c.Set(fiber.HeaderContentSecurityPolicy,
		"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:")
	return c.Send(dashboardHTML)
}

// dashboardView is GET /api/v1/dashboard (admin).
type dashboardView struct {
	Nodes []schema.NodeView `json:"nodes"`
	// Jobs maps each configured frontend to its job counts by state.
	Jobs map[string]map[schema.JobState]int `json:"jobs"`
	// Capped is true when counts come from a bounded scan and at least one
	// reached the bound (the true count is at least that).
	Capped bool   `json:"capped"`
	Error  string `json:"error,omitempty"`
}

func (s *Server) dashboardData(c *fiber.Ctx) error {
	ctx := c.UserContext()
	view := dashboardView{Nodes: []schema.NodeView{}, Jobs: map[string]map[schema.JobState]int{}}
	if s.deps.Nodes != nil {
		nodes, err := s.deps.Nodes.Nodes(ctx)
		if err != nil {
			return err
		}
		if nodes != nil {
			view.Nodes = nodes
		}
	}
	if s.deps.Jobs == nil {
		view.Error = "the job service is not running"
		return c.JSON(view)
	}
	if counter, ok := s.deps.Jobs.(JobCounter); ok {
		counts, err := counter.JobCounts(ctx)
		if err != nil {
			return err
		}
		if counts == nil {
			counts = map[string]map[schema.JobState]int{}
		}
		// Every configured frontend has a row, with or without jobs; jobs of a
		// frontend no longer configured keep theirs.
		for _, fe := range s.deps.Frontends.Names() {
			if counts[fe] == nil {
				counts[fe] = map[schema.JobState]int{}
				for _, st := range schema.JobStates {
					counts[fe][st] = 0
				}
			}
		}
		view.Jobs = counts
		return c.JSON(view)
	}
	for _, fe := range s.deps.Frontends.Names() {
		counts := map[schema.JobState]int{}
		for _, st := range []schema.JobState{schema.JobQueued, schema.JobDispatched, schema.JobRunning, schema.JobStoring} {
			jobs, err := s.deps.Jobs.Jobs(ctx, schema.JobFilter{Frontend: fe, State: st, Limit: dashboardScanLimit})
			if err != nil {
				return err
			}
			counts[st] = len(jobs)
			view.Capped = view.Capped || len(jobs) >= dashboardScanLimit
		}
		view.Jobs[fe] = counts
	}
	return c.JSON(view)
}
