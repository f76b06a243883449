package server

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Sampler defaults: a sample every 10 s, an hour of them.
const (
	DefaultSampleInterval = 10 * time.Second
	DefaultSampleCount    = 360
	// samplesPerBucket samples make one bar of the finished-jobs chart: a
	// minute at the default interval.
	samplesPerBucket = 6
)

// NodeLister is what the sampler needs from the node side.
type NodeLister interface {
	Nodes(ctx context.Context) ([]schema.NodeView, error)
}

// SamplerConfig tunes a Sampler. Zero values take the defaults.
type SamplerConfig struct {
	Interval time.Duration // between samples; DefaultSampleInterval
	Count    int           // samples kept; DefaultSampleCount
	Logger   *slog.Logger
	NowFunc  func() time.Time
}

// Sample is the farm at one moment, as the dashboard charts it.
type Sample struct {
	Seq uint64    `json:"seq"`
	At  time.Time `json:"t"`
	// Queued is the number of queued jobs per frontend; nil when the counts
	// could not be read.
	Queued map[string]int `json:"queued"`
	// Finished counts the jobs that ended since the previous sample, by
	// outcome (succeeded, failed, cancelled); nil when unknown.
	Finished map[schema.JobState]int `json:"finished"`
	// FinishedSeconds is the time Finished covers: since the last sample
	// that could count jobs.
	FinishedSeconds float64 `json:"finished_seconds,omitempty"`
	// Nodes holds each node's in-flight jobs and limit; served as Busy.
	Nodes map[string]NodeSample `json:"-"`
}

// NodeSample is one node in a sample.
type NodeSample struct {
	State    schema.NodeState `json:"state"`
	Inflight int              `json:"inflight"`
	Max      int              `json:"max_inflight"`
}

// Busy is the node's busy fraction: in-flight jobs over its limit.
func (n NodeSample) Busy() float64 {
	if n.Max <= 0 {
		return 0
	}
	return min(1, float64(n.Inflight)/float64(n.Max))
}

// FinishedBucket is the jobs finished per minute over a run of samples.
type FinishedBucket struct {
	Start     time.Time `json:"t"`
	Seconds   float64   `json:"seconds"` // time the bucket covers
	Succeeded float64   `json:"succeeded"`
	Failed    float64   `json:"failed"`
	Cancelled float64   `json:"cancelled"`
}

// SamplesView is GET /api/v1/dashboard/samples.
type SamplesView struct {
	IntervalSeconds float64 `json:"interval_seconds"`
	Capacity        int     `json:"capacity"` // samples the ring holds
	// Samples are the ring's samples, oldest first.
	Samples []Sample `json:"samples"`
	// FinishedPerMinute groups the samples' finished counts into buckets
	// of samplesPerBucket samples, as rates per minute, oldest first.
	FinishedPerMinute []FinishedBucket `json:"finished_per_minute"`
	// Busy is each node's busy fraction per sample (aligned with Samples;
	// -1 where the node was not registered).
	Busy map[string][]float64 `json:"busy"`
}

// Sampler keeps a fixed ring of samples of the farm taken from the services
// the server already has: node views for in-flight counts, job counts by
// frontend and state for queue depths and, by their differences, jobs
// finished. It needs no external service; the ring lives in memory and
// starts empty with the process.
type Sampler struct {
	cfg   SamplerConfig
	nodes NodeLister // may be nil
	jobs  JobCounter // may be nil

	mu       sync.Mutex
	ring     []Sample // len Count once full; next is the oldest then
	next     int
	seq      uint64
	finished map[schema.JobState]int // totals at the last sample that read them
	countAt  time.Time               // and when it was taken
}

// NewSampler builds a sampler over the node and job services; either may be
// nil (its part of the samples stays empty).
func NewSampler(cfg SamplerConfig, nodes NodeLister, jobs JobCounter) *Sampler {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultSampleInterval
	}
	if cfg.Count <= 0 {
		cfg.Count = DefaultSampleCount
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.NowFunc == nil {
		cfg.NowFunc = time.Now
	}
	return &Sampler{cfg: cfg, nodes: nodes, jobs: jobs, ring: make([]Sample, 0, cfg.Count)}
}

