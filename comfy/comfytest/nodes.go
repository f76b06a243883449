package comfytest

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Node classes run on stand-in values instead of tensors: an image is its size,
// batch and colour, a model is the checkpoint it came from. That is enough to
// save real PNGs of the requested size, to fail where ComfyUI fails (a blur
// wider than the image, a path outside the output folder, an upload that is
// not an image), and to cost time like a GPU would.

type imageT struct {
	W, H, B int
	RGB     [3]uint8
}

type maskT struct{ W, H, B int }

type latentT struct {
	W, H, B int // in latent cells: pixels / 8
	Seed    uint64
}

type modelT struct {
	Ckpt  string
	Loras []string
}

type clipT struct {
	Ckpt  string
	Loras []string
}

type vaeT struct{ Ckpt string }

type condT struct{ Text string }

// maxPixels bounds what one node may allocate; beyond it the fake raises the
// out-of-memory error a GPU server would.
const maxPixels = 1 << 26

// nodeFailure is an exception raised while a node runs.
type nodeFailure struct {
	exc         pyErr
	frames      []any
	interrupted bool
	aborted     bool // the server crashed or closed: stop without messages
}

// nodeExec is one node execution.
type nodeExec struct {
	x     *execution
	id    string
	class *nodeClass
	args  *obj // input name -> value (upstream outputs resolved)
}

type nodeFunc func(n *nodeExec) ([]any, *obj, *nodeFailure)

var nodeFuncs map[string]nodeFunc

func init() {
	nodeFuncs = map[string]nodeFunc{
		"EmptyImage":             runEmptyImage,
		"ImageInvert":            runImageInvert,
		"ImageScale":             runImageScale,
		"ImageScaleBy":           runImageScaleBy,
		"ImageBlur":              func(n *nodeExec) ([]any, *obj, *nodeFailure) { return runPadFilter(n, "blur_radius", "blur") },
		"ImageSharpen":           func(n *nodeExec) ([]any, *obj, *nodeFailure) { return runPadFilter(n, "sharpen_radius", "sharpen") },
		"ImageToMask":            runImageToMask,
		"LoadImage":              runLoadImage,
		"SaveImage":              func(n *nodeExec) ([]any, *obj, *nodeFailure) { return runSave(n, kindOutput) },
		"PreviewImage":           func(n *nodeExec) ([]any, *obj, *nodeFailure) { return runSave(n, kindTemp) },
		"SaveImageWebsocket":     runSaveImageWebsocket,
		"CheckpointLoaderSimple": runCheckpointLoader,
		"LoraLoader":             runLoraLoader,
		"CLIPTextEncode":         runCLIPTextEncode,
		"EmptyLatentImage":       runEmptyLatent,
		"KSampler":               runKSampler,
		"VAEDecode":              runVAEDecode,
	}
}

// nodeSite is the line of node code a traceback ends in.
var nodeSites = map[string][4]string{
	"EmptyImage":             {"nodes.py", "1816", "generate", "r = torch.full([batch_size, height, width, 1], ((color >> 16) & 0xFF) / 0xFF)"},
	"ImageInvert":            {"nodes.py", "1867", "invert", "s = 1.0 - image"},
	"ImageScale":             {"nodes.py", "1764", "upscale", "s = comfy.utils.common_upscale(samples, width, height, upscale_method, crop)"},
	"ImageScaleBy":           {"nodes.py", "1785", "upscale", "s = comfy.utils.common_upscale(samples, width, height, upscale_method, \"disabled\")"},
	"ImageToMask":            {"comfy_extras/nodes_mask.py", "139", "image_to_mask", "mask = image[:, :, :, channels.index(channel)]"},
	"LoadImage":              {"nodes.py", "1653", "load_image", "img = node_helpers.pillow(Image.open, image_path)"},
	"SaveImage":              {"nodes.py", "1599", "save_images", "full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])"},
	"PreviewImage":           {"nodes.py", "1599", "save_images", "full_output_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(filename_prefix, self.output_dir, images[0].shape[1], images[0].shape[0])"},
	"SaveImageWebsocket":     {"custom_nodes/websocket_image_save.py", "29", "save_images", "pbar.update_absolute(step, images.shape[0], (\"PNG\", img, None))"},
	"CheckpointLoaderSimple": {"nodes.py", "569", "load_checkpoint", "out = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True, embedding_directory=folder_paths.get_folder_paths(\"embeddings\"))"},
	"LoraLoader":             {"nodes.py", "683", "load_lora", "model_lora, clip_lora = comfy.sd.load_lora_for_models(model, clip, lora, strength_model, strength_clip)"},
	"CLIPTextEncode":         {"nodes.py", "69", "encode", "return (clip.encode_from_tokens_scheduled(tokens), )"},
	"EmptyLatentImage":       {"nodes.py", "1188", "generate", "latent = torch.zeros([batch_size, 4, height // 8, width // 8], device=self.device)"},
	"KSampler":               {"nodes.py", "1519", "sample", "return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise)"},
	"VAEDecode":              {"nodes.py", "291", "decode", "images = vae.decode(samples[\"samples\"])"},
}

