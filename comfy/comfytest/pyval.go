package comfytest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/big"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"
)

// ComfyUI is a Python program: its request bodies are decoded by json.loads into
// dicts that keep key order and tell ints from floats, and every response is
// written by json.dumps. The fake keeps the same data model so that echoed
// graphs, error messages and float formatting come out the way ComfyUI writes
// them. A value is one of: nil, bool, int64, *big.Int, float64, string, []any or
// *obj.

// obj is a JSON object that keeps insertion order, like a Python dict.
type obj struct {
	keys []string
	vals map[string]any
}

// newObj builds an object from key/value pairs.
func newObj(kv ...any) *obj {
	o := &obj{vals: make(map[string]any, len(kv)/2)}
	for i := 0; i+1 < len(kv); i += 2 {
		o.set(kv[i].(string), kv[i+1])
	}
	return o
}

// set stores v under k; a new key goes last, an existing key keeps its place.
func (o *obj) set(k string, v any) *obj {
	if _, ok := o.vals[k]; !ok {
		o.keys = append(o.keys, k)
	}
	o.vals[k] = v
	return o
}

func (o *obj) get(k string) (any, bool) {
	if o == nil {
		return nil, false
	}
	v, ok := o.vals[k]
	return v, ok
}

func (o *obj) has(k string) bool {
	_, ok := o.get(k)
	return ok
}

func (o *obj) del(k string) {
	if _, ok := o.vals[k]; !ok {
		return
	}
	delete(o.vals, k)
	for i, kk := range o.keys {
		if kk == k {
			o.keys = append(o.keys[:i:i], o.keys[i+1:]...)
			break
		}
	}
}

func (o *obj) len() int {
	if o == nil {
		return 0
	}
	return len(o.keys)
}

// clone copies o deeply.
func (o *obj) clone() *obj {
	if o == nil {
		return nil
	}
	c := &obj{keys: append([]string(nil), o.keys...), vals: make(map[string]any, len(o.vals))}
	for k, v := range o.vals {
		c.vals[k] = cloneValue(v)
	}
	return c
}

func cloneValue(v any) any {
	switch t := v.(type) {
	case *obj:
		return t.clone()
	case []any:
		c := make([]any, len(t))
		for i, e := range t {
			c[i] = cloneValue(e)
		}
		return c
	case *big.Int:
		return new(big.Int).Set(t)
	default:
		return v
	}
}

// decodeJSON parses JSON the way Python's json.loads does: ordered objects,
// integers without a fraction or exponent stay integers (of any size), the last
// duplicate key wins but keeps the first key's place.
func decodeJSON(data []byte) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err == nil {
		return nil, errors.New("extra data after JSON value")
	}
	return v, nil
}

func decodeValue(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			o := newObj()
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				k, ok := kt.(string)
				if !ok {
					return nil, errors.New("object key is not a string")
				}
				v, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				o.set(k, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			return o, nil
		case '[':
			list := []any{}
			for dec.More() {
				v, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				list = append(list, v)
			}
			if _, err := dec.Token(); err != nil {
				return nil, err
			}
			return list, nil
		}
		return nil, fmt.Errorf("unexpected delimiter %q", t)
	case json.Number:
		return parseNumber(string(t)), nil
	case string, bool, nil:
		return t, nil
	}
	return nil, fmt.Errorf("unexpected token %v", tok)
}

func parseNumber(s string) any {
	if strings.ContainsAny(s, ".eE") {
		f, err := strconv.ParseFloat(s, 64)
		if err != nil && !errors.Is(err, strconv.ErrRange) {
			return math.NaN()
		}
		return f
	}
	if i, err := strconv.ParseInt(s, 10, 64); err == nil {
		return i
	}
	b, ok := new(big.Int).SetString(s, 10)
	if !ok {
		return math.NaN()
	}
	return b
}

// pyJSON encodes v like Python's json.dumps with default settings: ", " and
// ": " separators, ASCII-only output, floats in repr form.
func pyJSON(v any) []byte {
	var b bytes.Buffer
	writeJSON(&b, v)
	return b.Bytes()
}

