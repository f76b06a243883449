package server

import (
	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Dashboard job list bounds.
const (
	dashboardJobLimit    = 50
	maxDashboardJobLimit = 200
)

// dashboardJobs is GET /api/v1/dashboard/jobs (admin): jobs of every
// frontend, newest first, filtered by frontend, state, user_id and node;
// before=ID pages on.
func (s *Server) dashboardJobs(c *fiber.Ctx) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	f := schema.JobFilter{
		Frontend: query(c, "frontend"),
		UserID:   query(c, "user_id"),
		State:    schema.JobState(query(c, "state")),
		Node:     query(c, "node"),
		Before:   query(c, "before"),
	}
	// A frontend no longer configured may still have jobs: only the form of
	// the name is checked.
	if f.Frontend != "" && !schema.ValidFrontendName(f.Frontend) {
		return schema.Invalid("frontend", "must match ^[a-z][a-z0-9_]{0,31}$")
	}
	if f.UserID != "" {
		if err := checkUserID("user_id", f.UserID); err != nil {
			return err
		}
	}
	if f.State != "" && !f.State.Valid() {
		return schema.Invalid("state", "unknown state %q", string(f.State))
	}
	if f.Node != "" && !nodeName.MatchString(f.Node) {
		return schema.Invalid("node", "must match %s", nodeName.String())
	}
	if err := checkJobID("before", f.Before, true); err != nil {
		return err
	}
	if f.Limit, err = intQuery(c, "limit", dashboardJobLimit, 1, maxDashboardJobLimit); err != nil {
		return err
	}
	return s.answerJobs(c, jobs, f)
}

// dashboardSamples is GET /api/v1/dashboard/samples (admin): the sampler's
// ring and the series the charts draw.
func (s *Server) dashboardSamples(c *fiber.Ctx) error {
	if s.deps.Samples == nil {
		return c.JSON(SamplesView{Samples: []Sample{}, FinishedPerMinute: []FinishedBucket{}, Busy: map[string][]float64{}})
	}
	return c.JSON(s.deps.Samples.View())
}

// nodeUpdateBody is PATCH /nodes/{name}.
type nodeUpdateBody struct {
	MaxInflight *int      `json:"max_inflight"`
	Tags        *[]string `json:"tags"`
}

func (b *nodeUpdateBody) update() (schema.NodeUpdate, error) {
	var p schema.NodeUpdate
	if b.MaxInflight == nil && b.Tags == nil {
		return p, schema.Invalid("max_inflight", "give max_inflight or tags")
	}
	if b.MaxInflight != nil {
		if err := checkMaxInflight(*b.MaxInflight); err != nil {
			return p, err
		}
		p.MaxInflight = b.MaxInflight
	}
	if b.Tags != nil {
		if err := checkNodeTags(*b.Tags); err != nil {
			return p, err
		}
		p.Tags = append([]string{}, *b.Tags...) // [] clears, never nil
	}
	return p, nil
}

// nodeUpdate changes a node's max_inflight and tags.
func (s *Server) nodeUpdate(c *fiber.Ctx) error {
	nodes, err := s.nodeService()
	if err != nil {
		return err
	}
	name, err := nodeParam(c)
	if err != nil {
		return err
	}
	var b nodeUpdateBody
	if err := decodeJSON(c, &b); err != nil {
		return err
	}
	p, err := b.update()
	if err != nil {
		return err
	}
	v, err := nodes.NodeUpdate(c.UserContext(), name, p)
	if err != nil {
		return err
	}
	return c.JSON(v)
}
