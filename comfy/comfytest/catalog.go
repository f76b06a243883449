package comfytest

import (
	"embed"
	"fmt"
	"sort"
)

// The node catalogue is the object_info of the classes the recorded servers ran
// (catalog/classic.json from v0.3.10, catalog/current.json from v0.8.0, copied
// from the golden traces) plus the Stable Diffusion classes in catalog/sd.json.
// Validation reads input types, ranges and combos from it, exactly like ComfyUI
// reads INPUT_TYPES.

//go:embed catalog/*.json
var catalogFS embed.FS

// inputSpec is one declared input of a node class.
type inputSpec struct {
	name     string
	category string // "required" or "optional"
	typ      any    // type name, or []any of combo options
	config   any    // the spec as object_info lists it: [type] or [type, options]
	opts     *obj   // the options object, or nil
	// dynamic lists the combo options when they depend on server state
	// (files in the input folder, configured checkpoints).
	dynamic func(in *instance) []any
}

// nodeClass is one entry of the catalogue.
type nodeClass struct {
	name       string
	info       *obj
	inputs     []*inputSpec // required then optional, in input_order
	outputs    []string
	outputNode bool
	// validate lists the inputs passed to VALIDATE_INPUTS; when an input is
	// listed, ComfyUI skips its range and combo checks.
	validate []string
	hidden   *obj
}

func (c *nodeClass) input(name string) *inputSpec {
	for _, in := range c.inputs {
		if in.name == name {
			return in
		}
	}
	return nil
}

// objectInfo renders the class as GET /object_info does, with dynamic combos
// filled in.
func (c *nodeClass) objectInfo(in *instance) *obj {
	info := c.info.clone()
	inputs, _ := info.get("input")
	io, _ := inputs.(*obj)
	for _, spec := range c.inputs {
		if spec.dynamic == nil {
			continue
		}
		cat, _ := io.get(spec.category)
		co, _ := cat.(*obj)
		cfg, _ := co.get(spec.name)
		list, _ := cfg.([]any)
		if len(list) > 0 {
			list[0] = spec.dynamic(in)
		}
	}
	return info
}

// catalog maps class names to classes, in catalogue order.
type catalog struct {
	order   []string
	classes map[string]*nodeClass
}

func (c *catalog) get(name string) *nodeClass { return c.classes[name] }

var catalogs = map[Generation]*catalog{}

func init() {
	for _, g := range []Generation{GenLegacy, GenClassic, GenCurrent} {
		base := "catalog/classic.json"
		if g == GenCurrent {
			base = "catalog/current.json"
		}
		c := &catalog{classes: map[string]*nodeClass{}}
		for _, file := range []string{base, "catalog/sd.json"} {
			if err := c.load(file); err != nil {
				panic(fmt.Sprintf("comfytest: catalogue %s: %v", file, err))
			}
		}
		catalogs[g] = c
	}
}

func (c *catalog) load(file string) error {
	data, err := catalogFS.ReadFile(file)
	if err != nil {
		return err
	}
	v, err := decodeJSON(data)
	if err != nil {
		return err
	}
	all, ok := v.(*obj)
	if !ok {
		return fmt.Errorf("not an object")
	}
	for _, name := range all.keys {
		info := all.vals[name].(*obj)
		nc, err := parseClass(name, info)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		if _, dup := c.classes[name]; !dup {
			c.order = append(c.order, name)
		}
		c.classes[name] = nc
	}
	return nil
}

func parseClass(name string, info *obj) (*nodeClass, error) {
	nc := &nodeClass{name: name, info: info}
	inputV, _ := info.get("input")
	inputs, _ := inputV.(*obj)
	for _, cat := range []string{"required", "optional"} {
		cv, ok := inputs.get(cat)
		if !ok {
			continue
		}
		co := cv.(*obj)
		for _, in := range co.keys {
			cfg, ok := co.vals[in].([]any)
			if !ok || len(cfg) == 0 {
				return nil, fmt.Errorf("input %s: bad spec", in)
			}
			spec := &inputSpec{name: in, category: cat, typ: cfg[0], config: cfg}
			if len(cfg) > 1 {
				spec.opts, _ = cfg[1].(*obj)
			}
			nc.inputs = append(nc.inputs, spec)
		}
	}
	if h, ok := inputs.get("hidden"); ok {
		nc.hidden, _ = h.(*obj)
	}
	outs, _ := info.get("output")
	for _, o := range outs.([]any) {
		nc.outputs = append(nc.outputs, o.(string))
	}
	on, _ := info.get("output_node")
	nc.outputNode, _ = on.(bool)
	switch name {
	case "LoadImage":
		nc.validate = []string{"image"}
		nc.input("image").dynamic = func(in *instance) []any { return in.srv.files.imageList(kindInput) }
	case "CheckpointLoaderSimple":
		nc.input("ckpt_name").dynamic = func(in *instance) []any { return sortedAny(in.srv.Checkpoints()) }
	case "LoraLoader":
		nc.input("lora_name").dynamic = func(in *instance) []any { return sortedAny(in.srv.Loras()) }
	}
	return nc, nil
}

func sortedAny(list []string) []any {
	s := append([]string(nil), list...)
	sort.Strings(s)
	out := make([]any, len(s))
	for i, v := range s {
		out[i] = v
	}
	return out
}

// comboOptions reports the options of a combo input, or nil when the input is
// not a combo.
func (spec *inputSpec) comboOptions(in *instance) []any {
	if spec.dynamic != nil {
		return spec.dynamic(in)
	}
	if l, ok := spec.typ.([]any); ok {
		return l
	}
	return nil
}

// configFor renders input_config for an error body: [type, options], with
// {} for an input declared without options and dynamic combos filled in.
func (spec *inputSpec) configFor(in *instance) any {
	typ := cloneValue(spec.typ)
	if spec.dynamic != nil {
		typ = spec.dynamic(in)
	}
	opts := spec.opts.clone()
	if opts == nil {
		opts = newObj()
	}
	return []any{typ, opts}
}