func writeJSON(b *bytes.Buffer, v any) {
	switch t := v.(type) {
	case nil:
		b.WriteString("null")
	case bool:
		if t {
			b.WriteString("true")
		} else {
			b.WriteString("false")
		}
	case int:
		b.WriteString(strconv.Itoa(t))
	case int64:
		b.WriteString(strconv.FormatInt(t, 10))
	case uint64:
		b.WriteString(strconv.FormatUint(t, 10))
	case *big.Int:
		b.WriteString(t.String())
	case float64:
		b.WriteString(jsonFloat(t))
	case string:
		writeJSONString(b, t)
	case []any:
		b.WriteByte('[')
		for i, e := range t {
			if i > 0 {
				b.WriteString(", ")
			}
			writeJSON(b, e)
		}
		b.WriteByte(']')
	case []string:
		b.WriteByte('[')
		for i, e := range t {
			if i > 0 {
				b.WriteString(", ")
			}
			writeJSONString(b, e)
		}
		b.WriteByte(']')
	case *obj:
		if t == nil {
			b.WriteString("null")
			return
		}
		b.WriteByte('{')
		for i, k := range t.keys {
			if i > 0 {
				b.WriteString(", ")
			}
			writeJSONString(b, k)
			b.WriteString(": ")
			writeJSON(b, t.vals[k])
		}
		b.WriteByte('}')
	default:
		panic(fmt.Sprintf("comfytest: cannot encode %T", v))
	}
}

func writeJSONString(b *bytes.Buffer, s string) {
	b.WriteByte('"')
	for _, r := range s {
		switch {
		case r == '"':
			b.WriteString(`\"`)
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\b':
			b.WriteString(`\b`)
		case r == '\f':
			b.WriteString(`\f`)
		case r >= 0x20 && r <= 0x7e:
			b.WriteRune(r)
		case r > 0xffff:
			r -= 0x10000
			fmt.Fprintf(b, `\u%04x\u%04x`, 0xd800+(r>>10), 0xdc00+(r&0x3ff))
		default:
			fmt.Fprintf(b, `\u%04x`, r)
		}
	}
	b.WriteByte('"')
}

// jsonFloat formats f as json.dumps does (repr, with Infinity and NaN).
func jsonFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	return floatRepr(f)
}

// floatRepr formats f as Python's repr(float): the shortest digits that
// round-trip, fixed notation for exponents in [-4, 16), ".0" for whole numbers.
func floatRepr(f float64) string {
	switch {
	case math.IsNaN(f):
		return "nan"
	case math.IsInf(f, 1):
		return "inf"
	case math.IsInf(f, -1):
		return "-inf"
	}
	sign := ""
	if math.Signbit(f) {
		sign = "-"
		f = -f
	}
	if f == 0 {
		return sign + "0.0"
	}
	s := strconv.FormatFloat(f, 'e', -1, 64)
	mant, expStr, _ := strings.Cut(s, "e")
	exp, _ := strconv.Atoi(expStr)
	digits := strings.Replace(mant, ".", "", 1)
	if exp >= -4 && exp < 16 {
		var ip, fp string
		if exp >= 0 {
			if len(digits) <= exp+1 {
				ip = digits + strings.Repeat("0", exp+1-len(digits))
				fp = "0"
			} else {
				ip, fp = digits[:exp+1], digits[exp+1:]
			}
		} else {
			ip, fp = "0", strings.Repeat("0", -exp-1)+digits
		}
		return sign + ip + "." + fp
	}
	m := digits[:1]
	if len(digits) > 1 {
		m += "." + digits[1:]
	}
	return fmt.Sprintf("%s%se%+03d", sign, m, exp)
}

// pyStr is Python's str(v).
func pyStr(v any) string {
	switch t := v.(type) {
	case string:
		return t
	case float64:
		return floatRepr(t)
	}
	return pyRepr(v)
}

