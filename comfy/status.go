package comfy

import (
	"context"
	"errors"
	"fmt"
)

// PromptPhase is where a prompt is on its server.
type PromptPhase int

// Phases.
const (
	// PromptLost: in neither the queue nor the history, twice in a row: deleted, evicted from
	// history, or the server restarted.
	PromptLost PromptPhase = iota
	PromptPending
	PromptRunning
	PromptDone
)

func (p PromptPhase) String() string {
	switch p {
	case PromptPending:
		return "pending"
	case PromptRunning:
		return "running"
	case PromptDone:
		return "done"
	}
	return "lost"
}

// PromptState is the reconciled state of a prompt.
type PromptState struct {
	Phase PromptPhase
	// Ahead is the number of prompts that run before it (PromptPending only).
	Ahead int
}

func (s PromptState) String() string {
	if s.Phase == PromptPending {
		return fmt.Sprintf("pending (%d ahead)", s.Ahead)
	}
	return s.Phase.String()
}

// PromptStatus finds out what became of a prompt, e.g. after a WebSocket gap. It asks the
// queue FIRST and the history second (a prompt moves from the queue to the history
// atomically, so this order cannot miss a finished one; the reverse can), and re-checks both
// once before calling the prompt lost. The entry is returned for PromptDone.
func (c *Client) PromptStatus(ctx context.Context, promptID string) (PromptState, *HistoryEntry, error) {
	for try := 0; try < 2; try++ {
		q, err := c.Queue(ctx)
		if err != nil {
			return PromptState{}, nil, err
		}
		if ahead, running, found := q.Position(promptID); found {
			if running {
				return PromptState{Phase: PromptRunning}, nil, nil
			}
			return PromptState{Phase: PromptPending, Ahead: ahead}, nil, nil
		}
		h, err := c.History(ctx, promptID)
		switch {
		case err == nil:
			return PromptState{Phase: PromptDone}, h, nil
		case !errors.Is(err, ErrNotInHistory):
			return PromptState{}, nil, err
		}
	}
	return PromptState{Phase: PromptLost}, nil, nil
}
