package main

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/dbcontrollers"
	"github.com/comfyfarm/comfyfarm/dbcontrollers/dbtest"
	"github.com/comfyfarm/comfyfarm/schema"
)

// comfyPrompt is an API-format graph as a ComfyUI client sends it.
const comfyPrompt = `{
 "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
 "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
 "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
 "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": 4, "cfg": 7.0, "sampler_name": "euler",
       "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0],
       "latent_image": ["5", 0]}},
 "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
 "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}}
}`

// exampleClient is a port of the steps of ComfyUI's own WebSocket API
// example client (script_examples/websockets_api_example.py): it knows only
// a server address (host:port plus, here, a path) and a client id it made up.
type exampleClient struct {
	t              *testing.T
	serverAddress  string // "127.0.0.1:PORT/comfy/u/TOKEN"
	clientID       string
	choosePromptID bool // newer versions of the example pick the prompt id themselves
	seen           []string
}

func uuid4(t *testing.T) string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// urlopen is urllib.request.urlopen: POST with a body (urllib sends it as
// application/x-www-form-urlencoded), GET without; an error status raises.
func (c *exampleClient) urlopen(rawURL string, data []byte) []byte {
	c.t.Helper()
	var res *http.Response
	var err error
	if data != nil {
		res, err = http.Post(rawURL, "application/x-www-form-urlencoded", bytes.NewReader(data))
	} else {
		res, err = http.Get(rawURL)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		c.t.Fatal(err)
	}
	if res.StatusCode != http.StatusOK {
		c.t.Fatalf("%s: HTTP %d: %s", rawURL, res.StatusCode, body)
	}
	return body
}

func (c *exampleClient) queuePrompt(prompt json.RawMessage, promptID string) string {
	p := map[string]any{"prompt": prompt, "client_id": c.clientID}
	if promptID != "" {
		p["prompt_id"] = promptID
	}
	data, _ := json.Marshal(p)
	var out struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal(c.urlopen(fmt.Sprintf("http://%s/prompt", c.serverAddress), data), &out); err != nil {
		c.t.Fatal(err)
	}
	return out.PromptID
}

func (c *exampleClient) getImage(filename, subfolder, folderType string) []byte {
	v := url.Values{"filename": {filename}, "subfolder": {subfolder}, "type": {folderType}}
	return c.urlopen(fmt.Sprintf("http://%s/view?%s", c.serverAddress, v.Encode()), nil)
}

func (c *exampleClient) getHistory(promptID string) map[string]json.RawMessage {
	var h map[string]json.RawMessage
	if err := json.Unmarshal(c.urlopen(fmt.Sprintf("http://%s/history/%s", c.serverAddress, promptID), nil), &h); err != nil {
		c.t.Fatal(err)
	}
	return h
}