// tracebackFrames renders the frames of an exception raised in a node: the
// executor's frames of the generation, then the node's own line(s).
func (n *nodeExec) tracebackFrames(tail ...string) []any {
	var frames []any
	switch n.x.gen {
	case GenCurrent:
		frames = []any{
			"  File \"/srv/comfyui/execution.py\", line 518, in execute\n    output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n                                                              ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
			"  File \"/srv/comfyui/execution.py\", line 329, in get_output_data\n    return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, v3_data=v3_data)\n                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
			"  File \"/srv/comfyui/execution.py\", line 303, in _async_map_node_over_list\n    await process_inputs(input_dict, i)\n",
			"  File \"/srv/comfyui/execution.py\", line 291, in process_inputs\n    result = f(**inputs)\n",
		}
	case GenClassic:
		frames = []any{
			"  File \"/srv/comfyui/execution.py\", line 328, in execute\n    output_data, output_ui, has_subgraph = get_output_data(obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb)\n                                           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
			"  File \"/srv/comfyui/execution.py\", line 203, in get_output_data\n    return_values = _map_node_over_list(obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb)\n                    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
			"  File \"/srv/comfyui/execution.py\", line 174, in _map_node_over_list\n    process_inputs(input_dict, i)\n",
			"  File \"/srv/comfyui/execution.py\", line 163, in process_inputs\n    results.append(getattr(obj, func)(**inputs))\n                   ^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n",
		}
	default:
		frames = []any{
			"  File \"/srv/comfyui/execution.py\", line 153, in recursive_execute\n    output_data, output_ui = get_output_data(obj, input_data_all)\n",
			"  File \"/srv/comfyui/execution.py\", line 83, in get_output_data\n    return_values = map_node_over_list(obj, input_data_all, obj.FUNCTION, allow_interrupt=True)\n",
			"  File \"/srv/comfyui/execution.py\", line 76, in map_node_over_list\n    results.append(getattr(obj, func)(**slice_dict(input_data_all, i)))\n",
		}
	}
	if len(tail) == 0 {
		if site, ok := nodeSites[n.class.name]; ok {
			tail = []string{fmt.Sprintf("  File \"/srv/comfyui/%s\", line %s, in %s\n    %s\n", site[0], site[1], site[2], site[3])}
		}
	}
	for _, t := range tail {
		frames = append(frames, t)
	}
	return frames
}

func (n *nodeExec) fail(typ, msg string, tail ...string) *nodeFailure {
	return &nodeFailure{exc: pyErr{Type: typ, Msg: msg}, frames: n.tracebackFrames(tail...)}
}

