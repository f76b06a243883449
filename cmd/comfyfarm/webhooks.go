package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"maps"
	"os"
	"slices"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

// openWebhooks builds the webhook targets from frontends.<f>.webhook and
// webhooks.allow, and has the control store write a job's outbox row with
// its final state. It runs before the farm, which writes those states.
func (a *app) openWebhooks() error {
	allow, err := webhook.ParseAllowList(a.cfg.Webhooks.Allow)
	if err != nil {
		return fmt.Errorf("webhooks.allow: %w", err)
	}
	endpoints := map[string]webhook.Endpoint{}
	for _, name := range slices.Sorted(maps.Keys(a.cfg.Frontends)) {
		w := a.cfg.Frontends[name].Webhook
		if w.Secret == "" {
			continue
		}
		key, err := webhook.DecodeSecret(w.Secret)
		if err != nil {
			return fmt.Errorf("frontends.%s.webhook.secret: %w", name, err)
		}
		e := webhook.Endpoint{URL: w.URL, Key: key}
		for _, ev := range w.Events {
			e.Events = append(e.Events, schema.JobState(ev))
		}
		endpoints[name] = e
	}
	if a.webhookTargets, err = webhook.NewTargets(endpoints, allow); err != nil {
		return fmt.Errorf("webhooks: %w", err)
	}
	a.controlStore.WebhookURLFunc = a.webhookTargets.URLFor
	return nil
}

// startWebhooks adds the deliverer to the workers; the server renders the
// bodies, so it runs after the server is built.
func (a *app) startWebhooks() error {
	cfg := a.cfg.Webhooks
	d, err := webhook.New(webhook.Config{
		Owner:        webhookOwner(a.cfg.Scheduler.InstanceID),
		Concurrency:  cfg.Concurrency,
		PerFrontend:  cfg.PerFrontend,
		Timeout:      cfg.Timeout,
		MaxAge:       cfg.MaxAge,
		Backoff:      cfg.Backoff,
		PollInterval: cfg.PollInterval,
		Logger:       a.log.With("component", "webhooks"),
		ViewFunc:     a.server.JobView,
	}, a.controlStore, a.webhookTargets)
	if err != nil {
		return err
	}
	for _, c := range d.Collectors() {
		if err := a.metrics.Register(c); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
	}
	a.workers = append(a.workers, d.Run)
	return nil
}

// webhookOwner names this process's outbox leases: the instance id (or host
// name) and a random part, so two processes on one host never share one.
func webhookOwner(instance string) string {
	if instance == "" {
		instance, _ = os.Hostname()
	}
	var b [6]byte
	_, _ = rand.Read(b[:])
	return fmt.Sprintf("%s/%d-%s", instance, os.Getpid(), hex.EncodeToString(b[:]))
}

// webhookService answers the server's webhook questions.
type webhookService struct {
	targets *webhook.Targets
	store   *dbcontrollers.Store
}

func (w webhookService) CheckJobURL(frontend, raw string) error {
	return w.targets.CheckJobURL(frontend, raw)
}

func (w webhookService) Deliveries(ctx context.Context, jobID string) ([]schema.WebhookDelivery, error) {
	return w.store.WebhookList(ctx, jobID)
}
