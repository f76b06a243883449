package comfytest

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// BenchmarkPromptRoundTrip measures the fake's own overhead per prompt: POST
// /prompt, execute three zero-cost nodes (one PNG written), receive
// executing{node:null} over the WebSocket.
func BenchmarkPromptRoundTrip(b *testing.B) {
	for _, gen := range []Generation{GenCurrent, GenClassic} {
		b.Run(gen.String(), func(b *testing.B) {
			s := NewServer(Options{Generation: gen, DefaultClassTime: -1})
			defer s.Close()
			sock := dialSock(b, "ws"+strings.TrimPrefix(s.URL(), "http")+"/ws?clientId=bench")
			defer sock.close()
			for len(sock.frames()) == 0 {
				time.Sleep(time.Millisecond)
			}
			seen := 0
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				body := strings.Replace(promptBody("bench", "bench"), `"color": 255`, fmt.Sprintf(`"color": %d`, i), 1)
				resp, err := http.Post(s.URL()+"/prompt", "application/json", strings.NewReader(body))
				if err != nil {
					b.Fatal(err)
				}
				resp.Body.Close()
				for done := false; !done; {
					sock.mu.Lock()
					for ; seen < len(sock.got); seen++ {
						if strings.Contains(string(sock.got[seen].data), `"node": null`) {
							done = true
						}
					}
					sock.mu.Unlock()
					if !done {
						time.Sleep(20 * time.Microsecond)
					}
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "prompts/s")
		})
	}
}

// BenchmarkValidateSD measures POST /prompt's validation of a text-to-image
// graph.
func BenchmarkValidateSD(b *testing.B) {
	s := NewServer(Options{})
	defer s.Close()
	in := s.current()
	body := []byte(sdPrompt(1, 20, "x"))
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		p, err := decodeJSON(body)
		if err != nil {
			b.Fatal(err)
		}
		if c, exc := in.validatePrompt(p, nil); exc != nil || !c.ok {
			b.Fatal("invalid")
		}
	}
}

// BenchmarkProgressFanOut measures broadcast delivery: a prompt without
// client_id sends progress to every socket; 50 sockets, 200 steps.
func BenchmarkProgressFanOut(b *testing.B) {
	const sockets, steps = 50, 200
	s := NewServer(Options{DefaultClassTime: -1, ProgressSteps: map[string]int{"ImageInvert": steps}})
	defer s.Close()
	var socks []*testSock
	for i := 0; i < sockets; i++ {
		sock := dialSock(b, "ws"+strings.TrimPrefix(s.URL(), "http")+fmt.Sprintf("/ws?clientId=fan%d", i))
		defer sock.close()
		socks = append(socks, sock)
	}
	for _, sock := range socks {
		for len(sock.frames()) == 0 {
			time.Sleep(time.Millisecond)
		}
	}
	seen, counts := make([]int, sockets), make([]int, sockets)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		body := strings.Replace(promptBody("fan", ""), `"color": 255`, fmt.Sprintf(`"color": %d`, i), 1)
		resp, err := http.Post(s.URL()+"/prompt", "application/json", strings.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		resp.Body.Close()
		for j, sock := range socks {
			for counts[j] < (i+1)*steps {
				sock.mu.Lock()
				for ; seen[j] < len(sock.got); seen[j]++ {
					if strings.HasPrefix(string(sock.got[seen[j]].data), `{"type": "progress",`) {
						counts[j]++
					}
				}
				sock.mu.Unlock()
				time.Sleep(100 * time.Microsecond)
			}
		}
	}
	b.ReportMetric(float64(b.N*sockets*steps)/b.Elapsed().Seconds(), "frames/s")
}
