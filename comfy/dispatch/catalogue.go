package dispatch

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"slices"
	"strings"
	"sync"

	"github.com/comfyfarm/comfyfarm/comfy"
)

// catalogue is what placement knows of one node's /object_info: the classes
// it offers (and which are output nodes) and, for every input whose type is
// a list of choices, the values it accepts. Nodes with the same
// /object_info share one catalogue, and identical choice lists are shared
// between catalogues (sampler names are the same everywhere; only the model
// folders differ), so 500 nodes cost little more than their distinct lists.
type catalogue struct {
	key     [32]byte
	classes map[string]bool                  // class -> output node
	choices map[string]map[string]*choiceSet // class -> input -> choices
	// Counts for the node view.
	checkpoints, loras, packs int
}

// choiceSet is one enum input's accepted values, sorted (a sorted slice
// takes a fraction of a map's memory; lookups are a binary search).
type choiceSet struct {
	key    [32]byte
	sorted []string
}

func (c *choiceSet) has(v string) bool { _, ok := slices.BinarySearch(c.sorted, v); return ok }

// need is one enum value a workflow uses: class.input = value.
type need struct {
	class, input, value string
}

// allows reports whether the catalogue offers every class and every value.
func (c *catalogue) allows(classes []string, needs []need) bool {
	for _, cl := range classes {
		if _, ok := c.classes[cl]; !ok {
			return false
		}
	}
	for _, n := range needs {
		if set := c.choices[n.class][n.input]; set != nil && !set.has(n.value) {
			return false
		}
	}
	return true
}

// lacking lists the needs the catalogue does not offer (classes it lacks
// make their needs moot and are reported by the class check).
func (c *catalogue) lacking(needs []need) []need {
	var out []need
	for _, n := range needs {
		if set := c.choices[n.class][n.input]; set != nil && !set.has(n.value) {
			out = append(out, n)
		}
	}
	return out
}

// catalogueCache shares catalogues and choice lists between nodes. Entries
// no runner holds are dropped at each build.
type catalogueCache struct {
	mu   sync.Mutex
	cats map[[32]byte]*catalogue
	sets map[[32]byte]*choiceSet
	strs map[string]string // every value of sets, one copy each
}

func newCatalogueCache() *catalogueCache {
	return &catalogueCache{cats: make(map[[32]byte]*catalogue), sets: make(map[[32]byte]*choiceSet), strs: make(map[string]string)}
}

// checkpointInputs and loraInputs name the inputs whose choices count as a
// node's checkpoints and LoRAs in its view.
var (
	checkpointInputs = map[string]bool{"ckpt_name": true, "unet_name": true}
	loraInputs       = map[string]bool{"lora_name": true}
)

// build turns an object_info into a catalogue, sharing what it can. live
// lists the catalogues runners hold now (besides the one being replaced):
// everything else is dropped from the cache.
func (cc *catalogueCache) build(info map[string]comfy.ClassInfo, live []*catalogue) *catalogue {
	names := make([]string, 0, len(info))
	for name := range info {
		names = append(names, name)
	}
	slices.Sort(names)
	// The catalogue's key covers what placement reads of each class.
	h := sha256.New()
	combos := make(map[string]map[string][]string, len(names))
	for _, name := range names {
		ci := info[name]
		writeString(h, name)
		if ci.OutputNode {
			h.Write([]byte{1})
		} else {
			h.Write([]byte{0})
		}
		writeString(h, ci.PythonModule)
		in := ci.ComboInputs()
		combos[name] = in
		inputs := make([]string, 0, len(in))
		for input := range in {
			inputs = append(inputs, input)
		}
		slices.Sort(inputs)
		for _, input := range inputs {
			writeString(h, input)
			binary.Write(h, binary.LittleEndian, uint32(len(in[input])))
			for _, v := range in[input] {
				writeString(h, v)
			}
		}
	}
	var key [32]byte
	h.Sum(key[:0])

	cc.mu.Lock()
	defer cc.mu.Unlock()
	if c := cc.cats[key]; c != nil {
		cc.pruneLocked(append(live, c))
		return c
	}
	c := &catalogue{key: key, classes: make(map[string]bool, len(names)), choices: make(map[string]map[string]*choiceSet)}
	packs := map[string]bool{}
	for _, name := range names {
		ci := info[name]
		c.classes[name] = ci.OutputNode
		if pack, ok := strings.CutPrefix(ci.PythonModule, "custom_nodes."); ok {
			pack, _, _ = strings.Cut(pack, ".")
			packs[pack] = true
		}
		for input, values := range combos[name] {
			if c.choices[name] == nil {
				c.choices[name] = make(map[string]*choiceSet)
			}
			set := cc.setLocked(values)
			c.choices[name][input] = set
			if checkpointInputs[input] {
				c.checkpoints = max(c.checkpoints, len(set.sorted))
			}
			if loraInputs[input] {
				c.loras = max(c.loras, len(set.sorted))
			}
		}
	}
	c.packs = len(packs)
	cc.cats[key] = c
	cc.pruneLocked(append(live, c))
	return c
}

