package comfy

import (
	"encoding/json"
	"path"
	"sort"
	"strings"
)

// modelInputs are input names that name a model file in core and common loader nodes.
var modelInputs = map[string]bool{
	"ckpt_name": true, "unet_name": true, "vae_name": true, "lora_name": true, "model_name": true,
	"control_net_name": true, "controlnet_name": true, "style_model_name": true, "gligen_name": true,
	"hypernetwork_name": true, "upscale_model": true, "upscale_model_name": true,
	"photomaker_model_name": true, "audio_encoder_name": true, "clip_vision_name": true,
	"ipadapter_file": true, "instantid_file": true, "pulid_file": true,
}

// modelExtensions are file extensions of model weights.
var modelExtensions = map[string]bool{
	".safetensors": true, ".ckpt": true, ".pt": true, ".pth": true, ".bin": true, ".gguf": true,
	".sft": true, ".pt2": true, ".onnx": true,
}

// Models lists the model files the workflow loads (sorted, distinct): string inputs named like
// a model input (ckpt_name, unet_name, lora_name, vae_name, clip_name*, model_name,
// control_net_name, ...) or whose value ends in a model-weights extension. The scheduler uses
// it to prefer a server that has them loaded.
func (g *Graph) Models() []string {
	set := map[string]bool{}
	for _, n := range g.nodes {
		for name, raw := range n.inputs {
			s, ok := stringInput(raw)
			if !ok || s == "" || strings.EqualFold(s, "none") {
				continue
			}
			if modelInputs[name] || strings.HasPrefix(name, "clip_name") ||
				modelExtensions[strings.ToLower(path.Ext(s))] {
				set[s] = true
			}
		}
	}
	return sortedSet(set)
}

// DefaultOutputClasses are core ComfyUI node classes with output_node set (v0.8.0). Prefer the
// server's /object_info (ClassInfo.OutputNode) when it is at hand.
var DefaultOutputClasses = map[string]bool{
	"SaveImage": true, "PreviewImage": true, "SaveAnimatedWEBP": true, "SaveAnimatedPNG": true,
	"SaveImageWebsocket": true, "SaveLatent": true, "SaveVideo": true, "SaveWEBM": true,
	"SaveAudio": true, "SaveAudioMP3": true, "SaveAudioOpus": true, "PreviewAudio": true,
	"SaveGLB": true, "Preview3D": true, "PreviewAny": true, "MaskPreview": true, "SaveSVGNode": true,
	"CheckpointSave": true, "ImageOnlyCheckpointSave": true, "CLIPSave": true, "VAESave": true,
	"ModelSave": true, "LoraSave": true, "SaveLoRA": true,
}

// OutputNodes lists the ids of output nodes, numeric-aware sorted. isOutput decides by class
// (nil: DefaultOutputClasses).
func (g *Graph) OutputNodes(isOutput func(classType string) bool) []string {
	if isOutput == nil {
		isOutput = func(ct string) bool { return DefaultOutputClasses[ct] }
	}
	var out []string
	for _, id := range g.ids {
		if isOutput(g.nodes[id].classType) {
			out = append(out, id)
		}
	}
	return out
}

// loadImageClasses are the nodes whose "image" input names a file in the input folder.
var loadImageClasses = map[string]bool{"LoadImage": true, "LoadImageMask": true}

// LoadImageRefs lists the files LoadImage/LoadImageMask nodes read (sorted, distinct).
func (g *Graph) LoadImageRefs() []string {
	set := map[string]bool{}
	for _, n := range g.nodes {
		if !loadImageClasses[n.classType] {
			continue
		}
		if s, ok := stringInput(n.inputs["image"]); ok && s != "" {
			set[s] = true
		}
	}
	return sortedSet(set)
}

// RewriteImages replaces LoadImage/LoadImageMask "image" inputs found in names (uploaded
// name -> the value the server gave it, see UploadResult.LoadImageValue) and returns how many
// inputs changed.
func (g *Graph) RewriteImages(names map[string]string) int {
	count := 0
	for _, id := range g.ids {
		n := g.nodes[id]
		if !loadImageClasses[n.classType] {
			continue
		}
		s, ok := stringInput(n.inputs["image"])
		if !ok {
			continue
		}
		if to, found := names[s]; found {
			n.inputs["image"] = mustJSON(to)
			count++
		}
	}
	return count
}

// SetFilenamePrefix sets every string filename_prefix input to prefix (a "/" in it makes a
// subfolder) and returns how many changed. A prefix unique per job forces fresh outputs: a
// save node whose inputs did not change would otherwise be served from cache, pointing at an
// older job's files.
func (g *Graph) SetFilenamePrefix(prefix string) int {
	count := 0
	for _, id := range g.ids {
		n := g.nodes[id]
		if _, ok := stringInput(n.inputs["filename_prefix"]); ok {
			n.inputs["filename_prefix"] = mustJSON(prefix)
			count++
		}
	}
	return count
}

func mustJSON(s string) json.RawMessage {
	b, _ := json.Marshal(s) // a string always encodes
	return b
}

// Literal is a string input set in the workflow itself (not linked from another node).
type Literal struct {
	NodeID string
	Class  string
	Input  string
	Value  string
}

// Literals lists the string inputs of every node, in node id order and by input name. Links
// ([id, index]) and non-string values are left out.
func (g *Graph) Literals() []Literal {
	var out []Literal
	for _, id := range g.ids {
		n := g.nodes[id]
		names := make([]string, 0, len(n.inputs))
		for name := range n.inputs {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if s, ok := stringInput(n.inputs[name]); ok {
				out = append(out, Literal{NodeID: id, Class: n.classType, Input: name, Value: s})
			}
		}
	}
	return out
}

// IsLoadImageInput reports whether class.input names a file of the input folder that
// RewriteImages may replace.
func IsLoadImageInput(class, input string) bool {
	return loadImageClasses[class] && input == "image"
}