// getImages is the example's get_images: queue, read the socket until
// executing with node null for this prompt, then history and view.
func (c *exampleClient) getImages(ws *websocket.Conn, prompt json.RawMessage) (string, map[string][][]byte) {
	promptID := ""
	if c.choosePromptID {
		promptID = uuid4(c.t)
		c.queuePrompt(prompt, promptID)
	} else {
		promptID = c.queuePrompt(prompt, "")
	}
	outputImages := map[string][][]byte{}
	for {
		typ, out, err := ws.ReadMessage()
		if err != nil {
			c.t.Fatalf("ws.recv: %v (seen %v)", err, c.seen)
		}
		if typ != websocket.TextMessage {
			continue // previews are binary data
		}
		var message struct {
			Type string `json:"type"`
			Data struct {
				Node     *string `json:"node"`
				PromptID string  `json:"prompt_id"`
			} `json:"data"`
		}
		if err := json.Unmarshal(out, &message); err != nil {
			c.t.Fatal(err)
		}
		c.seen = append(c.seen, message.Type)
		if message.Type == "executing" && message.Data.Node == nil && message.Data.PromptID == promptID {
			break // execution is done
		}
	}
	var history struct {
		Outputs map[string]struct {
			Images []struct {
				Filename  string `json:"filename"`
				Subfolder string `json:"subfolder"`
				Type      string `json:"type"`
			} `json:"images"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(c.getHistory(promptID)[promptID], &history); err != nil {
		c.t.Fatal(err)
	}
	for nodeID, nodeOutput := range history.Outputs {
		for _, image := range nodeOutput.Images {
			outputImages[nodeID] = append(outputImages[nodeID], c.getImage(image.Filename, image.Subfolder, image.Type))
		}
	}
	return promptID, outputImages
}

// run is the example's main part: connect the socket, then get_images.
func (c *exampleClient) run(prompt json.RawMessage) (string, map[string][][]byte) {
	ws, _, err := websocket.DefaultDialer.Dial(fmt.Sprintf("ws://%s/ws?clientId=%s", c.serverAddress, c.clientID), nil)
	if err != nil {
		c.t.Fatalf("ws connect: %v", err)
	}
	defer ws.Close()
	return c.getImages(ws, prompt)
}

// ComfyUI's own example client, given only the base address of a token,
// runs two prompts at once on a farm of two nodes: each ends with executing
// null for its prompt, history names the output, /view serves its bytes,
// and each output is a photo row of the token's user.
func TestComfyAPIExampleClientFlow(t *testing.T) {
	dbtest.Each(t, func(t *testing.T, db dbcontrollers.Config) {
		s := startStack(t, db)
		var tok struct {
			Token     string    `json:"token"`
			BaseURL   string    `json:"base_url"`
			ExpiresAt time.Time `json:"expires_at"`
		}
		res, body := s.do("POST", "/api/v1/comfy/tokens", "style-key",
			strings.NewReader(`{"user_id":"painter-7","ttl":"1h"}`), "application/json")
		if res.StatusCode != http.StatusCreated {
			t.Fatalf("mint token: %d %s", res.StatusCode, body)
		}
		if err := json.Unmarshal(body, &tok); err != nil {
			t.Fatal(err)
		}
		// base_url is on public_url (here derived from listen: localhost);
		// the client is given the loopback address with the same path.
		port := s.base[strings.LastIndex(s.base, ":"):]
		if !strings.HasSuffix(tok.BaseURL, port+"/comfy/u/"+tok.Token) || time.Until(tok.ExpiresAt) <= 0 {
			t.Fatalf("token answer %s (server %s)", body, s.base)
		}
		serverAddress := strings.TrimPrefix(s.base, "http://") + "/comfy/u/" + tok.Token

		// Both nodes hold their prompts until both jobs are on a node, so
		// the two prompts run on different nodes.
		for _, f := range s.fakes {
			f.Hold()
		}
		type result struct {
			promptID string
			images   map[string][][]byte
			seen     []string
		}
		results := make([]result, 2)
		var wg sync.WaitGroup
		for i := range results {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c := &exampleClient{t: t, serverAddress: serverAddress, clientID: uuid4(t), choosePromptID: i == 0}
				pid, images := c.run(json.RawMessage(fmt.Sprintf(comfyPrompt, 100+i)))
				results[i] = result{pid, images, c.seen}
			}()
		}
		deadline := time.Now().Add(30 * time.Second)
		for {
			var jobs []schema.Job
			s.getJSON("/api/v1/jobs?user_id=painter-7", "style-key", &jobs)
			onNode := map[string]bool{}
			for _, j := range jobs {
				if j.Node != "" {
					onNode[j.Node] = true
				}
			}
			if len(jobs) == 2 && len(onNode) == 2 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("jobs not spread over both nodes: %+v", jobs)
			}
			time.Sleep(20 * time.Millisecond)
		}
		for _, f := range s.fakes {
			f.Release()
		}
		wg.Wait()
		if t.Failed() {
			return
		}

		var photos struct {
			Photos []schema.Photo `json:"photos"`
			Total  int            `json:"total"`
		}
		s.getJSON("/api/v1/photos?user_id=painter-7", "style-key", &photos)
		if photos.Total != 2 {
			t.Fatalf("photos of painter-7: %+v", photos)
		}
		bySum := map[string]schema.Photo{}
		for _, p := range photos.Photos {
			bySum[p.SHA256] = p
		}
		nodes := map[string]bool{}
		for i, r := range results {
			images := r.images["9"]
			if len(images) != 1 || len(r.images) != 1 {
				t.Fatalf("prompt %d: outputs %v", i, r.images)
			}
			sum := sha256.Sum256(images[0])
			p, ok := bySum[hex.EncodeToString(sum[:])]
			if !ok {
				t.Fatalf("prompt %d: the image from /view is no photo of the user", i)
			}
			nodes[p.Node] = true
			for _, want := range []string{"status", "execution_start", "executing", "progress", "executed", "execution_success"} {
				if !slices.Contains(r.seen, want) {
					t.Errorf("prompt %d: no %s message in %v", i, want, r.seen)
				}
			}
			if r.seen[0] != "status" {
				t.Errorf("prompt %d: first message %s", i, r.seen[0])
			}
		}
		if len(nodes) != 2 {
			t.Errorf("outputs came from nodes %v, want both", nodes)
		}
		if !strings.Contains(results[0].promptID, "-") {
			t.Errorf("client-chosen prompt id not kept: %q", results[0].promptID)
		}
	})
}

// With a bare frontend key the prompts are user "comfy"'s: history and view
// answer to the key, and the output is a photo of user comfy.
func TestComfyAPIBareKey(t *testing.T) {
	s := startStack(t, dbtest.SQLite(t))
	res, body := s.do("POST", "/comfy/prompt", "logo-key",
		strings.NewReader(`{"prompt":`+fmt.Sprintf(comfyPrompt, 7)+`}`), "application/json")
	if res.StatusCode != http.StatusOK {
		t.Fatalf("prompt: %d %s", res.StatusCode, body)
	}
	var ans struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal(body, &ans); err != nil {
		t.Fatal(err)
	}
	var hist map[string]struct {
		Outputs map[string]map[string][]struct {
			Filename, Subfolder, Type string
		} `json:"outputs"`
		Status struct {
			StatusStr string `json:"status_str"`
		} `json:"status"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		s.getJSON("/comfy/history/"+ans.PromptID, "logo-key", &hist)
		if len(hist) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no history")
		}
		time.Sleep(20 * time.Millisecond)
	}
	entry := hist[ans.PromptID]
	imgs := entry.Outputs["9"]["images"]
	if entry.Status.StatusStr != "success" || len(imgs) != 1 {
		t.Fatalf("history %+v", hist)
	}
	q := url.Values{"filename": {imgs[0].Filename}, "subfolder": {imgs[0].Subfolder}, "type": {imgs[0].Type}}
	res, img := s.do("GET", "/comfy/view?"+q.Encode(), "logo-key", nil, "")
	if res.StatusCode != http.StatusOK || len(img) == 0 {
		t.Fatalf("view: %d %s", res.StatusCode, img)
	}
	if res, _ := s.do("GET", "/comfy/view?"+q.Encode(), "style-key", nil, ""); res.StatusCode != http.StatusNotFound {
		t.Fatalf("another frontend's key viewed the output: %d", res.StatusCode)
	}
	var photos struct {
		Photos []schema.Photo `json:"photos"`
	}
	s.getJSON("/api/v1/photos?user_id=comfy", "logo-key", &photos)
	sum := sha256.Sum256(img)
	if len(photos.Photos) != 1 || photos.Photos[0].SHA256 != hex.EncodeToString(sum[:]) {
		t.Fatalf("photos of comfy: %+v", photos)
	}

	// An uploaded image used by a prompt's LoadImage reaches the node.
	var form bytes.Buffer
	mw := multipart.NewWriter(&form)
	fw, _ := mw.CreateFormFile("image", "portrait.png")
	_, _ = fw.Write(pngBytes(t, 16, 16))
	_ = mw.Close()
	if res, b := s.do("POST", "/comfy/upload/image", "logo-key", &form, mw.FormDataContentType()); res.StatusCode != http.StatusOK {
		t.Fatalf("upload: %d %s", res.StatusCode, b)
	}
	withImage := `{"prompt":{"1":{"class_type":"LoadImage","inputs":{"image":"portrait.png"}},` +
		`"2":{"class_type":"ImageInvert","inputs":{"image":["1",0]}},` +
		`"3":{"class_type":"SaveImage","inputs":{"filename_prefix":"inv","images":["2",0]}}}}`
	res, body2 := s.do("POST", "/comfy/prompt", "logo-key", strings.NewReader(withImage), "application/json")
	if res.StatusCode != http.StatusOK {
		t.Fatalf("prompt with an upload: %d %s", res.StatusCode, body2)
	}
	if err := json.Unmarshal(body2, &ans); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(30 * time.Second)
	for {
		clear(hist)
		s.getJSON("/comfy/history/"+ans.PromptID, "logo-key", &hist)
		if len(hist) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no history of the prompt with an upload")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if e := hist[ans.PromptID]; e.Status.StatusStr != "success" || len(e.Outputs["3"]["images"]) != 1 {
		t.Fatalf("prompt with an upload: %+v", hist)
	}
}