// catalogueJSON is a catalogue as the leader shares it with the replicas
// that do not read the nodes themselves.
type catalogueJSON struct {
	Classes     map[string]bool                `json:"classes"` // class -> output node
	Choices     map[string]map[string][]string `json:"choices"`
	Checkpoints int                            `json:"checkpoints"`
	Loras       int                            `json:"loras"`
	Packs       int                            `json:"packs"`
}

// encode writes c for the other replicas.
func (c *catalogue) encode() ([]byte, error) {
	j := catalogueJSON{Classes: c.classes, Choices: make(map[string]map[string][]string, len(c.choices)),
		Checkpoints: c.checkpoints, Loras: c.loras, Packs: c.packs}
	for class, inputs := range c.choices {
		m := make(map[string][]string, len(inputs))
		for input, set := range inputs {
			m[input] = set.sorted
		}
		j.Choices[class] = m
	}
	return json.Marshal(j)
}

// decode reads a catalogue another replica encoded, sharing what it can
// as build does.
func (cc *catalogueCache) decode(b []byte, live []*catalogue) (*catalogue, error) {
	key := sha256.Sum256(b)
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if c := cc.cats[key]; c != nil {
		cc.pruneLocked(append(live, c))
		return c, nil
	}
	var j catalogueJSON
	if err := json.Unmarshal(b, &j); err != nil {
		return nil, err
	}
	c := &catalogue{key: key, classes: j.Classes, choices: make(map[string]map[string]*choiceSet, len(j.Choices)),
		checkpoints: j.Checkpoints, loras: j.Loras, packs: j.Packs}
	if c.classes == nil {
		c.classes = map[string]bool{}
	}
	for class, inputs := range j.Choices {
		m := make(map[string]*choiceSet, len(inputs))
		for input, values := range inputs {
			m[input] = cc.setLocked(values)
		}
		c.choices[class] = m
	}
	cc.cats[key] = c
	cc.pruneLocked(append(live, c))
	return c, nil
}

// setLocked returns the shared set of these values.
func (cc *catalogueCache) setLocked(values []string) *choiceSet {
	sorted := slices.Clone(values)
	slices.Sort(sorted)
	sorted = slices.Compact(sorted)
	h := sha256.New()
	for _, v := range sorted {
		writeString(h, v)
	}
	var key [32]byte
	h.Sum(key[:0])
	if s := cc.sets[key]; s != nil {
		return s
	}
	s := &choiceSet{key: key, sorted: slices.Clip(sorted)}
	for i, v := range sorted {
		// Lists that differ by a file share the strings of the others.
		if old, ok := cc.strs[v]; ok {
			v = old
		} else {
			cc.strs[v] = v
		}
		sorted[i] = v
	}
	cc.sets[key] = s
	return s
}

// pruneLocked keeps only what live catalogues use.
func (cc *catalogueCache) pruneLocked(live []*catalogue) {
	keep := make(map[[32]byte]bool, len(live))
	for _, c := range live {
		if c != nil {
			keep[c.key] = true
		}
	}
	if len(keep) == len(cc.cats) {
		return
	}
	for k := range cc.cats {
		if !keep[k] {
			delete(cc.cats, k)
		}
	}
	used := map[[32]byte]bool{}
	for _, c := range cc.cats {
		for _, inputs := range c.choices {
			for _, s := range inputs {
				used[s.key] = true
			}
		}
	}
	dropped := false
	for k := range cc.sets {
		if !used[k] {
			delete(cc.sets, k)
			dropped = true
		}
	}
	if dropped {
		clear(cc.strs)
		for _, s := range cc.sets {
			for _, v := range s.sorted {
				cc.strs[v] = v
			}
		}
	}
}

// size reports the catalogues and choice lists held, for tests.
func (cc *catalogueCache) size() (cats, sets int) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return len(cc.cats), len(cc.sets)
}

func writeString(h interface{ Write([]byte) (int, error) }, s string) {
	var n [4]byte
	binary.LittleEndian.PutUint32(n[:], uint32(len(s)))
	h.Write(n[:])
	h.Write([]byte(s))
}

// maxNeedValue is the longest literal kept as a need.
const maxNeedValue = 1024

// needsOf lists the enum values a workflow uses: every literal string input
// (links are not literals), except the LoadImage inputs that name an upload
// of the job (dispatch rewrites them to the file it uploads). Whether an
// input is an enum is the node's business: a need whose input a node does
// not list as a choice constrains nothing there.
func needsOf(g *comfy.Graph, uploads []string) []need {
	var out []need
	for _, l := range g.Literals() {
		if comfy.IsLoadImageInput(l.Class, l.Input) && slices.Contains(uploads, l.Value) {
			continue
		}
		if len(l.Value) > maxNeedValue {
			continue // a prompt, not a file or a choice
		}
		n := need{class: l.Class, input: l.Input, value: l.Value}
		if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}