func (n *nodeExec) oom(bytes int64) *nodeFailure {
	typ := "torch.OutOfMemoryError"
	if n.x.gen == GenLegacy {
		typ = "torch.cuda.OutOfMemoryError"
	}
	return n.fail(typ, fmt.Sprintf("Allocation on device 0 would exceed allowed memory. (out of memory)\nCurrently allocated     : 3.12 GiB\nRequested               : %s\nDevice limit            : %s\nFree (according to CUDA): 0 bytes\nPyTorch limit (set by user-supplied memory fraction)\n                        : 17179869184.00 GiB", gib(bytes), gib(n.x.in.srv.opts.VRAM)))
}

func gib(b int64) string { return fmt.Sprintf("%.2f GiB", float64(b)/(1<<30)) }

// arg reads an input; widget values are already converted by validation.
func (n *nodeExec) arg(name string) any {
	v, _ := n.args.get(name)
	return v
}

func (n *nodeExec) intArg(name string) int64 {
	v := n.arg(name)
	if i, ok := bigOrInt(v); ok {
		return i
	}
	if b, ok := v.(bool); ok && b {
		return 1
	}
	if f, ok := v.(float64); ok {
		return int64(f)
	}
	return math.MaxInt64
}

func (n *nodeExec) floatArg(name string) float64 {
	f, _ := pyNumber(n.arg(name))
	return f
}

func (n *nodeExec) strArg(name string) string { return pyStr(n.arg(name)) }

func (n *nodeExec) image(name string) (imageT, *nodeFailure) {
	switch t := n.arg(name).(type) {
	case imageT:
		return t, nil
	case nil:
		return imageT{}, n.fail("AttributeError", "'NoneType' object has no attribute 'shape'")
	default:
		return imageT{}, n.fail("AttributeError", fmt.Sprintf("'%s' object has no attribute 'shape'", pyTypeName(t)))
	}
}

func pixels(w, h, b int) int64 { return int64(w) * int64(h) * int64(b) }

func (n *nodeExec) checkSize(w, h, b int) *nodeFailure {
	if w <= 0 || h <= 0 || b <= 0 {
		return n.fail("RuntimeError", fmt.Sprintf("Trying to create tensor with negative dimension: [%d, %d, %d, 3]", b, h, w))
	}
	if p := pixels(w, h, b); p > maxPixels {
		return n.oom(p * 3 * 4)
	}
	return nil
}

func runEmptyImage(n *nodeExec) ([]any, *obj, *nodeFailure) {
	w, h, b := int(n.intArg("width")), int(n.intArg("height")), int(n.intArg("batch_size"))
	if f := n.checkSize(w, h, b); f != nil {
		return nil, nil, f
	}
	c := n.intArg("color")
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{imageT{W: w, H: h, B: b, RGB: [3]uint8{uint8(c >> 16), uint8(c >> 8), uint8(c)}}}, nil, nil
}

func runImageInvert(n *nodeExec) ([]any, *obj, *nodeFailure) {
	img, f := n.image("image")
	if f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	img.RGB = [3]uint8{255 - img.RGB[0], 255 - img.RGB[1], 255 - img.RGB[2]}
	return []any{img}, nil, nil
}

func runImageScale(n *nodeExec) ([]any, *obj, *nodeFailure) {
	img, f := n.image("image")
	if f != nil {
		return nil, nil, f
	}
	w, h := int(n.intArg("width")), int(n.intArg("height"))
	switch {
	case w == 0 && h == 0:
		w, h = img.W, img.H
	case w == 0:
		w = imax(1, int(math.Round(float64(img.W)*float64(h)/float64(img.H))))
	case h == 0:
		h = imax(1, int(math.Round(float64(img.H)*float64(w)/float64(img.W))))
	}
	if f := n.checkSize(w, h, img.B); f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	img.W, img.H = w, h
	return []any{img}, nil, nil
}

func runImageScaleBy(n *nodeExec) ([]any, *obj, *nodeFailure) {
	img, f := n.image("image")
	if f != nil {
		return nil, nil, f
	}
	s := n.floatArg("scale_by")
	w, h := int(math.Round(float64(img.W)*s)), int(math.Round(float64(img.H)*s))
	if f := n.checkSize(w, h, img.B); f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	img.W, img.H = w, h
	return []any{img}, nil, nil
}

