// Package dispatch is the farm: the node registry and prober, the fair
// scheduler, one runner per node that dispatches workflows and follows the
// node's event stream, and the output pipeline into storage. Every job's
// events go to its subscribers through the event hub (package comfy/hub).
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
//	requeue         | execution_success (outputs from the stream),
//	(node lost,     | executing(null) (outputs from /history)
//	 prompt lost,   v
//	 interrupted  storing --(objects + photo rows)--> succeeded
//	 by others,     |
//	 unreadable     +--> failed (execution_error, validation, attempts used up)
//	 answers;
//	 a post refused: no attempt used)
//
// A job moves only by compare-and-set on its state in the control database,
// so a late event can never move it backwards or out of a terminal state.
// Every change is one of the named transitions of dbcontrollers
// (job_transitions.go: JobMarkRunning, JobMarkStoring, JobSucceed, JobFail,
// JobRequeue, JobCancelActive, ...), which says from which states it
// applies; transitions of a running job name its attempt.
//
// Each claimed attempt has one owner, its executor (attempt.go: the
// attempt type), from the claim to its end on the node; every step of its
// life is one of its methods (post, markRunning, finished, complete, store,
// fail, requeue, timeout, takeOff). Its node's runner holds it and routes
// the node's events and reconcile's findings to it; a cancel asks it to
// give up (abandon). Its phase:
//
//	posting --posted--> following --the node ended it--> finishing --> (final state written)
//	   |                    |   ^                           |
//	   |                    |   +---- no history yet -------+
//	   |                    +--cancel, job_timeout--> abandoned --the node let go--> (forgotten)
//	   +--the post finds the job cancelled------------^
//
// A posting attempt is left alone by reconcile and by a cancel (the post
// itself finds the job cancelled); a finishing attempt no longer holds the
// node's slot; an abandoned one holds it until the node lets go.
//
// The scheduler's lock is held only to pick a job and a node: the job
// leaves the queue and the node slot is held, then the claim (one short
// transaction) runs without the lock, so submits, cancels and position
// reads never wait on the database.
//
// Each claim counts an attempt. A requeue keeps it (the node ran some of the
// job, or may have), except when the post never reached the node: a
// connection that could not be opened ran nothing, so the attempt is given
// back and the same prompt id is used at the next claim.
//
// # Nodes that fail
//
// Node health comes from the prober (nodes.go, prober.go): up, degraded
// (slow or bad answers), down, with two agreeing probes for a change; a
// drained node shows as draining. Refused connects are probed at the
// interval, timed-out probes back off. The runners add what only jobs show
// (node_faults.go):
//
//	          refused connect (post, reconcile)
//	  up ----------------------------------------> down
//	  |  ^                                          |
//	  |  |  two good probes in a row                |
//	  |  +------------------------------------------+
//	  |  ^
//	  |  | back-off over and a good probe (probation: the next
//	  |  | failure degrades again, back-off doubled), or a success
//	  v  |
//	degraded  <-- node_failure_limit failures of the node's own in a row
//
// A failure of the node's own is an unreadable answer (history, queue), a
// prompt it lost while its event stream stayed connected (a reconnect means
// a restart, which explains the loss), outputs it cannot serve, or a failed
// post that reached it. The workflow's own execution_error or validation
// error does not count. A job requeued for a node's fault remembers the node
// and is placed elsewhere whenever another up node can run it.
//
// # Scheduling
//
// Queued jobs are kept in memory (loaded from the database at start) in a
// fairQueue: smooth weighted round robin across frontends, priority then FIFO
// within one. When a node slot is free, the first job in that order that a
// free node can run (node up, not draining, under max_inflight, meeting the
// job's requirements, offering every class type and every enum value of the
// graph) is claimed, and sent to the best of those nodes: the one with the
// graph's models already loaded, then the least loaded, then the one that got
// work the longest ago. The same order gives every queued job its position,
// pushed to subscribers as queued events when it changes: the number of jobs
// planned before it whose eligible nodes overlap its own (jobs that can run on
// disjoint sets of nodes do not wait for each other). The plan and the
// positions are kept between changes and worked out again only from the
// first step a change can affect (a submit behind its frontend's queue
// touches the end of the plan), from checkpoints of the round robin state;
// starting a job, which moves every waiting job up, plans anew.
//
// # Placement
//
// Each runner reads its node's /object_info into a catalogue: the classes,
// and for every input whose type is a list of choices (model files, input
// images, samplers) the values the node accepts. Catalogues are shared
// between nodes with the same object_info (keyed by a hash of it), and
// identical choice lists between catalogues. A job may run on a node when
// every literal string input of its graph that the node lists as a choice
// holds one of the node's values (LoadImage inputs naming an upload of the
// job are exempt: dispatch uploads them), every class is offered, the node
// has every tag of requirements.tags and at least requirements.min_vram_gb of
// GPU memory. Catalogues are read again on a reconnect, on an operator's
// probe, every CatalogueInterval, and, at most every 30 s per node, when a
// submit names a value no up node offers (before refusing it with a
// schema.NoNodeError naming the missing values). A node that refuses a prompt
// with value_not_in_list only has its catalogue read again; when it no longer
// offers the value the job goes back to the queue with its attempt given
// back, avoiding that node.
//
// # Following nodes
//
// Each runner holds one WebSocket to its node under a fixed client id. The
// prompt id is chosen by us (servers since 0.3.45 honour it), so events that
// arrive before the /prompt response are recognised; for older servers such
// events are buffered until the response names the prompt. Completion is
// execution_success or executing(null). When the stream carried the whole
// run on one connection (execution_start to execution_success), the outputs
// are those of its executed frames, which are what the history entry lists;
// otherwise (a reconnect on the way, a 2023-era server without
// execution_success, an adopted job) they come from /history. After a
// reconnect, and for any job without a recent sign of life, the runner asks
// the node's queue and then its history: pending or running jobs stay, done
// jobs complete, lost jobs go back to the queue (attempt + 1, up to
// max_attempts). Deterministic failures (execution_error) fail without retry.
// A history answer that cannot be read is given up after three tries in a
// row, not waited out: the attempt fails at once and counts against the node.
//
// # Restarts
//
// Active jobs carry a lease extended by a heartbeat. At start the farm adopts
// every dispatched, running or storing job: it re-binds the prompt id, asks
// the node, and follows, completes or requeues it. Jobs of an instance that
// died are returned to the queue by the rescuer when their lease expires.
// Output storing is idempotent (fixed object keys, unique photo rows), so a
// repeated completion adds nothing twice.
//
// # Several replicas
//
// With a Bus (cluster.redis_url) the farm is one of several replicas on one
// control database (cluster.go). Every replica serves the API; one leads:
// the holder of the scheduler's lease row (dbcontrollers.LeaderAcquire),
// renewed every third of LeaderLease on the database's clock. Only the
// leader runs the scheduler, the runners and the prober, for one term:
//
//	follower --lease free or expired--> leader (new epoch: load the queue,
//	   ^                                 adopt every active job from the nodes)
//	   |                                        |
//	   +-- renewal refused or late, a write ----+
//	       refused by the fence, or a clean stop (the lease given up at once)
//
// Every job write of a term carries its epoch (fencedJobs): the store checks
// it against the lease row in the write's own transaction, so a leader that
// was paused past its lease cannot write once another took over; its first
// refused write ends its term. Events are numbered and relayed by the bus
// (one Redis Stream per job, numbered by a script, relayed by pub/sub), so
// whichever replica publishes, every subscriber sees one order and resumes
// anywhere; the hub of each replica keeps only the streams followed on it
// and fills gaps from the bus. An event is sent after its database write,
// from a queue; a stream left open because its job's end died with a
// replica is ended from the database (settleStreams, once a lease). A submit or cancel taken by a follower, and
// node registrations changed anywhere, are announced by notices; the leader
// also looks for queued jobs it does not hold every ReconcileEvery, in case
// a notice was lost. Followers answer positions and progress from the
// leader's published events and node views from the leader's shared views;
// they check submits against the catalogues the leader shares (each node's
// held by a passive runner, which never follows the node).
package dispatch
