package server

import (
	"bytes"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
)

// Events of one job that carry the same number (a preview relayed by the
// replicas' bus gets the number of the event before it) are each encoded
// as themselves, whichever is encoded first.
func TestFramesSameSeqDifferentEvents(t *testing.T) {
	s := &Server{frames: newFrameCache()}
	v, m := 3.0, 10.0
	progress := schema.Event{JobID: "j", Seq: 7, Type: schema.EventProgress, Value: &v, Max: &m}
	preview := schema.Event{JobID: "j", Seq: 7, Type: schema.EventPreview, Format: "image/jpeg", Image: "AAAA"}
	for _, order := range [][]schema.Event{{progress, preview}, {preview, progress}} {
		s.frames = newFrameCache()
		for range 2 {
			for _, ev := range order {
				_, sse, err := s.encoded(t.Context(), ev)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Contains(sse, []byte("event: "+string(ev.Type)+"\n")) {
					t.Fatalf("the %s event was sent as %q", ev.Type, sse)
				}
			}
		}
	}
}
