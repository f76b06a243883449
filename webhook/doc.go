// Package webhook tells frontends that their jobs have ended.
//
// When a job reaches succeeded, failed or cancelled, the control database
// gets a row in the webhooks outbox in the same transaction as the final
// state (dbcontrollers.Store.WebhookURLFunc decides the address, from
// Targets). A Deliverer, run beside the farm, claims due rows with a lease
// and POSTs the job view to the address:
//
//	job final ──tx──▶ outbox row (pending, due now)
//	                    │ claim: next_attempt_at = lease end, lease_owner = me
//	                    ▼
//	               POST (timeout) ──2xx──▶ delivered
//	                    │ 410 ─────────────▶ failed (the receiver asked to stop)
//	                    │ other / error
//	                    ▼
//	        next back-off step within max_age of the event? ──no──▶ failed
//	                    │ yes
//	                    └──▶ pending, due after the back-off
//
// Every attempt carries the same webhook-id (msg_<job>_<event>), a fresh
// webhook-timestamp and a webhook-signature of "v1," + base64 HMAC-SHA256 of
// "id.timestamp.body" under the frontend's secret, as Standard Webhooks
// verifiers expect. Delivery is at least once: a deliverer killed mid-attempt
// leaves its lease to run out, and the row is tried again.
//
// The job path never waits on a receiver: writing the outbox row is one
// insert, and delivery runs in its own goroutines, at most Concurrency at a
// time and PerFrontend for one frontend, each request bounded by Timeout: a
// receiver that hangs holds its frontend's share of the slots, no more.
package webhook
