// Package dispatch is the farm: the node registry and prober, the fair
// scheduler, one runner per node that dispatches workflows and follows the
// node's event stream, the output pipeline into storage, and the event hub
// that relays every job's progress to its subscribers.
//
// # The life of a job
//
//	              Submit
//	                |
//	                v          Cancel
//	   +-------> queued --------------------------------+
//	   |            | claim (one short transaction)     |
//	   |            v                                   |
//	   |  +---- dispatched --- Cancel: delete pending --+
//	   |  |         | execution_start / executing       |
//	   |  |         v                                   |
//	   +--+----- running ----- Cancel: interrupt -------+--> cancelled
//	requeue         | execution_success, executing(null);
//	(node lost,     | confirmed by /history
//	 prompt lost,   v
//	 interrupted  storing --(objects + photo rows)--> succeeded
//	 by others)     |
//	                +--> failed (execution_error, validation, attempts used up)
//
// A job moves only by compare-and-set on its state in the control database,
// so a late event can never move it backwards or out of a terminal state.
//
// # Scheduling
//
// Queued jobs are kept in memory (loaded from the database at start) in a
// fairQueue: smooth weighted round robin across frontends, priority then FIFO
// within one. When a node slot is free, the first job in that order that a
// free node can run (node up, not draining, under max_inflight, offering every
// class type of the graph) is claimed, and sent to the best of those nodes:
// the one with the graph's models already loaded, then the least loaded, then
// the one that got work the longest ago. The same order gives every queued
// job its position, pushed to subscribers as queued events when it changes.
//
// # Following nodes
//
// Each runner holds one WebSocket to its node under a fixed client id. The
// prompt id is chosen by us (servers since 0.3.45 honour it), so events that
// arrive before the /prompt response are recognised; for older servers such
// events are buffered until the response names the prompt. Completion is
// execution_success or executing(null), confirmed through /history. After a
// reconnect, and for any job without a recent sign of life, the runner asks
// the node's queue and then its history: pending or running jobs stay, done
// jobs complete, lost jobs go back to the queue (attempt + 1, up to
// max_attempts). Deterministic failures (execution_error) fail without retry.
//
// # Restarts
//
// Active jobs carry a lease extended by a heartbeat. At start the farm adopts
// every dispatched, running or storing job: it re-binds the prompt id, asks
// the node, and follows, completes or requeues it. Jobs of an instance that
// died are returned to the queue by the rescuer when their lease expires.
// Output storing is idempotent (fixed object keys, unique photo rows), so a
// repeated completion adds nothing twice.
package dispatch
