package schema

import (
	"errors"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

func TestCheckIdent(t *testing.T) {
	for v, ok := range map[string]bool{
		"bob": true, "BOB": true, "bo b": true, "u-1.x@z": true, "ünïc": true, "\U0001F600": true,
		"":                     false,
		"bob ":                 false,
		" bob":                 false,
		"bob\t":                false,
		"bob\n":                false,
		"bo\x00b":              false,
		"bob\u00a0":            false, // no-break space
		"\u3000bob":            false, // ideographic space
		"bo\u200bb":            false, // zero-width space
		"bo\u202eb":            false, // right-to-left override
		"bo\x7fb":              false,
		"\xffbob":              false,
		strings.Repeat("x", 9): false,
		strings.Repeat("x", 8): true,
	} {
		err := CheckIdent("user_id", v, 8)
		if (err == nil) != ok {
			t.Errorf("CheckIdent(%q) = %v, want ok %v", v, err, ok)
		}
		var ve *ValidationError
		if err != nil && (!errors.As(err, &ve) || ve.Field != "user_id") {
			t.Errorf("CheckIdent(%q) = %#v, want a ValidationError naming user_id", v, err)
		}
	}
}

// FuzzCheckIdent: whatever it accepts is UTF-8 without white space at its
// ends and without invisible characters.
func FuzzCheckIdent(f *testing.F) {
	for _, s := range []string{"bob", "bob ", "bob\t", "a b", "\u00a0", "\xff"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		if CheckIdent("id", v, 255) != nil {
			return
		}
		if v == "" || len(v) > 255 || !utf8.ValidString(v) || strings.TrimSpace(v) != v ||
			strings.IndexFunc(v, func(r rune) bool { return !unicode.IsPrint(r) }) >= 0 {
			t.Fatalf("accepted %q", v)
		}
	})
}
