package dispatch

import (
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/comfyfarm/comfyfarm/schema"
)

// busyWindow is the span comfyfarm_node_busy_ratio looks back over.
const busyWindow = time.Minute

type farmMetrics struct {
	submitted       *prometheus.CounterVec
	finished        *prometheus.CounterVec
	requeued        prometheus.Counter
	storageRetries  prometheus.Counter
	queued          *prometheus.GaugeVec
	dispatchSeconds prometheus.Histogram
	jobSeconds      prometheus.Histogram
	queueWait       *prometheus.HistogramVec
	runDuration     *prometheus.HistogramVec
	storeDuration   prometheus.Histogram
}

// Buckets of job durations: 0.1 s to about 55 min.
var jobBuckets = prometheus.ExponentialBuckets(0.1, 2, 16)

func newFarmMetrics() *farmMetrics {
	return &farmMetrics{
		submitted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_submitted_total", Help: "Jobs accepted, by frontend.",
		}, []string{"frontend"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_finished_total",
			Help: "Jobs that reached a terminal state, by frontend, outcome (succeeded, failed, cancelled) and error code (failed jobs).",
		}, []string{"frontend", "outcome", "error_code"}),
		requeued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_requeued_total", Help: "Jobs sent back to the queue after a node failed them.",
		}),
		storageRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "comfyfarm_storage_retries_total", Help: "Failed attempts to store a job's outputs.",
		}),
		queued: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "comfyfarm_queue_depth", Help: "Jobs waiting for a node, by frontend.",
		}, []string{"frontend"}),
		dispatchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "comfyfarm_dispatch_seconds", Help: "Time to upload inputs and post a prompt to a node.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		jobSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "comfyfarm_job_seconds", Help: "Submit to success.", Buckets: jobBuckets,
		}),
		queueWait: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "comfyfarm_job_queue_wait_seconds", Help: "Submit to first dispatch to a node, by frontend.",
			Buckets: jobBuckets,
		}, []string{"frontend"}),
		runDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "comfyfarm_job_run_duration_seconds", Help: "Running on the node (its execution start to its end) of runs that ended well, by frontend and node.",
			Buckets: jobBuckets,
		}, []string{"frontend", "node"}),
		storeDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "comfyfarm_job_store_duration_seconds", Help: "Copying a job's outputs into storage and recording its photos.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 16),
		}),
	}
}

// finished counts a job that reached its terminal state.
func (m *farmMetrics) jobFinished(j *schema.Job) {
	code := ""
	if j.State == schema.JobFailed && j.Error != nil {
		code = j.Error.Code
	}
	m.finished.WithLabelValues(j.Frontend, string(j.State), code).Inc()
}

// queueLen is the queue's LenFunc: the depth gauge follows every change.
func (m *farmMetrics) queueLen(frontend string, n int) {
	m.queued.WithLabelValues(frontend).Set(float64(n))
}

var (
	nodeInflightDesc = prometheus.NewDesc("comfyfarm_node_inflight",
		"Jobs holding a slot of the node (posted to it and not yet let go).", []string{"node"}, nil)
	nodeBusyDesc = prometheus.NewDesc("comfyfarm_node_busy_ratio",
		"Share of the last minute the node spent running one of the farm's prompts.", []string{"node"}, nil)
)

// nodeCollector reads every node's slots and busy time when scraped.
type nodeCollector struct{ f *Farm }

func (c nodeCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- nodeInflightDesc
	ch <- nodeBusyDesc
}

func (c nodeCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.f
	now := f.cfg.NowFunc()
	f.rmu.Lock()
	names := make([]string, 0, len(f.runners))
	for name := range f.runners {
		names = append(names, name)
	}
	f.rmu.Unlock()
	slices.Sort(names)
	for _, name := range names {
		r := f.runner(name)
		if r == nil {
			continue
		}
		inflight, busy := r.load(now)
		ch <- prometheus.MustNewConstMetric(nodeInflightDesc, prometheus.GaugeValue, float64(inflight), name)
		ch <- prometheus.MustNewConstMetric(nodeBusyDesc, prometheus.GaugeValue, busy, name)
	}
}

// Collectors returns the farm's metrics for registration.
func (f *Farm) Collectors() []prometheus.Collector {
	m := f.metrics
	return []prometheus.Collector{m.submitted, m.finished, m.requeued, m.storageRetries, m.queued, m.dispatchSeconds,
		m.jobSeconds, m.queueWait, m.runDuration, m.storeDuration, nodeCollector{f},
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "comfyfarm_leader", Help: "1 while this process schedules the farm (always, for one process alone; the lease holder among replicas).",
		}, func() float64 {
			if f.leading() {
				return 1
			}
			return 0
		}),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "comfyfarm_fenced_writes_total", Help: "Job writes of this replica refused because another replica had taken the scheduler's lease.",
		}, func() float64 {
			if f.fenced == nil {
				return 0
			}
			return float64(f.fenced.refused.Load())
		}),
	}
}

// busyClock keeps the spans of time a node ran one of our prompts, over the
// last busyWindow, to tell the share of that window it was busy.
type busyClock struct {
	spans []busySpan // closed spans, oldest first, ending within the window
	since time.Time  // start of the open span; zero when idle
}

type busySpan struct{ from, to time.Time }

// maxBusySpans bounds the memory of a node that starts and ends prompts
// faster than anyone can watch; the oldest spans are merged away.
const maxBusySpans = 4096

// set records the node going busy or idle at now.
func (b *busyClock) set(now time.Time, busy bool) {
	switch {
	case busy && b.since.IsZero():
		b.since = now
	case !busy && !b.since.IsZero():
		b.spans = append(b.spans, busySpan{b.since, now})
		b.since = time.Time{}
		b.trim(now)
	}
}

func (b *busyClock) trim(now time.Time) {
	from := now.Add(-busyWindow)
	i := 0
	for i < len(b.spans) && !b.spans[i].to.After(from) {
		i++
	}
	b.spans = b.spans[i:]
	if len(b.spans) > maxBusySpans {
		// Merge the oldest two: the busy time between them is counted as busy.
		b.spans[1].from = b.spans[0].from
		b.spans = b.spans[1:]
	}
}

// ratio is the busy share of the busyWindow ending at now.
func (b *busyClock) ratio(now time.Time) float64 {
	from := now.Add(-busyWindow)
	var busy time.Duration
	add := func(s, e time.Time) {
		if s.Before(from) {
			s = from
		}
		if e.After(now) {
			e = now
		}
		if e.After(s) {
			busy += e.Sub(s)
		}
	}
	for _, s := range b.spans {
		add(s.from, s.to)
	}
	if !b.since.IsZero() {
		add(b.since, now)
	}
	return min(float64(busy)/float64(busyWindow), 1)
}
