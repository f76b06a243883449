package main

import (
	"context"
	"fmt"

	"github.com/comfyfarm/comfyfarm/comfy/cluster"
	"github.com/comfyfarm/comfyfarm/comfy/dispatch"
	"github.com/comfyfarm/comfyfarm/schema"
)

// openFarm wires the node registry and the farm (scheduler, runners, event
// hub) and adds both to the workers run beside the HTTP server.
func (a *app) openFarm(ctx context.Context) error {
	cfg := a.cfg
	store := a.controlStore
	nodes := dispatch.NewNodes(store, dispatch.ProbeConfig{
		Interval:     cfg.Scheduler.ProbeInterval,
		Timeout:      cfg.Probe.Timeout,
		Allow:        cfg.Probe.Allow,
		FailureLimit: cfg.Scheduler.NodeFailureLimit,
	}, a.log.With("component", "nodes"))
	list := make([]schema.Node, 0, len(cfg.Nodes))
	for _, n := range cfg.Nodes {
		list = append(list, schema.Node{Name: n.Name, URL: n.URL, Tags: n.Tags, MaxInflight: n.MaxInflight})
	}
	if err := nodes.Load(ctx, list); err != nil {
		return fmt.Errorf("nodes: %w", err)
	}
	weights := map[string]int{}
	for name, f := range cfg.Frontends {
		if f.Weight > 0 {
			weights[name] = f.Weight
		}
	}
	fc := dispatch.FarmConfig{
		InstanceID:        cfg.Scheduler.InstanceID,
		MaxAttempts:       cfg.Scheduler.MaxAttempts,
		StallTimeout:      cfg.Scheduler.StallTimeout,
		JobTimeout:        cfg.Scheduler.JobTimeout,
		MaxInputBytes:     int64(cfg.Limits.MaxUploadMB) << 20,
		MaxImagePixels:    cfg.Limits.MaxImagePixels,
		MaxGraphNodes:     cfg.Limits.MaxGraphNodes,
		CatalogueInterval: cfg.Probe.CatalogueInterval,
		Weights:           weights,
		Logger:            a.log,
		LeaderLease:       cfg.Scheduler.LeaderLease,
	}
	if cfg.Cluster.RedisURL != "" {
		// One of several replicas: the farm probes and schedules only
		// while it holds the scheduler's lease (it runs the prober then).
		bus, err := cluster.Open(ctx, cfg.Cluster.RedisURL, cluster.Options{Prefix: cfg.Cluster.RedisPrefix, Logger: a.log})
		if err != nil {
			return err
		}
		a.closers = append(a.closers, bus.Close)
		fc.Bus, a.bus = bus, bus
	}
	farm := dispatch.NewFarm(fc, store, a.registry, a.store, nodes)
	for _, c := range append(nodes.Collectors(), farm.Collectors()...) {
		if err := a.metrics.Register(c); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
	}
	a.farm, a.jobs, a.nodes = farm, farm, farm
	if fc.Bus == nil {
		a.workers = append(a.workers, nodes.Run)
	}
	a.workers = append(a.workers, farm.Run)
	return nil
}
