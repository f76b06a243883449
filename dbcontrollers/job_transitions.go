package dbcontrollers

import (
	"time"

	"github.com/comfyfarm/comfyfarm/schema"
)

// The life of a job as the farm writes it: every change of state is one of
// these named transitions, each a compare-and-set (JobUpdate) from the
// states it is valid in. A transition that names an attempt applies only
// to that attempt of the job, so a late event of an earlier attempt cannot
// move a newer one. JobClaim (queued -> dispatched) and JobRescue (an
// expired lease) are the two changes made by their own statements.
//
//	queued     --JobClaim-->         dispatched
//	queued     --JobCancelQueued-->  cancelled
//	queued     --JobFailQueued-->    failed      (no node can run it, unreadable workflow)
//	dispatched --JobRecordPrompt-->  dispatched  (the node's prompt id)
//	dispatched --JobMarkRunning-->   running
//	active     --JobMarkStoring-->   storing     (the node finished it)
//	active     --JobRequeue-->       queued      (node lost, prompt lost, interrupted by others)
//	active     --JobFail-->          failed
//	active     --JobAdopt-->         active      (a new process or leader takes the lease)
//	dispatched, running --JobCancelActive--> cancelled
//	storing    --JobSucceed-->       succeeded

// ActiveStates are the states of a job that holds a node.
var ActiveStates = []schema.JobState{schema.JobDispatched, schema.JobRunning, schema.JobStoring}

func attemptPtr(attempt int) *int {
	if attempt == 0 {
		return nil // whichever attempt is current
	}
	return &attempt
}

func timePtr(t time.Time) *time.Time { t = t.UTC(); return &t }

// JobRecordPrompt records the prompt id the node runs attempt under.
func JobRecordPrompt(id string, attempt int, promptID string) JobUpdate {
	return JobUpdate{ID: id, From: ActiveStates, PromptID: &promptID, Attempt: attemptPtr(attempt)}
}

// JobMarkRunning records that the node started attempt at at.
func JobMarkRunning(id string, attempt int, at time.Time) JobUpdate {
	return JobUpdate{ID: id, From: []schema.JobState{schema.JobDispatched}, State: schema.JobRunning,
		StartedAt: timePtr(at), Attempt: attemptPtr(attempt)}
}

// JobMarkStoring records that the node finished attempt: its outputs are
// being copied.
func JobMarkStoring(id string, attempt int) JobUpdate {
	return JobUpdate{ID: id, From: ActiveStates, State: schema.JobStoring, Attempt: attemptPtr(attempt)}
}

// JobSucceed ends attempt with its stored outputs.
func JobSucceed(id string, attempt int, outputs []schema.Output, at time.Time) JobUpdate {
	if outputs == nil {
		outputs = []schema.Output{}
	}
	return JobUpdate{ID: id, From: []schema.JobState{schema.JobStoring}, State: schema.JobSucceeded,
		Outputs: outputs, FinishedAt: timePtr(at), ClearLease: true, Attempt: attemptPtr(attempt)}
}

// JobFail ends an active attempt as failed (no retry).
func JobFail(id string, attempt int, jerr *schema.JobError, at time.Time) JobUpdate {
	return JobUpdate{ID: id, From: ActiveStates, State: schema.JobFailed, Error: jerr,
		FinishedAt: timePtr(at), ClearLease: true, Attempt: attemptPtr(attempt)}
}

// JobFailQueued fails a job that never left the queue.
func JobFailQueued(id string, jerr *schema.JobError, at time.Time) JobUpdate {
	return JobUpdate{ID: id, From: []schema.JobState{schema.JobQueued}, State: schema.JobFailed, Error: jerr,
		FinishedAt: timePtr(at)}
}

// JobRequeue sends attempt back to the queue, node and prompt cleared;
// attempts is the count the job keeps (one less when nothing ran, so that
// the next claim takes the same attempt again).
func JobRequeue(id string, attempt, attempts int) JobUpdate {
	empty := ""
	return JobUpdate{ID: id, From: ActiveStates, State: schema.JobQueued, Node: &empty, PromptID: &empty,
		ClearLease: true, Attempt: attemptPtr(attempt), Attempts: &attempts}
}

// JobAdopt gives an active job's lease to owner (a restarted process, or
// a new leader, following it from now on).
func JobAdopt(id, owner string, until time.Time) JobUpdate {
	return JobUpdate{ID: id, From: ActiveStates, LeaseOwner: &owner, LeaseUntil: &until}
}

// JobCancelQueued cancels a job still in the queue.
func JobCancelQueued(id string, at time.Time) JobUpdate {
	return JobUpdate{ID: id, From: []schema.JobState{schema.JobQueued}, State: schema.JobCancelled, FinishedAt: timePtr(at)}
}

// JobCancelActive cancels a job on a node (its prompt is then taken off the
// node); a job storing its outputs cannot be cancelled.
func JobCancelActive(id string, at time.Time) JobUpdate {
	yes := true
	return JobUpdate{ID: id, From: []schema.JobState{schema.JobDispatched, schema.JobRunning}, State: schema.JobCancelled,
		FinishedAt: timePtr(at), ClearLease: true, CancelRequested: &yes}
}
