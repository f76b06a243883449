package dispatch

import "github.com/prometheus/client_golang/prometheus"

type farmMetrics struct {
	submitted       *prometheus.CounterVec
	finished        *prometheus.CounterVec
	requeued        prometheus.Counter
	storageRetries  prometheus.Counter
	queued          prometheus.Gauge
	dispatchSeconds prometheus.Histogram
	jobSeconds      prometheus.Histogram
}

func newFarmMetrics() *farmMetrics {
	return &farmMetrics{
		submitted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_submitted_total", Help: "Jobs accepted, by frontend.",
		}, []string{"frontend"}),
		finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_finished_total", Help: "Jobs that reached a terminal state, by frontend and state.",
		}, []string{"frontend", "state"}),
		requeued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "comfyfarm_jobs_requeued_total", Help: "Jobs sent back to the queue after a node failed them.",
		}),
		storageRetries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "comfyfarm_storage_retries_total", Help: "Failed attempts to store a job's outputs.",
		}),
		queued: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "comfyfarm_queue_depth", Help: "Jobs waiting for a node.",
		}),
		dispatchSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "comfyfarm_dispatch_seconds", Help: "Time to upload inputs and post a prompt to a node.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		jobSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "comfyfarm_job_seconds", Help: "Submit to success.",
			Buckets: prometheus.ExponentialBuckets(0.1, 2, 16),
		}),
	}
}

// Collectors returns the farm's metrics for registration.
func (f *Farm) Collectors() []prometheus.Collector {
	m := f.metrics
	return []prometheus.Collector{m.submitted, m.finished, m.requeued, m.storageRetries, m.queued, m.dispatchSeconds, m.jobSeconds}
}
