package server

import (
	"context"
	"encoding/json"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// WebhookService is what the server needs for job webhooks.
type WebhookService interface {
	// CheckJobURL validates a submitted webhook_url for a frontend: a
	// *schema.ValidationError for webhook_url when refused.
	CheckJobURL(frontend, rawURL string) error
	// Deliveries lists a job's webhook deliveries with their attempts.
	Deliveries(ctx context.Context, jobID string) ([]schema.WebhookDelivery, error)
}

// checkWebhookURL refuses a webhook_url the frontend may not use; without a
// WebhookService every one is refused.
func (s *Server) checkWebhookURL(frontend, raw string) error {
	if raw == "" {
		return nil
	}
	if s.deps.Webhooks == nil {
		return schema.Invalid("webhook_url", "webhooks are not enabled")
	}
	return s.deps.Webhooks.CheckJobURL(frontend, raw)
}

// jobWebhooks is GET /api/v1/jobs/{id}/webhooks: the job's deliveries and
// every attempt (frontend key: its own jobs; admin: with ?frontend=).
func (s *Server) jobWebhooks(c *fiber.Ctx) error {
	jobs, err := s.jobService()
	if err != nil {
		return err
	}
	id, err := jobID(c)
	if err != nil {
		return err
	}
	frontend, err := s.frontendName(c, "")
	if err != nil {
		return err
	}
	// The job must be the frontend's: another frontend's is not found.
	if _, err := jobs.Job(c.UserContext(), frontend, id); err != nil {
		return err
	}
	list := []schema.WebhookDelivery{}
	if s.deps.Webhooks != nil {
		if list, err = s.deps.Webhooks.Deliveries(c.UserContext(), id); err != nil {
			return err
		}
	}
	if list == nil {
		list = []schema.WebhookDelivery{}
	}
	return c.JSON(list)
}

// JobView renders a job as GET /api/v1/jobs/{id} shows it (outputs with
// their URLs): the body of its webhooks.
func (s *Server) JobView(ctx context.Context, j *schema.Job) ([]byte, error) {
	v := *j
	v.Outputs = append([]schema.Output(nil), j.Outputs...)
	if err := s.outputURLs(ctx, &v); err != nil {
		return nil, err
	}
	return json.Marshal(&v)
}