// runPadFilter is ImageBlur and ImageSharpen: both reflect-pad the image by the
// radius, which torch refuses when the padding reaches the image size.
func runPadFilter(n *nodeExec, radiusInput, fn string) ([]any, *obj, *nodeFailure) {
	img, f := n.image("image")
	if f != nil {
		return nil, nil, f
	}
	r := n.intArg(radiusInput)
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	if r == 0 {
		return []any{img}, nil, nil
	}
	dim := 0
	switch {
	case r >= int64(img.W):
		dim = 3
	case r >= int64(img.H):
		dim = 2
	}
	if dim == 0 {
		return []any{img}, nil, nil
	}
	var msg string
	var tail []string
	padLine := fmt.Sprintf("padded_image = F.pad(image, (%s,%s,%s,%s), 'reflect')", radiusInput, radiusInput, radiusInput, radiusInput)
	switch n.x.gen {
	case GenCurrent:
		msg = fmt.Sprintf("Argument #4: Padding size should be less than the corresponding input dimension, but got: padding (%d, %d) at dimension %d of input [%d, 3, %d, %d]\n", r, r, dim, img.B, img.H, img.W)
		tail = []string{
			"  File \"/srv/comfyui/comfy_api/internal/__init__.py\", line 149, in wrapped_func\n    return method(locked_class, **inputs)\n",
			"  File \"/srv/comfyui/comfy_api/latest/_io.py\", line 1570, in EXECUTE_NORMALIZED\n    to_return = cls.execute(*args, **kwargs)\n",
			"  File \"/srv/comfyui/comfy_extras/nodes_post_processing.py\", line 102, in execute\n    " + padLine + "\n",
			"  File \"/usr/lib/python3/dist-packages/torch/nn/functional.py\", line 5209, in pad\n    return torch._C._nn.pad(input, pad, mode, value)\n           ~~~~~~~~~~~~~~~~^^^^^^^^^^^^^^^^^^^^^^^^^\n",
		}
	default:
		msg = fmt.Sprintf("Argument #4: Padding size should be less than the corresponding input dimension, but got: padding (%d, %d) at dimension %d of input 4", r, r, dim)
		tail = []string{"  File \"/srv/comfyui/comfy_extras/nodes_post_processing.py\", line 113, in " + fn + "\n    " + padLine + "\n                   " + strings.Repeat("^", len(padLine)-15) + "\n"}
	}
	return nil, nil, n.fail("RuntimeError", msg, tail...)
}

func runImageToMask(n *nodeExec) ([]any, *obj, *nodeFailure) {
	img, f := n.image("image")
	if f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{maskT{W: img.W, H: img.H, B: img.B}}, nil, nil
}

func runLoadImage(n *nodeExec) ([]any, *obj, *nodeFailure) {
	name := n.strArg("image")
	kind, rel := splitAnnotation(name, kindInput)
	clean, _ := joinRel(rel)
	file, ok := n.x.in.srv.files.read(kind, clean)
	if !ok {
		return nil, nil, n.fail("FileNotFoundError", fmt.Sprintf("[Errno 2] No such file or directory: '/srv/comfyui-data/%s/%s'", kind, clean))
	}
	cfg, err := decodeImageConfig(file.data)
	if err != nil {
		return nil, nil, n.fail("PIL.UnidentifiedImageError", fmt.Sprintf("cannot identify image file '/srv/comfyui-data/%s/%s'", kind, clean))
	}
	if f := n.checkSize(cfg.Width, cfg.Height, 1); f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	sum := sha256.Sum256(file.data)
	img := imageT{W: cfg.Width, H: cfg.Height, B: 1, RGB: [3]uint8{sum[0], sum[1], sum[2]}}
	return []any{img, maskT{W: cfg.Width, H: cfg.Height, B: 1}}, nil, nil
}

// saveTarget is where SaveImage/PreviewImage writes one batch.
type saveTarget struct {
	folder, filename, subfolder, prefix string
	counter                             int
}

