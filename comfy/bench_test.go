package comfy

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// lastFrame returns the largest recorded text frame of the given type.
func lastFrame(b *testing.B, typ string) []byte {
	var best string
	for _, tr := range loadTraces(b) {
		for _, e := range tr.Events {
			if e.Kind == "ws_text" && strings.Contains(e.Raw, `"type": "`+typ+`"`) && len(e.Raw) > len(best) {
				best = e.Raw
			}
		}
	}
	if best == "" {
		b.Fatalf("no %s frame", typ)
	}
	return []byte(best)
}

func BenchmarkDecodeText(b *testing.B) {
	for _, typ := range []string{"executing", "progress", "progress_state", "executed", "execution_error"} {
		frame := lastFrame(b, typ)
		b.Run(typ, func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := DecodeText(frame); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkDecodeBinaryPreview(b *testing.B) {
	meta := []byte(`{"node_id": "3", "prompt_id": "0d4fb8cf-aed8-437d-9874-f71194332f5e", "display_node_id": "3", "parent_node_id": null, "real_node_id": "3", "image_type": "image/jpeg"}`)
	frames := map[string][]byte{
		"kind1": EncodePreview(PreviewFormatJPEG, make([]byte, 64<<10)),
		"kind4": EncodePreviewWithMetadata(meta, make([]byte, 64<<10)),
	}
	for name, frame := range frames {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(frame)))
			b.ReportAllocs()
			for b.Loop() {
				if _, err := DecodeBinary(frame); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkParseGraph(b *testing.B) {
	// A realistic workflow and a large generated one (500 chained nodes).
	var big strings.Builder
	big.WriteString(`{"0": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}`)
	for i := 1; i < 500; i++ {
		fmt.Fprintf(&big, `,"%d": {"class_type": "ImageBlur", "inputs": {"image": ["%d", 0], "blur_radius": 3, "sigma": 1.5}}`, i, i-1)
	}
	big.WriteString(`}`)
	for name, wf := range map[string][]byte{"sdxl17": []byte(sdxlWorkflow), "chain500": []byte(big.String())} {
		b.Run(name, func(b *testing.B) {
			b.SetBytes(int64(len(wf)))
			b.ReportAllocs()
			for b.Loop() {
				g, err := ParseGraph(wf, GraphLimits{})
				if err != nil {
					b.Fatal(err)
				}
				g.SetFilenamePrefix("job")
				if _, err := g.Marshal(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkQueuePosition(b *testing.B) {
	var sb strings.Builder
	sb.WriteString(`{"queue_running": [[0, "run", {}, {}, []]], "queue_pending": [`)
	for i := 0; i < 1000; i++ {
		if i > 0 {
			sb.WriteString(",")
		}
		fmt.Fprintf(&sb, `[%d, "p%04d", {"1": {"class_type": "EmptyImage", "inputs": {}}}, {"client_id": "c"}, ["1"]]`, (i*7919)%1000, i)
	}
	sb.WriteString(`]}`)
	body := []byte(sb.String())
	b.Run("decode1000", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		b.ReportAllocs()
		for b.Loop() {
			var q Queue
			if err := json.Unmarshal(body, &q); err != nil {
				b.Fatal(err)
			}
		}
	})
	var q Queue
	if err := json.Unmarshal(body, &q); err != nil {
		b.Fatal(err)
	}
	b.Run("position1000", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, _, found := q.Position("p0500"); !found {
				b.Fatal("not found")
			}
		}
	})
}

func BenchmarkHistoryDecode(b *testing.B) {
	var body []byte
	for _, tr := range loadTraces(b) {
		for _, e := range tr.Events {
			if e.Kind == "http_response" && strings.HasPrefix(e.Path, "/history/") && len(e.Body) > len(body) {
				body = e.Body
			}
		}
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	for b.Loop() {
		hs, err := DecodeHistory(body)
		if err != nil {
			b.Fatal(err)
		}
		for _, h := range hs {
			_ = h.Outcome()
			_ = h.Files()
		}
	}
}
