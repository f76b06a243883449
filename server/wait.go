package server

import (
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/gofiber/fiber/v2"

	"github.com/comfyfarm/comfyfarm/schema"
)

// maxWait bounds ?wait= (contract: 120 s).
const maxWait = 120 * time.Second

// goneCheckInterval is how often a waiting request looks whether its client
// has hung up.
const goneCheckInterval = 200 * time.Millisecond

// waitQuery reads ?wait=: a Go duration ("60s", "1m30s") or whole seconds
// ("60"), from 0 (no wait) to maxWait.
func waitQuery(c *fiber.Ctx) (time.Duration, error) {
	raw := strings.TrimSpace(c.Query("wait"))
	if raw == "" {
		return 0, nil
	}
	var d time.Duration
	if n, err := strconv.Atoi(raw); err == nil {
		if n < 0 || n > int(maxWait/time.Second) {
			return 0, schema.Invalid("wait", "must be between 0s and %s", maxWait)
		}
		d = time.Duration(n) * time.Second
	} else if d, err = time.ParseDuration(raw); err != nil {
		return 0, schema.Invalid("wait", "must be a duration such as 30s (at most %s)", maxWait)
	}
	if d < 0 || d > maxWait {
		return 0, schema.Invalid("wait", "must be between 0s and %s", maxWait)
	}
	return d, nil
}

// awaitJob waits up to d for a job to finish and returns its view then, or
// its current view when the wait runs out (output URLs not yet built) or the server shuts down. It
// learns of the end from the job's event stream, not by polling the job. A
// client that hangs up ends the wait with errClientGone.
func (s *Server) awaitJob(c *fiber.Ctx, jobs JobService, frontend, id string, d time.Duration) (*schema.Job, error) {
	ctx := c.UserContext()
	events, unsubscribe, err := jobs.Subscribe(ctx, id, 0, false)
	if err != nil {
		return nil, err
	}
	defer unsubscribe()
	timer := time.NewTimer(d)
	defer timer.Stop()
	gone := time.NewTicker(goneCheckInterval)
	defer gone.Stop()
	conn := c.Context().Conn()
wait:
	for {
		select {
		case ev, ok := <-events:
			if !ok || ev.Type.Terminal() || (ev.Job != nil && ev.Job.State.Terminal()) {
				break wait
			}
		case <-timer.C:
			break wait
		case <-s.done:
			break wait
		case <-gone.C:
			if clientGone(conn) {
				return nil, errClientGone()
			}
		}
	}
	return jobs.Job(ctx, frontend, id)
}

// errClientGone ends a request whose client hung up while it waited; nobody
// reads the answer.
func errClientGone() error {
	return newAPIError(statusClientClosed, "client_closed", "the client closed the connection")
}

// waitedJob is the answer of a request with ?wait=: the job view, and for
// a submit the events_url too.
type waitedJob struct {
	*schema.Job
	EventsURL string `json:"events_url,omitempty"`
}

// clientGone reports whether the peer of conn has closed it, by peeking at
// the socket without consuming anything (see clientGoneFD); false when that
// cannot be told.
func clientGone(conn net.Conn) bool {
	if conn == nil {
		return false
	}
	return connClosed(conn)
}

// statusFor is the status of a waited submit's answer: 200 for a finished
// job, else the given one (202: still under way).
func statusFor(job *schema.Job, unfinished int) int {
	if job.State.Terminal() {
		return http.StatusOK
	}
	return unfinished
}
