package dispatch

import (
	"fmt"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Faults of a node's own making.
//
// A job can fail because of its workflow (an execution_error, a validation
// error: those say nothing about the node) or because of the node: it
// answers what cannot be read, loses a prompt while its event stream stayed
// up, cannot serve the outputs it reported, or fails a post that reached it.
// The runner reports the second kind with JobFailed. After FailureLimit of
// them in a row the node is degraded: it keeps its probe health, but
// placement takes only up nodes, so it gets no new jobs. The prober then
// probes it once its back-off (FaultBackoff, doubling each time up to
// maxFaultBackoff) has passed; a good probe takes it back on probation: its
// next job decides. A success (JobSucceeded) clears the count and the
// back-off; one more failure of its own degrades it again at once.
//
// A connection refused (or any failed connect) is no job failure: the post
// never reached the node, so nothing ran there and the job keeps its
// attempt. Suspect marks the node down at once, so that queued jobs wait for
// a live node instead of being sent to a dead one; the prober brings it back
// after two good probes in a row.

// JobFailed records a job that failed for a reason of the node's own. It
// reports whether the node is now degraded by such failures.
func (n *Nodes) JobFailed(name, reason string) bool {
	n.mu.Lock()
	e, ok := n.entries[name]
	if !ok {
		n.mu.Unlock()
		return false
	}
	e.faults++
	if e.faulty || e.faults < n.cfg.FailureLimit {
		faulty := e.faulty
		n.mu.Unlock()
		return faulty
	}
	old := e.state()
	if e.faultBackoff <= 0 {
		e.faultBackoff = n.cfg.FaultBackoff
	}
	e.faulty = true
	e.faultyUntil = n.cfg.NowFunc().Add(e.faultBackoff)
	e.faultReason = fmt.Sprintf("%d jobs in a row failed on the node (retried after %s); last: %s",
		e.faults, e.faultBackoff, reason)
	e.faultBackoff = min(2*e.faultBackoff, max(maxFaultBackoff, n.cfg.FaultBackoff))
	var changes []NodeChange
	if s := e.state(); s != old {
		n.metrics.setState(name, s)
		changes = append(changes, n.changeLocked(e, old, false, false))
	}
	n.log.Warn("node degraded by job failures", "node", name, "failures", e.faults, "reason", reason)
	n.mu.Unlock()
	n.emit(changes...)
	return true
}

// JobSucceeded records a job that succeeded on the node: its count of
// failures starts over and a node degraded by them is up again.
func (n *Nodes) JobSucceeded(name string) {
	n.mu.Lock()
	e, ok := n.entries[name]
	if !ok || (e.faults == 0 && !e.faulty && e.faultBackoff == 0) {
		n.mu.Unlock()
		return
	}
	old := e.state()
	e.faults, e.faulty, e.faultBackoff, e.faultReason = 0, false, 0, ""
	var changes []NodeChange
	if s := e.state(); s != old {
		n.metrics.setState(name, s)
		changes = append(changes, n.changeLocked(e, old, false, false))
		n.log.Info("node up again after a job succeeded", "node", name)
	}
	n.mu.Unlock()
	n.emit(changes...)
}

// Suspect marks a node down at once, without waiting for the prober: a
// connection to it was refused. The prober confirms, and brings it back when
// two probes in a row find it answering.
func (n *Nodes) Suspect(name, reason string) {
	n.mu.Lock()
	e, ok := n.entries[name]
	if !ok || e.health == schema.NodeDown {
		n.mu.Unlock()
		return
	}
	old := e.state()
	e.health, e.pending, e.suspect = schema.NodeDown, "", reason
	var changes []NodeChange
	if s := e.state(); s != old {
		n.metrics.setState(name, s)
		changes = append(changes, n.changeLocked(e, old, false, false))
	}
	n.log.Warn("node marked down: connection failed", "node", name, "reason", reason)
	n.mu.Unlock()
	n.emit(changes...)
}
