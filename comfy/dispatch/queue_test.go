package dispatch

import (
	"fmt"
	"testing"
	"time"
)

func pj(id, frontend string, prio int, at time.Time) *pendingJob {
	return &pendingJob{ID: id, Frontend: frontend, Priority: prio, Created: at}
}

func TestFairQueuePriorityThenFIFO(t *testing.T) {
	q := newFairQueue(nil)
	t0 := time.Unix(1000, 0)
	q.Push(pj("a1", "a", 0, t0))
	q.Push(pj("a2", "a", 5, t0.Add(time.Second)))
	q.Push(pj("a3", "a", 0, t0.Add(2*time.Second)))
	q.Push(pj("a4", "a", 5, t0.Add(3*time.Second)))
	got := ids(q.Plan())
	want := "a2 a4 a1 a3"
	if got != want {
		t.Fatalf("plan = %s, want %s", got, want)
	}
}

func TestFairQueueBacklogDoesNotStarveAnother(t *testing.T) {
	q := newFairQueue(nil)
	t0 := time.Unix(1000, 0)
	for i := 0; i < 100; i++ {
		q.Push(pj(fmt.Sprintf("a%03d", i), "a", 0, t0.Add(time.Duration(i)*time.Millisecond)))
	}
	// A has been served for a while.
	for i := 0; i < 10; i++ {
		q.Take(q.Plan()[0].ID)
	}
	q.Push(pj("b000", "b", 0, t0.Add(time.Hour)))
	pos := q.Positions()
	if pos["b000"] > 1 {
		t.Fatalf("b's job has %d jobs ahead, want at most 1", pos["b000"])
	}
	// And the plan is followed: taking heads in plan order starts b within 2 picks.
	for i := 0; i < 2; i++ {
		if q.Take(q.Plan()[0].ID).Frontend == "b" {
			return
		}
	}
	t.Fatal("b's job was not started within two picks")
}

func TestFairQueueWeights(t *testing.T) {
	q := newFairQueue(map[string]int{"a": 3, "b": 1})
	t0 := time.Unix(1000, 0)
	for i := 0; i < 40; i++ {
		q.Push(pj(fmt.Sprintf("a%02d", i), "a", 0, t0))
		q.Push(pj(fmt.Sprintf("b%02d", i), "b", 0, t0))
	}
	plan := q.Plan()
	counts := map[string]int{}
	for _, j := range plan[:40] {
		counts[j.Frontend]++
	}
	if counts["a"] != 30 || counts["b"] != 10 {
		t.Fatalf("first 40 picks = %v, want a:30 b:10", counts)
	}
}

func TestFairQueuePlanMatchesTakes(t *testing.T) {
	q := newFairQueue(map[string]int{"c": 2})
	t0 := time.Unix(1000, 0)
	for i := 0; i < 7; i++ {
		q.Push(pj(fmt.Sprintf("a%d", i), "a", i%3, t0.Add(time.Duration(i)*time.Second)))
		if i%2 == 0 {
			q.Push(pj(fmt.Sprintf("b%d", i), "b", 0, t0.Add(time.Duration(i)*time.Second)))
		}
		q.Push(pj(fmt.Sprintf("c%d", i), "c", -i, t0.Add(time.Duration(i)*time.Second)))
	}
	plan := ids(q.Plan())
	var taken []string
	for q.Len() > 0 {
		taken = append(taken, q.Take(q.Plan()[0].ID).ID)
	}
	if got := fmt.Sprint(taken); "["+plan+"]" != got {
		t.Fatalf("plan %s but takes %s", plan, got)
	}
}

func ids(js []*pendingJob) string {
	s := ""
	for i, j := range js {
		if i > 0 {
			s += " "
		}
		s += j.ID
	}
	return s
}
