package comfytest

import (
	"math"
	"strings"
	"testing"
)

// Expected values are what CPython 3 prints.

func TestFloatRepr(t *testing.T) {
	cases := map[float64]string{
		1: "1.0", 0.1: "0.1", 1e16: "1e+16", 1e15: "1000000000000000.0", 1.5e-5: "1.5e-05",
		0.0001: "0.0001", 123456789012345678: "1.2345678901234568e+17", math.Copysign(0, -1): "-0.0",
		2.5: "2.5", 1e-7: "1e-07", 100: "100.0", -7.25: "-7.25", 16384.5: "16384.5",
	}
	for f, want := range cases {
		if got := floatRepr(f); got != want {
			t.Errorf("repr(%v) = %q, want %q", f, got, want)
		}
	}
	if got := string(pyJSON([]any{math.Inf(1), math.NaN()})); got != "[Infinity, NaN]" {
		t.Errorf("json.dumps of non-finite floats: %s", got)
	}
}

func TestPyIntAndFloat(t *testing.T) {
	ints := []struct {
		in   any
		want any
		err  string
	}{
		{"12", int64(12), ""}, {" -3 ", int64(-3), ""}, {"1_000", int64(1000), ""},
		{"1__0", nil, "ValueError: invalid literal for int() with base 10: '1__0'"},
		{"1.5", nil, "ValueError: invalid literal for int() with base 10: '1.5'"},
		{3.9, int64(3), ""}, {-3.9, int64(-3), ""}, {true, int64(1), ""},
		{nil, nil, "TypeError: int() argument must be a string, a bytes-like object or a real number, not 'NoneType'"},
		{math.Inf(1), nil, "OverflowError: cannot convert float infinity to integer"},
		{newObj(), nil, "TypeError: int() argument must be a string, a bytes-like object or a real number, not 'dict'"},
	}
	for _, c := range ints {
		got, err := pyInt(c.in)
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("int(%s): %v, want %s", pyRepr(c.in), err, c.err)
			}
			continue
		}
		if err != nil || !pyEqual(got, c.want) {
			t.Errorf("int(%s) = %v, %v", pyRepr(c.in), got, err)
		}
	}
	floats := []struct {
		in   any
		want float64
		err  string
	}{
		{"1e5", 1e5, ""}, {" .5 ", 0.5, ""}, {"1_0.5", 10.5, ""}, {"-inf", math.Inf(-1), ""}, {int64(3), 3, ""},
		{"abc", 0, "ValueError: could not convert string to float: 'abc'"},
		{"0x10", 0, "ValueError: could not convert string to float: '0x10'"},
		{"", 0, "ValueError: could not convert string to float: ''"},
	}
	for _, c := range floats {
		got, err := pyFloat(c.in)
		if c.err != "" {
			if err == nil || err.Error() != c.err {
				t.Errorf("float(%s): %v, want %s", pyRepr(c.in), err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("float(%s) = %v, %v", pyRepr(c.in), got, err)
		}
	}
}

func TestReprAndJSON(t *testing.T) {
	reprs := map[string]string{"it's": `"it's"`, `a'b"c`: `'a\'b"c'`, "x\n": `'x\n'`, "é": `'é'`}
	for in, want := range reprs {
		if got := strRepr(in); got != want {
			t.Errorf("repr(%q) = %s, want %s", in, got, want)
		}
	}
	if got := pyRepr([]any{"a", int64(1), 2.0, nil, true, newObj("k", "v")}); got != `['a', 1, 2.0, None, True, {'k': 'v'}]` {
		t.Errorf("repr of a list: %s", got)
	}
	if got := string(pyJSON(newObj("a", "é😀", "b", 1.0, "c", int64(2)))); got != `{"a": "\u00e9\ud83d\ude00", "b": 1.0, "c": 2}` {
		t.Errorf("json.dumps: %s", got)
	}
	v, err := decodeJSON([]byte(`{"b": 1, "a": 2.0, "b": 3, "n": 123456789012345678901234567890}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := string(pyJSON(v)); got != `{"b": 3, "a": 2.0, "n": 123456789012345678901234567890}` {
		t.Errorf("json.loads keeps order, ints and the last duplicate: %s", got)
	}
}

func TestHeapMatchesPythonHeapq(t *testing.T) {
	// Pushing 22, 23, -24, 0.5 leaves [-24, 0.5, 22, 23] in heapq's array,
	// as GET /queue showed in the recorded e2 trace.
	var h promptHeap
	for i, n := range []float64{22, 23, -24, 0.5} {
		h.push(&queueItem{numF: n, promptID: string(rune('a' + i)), seq: int64(i)})
	}
	var got []string
	for _, it := range h {
		got = append(got, floatRepr(it.numF))
	}
	if strings.Join(got, " ") != "-24.0 0.5 22.0 23.0" {
		t.Errorf("heap array %v", got)
	}
	var order []string
	for len(h) > 0 {
		order = append(order, floatRepr(h.pop().numF))
	}
	if strings.Join(order, " ") != "-24.0 0.5 22.0 23.0" {
		t.Errorf("pop order %v", order)
	}
}