// Run takes a sample at once and then every interval until ctx ends.
func (s *Sampler) Run(ctx context.Context) error {
	t := time.NewTicker(s.cfg.Interval)
	defer t.Stop()
	for {
		s.Take(ctx)
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// sampleTimeout bounds the reads of one sample.
const sampleTimeout = 5 * time.Second

// Take reads the services and adds one sample to the ring.
func (s *Sampler) Take(parent context.Context) {
	ctx, cancel := context.WithTimeout(parent, min(sampleTimeout, s.cfg.Interval))
	defer cancel()
	smp := Sample{At: s.cfg.NowFunc().UTC(), Nodes: map[string]NodeSample{}}
	if s.nodes != nil {
		views, err := s.nodes.Nodes(ctx)
		if err != nil && parent.Err() == nil {
			s.cfg.Logger.Warn("dashboard sample: list nodes", "err", err)
		}
		for _, v := range views {
			smp.Nodes[v.Name] = NodeSample{State: v.State, Inflight: v.Inflight, Max: v.MaxInflight}
		}
	}
	var totals map[schema.JobState]int
	if s.jobs != nil {
		counts, err := s.jobs.JobCounts(ctx)
		if err != nil {
			if parent.Err() == nil {
				s.cfg.Logger.Warn("dashboard sample: count jobs", "err", err)
			}
		} else {
			smp.Queued = map[string]int{}
			totals = map[schema.JobState]int{}
			for fe, byState := range counts {
				smp.Queued[fe] = byState[schema.JobQueued]
				for _, st := range []schema.JobState{schema.JobSucceeded, schema.JobFailed, schema.JobCancelled} {
					totals[st] += byState[st]
				}
			}
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if totals != nil {
		if s.finished != nil {
			smp.Finished = map[schema.JobState]int{}
			for st, n := range totals {
				// Rows deleted by hand would make a difference negative.
				smp.Finished[st] = max(0, n-s.finished[st])
			}
			smp.FinishedSeconds = smp.At.Sub(s.countAt).Seconds()
		}
		s.finished, s.countAt = totals, smp.At
	}
	s.seq++
	smp.Seq = s.seq
	if len(s.ring) < s.cfg.Count {
		s.ring = append(s.ring, smp)
		return
	}
	s.ring[s.next] = smp
	s.next = (s.next + 1) % s.cfg.Count
}

// Samples returns the ring, oldest first.
func (s *Sampler) Samples() []Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]Sample, 0, len(s.ring))
	out = append(out, s.ring[s.next:]...)
	return append(out, s.ring[:s.next]...)
}

// View returns the ring with the series the dashboard draws.
func (s *Sampler) View() SamplesView {
	samples := s.Samples()
	v := SamplesView{
		IntervalSeconds:   s.cfg.Interval.Seconds(),
		Capacity:          s.cfg.Count,
		Samples:           samples,
		FinishedPerMinute: finishedPerMinute(samples),
		Busy:              map[string][]float64{},
	}
	for i, smp := range samples {
		for name, n := range smp.Nodes {
			row, ok := v.Busy[name]
			if !ok {
				row = slices.Repeat([]float64{-1}, len(samples))
				v.Busy[name] = row
			}
			row[i] = n.Busy()
		}
	}
	return v
}

// finishedPerMinute groups samples into buckets by their sequence number
// (so a bucket keeps its samples as the ring moves) and turns each bucket's
// finished counts into rates per minute over the time they cover.
func finishedPerMinute(samples []Sample) []FinishedBucket {
	var out []FinishedBucket
	var cur *FinishedBucket
	curID := uint64(0)
	var counts [3]int
	flush := func() {
		if cur == nil || cur.Seconds <= 0 {
			return
		}
		perMin := 60 / cur.Seconds
		cur.Succeeded = float64(counts[0]) * perMin
		cur.Failed = float64(counts[1]) * perMin
		cur.Cancelled = float64(counts[2]) * perMin
		out = append(out, *cur)
	}
	for _, smp := range samples {
		id := (smp.Seq - 1) / samplesPerBucket
		if cur == nil || id != curID {
			flush()
			cur, curID, counts = &FinishedBucket{Start: smp.At}, id, [3]int{}
		}
		if smp.Finished == nil {
			continue
		}
		cur.Seconds += smp.FinishedSeconds
		counts[0] += smp.Finished[schema.JobSucceeded]
		counts[1] += smp.Finished[schema.JobFailed]
		counts[2] += smp.Finished[schema.JobCancelled]
	}
	flush()
	if out == nil {
		out = []FinishedBucket{}
	}
	return out
}
