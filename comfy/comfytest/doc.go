// Package comfytest is a fake ComfyUI server for tests, demos and benchmarks.
// It speaks real HTTP and WebSocket on a loopback port, and behaves like a
// real ComfyUI of one of three protocol generations closely enough that the
// traffic recorded from real servers (comfy/testdata/comfy-traces from
// v0.3.10, comfy/testdata/comfy-traces-current from v0.8.0) replays against
// it with the same messages, the same fields and the same HTTP status codes
// and body structure.
//
//	s := comfytest.NewServer(comfytest.Options{Generation: comfytest.GenCurrent})
//	defer s.Close()
//	// point a client at s.URL()
//
// As a process, ListenAndServe(ctx, "127.0.0.1:8188", opts) runs one until ctx
// ends.
//
// # What is faithful
//
// The fake follows ComfyUI's server.py, execution.py and main.py step by step
// rather than imitating their output:
//
//   - One worker runs prompts strictly one at a time from a heap that is
//     Python's heapq, ordered by (number, prompt_id): the counter starts at 0,
//     rises with every POST /prompt without "number" (failed validations leave
//     gaps), "front" gives -counter, an explicit "number" is taken as a float.
//     GET /queue lists pending prompts in raw heap order, as ComfyUI does.
//   - Validation walks the graph the way validate_prompt/validate_inputs do,
//     with the catalogue (object_info) driving types, ranges and combos:
//     invalid_prompt, prompt_no_outputs, prompt_outputs_failed_validation with
//     per-node required_input_missing, bad_linked_input, return_type_mismatch,
//     invalid_input_type (Python int()/float() rules and messages),
//     value_smaller_than_min, value_bigger_than_max, value_not_in_list (long
//     lists abbreviated), custom_validation_failed (LoadImage),
//     exception_during_inner_validation and exception_during_validation where
//     ComfyUI catches an exception, HTTP 500 where it does not. Partly valid
//     prompts run their valid outputs and answer 200 with node_errors. Inputs
//     are converted in place, so history and queue echo converted values.
//   - Bodies are decoded into ordered values that keep ints and floats apart
//     and encoded like json.dumps (", " and ": " separators, ASCII escapes,
//     float repr), so responses and frames have the recordings' layout: key
//     order, 1.0 versus 1, echoed graphs as the client sent them (after
//     conversion).
//   - Execution uses ComfyUI's execution list (output nodes first, then nodes
//     feeding outputs) and its cache: a node is cached when an identical node
//     with identical upstream ran in the last prompt (input signatures);
//     resubmitting a prompt re-sends executed for cached outputs and writes no
//     file; a failed node is not cached; POST /free {"free_memory": true} drops
//     the cache. GenLegacy uses the 2023 node-id cache instead.
//   - Events go to the prompt's client_id, or to every socket when it has none
//     (status, progress, previews, progress_state, execution_interrupted),
//     exactly as PromptServer.send_sync routes them. A socket reconnecting with
//     the same clientId gets status (with sid) and executing{node} without
//     prompt_id; frames sent while it was away are lost. When a handler of an
//     older socket with the same clientId exits, it unregisters the newer
//     socket (ComfyUI issue #16010).
//   - Node classes run on stand-in values (an image is its size, batch and
//     colour) and fail where ComfyUI fails: ImageBlur/ImageSharpen with a radius
//     not smaller than the image raise torch's padding RuntimeError with a
//     traceback and current_inputs; SaveImage outside the output folder raises;
//     LoadImage of bytes that are not an image raises PIL's error; allocations
//     beyond 64 Mpixel raise CUDA out of memory.
//   - SaveImage writes real PNGs of the requested size (with the prompt in a
//     tEXt chunk, as ComfyUI does) as <prefix>_<counter:05>_.png, counter =
//     highest counter in the folder + 1, "/" in the prefix makes subfolders,
//     %width%/%height%/%year%… tokens are expanded. PreviewImage writes
//     ComfyUI_temp_<5 letters>_<counter>_.png to temp. GET /view serves them with
//     ComfyUI's path rules (".." or a leading "/" → 400, unknown type → 400,
//     subfolder escape → 403, missing → 404, " [input]" suffixes, Range).
//   - Uploads: overwrite, identical-bytes detection (not in GenLegacy), renaming
//     to "name (1).ext", subfolders, 400 without an image, 500 for an unknown
//     type; /upload/mask copies the mask's alpha onto the original.
//   - Body size limit for every request (Options.MaxUploadMB) → 413.
//
// Stable Diffusion classes are included: CheckpointLoaderSimple (the first
// run for a checkpoint costs Options.CheckpointLoad, then it counts as loaded
// until POST /free unloads models), LoraLoader, CLIPTextEncode,
// EmptyLatentImage, KSampler (one progress step per "steps", JPEG previews
// with Options.Previews) and VAEDecode.
//
// # Generations
//
// GenCurrent (v0.8.0): progress_state, the feature_flags handshake (first
// client frame) and GET /features, binary type-4 previews for sockets that
// negotiated supports_preview_metadata (sent before their progress frame),
// client-chosen prompt_id, targeted POST /interrupt {"prompt_id"}, /api/jobs,
// error bodies with node_errors {} and the no_prompt shape, extra_data
// create_time, no Content-Type on empty bodies.
//
// GenClassic (v0.3.10): the same without those; "no prompt" is
// {"error": "no prompt", "node_errors": []}; empty bodies are
// application/octet-stream.
//
// GenLegacy (mid/late 2023): no execution_success, no timestamps, executed
// only for nodes that ran, executing{node:null} as the only completion signal,
// progress {value, max} only, history entries with prompt and outputs only,
// no /api prefix, no /features, /free or /models, no duplicate detection on
// upload.
//
// # Configuration and faults
//
// Options sets the generation, the listen address, per-class execution times
// (ClassTime, DefaultClassTime), progress steps, previews, checkpoint load
// time and names, the body limit, the reported device and a logger.
//
// Fault controls on *Server are safe for concurrent use:
//
//   - Crash closes the listener and every connection (connections are
//     refused); Restart listens again on the same port with fresh state
//     (queue, history, cache, loaded models, counter and temp files gone,
//     input and output files kept).
//   - Hang(true) accepts connections but answers no request, sends no frame
//     and stops the worker at its next step; Hang(false) lets everything go on.
//   - SetSlow(d) delays every HTTP response.
//   - FailNth(n): the n-th prompt started after the call fails with a CUDA
//     out-of-memory execution_error at the first node it executes (a fully
//     cached prompt executes none and succeeds).
//   - Hold/Release stop and restart taking prompts from the queue.
//
// Stats, History, ReadFile and WriteInput let tests look inside.
//
// # Conformance and known differences
//
// The tests replay every recorded scenario of both trace folders on one fake
// per folder, in recording order, with the worker moved in lockstep with the
// trace. They compare the sequence of WebSocket message types and binary
// kinds, the key sets of every frame, node ids, every HTTP status and
// Content-Type, JSON body structure, error types and per-node error types,
// the priority numbers and the saved file names. What differs, and how the
// comparison treats it:
//
//	detail                                  | fake                                        | comparison
//	----------------------------------------|---------------------------------------------|------------------------------
//	status frames from HTTP handlers        | per-socket FIFO; place relative to worker   | count exact, place within
//	                                        | frames depends on request timing, as in the | three frames
//	                                        | real server (recordings differ too)         |
//	/system_stats device and argv           | a GPU ("cuda", index 0, Options.VRAM) and   | these two fields by presence
//	                                        | a short argv; the recording ran on CPU      |
//	/object_info class list                 | traced classes + SD classes + ImageToMask,  | traced classes compared
//	                                        | not all 248/562 classes                     | entry by entry
//	PreviewImage file names                 | random letters differ                       | mapped, not compared
//	/view body length                       | solid-colour PNGs compress differently      | PNG decodes; length not
//	execution order of independent outputs  | reverse prompt order (ComfyUI iterates a    | exact (matches every trace)
//	and error order within a node           | hash-ordered set); error order: declaration |
//	                                        | order (classic), sorted names (current)     |
//	"executed" in execution_interrupted,    | execution order, prompt order               | structure only
//	current_outputs                         |                                             |
//	tracebacks, current_inputs tensors      | templates from the traces for the blur and  | structure only
//	                                        | validation errors; short tensor reprs       |
//	timing                                  | ClassTime instead of compute                | replayed in virtual time
//	                                        |                                             | with ImageBlur the slow
//	                                        |                                             | class, so the longest jobs
//	                                        |                                             | stay the same
//
// Beyond the traces, simplified on purpose: one FIFO per socket instead of
// ComfyUI's single global FIFO (a client that stops reading stalls only
// itself, and its socket is closed once 65536 frames wait); ?preview=webp is answered with JPEG (no WebP encoder in the
// standard library); NaN/Infinity literals and invalid UTF-8 in request bodies
// are refused (500) or replaced rather than accepted; extra_data must be an
// object; lazy inputs, subgraph expansion and ExecutionBlocker are not
// modelled; partial_execution_targets only filters output nodes; the cache has
// no LRU or RAM modes.
package comfytest