// pyRepr is Python's repr(v).
func pyRepr(v any) string {
	switch t := v.(type) {
	case nil:
		return "None"
	case bool:
		if t {
			return "True"
		}
		return "False"
	case int:
		return strconv.Itoa(t)
	case int64:
		return strconv.FormatInt(t, 10)
	case *big.Int:
		return t.String()
	case float64:
		return floatRepr(t)
	case string:
		return strRepr(t)
	case []any:
		parts := make([]string, len(t))
		for i, e := range t {
			parts[i] = pyRepr(e)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case []string:
		parts := make([]string, len(t))
		for i, e := range t {
			parts[i] = strRepr(e)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case *obj:
		parts := make([]string, 0, t.len())
		for _, k := range t.keys {
			parts = append(parts, strRepr(k)+": "+pyRepr(t.vals[k]))
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	return fmt.Sprint(v)
}

func strRepr(s string) string {
	q := byte('\'')
	if strings.Contains(s, "'") && !strings.Contains(s, `"`) {
		q = '"'
	}
	var b strings.Builder
	b.WriteByte(q)
	for _, r := range s {
		switch {
		case r == rune(q) || r == '\\':
			b.WriteByte('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, r)
		case r == utf8.RuneError:
			b.WriteString(`\ufffd`)
		default:
			b.WriteRune(r)
		}
	}
	b.WriteByte(q)
	return b.String()
}

// pyTypeName is type(v).__name__.
func pyTypeName(v any) string {
	switch v.(type) {
	case nil:
		return "NoneType"
	case bool:
		return "bool"
	case int, int64, *big.Int:
		return "int"
	case float64:
		return "float"
	case string:
		return "str"
	case []any:
		return "list"
	case *obj:
		return "dict"
	}
	return fmt.Sprintf("%T", v)
}

// pyErr is a Python exception raised inside the emulated server code.
type pyErr struct {
	Type string // full type name as ComfyUI reports it: "KeyError", "torch.OutOfMemoryError"
	Msg  string // str(exception)
	Site string // the source line that raised, for tracebacks (optional)
}

func (e *pyErr) Error() string { return e.Type + ": " + e.Msg }

func keyError(k any) *pyErr { return &pyErr{Type: "KeyError", Msg: pyRepr(k)} }

// pyTruthy is Python's bool(v).
func pyTruthy(v any) bool {
	switch t := v.(type) {
	case nil:
		return false
	case bool:
		return t
	case int64:
		return t != 0
	case int:
		return t != 0
	case *big.Int:
		return t.Sign() != 0
	case float64:
		return t != 0
	case string:
		return t != ""
	case []any:
		return len(t) > 0
	case *obj:
		return t.len() > 0
	}
	return true
}

// pyContains is Python's `key in container` for a string key.
func pyContains(container any, key string) (bool, *pyErr) {
	switch t := container.(type) {
	case *obj:
		return t.has(key), nil
	case []any:
		for _, e := range t {
			if s, ok := e.(string); ok && s == key {
				return true, nil
			}
		}
		return false, nil
	case string:
		return strings.Contains(t, key), nil
	}
	return false, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("argument of type '%s' is not iterable", pyTypeName(container))}
}

// pyGetItem is Python's container[key] for a key taken from JSON.
func pyGetItem(container any, key any) (any, *pyErr) {
	switch t := container.(type) {
	case *obj:
		ks, ok := key.(string)
		if !ok {
			if _, hashable := key.(*obj); hashable {
				return nil, &pyErr{Type: "TypeError", Msg: "unhashable type: 'dict'"}
			}
			if _, isList := key.([]any); isList {
				return nil, &pyErr{Type: "TypeError", Msg: "unhashable type: 'list'"}
			}
			return nil, keyError(key)
		}
		v, ok := t.get(ks)
		if !ok {
			return nil, keyError(key)
		}
		return v, nil
	case []any, string:
		i, ok := pyIndex(key)
		if !ok {
			what := "list"
			if _, s := container.(string); s {
				what = "string"
			}
			return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("%s indices must be integers or slices, not %s", what, pyTypeName(key))}
		}
		if l, isList := container.([]any); isList {
			if i < 0 {
				i += int64(len(l))
			}
			if i < 0 || i >= int64(len(l)) {
				return nil, &pyErr{Type: "IndexError", Msg: "list index out of range"}
			}
			return l[i], nil
		}
		rs := []rune(container.(string))
		if i < 0 {
			i += int64(len(rs))
		}
		if i < 0 || i >= int64(len(rs)) {
			return nil, &pyErr{Type: "IndexError", Msg: "string index out of range"}
		}
		return string(rs[i]), nil
	}
	return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("'%s' object is not subscriptable", pyTypeName(container))}
}

// pyIndex reports the integer value of an index key (bools are ints in Python).
func pyIndex(v any) (int64, bool) {
	switch t := v.(type) {
	case int64:
		return t, true
	case int:
		return int64(t), true
	case bool:
		if t {
			return 1, true
		}
		return 0, true
	case *big.Int:
		if t.IsInt64() {
			return t.Int64(), true
		}
		return math.MaxInt64, true
	}
	return 0, false
}

// pyInt is Python's int(v); the result is an int64 or a *big.Int.
func pyInt(v any) (any, *pyErr) {
	switch t := v.(type) {
	case int64, *big.Int:
		return t, nil
	case int:
		return int64(t), nil
	case bool:
		if t {
			return int64(1), nil
		}
		return int64(0), nil
	case float64:
		switch {
		case math.IsNaN(t):
			return nil, &pyErr{Type: "ValueError", Msg: "cannot convert float NaN to integer"}
		case math.IsInf(t, 0):
			return nil, &pyErr{Type: "OverflowError", Msg: "cannot convert float infinity to integer"}
		}
		tr := math.Trunc(t)
		if tr >= -9.2e18 && tr <= 9.2e18 {
			return int64(tr), nil
		}
		b, _ := new(big.Float).SetFloat64(tr).Int(nil)
		return b, nil
	case string:
		if n, ok := parsePyIntLiteral(t); ok {
			return n, nil
		}
		return nil, &pyErr{Type: "ValueError", Msg: "invalid literal for int() with base 10: " + strRepr(t)}
	}
	return nil, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("int() argument must be a string, a bytes-like object or a real number, not '%s'", pyTypeName(v))}
}

func parsePyIntLiteral(s string) (any, bool) {
	t := strings.TrimSpace(s)
	neg := false
	if t != "" && (t[0] == '+' || t[0] == '-') {
		neg = t[0] == '-'
		t = t[1:]
	}
	digits, ok := stripDigitUnderscores(t)
	if !ok {
		return nil, false
	}
	if neg {
		digits = "-" + digits
	}
	return parseNumber(digits), true
}

// stripDigitUnderscores accepts digits with single underscores between them.
func stripDigitUnderscores(t string) (string, bool) {
	if t == "" {
		return "", false
	}
	var b strings.Builder
	prevDigit := false
	for i := 0; i < len(t); i++ {
		c := t[i]
		switch {
		case c >= '0' && c <= '9':
			b.WriteByte(c)
			prevDigit = true
		case c == '_' && prevDigit && i+1 < len(t) && t[i+1] >= '0' && t[i+1] <= '9':
			prevDigit = false
		default:
			return "", false
		}
	}
	return b.String(), true
}

// pyFloat is Python's float(v).
func pyFloat(v any) (float64, *pyErr) {
	switch t := v.(type) {
	case float64:
		return t, nil
	case int64:
		return float64(t), nil
	case int:
		return float64(t), nil
	case *big.Int:
		f, _ := new(big.Float).SetInt(t).Float64()
		if math.IsInf(f, 0) {
			return 0, &pyErr{Type: "OverflowError", Msg: "int too large to convert to float"}
		}
		return f, nil
	case bool:
		if t {
			return 1, nil
		}
		return 0, nil
	case string:
		if f, ok := parsePyFloatLiteral(t); ok {
			return f, nil
		}
		return 0, &pyErr{Type: "ValueError", Msg: "could not convert string to float: " + strRepr(t)}
	}
	return 0, &pyErr{Type: "TypeError", Msg: fmt.Sprintf("float() argument must be a string or a real number, not '%s'", pyTypeName(v))}
}

func parsePyFloatLiteral(s string) (float64, bool) {
	t := strings.TrimSpace(s)
	body := t
	sign := ""
	if body != "" && (body[0] == '+' || body[0] == '-') {
		sign, body = body[:1], body[1:]
	}
	switch strings.ToLower(body) {
	case "inf", "infinity":
		f := math.Inf(1)
		if sign == "-" {
			f = -f
		}
		return f, true
	case "nan":
		return math.NaN(), true
	}
	// digits [. digits] [e [sign] digits], underscores only between digits.
	mant, exp, hasExp := strings.Cut(strings.ToLower(body), "e")
	ip, fp, hasDot := strings.Cut(mant, ".")
	var clean strings.Builder
	if ip != "" {
		d, ok := stripDigitUnderscores(ip)
		if !ok {
			return 0, false
		}
		clean.WriteString(d)
	}
	if hasDot {
		clean.WriteByte('.')
		if fp != "" {
			d, ok := stripDigitUnderscores(fp)
			if !ok {
				return 0, false
			}
			clean.WriteString(d)
		}
	}
	if ip == "" && fp == "" {
		return 0, false
	}
	if hasExp {
		es := ""
		if exp != "" && (exp[0] == '+' || exp[0] == '-') {
			es, exp = exp[:1], exp[1:]
		}
		d, ok := stripDigitUnderscores(exp)
		if !ok {
			return 0, false
		}
		clean.WriteString("e" + es + d)
	}
	f, err := strconv.ParseFloat(sign+clean.String(), 64)
	if err != nil && !errors.Is(err, strconv.ErrRange) {
		return 0, false
	}
	return f, true
}

// pyNumber reports v as a float64 for comparisons, and whether v is a number.
func pyNumber(v any) (float64, bool) {
	switch t := v.(type) {
	case int64:
		return float64(t), true
	case int:
		return float64(t), true
	case float64:
		return t, true
	case bool:
		if t {
			return 1, true
		}
		return 0, true
	case *big.Int:
		f, _ := new(big.Float).SetInt(t).Float64()
		return f, true
	}
	return 0, false
}

// pyLess is Python's a < b for numbers; ok is false when Python would raise.
func pyLess(a, b any) (less bool, ok bool) {
	if ab, isBig := a.(*big.Int); isBig {
		if bb, isBig2 := b.(*big.Int); isBig2 {
			return ab.Cmp(bb) < 0, true
		}
	}
	if ai, isInt := a.(int64); isInt {
		if bb, isBig := b.(*big.Int); isBig {
			return big.NewInt(ai).Cmp(bb) < 0, true
		}
	}
	if ab, isBig := a.(*big.Int); isBig {
		if bi, isInt := b.(int64); isInt {
			return ab.Cmp(big.NewInt(bi)) < 0, true
		}
	}
	af, aok := pyNumber(a)
	bf, bok := pyNumber(b)
	if !aok || !bok {
		return false, false
	}
	return af < bf, true
}

// pyEqual is Python's a == b for JSON values.
func pyEqual(a, b any) bool {
	af, aNum := pyNumber(a)
	bf, bNum := pyNumber(b)
	if aNum && bNum {
		ab, aBig := a.(*big.Int)
		bb, bBig := b.(*big.Int)
		if aBig && bBig {
			return ab.Cmp(bb) == 0
		}
		return af == bf
	}
	switch t := a.(type) {
	case nil:
		return b == nil
	case string:
		s, ok := b.(string)
		return ok && s == t
	case []any:
		u, ok := b.([]any)
		if !ok || len(u) != len(t) {
			return false
		}
		for i := range t {
			if !pyEqual(t[i], u[i]) {
				return false
			}
		}
		return true
	case *obj:
		u, ok := b.(*obj)
		if !ok || u.len() != t.len() {
			return false
		}
		for _, k := range t.keys {
			uv, ok := u.get(k)
			if !ok || !pyEqual(t.vals[k], uv) {
				return false
			}
		}
		return true
	}
	return false
}

// canonical renders v as a stable string for hashing (object keys sorted,
// numbers compared the Python way: 1 and 1.0 are the same key).
func canonical(v any) string {
	var b strings.Builder
	writeCanonical(&b, v)
	return b.String()
}

func writeCanonical(b *strings.Builder, v any) {
	switch t := v.(type) {
	case *obj:
		keys := append([]string(nil), t.keys...)
		sort.Strings(keys)
		b.WriteByte('{')
		for _, k := range keys {
			b.WriteString(strconv.Quote(k))
			b.WriteByte(':')
			writeCanonical(b, t.vals[k])
			b.WriteByte(',')
		}
		b.WriteByte('}')
	case []any:
		b.WriteByte('[')
		for _, e := range t {
			writeCanonical(b, e)
			b.WriteByte(',')
		}
		b.WriteByte(']')
	case string:
		b.WriteString(strconv.Quote(t))
	default:
		if f, ok := pyNumber(v); ok {
			if _, isBig := v.(*big.Int); isBig {
				b.WriteString("n" + v.(*big.Int).String())
				return
			}
			b.WriteString("n" + strconv.FormatFloat(f, 'g', -1, 64))
			return
		}
		b.WriteString(pyRepr(v))
	}
}