// saveImagePath follows folder_paths.get_save_image_path: server-side
// %tokens%, "/" in the prefix makes a subfolder, the counter continues after
// the highest counter already in the folder for that prefix.
func (n *nodeExec) saveImagePath(kind, prefix string, w, h int) (saveTarget, *nodeFailure) {
	if strings.Contains(prefix, "%") {
		now := time.Now()
		r := strings.NewReplacer(
			"%width%", strconv.Itoa(w), "%height%", strconv.Itoa(h),
			"%year%", strconv.Itoa(now.Year()), "%month%", fmt.Sprintf("%02d", int(now.Month())),
			"%day%", fmt.Sprintf("%02d", now.Day()), "%hour%", fmt.Sprintf("%02d", now.Hour()),
			"%minute%", fmt.Sprintf("%02d", now.Minute()), "%second%", fmt.Sprintf("%02d", now.Second()))
		prefix = r.Replace(prefix)
	}
	norm := pyNormpath(prefix)
	sub, file := "", norm
	if i := strings.LastIndex(norm, "/"); i >= 0 {
		sub, file = norm[:i], norm[i+1:]
		if sub == "" {
			sub = "/"
		}
	}
	folder, ok := joinRel(sub)
	if !ok {
		return saveTarget{}, n.fail("Exception", fmt.Sprintf("**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: %s\n         output_dir: /srv/comfyui-data/%s\n         commonpath: /", pyNormpath("/srv/comfyui-data/"+kind+"/"+sub), kind))
	}
	prefixLen := len(baseName(prefix))
	counter := 1
	for _, name := range n.x.in.srv.files.list(kind, folder) {
		if len(name) < prefixLen+1 {
			continue
		}
		p := name[:prefixLen+1]
		if p[:len(p)-1] != file || p[len(p)-1] != '_' {
			continue
		}
		digits := 0
		if d, err := strconv.Atoi(strings.SplitN(name[prefixLen+1:], "_", 2)[0]); err == nil {
			digits = d
		}
		if digits+1 > counter {
			counter = digits + 1
		}
	}
	return saveTarget{folder: folder, filename: file, subfolder: sub, prefix: prefix, counter: counter}, nil
}

// baseName is os.path.basename.
func baseName(p string) string {
	if i := strings.LastIndex(p, "/"); i >= 0 {
		return p[i+1:]
	}
	return p
}

// pyNormpath is os.path.normpath for POSIX paths.
func pyNormpath(p string) string {
	if p == "" {
		return "."
	}
	abs := strings.HasPrefix(p, "/")
	var out []string
	for _, seg := range strings.Split(p, "/") {
		switch seg {
		case "", ".":
		case "..":
			if len(out) > 0 && out[len(out)-1] != ".." {
				out = out[:len(out)-1]
			} else if !abs {
				out = append(out, "..")
			}
		default:
			out = append(out, seg)
		}
	}
	s := strings.Join(out, "/")
	if abs {
		return "/" + s
	}
	if s == "" {
		return "."
	}
	return s
}

func randomLetters(k int) string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	out := make([]byte, k)
	for i := range out {
		out[i] = 'a' + b[i]%26
	}
	return string(out)
}

