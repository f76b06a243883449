package webhook_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/comfyfarm/comfyfarm/schema"
	"github.com/comfyfarm/comfyfarm/webhook"
)

func TestAllowListCheck(t *testing.T) {
	t.Parallel()
	a, err := webhook.ParseAllowList([]string{"10.0.0.0/8", "127.0.0.1", "hooks.example.com", "*.apps.example.org", " ::1 "})
	if err != nil {
		t.Fatal(err)
	}
	for raw, ok := range map[string]bool{
		"https://hooks.example.com/x?y=1":     true,
		"http://HOOKS.example.com./x":         true,
		"http://10.2.3.4:8080/cb":             true,
		"http://127.0.0.1:9/":                 true,
		"http://[::1]:80/":                    true,
		"https://a.b.apps.example.org/":       true,
		"https://apps.example.org/":           false, // the wildcard is for names under it
		"https://evil.com/?hooks.example.com": false,
		"https://hooks.example.com.evil.com/": false,
		"http://127.0.0.2/":                   false,
		"http://192.168.1.1/":                 false,
		"ftp://hooks.example.com/":            false,
		"file:///etc/passwd":                  false,
		"hooks.example.com/x":                 false,
		"http:///x":                           false,
		"https://hooks.example.com/#frag":     false,
		"http://hooks.example.com:0/":         false,
		"http://hooks.example.com:99999/":     false,
		"https://hooks.example.com/" + strings.Repeat("a", webhook.MaxURLBytes): false,
	} {
		err := a.Check(raw)
		if ok != (err == nil) {
			t.Errorf("Check(%q) = %v, want allowed %v", raw, err, ok)
		}
		var ve *schema.ValidationError
		if err != nil && (!errors.As(err, &ve) || ve.Field != "webhook_url") {
			t.Errorf("Check(%q): %v is not a webhook_url validation error", raw, err)
		}
	}
	var empty webhook.AllowList
	if err := empty.Check("http://127.0.0.1/"); err == nil || !strings.Contains(err.Error(), "webhooks.allow is empty") {
		t.Fatalf("empty list: %v", err)
	}
	for _, bad := range []string{"", "*", "a/b", "http://x", "exa mple.com", "-a.com", "*.", "10.0.0.0/33"} {
		if _, err := webhook.ParseAllowList([]string{bad}); err == nil {
			t.Errorf("ParseAllowList(%q) accepted", bad)
		}
	}
}

func TestTargetsCheckJobURL(t *testing.T) {
	t.Parallel()
	a, _ := webhook.ParseAllowList([]string{"127.0.0.1"})
	key, _ := webhook.DecodeSecret("0123456789abcdef0123")
	tg, err := webhook.NewTargets(map[string]webhook.Endpoint{"alpha": {Key: key}}, a)
	if err != nil {
		t.Fatal(err)
	}
	if err := tg.CheckJobURL("alpha", "http://127.0.0.1:5/x"); err != nil {
		t.Fatal(err)
	}
	if err := tg.CheckJobURL("beta", "http://127.0.0.1:5/x"); err == nil || !strings.Contains(err.Error(), "no webhook secret") {
		t.Fatalf("frontend without webhook: %v", err)
	}
	if _, err := webhook.NewTargets(map[string]webhook.Endpoint{"alpha": {Key: key, Events: []schema.JobState{"running"}}}, a); err == nil {
		t.Fatal("event running accepted")
	}
	if _, err := webhook.NewTargets(map[string]webhook.Endpoint{"alpha": {Key: key, URL: "gopher://x"}}, a); err == nil {
		t.Fatal("gopher url accepted")
	}
}

func TestDecodeSecret(t *testing.T) {
	t.Parallel()
	k, err := webhook.DecodeSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil || len(k) != 24 {
		t.Fatalf("whsec secret: %d bytes, %v", len(k), err)
	}
	if k, err := webhook.DecodeSecret("a raw secret of some length"); err != nil || string(k) != "a raw secret of some length" {
		t.Fatalf("raw secret: %q %v", k, err)
	}
	for _, bad := range []string{"whsec_not base64!", "short", "whsec_c2hvcnQ="} {
		if _, err := webhook.DecodeSecret(bad); err == nil {
			t.Errorf("DecodeSecret(%q) accepted", bad)
		}
	}
}

// The signature of the Standard Webhooks specification's own example.
func TestSignSpecExample(t *testing.T) {
	t.Parallel()
	key, err := webhook.DecodeSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := webhook.Sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Fatalf("signature %s, want %s", got, want)
	}
}

func FuzzAllowListCheck(f *testing.F) {
	for _, s := range []string{"http://127.0.0.1:1/x", "https://hooks.example.com/#a", "http://[::1]/", "http://a.b.example.org:65535/?q"} {
		f.Add(s)
	}
	a, err := webhook.ParseAllowList([]string{"127.0.0.0/8", "::1", "hooks.example.com", "*.example.org"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		err := a.Check(raw)
		if err == nil {
			u, perr := webhook.ParseURL(raw)
			if perr != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Hostname() == "" || len(raw) > webhook.MaxURLBytes {
				t.Fatalf("allowed %q (parse: %v)", raw, perr)
			}
			return
		}
		var ve *schema.ValidationError
		if !errors.As(err, &ve) || ve.Field != "webhook_url" {
			t.Fatalf("Check(%q): %v", raw, err)
		}
	})
}

func FuzzParseAllowList(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "*.example.com", "hooks.example.com", "::1", "[::1]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, entry string) {
		a, err := webhook.ParseAllowList([]string{entry})
		if err != nil {
			return
		}
		if a.Empty() {
			t.Fatalf("%q parsed to an empty list", entry)
		}
		_ = a.Check("http://127.0.0.1/")
	})
}
