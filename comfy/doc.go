// Package comfy is the client for ONE ComfyUI server: its HTTP API, its WebSocket event
// stream and the API-format workflow graphs it runs. It imports no other package of the
// project; the farm (comfy/dispatch) builds on it.
//
// # Servers
//
// ComfyUI changed a lot between 2023 and 2026 and has no protocol version. Features detects
// what a server supports and groups servers into three generations:
//
//	GenLegacy   before 2024-08   executing{node:null} is the only completion signal; history may
//	                             have no status; no timestamps
//	GenClassic  2024-08..0.3.44  execution_success, history status and meta (v0.3.10 is one)
//	GenCurrent  >= 0.3.45        /features, feature_flags handshake, progress_state,
//	                             kind-4 previews with metadata, client-chosen prompt_id;
//	                             >= 0.3.57 targeted interrupt; >= 0.6.0 /api/jobs
//
// The decoders are tested against traffic recorded from real v0.3.10 and v0.8.0 servers
// (testdata/comfy-traces*).
//
// # Life of a prompt
//
//	Submit ──> pending ──> running ──> history entry written ──> executing{node:null}
//	   │          │ (Queue.Position: sort by (number, prompt_id), +1 if one runs)
//	   │          └── DeletePending
//	   └── 400: *ValidationError (nothing queued); 200 + node_errors: *ValidationError with
//	       the response (queued, broken outputs dropped)
//
// Over the WebSocket a prompt posted with this client's ClientID produces execution_start,
// execution_cached, then per node [progress_state] executing, progress/previews, executed,
// and finally execution_success | execution_error | execution_interrupted, status, and
// executing with node null. History exists only after the terminal message: fetch it on
// executing{node:null} (retry on ErrNotInHistory). HistoryEntry.Outcome tells success from
// error from interrupt (interrupts are recorded as "error" too); Files lists the outputs,
// View downloads them with a size cap.
//
// # Things that bite
//
//   - Events for a client id with no open socket are dropped, not buffered. After any gap
//     (Stream emits *Disconnected then *Connected{Reconnect: true}) reconcile each in-flight
//     prompt with PromptStatus, which asks the queue first and the history second.
//   - Reconnecting with the same client id while the old socket lingers can make the server
//     unregister the new one; Conn.Close waits until the old socket is gone, and Stream closes
//     before it redials.
//   - The server never pings and sends nothing while idle; Conn pings and gives up when no
//     frame or pong arrives within the keep-alive window.
//   - Before 0.3.57 an interrupt with a prompt_id is global: it stops whatever runs.
//   - An identical resubmission runs nothing and returns the old files; give every job its
//     own filename_prefix (Graph.SetFilenamePrefix).
//   - Every body, JSON prompts included, is capped by the server (413, ErrTooLarge). A proxy
//     that forwards a browser Origin gets a bare 403 (ErrForbidden); this client never sends
//     Origin or Sec-Fetch-* headers.
//   - Numbers may be int or float, node_errors an object or [], "error" an object or a
//     string, executing.node null: the decoders accept all of these.
//
// IsTransient separates errors worth retrying (refused or reset connections, timeouts, 5xx)
// from permanent ones (validation, 4xx).
package comfy
