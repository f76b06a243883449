package webhook

import (
	"fmt"
	"slices"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Endpoint is one frontend's webhook (frontends.<f>.webhook).
type Endpoint struct {
	// URL receives the frontend's job events; empty: only jobs that give
	// their own webhook_url are announced.
	URL string
	// Key signs every message of the frontend (DecodeSecret of the
	// configured secret); required.
	Key []byte
	// Events are the final states announced; empty: all of them.
	Events []schema.JobState
}

// Targets decides where a job's events go: its own webhook_url (checked
// against the allow list at submit) or its frontend's webhook.url, for the
// events the frontend asked for.
type Targets struct {
	endpoints map[string]Endpoint
	allow     AllowList
}

// NewTargets checks the endpoints and builds the decision. Frontends without
// an entry send no webhooks and may not give a webhook_url.
func NewTargets(endpoints map[string]Endpoint, allow AllowList) (*Targets, error) {
	t := &Targets{endpoints: make(map[string]Endpoint, len(endpoints)), allow: allow}
	for name, e := range endpoints {
		if len(e.Key) < minSecretBytes {
			return nil, fmt.Errorf("frontend %s: webhook secret shorter than %d bytes", name, minSecretBytes)
		}
		if e.URL != "" {
			if _, err := ParseURL(e.URL); err != nil {
				return nil, fmt.Errorf("frontend %s: webhook url: %w", name, err)
			}
		}
		for _, ev := range e.Events {
			if !slices.Contains(schema.WebhookEvents, ev) {
				return nil, fmt.Errorf("frontend %s: webhook event %q is not one of succeeded, failed, cancelled", name, ev)
			}
		}
		if len(e.Events) == 0 {
			e.Events = schema.WebhookEvents
		}
		t.endpoints[name] = e
	}
	return t, nil
}

// URLFor is dbcontrollers.Store.WebhookURLFunc: the address a job that has
// just ended is announced to, or "" for none.
func (t *Targets) URLFor(j *schema.Job) string {
	e, ok := t.endpoints[j.Frontend]
	if !ok || !slices.Contains(e.Events, j.State) {
		return ""
	}
	if j.WebhookURL != "" {
		return j.WebhookURL
	}
	return e.URL
}

// Key returns the signing key of a frontend; nil when it has no webhook.
func (t *Targets) Key(frontend string) []byte {
	return t.endpoints[frontend].Key
}

// CheckJobURL validates a job's own webhook_url at submit: the frontend must
// have a webhook (its secret signs the messages) and the host must be in the
// allow list. Refusals are *schema.ValidationError for webhook_url.
func (t *Targets) CheckJobURL(frontend, raw string) error {
	if _, ok := t.endpoints[frontend]; !ok {
		if _, err := ParseURL(raw); err != nil {
			return err
		}
		return schema.Invalid("webhook_url", "frontend %s has no webhook secret configured (frontends.%s.webhook.secret)", frontend, frontend)
	}
	return t.allow.Check(raw)
}