// runSave is SaveImage (output folder) and PreviewImage (temp folder with a
// random "_temp_xxxxx" prefix).
func runSave(n *nodeExec, kind string) ([]any, *obj, *nodeFailure) {
	img, f := n.image("images")
	if f != nil {
		return nil, nil, f
	}
	prefix := "ComfyUI_temp_" + randomLetters(5)
	if kind == kindOutput {
		prefix = n.strArg("filename_prefix")
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	t, f := n.saveImagePath(kind, prefix, img.W, img.H)
	if f != nil {
		return nil, nil, f
	}
	texts := n.x.pngTexts()
	var results []any
	for i := 0; i < img.B; i++ {
		name := strings.ReplaceAll(t.filename, "%batch_num%", strconv.Itoa(i))
		file := fmt.Sprintf("%s_%05d_.png", name, t.counter)
		rel, _ := joinRel(t.folder, file)
		n.x.in.srv.files.put(kind, rel, solidPNG(img.W, img.H, img.RGB, texts))
		results = append(results, newObj("filename", file, "subfolder", t.subfolder, "type", kind))
		t.counter++
	}
	return []any{}, newObj("images", results), nil
}

func runSaveImageWebsocket(n *nodeExec) ([]any, *obj, *nodeFailure) {
	img, f := n.image("images")
	if f != nil {
		return nil, nil, f
	}
	step := n.x.in.srv.opts.classTime(n.class.name) / time.Duration(imax(1, img.B))
	for i := 0; i < img.B; i++ {
		if f := n.x.sleep(step); f != nil {
			return nil, nil, f
		}
		p := &preview{format: 2, mime: "image/png", data: solidPNG(img.W, img.H, img.RGB, nil)}
		if f := n.x.progress(n, i, img.B, p); f != nil {
			return nil, nil, f
		}
	}
	return []any{}, nil, nil
}

func runCheckpointLoader(n *nodeExec) ([]any, *obj, *nodeFailure) {
	name := n.strArg("ckpt_name")
	if n.x.in.loadCheckpoint(name) {
		if f := n.x.sleep(n.x.in.srv.opts.CheckpointLoad); f != nil {
			return nil, nil, f
		}
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{modelT{Ckpt: name}, clipT{Ckpt: name}, vaeT{Ckpt: name}}, nil, nil
}

func runLoraLoader(n *nodeExec) ([]any, *obj, *nodeFailure) {
	m, ok1 := n.arg("model").(modelT)
	c, ok2 := n.arg("clip").(clipT)
	if !ok1 || !ok2 {
		return nil, nil, n.fail("AttributeError", "'NoneType' object has no attribute 'clone'")
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	lora := n.strArg("lora_name")
	m.Loras = append(append([]string(nil), m.Loras...), lora)
	c.Loras = append(append([]string(nil), c.Loras...), lora)
	return []any{m, c}, nil, nil
}

func runCLIPTextEncode(n *nodeExec) ([]any, *obj, *nodeFailure) {
	if _, ok := n.arg("clip").(clipT); !ok {
		return nil, nil, n.fail("RuntimeError", "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint does not contain a valid clip or text encoder model.")
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{condT{Text: n.strArg("text")}}, nil, nil
}

func runEmptyLatent(n *nodeExec) ([]any, *obj, *nodeFailure) {
	w, h, b := int(n.intArg("width")), int(n.intArg("height")), int(n.intArg("batch_size"))
	if f := n.checkSize(w, h, b); f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{latentT{W: w / 8, H: h / 8, B: b}}, nil, nil
}

func runKSampler(n *nodeExec) ([]any, *obj, *nodeFailure) {
	lat, ok := n.arg("latent_image").(latentT)
	if _, isModel := n.arg("model").(modelT); !ok || !isModel {
		return nil, nil, n.fail("AttributeError", "'NoneType' object has no attribute 'shape'")
	}
	steps := int(n.intArg("steps"))
	if s, ok := n.x.in.srv.opts.ProgressSteps[n.class.name]; ok && s > 0 {
		steps = s
	}
	if steps < 1 {
		steps = 1
	}
	seed := uint64(0)
	if v, ok := n.arg("seed").(int64); ok {
		seed = uint64(v)
	}
	lat.Seed = seed ^ hashString(fmt.Sprint(n.arg("positive")))
	per := n.x.in.srv.opts.classTime(n.class.name) / time.Duration(steps)
	for i := 1; i <= steps; i++ {
		if f := n.x.sleep(per); f != nil {
			return nil, nil, f
		}
		var p *preview
		if n.x.in.srv.opts.Previews {
			p = &preview{format: 1, mime: "image/jpeg", data: previewJPEG(lat.W*8, lat.H*8, seedColor(lat.Seed, i, steps))}
		}
		if f := n.x.progress(n, i, steps, p); f != nil {
			return nil, nil, f
		}
	}
	return []any{lat}, nil, nil
}

func runVAEDecode(n *nodeExec) ([]any, *obj, *nodeFailure) {
	lat, ok := n.arg("samples").(latentT)
	if _, isVAE := n.arg("vae").(vaeT); !ok || !isVAE {
		return nil, nil, n.fail("AttributeError", "'NoneType' object has no attribute 'decode'")
	}
	if f := n.checkSize(lat.W*8, lat.H*8, lat.B); f != nil {
		return nil, nil, f
	}
	if f := n.work(); f != nil {
		return nil, nil, f
	}
	return []any{imageT{W: lat.W * 8, H: lat.H * 8, B: lat.B, RGB: seedColor(lat.Seed, 1, 1)}}, nil, nil
}

// work spends the class's time for a node without progress steps; classes
// listed in ProgressSteps report their steps while doing so.
func (n *nodeExec) work() *nodeFailure {
	d := n.x.in.srv.opts.classTime(n.class.name)
	steps := n.x.in.srv.opts.ProgressSteps[n.class.name]
	if steps <= 0 {
		return n.x.sleep(d)
	}
	per := d / time.Duration(steps)
	for i := 1; i <= steps; i++ {
		if f := n.x.sleep(per); f != nil {
			return f
		}
		var p *preview
		if n.x.in.srv.opts.Previews {
			p = &preview{format: 1, mime: "image/jpeg", data: previewJPEG(64, 64, seedColor(uint64(i), i, steps))}
		}
		if f := n.x.progress(n, i, steps, p); f != nil {
			return f
		}
	}
	return nil
}

func hashString(s string) uint64 {
	sum := sha256.Sum256([]byte(s))
	return binary.BigEndian.Uint64(sum[:8])
}

// seedColor is the colour of a generated image: fixed by the seed, fading in
// over the sampling steps.
func seedColor(seed uint64, step, steps int) [3]uint8 {
	var c [3]uint8
	for i := range c {
		full := uint8(seed >> (8 * i))
		c[i] = uint8(int(full) * step / imax(1, steps))
	}
	return c
}

// formatValue is ComfyUI's format_value for current_inputs in error reports.
func formatValue(v any) any {
	switch t := v.(type) {
	case nil, bool, int64, float64, string:
		return v
	case *obj, []any:
		return pyStr(v)
	case imageT:
		return tensorRepr([]int{t.B, t.H, t.W, 3}, [3]float64{float64(t.RGB[0]) / 255, float64(t.RGB[1]) / 255, float64(t.RGB[2]) / 255})
	case maskT:
		return tensorRepr([]int{t.B, t.H, t.W}, [3]float64{})
	case latentT:
		return "{'samples': " + tensorRepr([]int{t.B, 4, t.H, t.W}, [3]float64{}) + "}"
	case modelT:
		return "<comfy.model_patcher.ModelPatcher object at 0x7f3c2a1b4d90>"
	case clipT:
		return "<comfy.sd.CLIP object at 0x7f3c2a1b5e50>"
	case vaeT:
		return "<comfy.sd.VAE object at 0x7f3c2a1b6f10>"
	case condT:
		return "[[tensor([[[-0.3884,  0.0229, -0.0523,  ..., -0.4902, -0.3066,  0.0674]]]), {'pooled_output': tensor([[-0.4529,  0.2410,  0.1195,  ..., -0.7510,  0.1132, -0.0373]])}]]"
	}
	return pyStr(v)
}

// tensorRepr is a short torch-style rendering of a constant tensor.
func tensorRepr(shape []int, last [3]float64) string {
	row := fmt.Sprintf("[%.4f, %.4f, %.4f]", last[0], last[1], last[2])
	open := strings.Repeat("[", len(shape))
	close := strings.Repeat("]", len(shape))
	return "tensor(" + open[:len(open)-1] + row + ", ..., " + row + close[:len(close)-1] + ")"
}
