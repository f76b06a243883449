// Package server is comfyfarm's HTTP face: a Fiber v2 app with the routes of
// the contract (DESIGN §4) under /api/v1, the job event streams (WebSocket and
// Server-Sent Events), health and readiness probes, Prometheus metrics, the
// local file server and the operator dashboard.
//
// The package depends on small interfaces it declares itself — JobService and
// NodeService for the farm, Frontends for the per-frontend controllers,
// FileServer for local storage — so that cmd can wire any implementation and
// nothing has to import server.
//
// A request goes through these layers, outermost first:
//
//	request id -> observe (access log, metrics, error handler) -> recover
//	  -> encoding guard -> route: authenticate (bearer key, then its rate limit) -> handler
//	     handler: decode + validate input -> resolve frontend -> authorize -> service
//
// Keys are compared in constant time (SHA-256 digests, every key compared).
// A frontend key acts for its own frontend only; the admin key acts for every
// frontend and is the only key for /nodes, /probe and the dashboard data.
// The frontend a request acts for comes from the `frontend` query parameter or
// a body field; a frontend key may leave it out. Its name is validated, then
// resolved through the Frontends map only, so it never reaches SQL as text.
//
// Rate limits (Config.RatePerMinute, Config.SubmitPerMinute) count per
// frontend API key in token buckets (golang.org/x/time/rate), after
// authentication, so an unknown key is 401 and never 429. Beyond the limit a
// request gets 429 rate_limited with Retry-After and
// details.retry_after_seconds. The admin key, event streams followed with a
// token, and the routes outside /api/v1 are not limited. With Deps.Rates
// (replicas on one Redis) the count is the farm's: each key's budget is
// spent on whichever replica, and a replica counts alone only while the
// shared count does not answer.
//
// Errors leave through one ErrorHandler that maps schema sentinels,
// *schema.ValidationError and Fiber errors to {"error":{"code","message",
// "details"}} with a fitting status. Only 5xx are logged; a 500 says
// "internal error" to the client, never more.
//
// Event streams: the first event is a snapshot (or, when resuming with
// Last-Event-ID or ?after=SEQ, the buffered events after it), then live events;
// the stream closes after the terminal event. A keep-alive goes out every
// Config.KeepAlive: a JSON frame {"type":"keepalive",...} on the WebSocket and
// an SSE comment line ": keepalive" on SSE. A browser may follow a job with
// the job-scoped token minted in the submit response's events_url instead of a
// key.
//
// The dashboard (/dashboard) is static HTML, script and style embedded from
// dashboard/ and served under a policy that runs scripts of this origin only.
// It reads the admin routes; its charts come from a Sampler, a worker that
// keeps the last hour of samples of the node views and job counts in memory.
package server
