package webhook_test

import (
	"net/http"
	"testing"

	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

// BenchmarkDeliver: b.N jobs end, then one deliverer (default concurrency)
// sends them all to a receiver on loopback that answers 204; reports
// deliveries per second including the outbox writes and reads.
func BenchmarkDeliver(b *testing.B) {
	for _, n := range dbtest.Configs() {
		b.Run(n.Name, func(b *testing.B) {
			cfg := n.Config(b)
			done := make(chan struct{}, b.N)
			rc := newReceiver(b, func(_ int, w http.ResponseWriter, _ *http.Request) {
				w.WriteHeader(http.StatusNoContent)
				done <- struct{}{}
			})
			go func() {
				for range rc.got { // drain what the receiver passes on
				}
			}()
			targets := mustTargets(b, map[string]webhook.Endpoint{
				"alpha": endpoint(b, rc.URL, newSecret(b)), "beta": endpoint(b, rc.URL, newSecret(b)),
			})
			s := openStore(b, cfg, nil, targets)
			for i := 0; i < b.N; i++ {
				finish(b, s, []string{"alpha", "beta"}[i%2], schema.JobSucceeded, "")
			}
			b.ResetTimer()
			stop := run(b, webhook.Config{}, s, targets)
			for i := 0; i < b.N; i++ {
				<-done
			}
			b.StopTimer()
			stop()
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "deliveries/s")
		})
	}
}
