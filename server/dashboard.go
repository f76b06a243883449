package server

import (
	"embed"
	"mime"
	"path"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// dashboardFS is the operator page and its script and style: plain files,
// no build step, nothing from another origin. The page holds no data
// itself. It asks for the admin key, keeps it in sessionStorage, and calls
// the /api/v1/dashboard routes, the node routes and a job's own routes.
//
//go:embed dashboard/index.html dashboard/app.js dashboard/charts.js dashboard/style.css
var dashboardFS embed.FS

// dashboardCSP allows scripts, styles and requests of this origin only;
// images may also be data: URLs (previews) and come from another origin
// (outputs in object storage).
const dashboardCSP = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; " +
	"img-src 'self' data: https: http:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// dashboardScanLimit is how many jobs per frontend and state are counted when
// the JobService cannot count them itself.
const dashboardScanLimit = 500

func (s *Server) dashboard(c *fiber.Ctx) error {
	return s.sendDashboardFile(c, "index.html")
}

// dashboardAsset serves GET /dashboard/assets/{file}.
func (s *Server) dashboardAsset(c *fiber.Ctx) error {
	name, err := param(c, "file")
	if err != nil {
		return err
	}
	if name == "index.html" || path.Base(name) != name {
		return schema.ErrNotFound
	}
	return s.sendDashboardFile(c, name)
}

func (s *Server) sendDashboardFile(c *fiber.Ctx, name string) error {
	b, err := dashboardFS.ReadFile("dashboard/" + name)
	if err != nil {
		return schema.ErrNotFound
	}
	ct := mime.TypeByExtension(path.Ext(name))
	if ct == "" {
		ct = fiber.MIMEOctetStream
	}
	c.Set(fiber.HeaderContentType, ct)
	c.Set(fiber.HeaderCacheControl, "no-cache")
	c.Set(fiber.HeaderXContentTypeOptions, "nosniff")
	c.Set(fiber.HeaderXFrameOptions, "DENY")
	c.Set(fiber.HeaderContentSecurityPolicy, dashboardCSP)
	c.Set(fiber.HeaderReferrerPolicy, "no-referrer")
	return c.Send(b)
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
