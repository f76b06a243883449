package dispatch

import (
	"bytes"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"testing"

	"github.com/gorilla/websocket"

	"github.com/comfyfarm/comfyfarm/comfy/comfytest"
)

// rewritingProxy puts a proxy in front of the fake node s and returns its
// URL: /history/ answer bodies go through history and the text frames of
// /ws through frame (nil: passed unchanged), and each /view query is told to
// view (nil: not told).
func rewritingProxy(t testing.TB, s *comfytest.Server, history, frame func([]byte) []byte, view func(query string)) string {
	target, _ := url.Parse(s.URL())
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.ModifyResponse = func(resp *http.Response) error {
		if resp.Request.URL.Path == "/view" && view != nil {
			view(resp.Request.URL.RawQuery)
		}
		if !strings.HasPrefix(resp.Request.URL.Path, "/history/") || history == nil {
			return nil
		}
		body, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		resp.Body.Close()
		body = history(body)
		resp.Body = io.NopCloser(bytes.NewReader(body))
		resp.ContentLength = int64(len(body))
		resp.Header.Del("Content-Length")
		return nil
	}
	var up websocket.Upgrader
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/ws" {
			proxy.ServeHTTP(w, r)
			return
		}
		node, _, err := websocket.DefaultDialer.Dial("ws://"+target.Host+"/ws?"+r.URL.RawQuery, nil)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		client, err := up.Upgrade(w, r, nil)
		if err != nil {
			node.Close()
			return
		}
		relay := func(from, to *websocket.Conn, rewrite func([]byte) []byte) {
			defer from.Close()
			defer to.Close()
			for {
				typ, msg, err := from.ReadMessage()
				if err != nil {
					return
				}
				if typ == websocket.TextMessage && rewrite != nil {
					msg = rewrite(msg)
				}
				if to.WriteMessage(typ, msg) != nil {
					return
				}
			}
		}
		go relay(client, node, nil)
		relay(node, client, frame)
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}
