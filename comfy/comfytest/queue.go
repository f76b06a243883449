package comfytest

import (
	"math"
)

// queueItem is ComfyUI's queue tuple (number, prompt_id, prompt, extra_data,
// outputs_to_execute).
type queueItem struct {
	number   any     // int64 from the counter, float64 when the client sent one
	numF     float64 // number as a float, for ordering
	promptID string
	prompt   *obj
	extra    any // *obj normally; whatever the client sent otherwise
	outputs  []string
	seq      int64 // tie-break between identical (number, prompt_id)
}

func (q *queueItem) tuple() []any {
	outs := make([]any, len(q.outputs))
	for i, o := range q.outputs {
		outs[i] = o
	}
	return []any{q.number, q.promptID, q.prompt.clone(), cloneValue(q.extra), outs}
}

// clientID reports where this prompt's events go: ok is false when the prompt
// has no client_id (events broadcast or dropped); sid is "" with ok true when
// client_id is not a string (matches no socket).
func (q *queueItem) clientID() (sid string, ok bool) {
	eo, isObj := q.extra.(*obj)
	if !isObj {
		return "", false
	}
	v, has := eo.get("client_id")
	if !has || v == nil {
		return "", false
	}
	s, isStr := v.(string)
	if !isStr {
		return "\x00not-a-string", true
	}
	return s, true
}

func (q *queueItem) less(o *queueItem) bool {
	switch {
	case q.numF < o.numF:
		return true
	case q.numF > o.numF:
		return false
	case math.IsNaN(q.numF) != math.IsNaN(o.numF):
		return false
	}
	if q.promptID != o.promptID {
		return q.promptID < o.promptID
	}
	return q.seq < o.seq
}

// promptHeap reproduces Python's heapq exactly, so GET /queue lists pending
// prompts in the same raw heap order as ComfyUI.
type promptHeap []*queueItem

func (h *promptHeap) push(it *queueItem) {
	*h = append(*h, it)
	h.siftDown(0, len(*h)-1)
}

func (h *promptHeap) pop() *queueItem {
	a := *h
	last := a[len(a)-1]
	a = a[:len(a)-1]
	*h = a
	if len(a) == 0 {
		return last
	}
	ret := a[0]
	a[0] = last
	h.siftUp(0)
	return ret
}

func (h *promptHeap) heapify() {
	for i := len(*h)/2 - 1; i >= 0; i-- {
		h.siftUp(i)
	}
}

// siftDown is heapq._siftdown: move the item at pos up towards startpos.
func (h promptHeap) siftDown(startpos, pos int) {
	newitem := h[pos]
	for pos > startpos {
		parentpos := (pos - 1) >> 1
		parent := h[parentpos]
		if newitem.less(parent) {
			h[pos] = parent
			pos = parentpos
			continue
		}
		break
	}
	h[pos] = newitem
}

// siftUp is heapq._siftup: bubble the smaller child up to a leaf, then sift
// the item down into place.
func (h promptHeap) siftUp(pos int) {
	endpos := len(h)
	startpos := pos
	newitem := h[pos]
	childpos := 2*pos + 1
	for childpos < endpos {
		rightpos := childpos + 1
		if rightpos < endpos && !h[childpos].less(h[rightpos]) {
			childpos = rightpos
		}
		h[pos] = h[childpos]
		pos = childpos
		childpos = 2*pos + 1
	}
	h[pos] = newitem
	h.siftDown(startpos, pos)
}

// maxHistory is ComfyUI's MAXIMUM_HISTORY_SIZE.
const maxHistory = 10000
